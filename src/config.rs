//! Configuration: the agent file and one TOML file per site, parsed and validated once.
//!
//! The raw `serde` structs mirror the file format exactly (`deny_unknown_fields`, so a
//! typo is an error, not a silently ignored key); [`load`] turns them into validated,
//! immutable values with durations, sizes, signals and users resolved. Every error names
//! the file, the key and what is accepted, and loading has no side effects, so a bad file
//! on reload changes nothing that runs.
//!
//! Users and groups are resolved from `/etc/passwd` and `/etc/group` (NSS modules such as
//! LDAP are not consulted).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod sandbox;

/// The agent file read when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/hatchery/hatchery.toml";
/// Most workers one site may ask for.
pub const MAX_WORKERS: u32 = 4096;
/// Most listeners one site may declare.
pub const MAX_LISTENERS: usize = 16;

/// A configuration error: which file, which key, and what is wrong or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {message}", .file.display())]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// The key at fault (dotted path), or `-` for the whole file.
    pub key: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

fn err(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- raw file format

/// The agent file, as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Path of the control socket.
    pub control_socket: Option<PathBuf>,
    /// Directory for logs and the notify socket.
    pub state_dir: Option<PathBuf>,
    /// Directory holding one `<site>.toml` per site.
    pub sites_dir: Option<PathBuf>,
    /// `auto`, `off`, or the path of the cgroup v2 directory to manage.
    pub cgroup_base: Option<String>,
    /// Default log rotation for every site.
    pub logs: Option<RawLogs>,
    /// Memory kept for the host and the agent: site budgets must leave this much free.
    pub memory_reserve: Option<String>,
}

/// A site file, as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    /// The site's name (must match the file name).
    pub name: Option<String>,
    /// The worker's argv.
    pub command: Option<Vec<String>>,
    /// How many workers: a number, or `"auto"` (as many as the memory budget holds).
    pub workers: Option<RawWorkers>,
    /// With `workers = "auto"`: the fewest workers.
    pub workers_min: Option<u32>,
    /// With `workers = "auto"`: the most workers.
    pub workers_max: Option<u32>,
    /// Expected memory of one worker, until workers have been measured.
    pub worker_memory: Option<String>,
    /// The user the workers run as.
    pub user: Option<String>,
    /// The group the workers run as.
    pub group: Option<String>,
    /// The working directory of the workers.
    pub workdir: Option<PathBuf>,
    /// The release symlink: each generation runs its target, `{release}` in `command`,
    /// `workdir` and `env`.
    pub release: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Listeners bound by the agent and passed to every worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<RawListen>,
    /// How workers are stopped.
    pub stop: Option<RawStop>,
    /// How crashed workers are restarted.
    pub restart: Option<RawRestart>,
    /// How readiness is decided.
    pub ready: Option<RawReady>,
    /// How deploys go.
    pub deploy: Option<RawDeploy>,
    /// Log rotation for this site.
    pub logs: Option<RawLogs>,
    /// The site's memory budget (`memory.max` of its cgroup).
    pub memory: Option<String>,
    /// Most processes the site may have (`pids.max`).
    pub pids_max: Option<u32>,
    /// CPU weight of the site against others (`cpu.weight`, 1 to 10000).
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of each worker (`memory.max` of its leaf).
    pub memory_max: Option<String>,
    /// Memory level above which each worker is throttled and reclaimed (`memory.high`).
    pub memory_high: Option<String>,
    /// The sandbox (`[sandbox]`).
    pub sandbox: Option<sandbox::RawSandbox>,
}

/// `workers`: a count or `"auto"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawWorkers {
    /// A fixed count.
    Count(u32),
    /// `"auto"`.
    Auto(String),
}

/// `[[listen]]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// The fd name passed in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// A TCP address, `host:port`.
    pub tcp: Option<String>,
    /// A unix socket path.
    pub unix: Option<PathBuf>,
    /// The listen backlog.
    pub backlog: Option<u32>,
}

/// `[stop]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStop {
    /// The signal asking a worker to stop.
    pub signal: Option<String>,
    /// How long before `SIGKILL`.
    pub timeout: Option<String>,
}

/// `[restart]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    /// The delay after the second quick crash.
    pub backoff_initial: Option<String>,
    /// The longest delay.
    pub backoff_max: Option<String>,
    /// How long a worker must run for its backoff to reset.
    pub healthy_after: Option<String>,
    /// `{ exits = N, within = "10s" }`.
    pub flapping: Option<RawFlapping>,
}

/// `[restart] flapping`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlapping {
    /// Exits of one worker slot...
    pub exits: Option<u32>,
    /// ...within this window mark the site failed.
    pub within: Option<String>,
}

/// `[ready]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReady {
    /// `notify`, `tcp` or `none`.
    pub check: Option<String>,
    /// How long a worker may take to become ready.
    pub timeout: Option<String>,
    /// How long a worker must stay up once ready before `start`, `scale` and `restart`
    /// call it a success.
    pub settle: Option<String>,
}

/// `[deploy]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    /// How long a new generation's workers must stay up, all ready, before the flip.
    pub probation: Option<String>,
}

/// `[logs]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogs {
    /// Rotate when the file reaches this size.
    pub max_size: Option<String>,
    /// How many rotated files to keep.
    pub keep: Option<u32>,
}

// ---------------------------------------------------------------- validated values

/// A validated site name: 1 to 64 of `[a-z0-9_-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SiteName(String);

impl SiteName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<SiteName, String> {
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        let first_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if name.is_empty() || name.len() > 64 || !first_ok || !name.chars().all(ok_char) {
            return Err(format!(
                "invalid site name {name:?}: use 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
            ));
        }
        Ok(SiteName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the agent manages cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupBase {
    /// The delegated cgroup the agent runs in, or `/sys/fs/cgroup/hatchery` when run as
    /// root outside a delegated unit.
    Auto,
    /// No cgroups: no accounting, no tree kill.
    Off,
    /// This cgroup v2 directory.
    Path(PathBuf),
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent file.
    pub file: PathBuf,
    /// The control socket.
    pub control_socket: PathBuf,
    /// The state directory (logs, notify socket).
    pub state_dir: PathBuf,
    /// The sites directory.
    pub sites_dir: PathBuf,
    /// Where cgroups live.
    pub cgroup_base: CgroupBase,
    /// Memory the site budgets must leave to the host.
    pub memory_reserve: u64,
    /// The sites, sorted by name.
    pub sites: Vec<SiteConfig>,
}

/// A listener address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// TCP on this address.
    Tcp(SocketAddr),
    /// A unix stream socket at this path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp {a}"),
            ListenAddr::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// One listener of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The address.
    pub addr: ListenAddr,
    /// The backlog.
    pub backlog: u32,
}

/// How a site's workers are stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPolicy {
    /// The first signal.
    pub signal: Signal,
    /// When `SIGKILL` follows.
    pub timeout: Duration,
}

/// Restart backoff and flapping control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the restart after the second crash in a row.
    pub backoff_initial: Duration,
    /// The longest delay.
    pub backoff_max: Duration,
    /// A worker that ran this long resets its backoff.
    pub healthy_after: Duration,
    /// This many exits of one slot...
    pub flapping_exits: u32,
    /// ...within this window mark the site failed.
    pub flapping_within: Duration,
}

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyCheck {
    /// `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// The site's TCP listener accepted a probe connection.
    Tcp,
    /// Ready as soon as it runs.
    None,
}

/// Readiness policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyPolicy {
    /// The check.
    pub check: ReadyCheck,
    /// How long a worker may take.
    pub timeout: Duration,
    /// How long a ready worker must stay up before it counts as settled: a worker that
    /// exits within it fails the operation that started it.
    pub settle: Duration,
}

/// Deploy policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployPolicy {
    /// How long every worker of a new generation must stay up and ready before the flip.
    pub probation: Duration,
}

/// The text in `command`, `workdir` and `env` replaced by a generation's release.
pub const RELEASE_PLACEHOLDER: &str = "{release}";

/// Log rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPolicy {
    /// Rotate at this size in bytes.
    pub max_size: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            max_size: 10 << 20,
            keep: 3,
        }
    }
}

/// A signal number, with its name for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

impl Signal {
    /// Parses `SIGTERM`, `TERM`, `term` or a number from 1 to 64.
    pub fn parse(s: &str) -> Result<Signal, String> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some((_, n)) = SIGNALS.iter().find(|(name, _)| *name == bare) {
            return Ok(Signal(*n));
        }
        match s.trim().parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) => Ok(Signal(n)),
            _ => Err(format!(
                "unknown signal {s:?}: use a name ({}) with or without SIG, or a number from 1 to 64",
                SIGNALS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// `SIGTERM`, `SIGRTMIN+2`, or the number for signals without a name.
    pub fn name(self) -> String {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => format!("SIG{name}"),
            None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&self.0) => {
                format!("SIGRTMIN+{}", self.0 - libc::SIGRTMIN())
            }
            None => self.0.to_string(),
        }
    }
}

/// A validated site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// Its name.
    pub name: SiteName,
    /// The file it came from.
    pub file: PathBuf,
    /// The worker argv.
    pub command: Vec<String>,
    /// The configured worker count (for `"auto"`: `workers_max`).
    pub workers: u32,
    /// `workers = "auto"`: sized by the memory budget.
    pub auto: Option<AutoWorkers>,
    /// The user name (as written; `None` means the agent's own user).
    pub user: Option<String>,
    /// The group name (as written).
    pub group: Option<String>,
    /// The resolved uid.
    pub uid: u32,
    /// The resolved gid.
    pub gid: u32,
    /// The working directory.
    pub workdir: Option<PathBuf>,
    /// The release symlink (each generation runs its resolved target).
    pub release: Option<PathBuf>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Listeners.
    pub listen: Vec<ListenSpec>,
    /// Stop policy.
    pub stop: StopPolicy,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Readiness policy.
    pub ready: ReadyPolicy,
    /// Deploy policy.
    pub deploy: DeployPolicy,
    /// Log rotation.
    pub logs: LogPolicy,
    /// cgroup limits.
    pub limits: Limits,
    /// The sandbox.
    pub sandbox: sandbox::SandboxConfig,
}

/// `workers = "auto"`: as many workers as the budget holds, between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoWorkers {
    /// The fewest.
    pub min: u32,
    /// The most.
    pub max: u32,
}

/// cgroup v2 limits of a site and of each of its workers (enforced where the controllers
/// are available; `check` and `status` say when they are not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Site budget in bytes (`memory.max` of `sites/<site>`).
    pub memory: Option<u64>,
    /// `pids.max` of the site.
    pub pids_max: Option<u32>,
    /// `cpu.weight` of the site.
    pub cpu_weight: Option<u32>,
    /// `memory.max` of each worker leaf.
    pub worker_memory_max: Option<u64>,
    /// `memory.high` of each worker leaf.
    pub worker_memory_high: Option<u64>,
    /// Expected memory of one worker (`worker_memory`), before measurements.
    pub worker_memory: Option<u64>,
}

impl Limits {
    /// The per-worker memory to assume before any worker has been measured: the
    /// configured estimate, else the per-worker hard limit, else `memory.high`.
    pub fn worker_estimate(&self) -> Option<u64> {
        self.worker_memory
            .or(self.worker_memory_max)
            .or(self.worker_memory_high)
    }
}

// ---------------------------------------------------------------- parsing helpers

/// Parses `250ms`, `30s`, `1.5s`, `5m`, `1h` (a number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => f64::NAN,
    };
    let value: f64 = num.parse().unwrap_or(f64::NAN);
    let secs = value * scale;
    if !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!(
            "invalid duration {s:?}: use a number and a unit (ms, s, m, h), e.g. \"250ms\" or \"30s\""
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a size: bytes, or a number with `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => 0,
    };
    match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(v) if mult != 0 => Ok(v),
        _ => Err(format!(
            "invalid size {s:?}: use a number of bytes or a number with K, M or G (KiB, MiB, GiB), e.g. \"10M\""
        )),
    }
}

/// Formats a size the way [`parse_size`] reads it.
pub fn format_size(v: u64) -> String {
    if v > 0 && v % (1 << 30) == 0 {
        format!("{}G", v >> 30)
    } else if v > 0 && v % (1 << 20) == 0 {
        format!("{}M", v >> 20)
    } else if v > 0 && v % (1 << 10) == 0 {
        format!("{}K", v >> 10)
    } else {
        v.to_string()
    }
}

fn read_toml<T: for<'de> Deserialize<'de>>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| err(file, "-", format!("cannot read the file: {e}")))?;
    parse_toml(file, &text)
}

fn parse_toml<T: for<'de> Deserialize<'de>>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let where_ = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        // toml reports the offending key in the message for unknown fields.
        err(file, "-", format!("{msg}{where_}"))
    })
}

// ---------------------------------------------------------------- users and groups

/// A user entry from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Looks a user up by name or numeric uid in `/etc/passwd`.
pub fn lookup_user(name: &str) -> Option<UserEntry> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    let entries = text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7).then(|| UserEntry {
            name: f[0].to_string(),
            uid: f[2].parse().unwrap_or(u32::MAX),
            gid: f[3].parse().unwrap_or(u32::MAX),
            home: f[5].to_string(),
            shell: f[6].to_string(),
        })
    });
    let mut by_uid = None;
    for e in entries {
        if e.name == name {
            return Some(e);
        }
        if name.parse::<u32>().ok() == Some(e.uid) {
            by_uid = Some(e);
        }
    }
    by_uid
}

/// Looks a group up by name or numeric gid in `/etc/group`.
pub fn lookup_group(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            return f[2].parse().ok();
        }
    }
    name.parse().ok()
}

// ---------------------------------------------------------------- validation

/// A site file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenSite {
    /// The site's name: its file's name without `.toml`.
    pub name: String,
    /// Why (the file, key and message).
    pub error: ConfigError,
}

/// Reads and validates the agent file at `path` and every `*.toml` in its sites dir; any
/// error is an error (reload and `check` change nothing on a bad file).
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    load_keeping(path, &|_| false)
}

/// As [`load`] for a running agent: sites for which `holds` is true (running, with the
/// same listeners) keep their addresses, and a conflict is blamed on the other site.
pub fn load_keeping(
    path: &Path,
    holds: &dyn Fn(&SiteConfig) -> bool,
) -> Result<AgentConfig, ConfigError> {
    let (config, broken) = load_each_keeping(path, holds)?;
    match broken.into_iter().next() {
        Some(b) => Err(b.error),
        None => Ok(config),
    }
}

/// As [`load`], but a bad site file only puts that site aside: the configuration holds
/// every valid site, and the others come back with their errors (the agent starts the
/// valid ones and shows the others as failed). Errors of the agent file itself are still
/// errors. Where two sites want one address, or budgets overflow, the later file (in name
/// order) is the one put aside.
pub fn load_each(path: &Path) -> Result<(AgentConfig, Vec<BrokenSite>), ConfigError> {
    load_each_keeping(path, &|_| false)
}

fn load_each_keeping(
    path: &Path,
    holds: &dyn Fn(&SiteConfig) -> bool,
) -> Result<(AgentConfig, Vec<BrokenSite>), ConfigError> {
    let raw: RawAgent = read_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let control_socket = rel(raw
        .control_socket
        .unwrap_or_else(|| PathBuf::from("/run/hatchery/control.sock")));
    let state_dir = rel(raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/hatchery")));
    let sites_dir = rel(raw
        .sites_dir
        .unwrap_or_else(|| PathBuf::from("/etc/hatchery/sites.d")));
    let cgroup_base = match raw.cgroup_base.as_deref() {
        None | Some("auto") => CgroupBase::Auto,
        Some("off") => CgroupBase::Off,
        Some(p) if p.starts_with('/') => CgroupBase::Path(PathBuf::from(p)),
        Some(other) => {
            return Err(err(
                path,
                "cgroup_base",
                format!("invalid value {other:?}: use \"auto\", \"off\" or an absolute path"),
            ));
        }
    };
    let default_logs = validate_logs(path, "logs", raw.logs.as_ref(), LogPolicy::default())?;
    let memory_reserve = match &raw.memory_reserve {
        Some(s) => parse_size(s).map_err(|m| err(path, "memory_reserve", m))?,
        None => DEFAULT_MEMORY_RESERVE,
    };

    let mut sites = Vec::new();
    let mut broken = Vec::new();
    let entries = std::fs::read_dir(&sites_dir).map_err(|e| {
        err(
            path,
            "sites_dir",
            format!("cannot read {}: {e}", sites_dir.display()),
        )
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match read_toml::<RawSite>(&file).and_then(|raw| validate_site(&file, &raw, default_logs)) {
            Ok(site) => sites.push(site),
            Err(error) => broken.push(BrokenSite { name, error }),
        }
    }
    // Those that hold their addresses first (stable: then in file order).
    sites.sort_by_key(|s| !holds(s));
    let mut kept: Vec<SiteConfig> = Vec::new();
    for site in sites {
        if let Err(error) = check_conflicts(&kept, &site) {
            broken.push(BrokenSite {
                name: site.name.to_string(),
                error,
            });
            continue;
        }
        let mut with = kept.clone();
        with.push(site.clone());
        if let Some(total) = host_memory() {
            if let Err(e) = check_budgets(
                path,
                &with,
                memory_reserve,
                total,
                "the host's memory (MemTotal)",
            ) {
                broken.push(BrokenSite {
                    name: site.name.to_string(),
                    error: err(&site.file, "memory", e.message),
                });
                continue;
            }
        }
        kept.push(site);
    }
    broken.sort_by(|a, b| a.error.file.cmp(&b.error.file));
    kept.sort_by(|a, b| a.file.cmp(&b.file));
    let sites = kept;
    let config = AgentConfig {
        file: path.to_path_buf(),
        control_socket,
        state_dir,
        sites_dir,
        cgroup_base,
        memory_reserve,
        sites,
    };
    Ok((config, broken))
}

/// Memory reserved for the host when the agent file says nothing.
pub const DEFAULT_MEMORY_RESERVE: u64 = 256 << 20;

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Refuses site budgets that, with the reserve, do not fit in `limit` bytes.
pub fn check_budgets(
    file: &Path,
    sites: &[SiteConfig],
    reserve: u64,
    limit: u64,
    what: &str,
) -> Result<(), ConfigError> {
    let budgets: u64 = sites.iter().filter_map(|s| s.limits.memory).sum();
    if budgets.saturating_add(reserve) > limit {
        return Err(err(
            file,
            "memory_reserve",
            format!(
                "site budgets ({}) plus memory_reserve ({}) exceed {what} ({}): lower the sites' memory or the reserve",
                format_size(budgets),
                format_size(reserve),
                format_size(limit)
            ),
        ));
    }
    Ok(())
}

/// Refuses `site` when one of its addresses overlaps one of `others` (same port, and the
/// same address or a wildcard on either side; the same unix path): the blame goes to
/// `site`, the one that came later.
fn check_conflicts(others: &[SiteConfig], site: &SiteConfig) -> Result<(), ConfigError> {
    for l in &site.listen {
        for other in others.iter().filter(|o| o.name != site.name) {
            if let Some(o) = other.listen.iter().find(|o| o.addr.overlaps(&l.addr)) {
                return Err(err(
                    &site.file,
                    "listen",
                    format!(
                        "{} overlaps {} of site {} ({})",
                        l.addr,
                        o.addr,
                        other.name,
                        other.file.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl ListenAddr {
    /// Whether binding both would collide: one unix path, or one TCP port with the same
    /// address or a wildcard (`0.0.0.0`, `[::]`) on either side.
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        match (self, other) {
            (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
            (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => {
                a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            }
            _ => false,
        }
    }
}

impl PartialOrd for ListenAddr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ListenAddr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

fn validate_logs(
    file: &Path,
    key: &str,
    raw: Option<&RawLogs>,
    default: LogPolicy,
) -> Result<LogPolicy, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let max_size = match &raw.max_size {
        Some(s) => parse_size(s).map_err(|m| err(file, &format!("{key}.max_size"), m))?,
        None => default.max_size,
    };
    if max_size < 4096 {
        return Err(err(file, &format!("{key}.max_size"), "must be at least 4K"));
    }
    let keep = raw.keep.unwrap_or(default.keep);
    if keep > 100 {
        return Err(err(file, &format!("{key}.keep"), "must be at most 100"));
    }
    Ok(LogPolicy { max_size, keep })
}

fn duration_key(
    file: &Path,
    key: &str,
    v: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        Some(s) => parse_duration(s).map_err(|m| err(file, key, m)),
        None => Ok(default),
    }
}

const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Validates one site file's contents.
pub fn validate_site(
    file: &Path,
    raw: &RawSite,
    default_logs: LogPolicy,
) -> Result<SiteConfig, ConfigError> {
    let name_str = raw.name.as_deref().ok_or_else(|| {
        err(
            file,
            "name",
            "missing: every site file needs name = \"...\"",
        )
    })?;
    let name = SiteName::new(name_str).map_err(|m| err(file, "name", m))?;
    if let Some(stem) = file.file_stem().and_then(|s| s.to_str()) {
        if stem != name.as_str() {
            return Err(err(
                file,
                "name",
                format!(
                    "the site is named {name:?} but its file is {stem}.toml: name the file {name}.toml"
                ),
            ));
        }
    }
    let command = raw.command.clone().unwrap_or_default();
    if command.is_empty() || command[0].is_empty() {
        return Err(err(
            file,
            "command",
            "missing or empty: give the worker's argv, e.g. [\"/usr/bin/python3\", \"-m\", \"app\"]",
        ));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(err(file, "command", "arguments must not contain NUL bytes"));
    }
    let (workers, auto) = match &raw.workers {
        None => (1, None),
        Some(RawWorkers::Count(n)) => (*n, None),
        Some(RawWorkers::Auto(a)) if a == "auto" => {
            let min = raw.workers_min.unwrap_or(1);
            let max = raw.workers_max.unwrap_or(64);
            if min > max || max == 0 || max > MAX_WORKERS {
                return Err(err(
                    file,
                    "workers_max",
                    format!("use 1 to {MAX_WORKERS}, at least workers_min ({min})"),
                ));
            }
            (max, Some(AutoWorkers { min, max }))
        }
        Some(RawWorkers::Auto(other)) => {
            return Err(err(
                file,
                "workers",
                format!("invalid value {other:?}: use a number or \"auto\""),
            ));
        }
    };
    if auto.is_none() && (raw.workers_min.is_some() || raw.workers_max.is_some()) {
        return Err(err(
            file,
            "workers_min",
            "workers_min and workers_max need workers = \"auto\"",
        ));
    }
    if workers > MAX_WORKERS {
        return Err(err(
            file,
            "workers",
            format!("{workers} is too many: use 0 to {MAX_WORKERS}"),
        ));
    }

    // Users: default to the agent's own identity.
    let (uid, user_gid) = match &raw.user {
        Some(u) => {
            let entry = lookup_user(u)
                .ok_or_else(|| err(file, "user", format!("no such user {u:?} in /etc/passwd")))?;
            (entry.uid, entry.gid)
        }
        None => (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
    };
    let gid = match &raw.group {
        Some(g) => lookup_group(g)
            .ok_or_else(|| err(file, "group", format!("no such group {g:?} in /etc/group")))?,
        None => user_gid,
    };

    for (k, v) in &raw.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(err(
                file,
                &format!("env.{k}"),
                "names must be non-empty without '=' or NUL, values without NUL",
            ));
        }
        if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("HATCHERY_") {
            return Err(err(
                file,
                &format!("env.{k}"),
                "is set by the agent for every worker and cannot be overridden",
            ));
        }
    }

    if raw.listen.len() > MAX_LISTENERS {
        return Err(err(
            file,
            "listen",
            format!("at most {MAX_LISTENERS} listeners"),
        ));
    }
    let mut listen = Vec::new();
    for (i, l) in raw.listen.iter().enumerate() {
        let key = format!("listen[{i}]");
        let addr = match (&l.tcp, &l.unix) {
            (Some(t), None) => ListenAddr::Tcp(t.parse().map_err(|_| {
                err(file, &format!("{key}.tcp"), format!("invalid address {t:?}: use host:port, e.g. \"127.0.0.1:8000\" or \"[::1]:8000\""))
            })?),
            (None, Some(u)) if u.is_absolute() => ListenAddr::Unix(u.clone()),
            (None, Some(_)) => return Err(err(file, &format!("{key}.unix"), "must be an absolute path")),
            _ => {
                return Err(err(file, &key, "give exactly one of tcp = \"host:port\" or unix = \"/path\""));
            }
        };
        let lname = l.name.clone().unwrap_or_else(|| format!("listen{i}"));
        if lname.is_empty()
            || lname.len() > 255
            || !lname.chars().all(|c| c.is_ascii_graphic() && c != ':')
        {
            return Err(err(
                file,
                &format!("{key}.name"),
                "use 1 to 255 printable characters without ':'",
            ));
        }
        listen.push(ListenSpec {
            name: lname,
            addr,
            backlog: l.backlog.unwrap_or(1024).clamp(1, 65535),
        });
    }

    let stop_raw = raw.stop.clone().unwrap_or_default();
    let stop = StopPolicy {
        signal: match &stop_raw.signal {
            Some(s) => Signal::parse(s).map_err(|m| err(file, "stop.signal", m))?,
            None => Signal(libc::SIGTERM),
        },
        timeout: duration_key(
            file,
            "stop.timeout",
            stop_raw.timeout.as_ref(),
            Duration::from_secs(30),
        )?,
    };

    let r = raw.restart.clone().unwrap_or_default();
    let fl = r.flapping.clone().unwrap_or_default();
    let restart = RestartPolicy {
        backoff_initial: duration_key(
            file,
            "restart.backoff_initial",
            r.backoff_initial.as_ref(),
            Duration::from_millis(100),
        )?,
        backoff_max: duration_key(
            file,
            "restart.backoff_max",
            r.backoff_max.as_ref(),
            Duration::from_secs(30),
        )?,
        healthy_after: duration_key(
            file,
            "restart.healthy_after",
            r.healthy_after.as_ref(),
            Duration::from_secs(60),
        )?,
        flapping_exits: fl.exits.unwrap_or(5),
        flapping_within: duration_key(
            file,
            "restart.flapping.within",
            fl.within.as_ref(),
            Duration::from_secs(10),
        )?,
    };
    if restart.backoff_max < restart.backoff_initial {
        return Err(err(
            file,
            "restart.backoff_max",
            "must not be less than restart.backoff_initial",
        ));
    }
    if restart.flapping_exits == 0 {
        return Err(err(file, "restart.flapping.exits", "must be at least 1"));
    }

    let rd = raw.ready.clone().unwrap_or_default();
    let check = match rd.check.as_deref() {
        None | Some("none") => ReadyCheck::None,
        Some("notify") => ReadyCheck::Notify,
        Some("tcp") => ReadyCheck::Tcp,
        Some(other) => {
            return Err(err(
                file,
                "ready.check",
                format!("unknown check {other:?}: use \"notify\", \"tcp\" or \"none\""),
            ));
        }
    };
    if check == ReadyCheck::Tcp && !listen.iter().any(|l| matches!(l.addr, ListenAddr::Tcp(_))) {
        return Err(err(
            file,
            "ready.check",
            "\"tcp\" needs at least one [[listen]] with tcp = \"host:port\"",
        ));
    }
    let ready = ReadyPolicy {
        check,
        timeout: duration_key(
            file,
            "ready.timeout",
            rd.timeout.as_ref(),
            Duration::from_secs(30),
        )?,
        settle: duration_key(
            file,
            "ready.settle",
            rd.settle.as_ref(),
            Duration::from_secs(1),
        )?,
    };
    let logs = validate_logs(file, "logs", raw.logs.as_ref(), default_logs)?;
    let limits = validate_limits(file, raw)?;
    if auto.is_some() && (limits.memory.is_none() || limits.worker_estimate().is_none()) {
        return Err(err(
            file,
            "workers",
            "\"auto\" needs a memory budget (memory = ...) and a per-worker figure (worker_memory or memory_max)",
        ));
    }
    if let Some(w) = &raw.workdir {
        if !w.is_absolute() && !w.starts_with(RELEASE_PLACEHOLDER) {
            return Err(err(
                file,
                "workdir",
                "must be an absolute path (or start with {release})",
            ));
        }
    }
    let deploy = DeployPolicy {
        probation: duration_key(
            file,
            "deploy.probation",
            raw.deploy.as_ref().and_then(|d| d.probation.as_ref()),
            Duration::from_secs(1),
        )?,
    };
    let release = validate_release(file, raw)?;

    let sandbox = sandbox::validate(file, raw.sandbox.as_ref(), raw.user.as_deref())?;
    if sandbox.root.is_some() && ready.check == ReadyCheck::Notify {
        return Err(err(
            file,
            "ready.check",
            "\"notify\" cannot reach the agent's notify socket from inside sandbox.root: use \"tcp\" or \"none\"",
        ));
    }

    Ok(SiteConfig {
        name,
        file: file.to_path_buf(),
        command,
        workers,
        auto,
        user: raw.user.clone(),
        group: raw.group.clone(),
        uid,
        gid,
        workdir: raw.workdir.clone(),
        release,
        env: raw.env.clone(),
        listen,
        stop,
        restart,
        ready,
        deploy,
        logs,
        limits,
        sandbox,
    })
}

/// `release`: an absolute symlink path resolving to a directory; `{release}` anywhere
/// needs it.
fn validate_release(file: &Path, raw: &RawSite) -> Result<Option<PathBuf>, ConfigError> {
    let uses = raw
        .command
        .iter()
        .flatten()
        .chain(raw.env.values())
        .any(|a| a.contains(RELEASE_PLACEHOLDER))
        || raw
            .workdir
            .as_ref()
            .is_some_and(|w| w.to_string_lossy().contains(RELEASE_PLACEHOLDER));
    let Some(release) = &raw.release else {
        if uses {
            return Err(err(
                file,
                "release",
                "{release} is used in command, workdir or env: set release = \"/path/to/current\" (a symlink to the release directory)",
            ));
        }
        return Ok(None);
    };
    if !release.is_absolute() {
        return Err(err(file, "release", "must be an absolute path"));
    }
    if let Err(e) = resolve_release(release) {
        return Err(err(file, "release", e));
    }
    Ok(Some(release.clone()))
}

/// The directory a release symlink points to now, fully resolved.
pub fn resolve_release(link: &Path) -> Result<PathBuf, String> {
    let target = std::fs::canonicalize(link)
        .map_err(|e| format!("{} does not resolve: {e}", link.display()))?;
    if !target.is_dir() {
        return Err(format!(
            "{} resolves to {}, which is not a directory",
            link.display(),
            target.display()
        ));
    }
    Ok(target)
}

fn validate_limits(file: &Path, raw: &RawSite) -> Result<Limits, ConfigError> {
    let size = |key: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => {
                let n = parse_size(s).map_err(|m| err(file, key, m))?;
                if n < (4 << 20) {
                    return Err(err(file, key, "must be at least 4M"));
                }
                Ok(Some(n))
            }
        }
    };
    let limits = Limits {
        memory: size("memory", &raw.memory)?,
        pids_max: raw.pids_max,
        cpu_weight: raw.cpu_weight,
        worker_memory_max: size("memory_max", &raw.memory_max)?,
        worker_memory_high: size("memory_high", &raw.memory_high)?,
        worker_memory: size("worker_memory", &raw.worker_memory)?,
    };
    if limits.pids_max == Some(0) {
        return Err(err(file, "pids_max", "must be at least 1"));
    }
    if let Some(w) = limits.cpu_weight {
        if !(1..=10_000).contains(&w) {
            return Err(err(
                file,
                "cpu_weight",
                format!("{w} is out of range: use 1 to 10000"),
            ));
        }
    }
    if let (Some(high), Some(max)) = (limits.worker_memory_high, limits.worker_memory_max) {
        if high > max {
            return Err(err(file, "memory_high", "must not exceed memory_max"));
        }
    }
    if let (Some(w), Some(site)) = (
        limits.worker_memory_max.or(limits.worker_memory_high),
        limits.memory,
    ) {
        if w > site {
            return Err(err(
                file,
                "memory_max",
                "a worker's limit must not exceed the site's memory budget",
            ));
        }
    }
    Ok(limits)
}

impl SiteConfig {
    /// This site as run from `release` (a resolved release directory): `{release}` in
    /// `command`, `workdir` and `env` replaced by it.
    pub fn for_release(&self, release: &Path) -> SiteConfig {
        let r = release.to_string_lossy();
        let fill = |s: &str| s.replace(RELEASE_PLACEHOLDER, &r);
        SiteConfig {
            command: self.command.iter().map(|a| fill(a)).collect(),
            workdir: self
                .workdir
                .as_ref()
                .map(|w| PathBuf::from(fill(&w.to_string_lossy()))),
            env: self.env.iter().map(|(k, v)| (k.clone(), fill(v))).collect(),
            ..self.clone()
        }
    }

    /// The effective configuration, every default filled in, in the file format.
    pub fn to_raw(&self) -> RawSite {
        RawSite {
            name: Some(self.name.to_string()),
            command: Some(self.command.clone()),
            workers: Some(match self.auto {
                Some(_) => RawWorkers::Auto("auto".into()),
                None => RawWorkers::Count(self.workers),
            }),
            workers_min: self.auto.map(|a| a.min),
            workers_max: self.auto.map(|a| a.max),
            worker_memory: self.limits.worker_memory.map(format_size),
            user: self.user.clone().or_else(|| Some(self.uid.to_string())),
            group: self.group.clone().or_else(|| Some(self.gid.to_string())),
            workdir: self.workdir.clone(),
            release: self.release.clone(),
            env: self.env.clone(),
            listen: self
                .listen
                .iter()
                .map(|l| RawListen {
                    name: Some(l.name.clone()),
                    tcp: match &l.addr {
                        ListenAddr::Tcp(a) => Some(a.to_string()),
                        ListenAddr::Unix(_) => None,
                    },
                    unix: match &l.addr {
                        ListenAddr::Unix(p) => Some(p.clone()),
                        ListenAddr::Tcp(_) => None,
                    },
                    backlog: Some(l.backlog),
                })
                .collect(),
            stop: Some(RawStop {
                signal: Some(self.stop.signal.name()),
                timeout: Some(format_duration(self.stop.timeout)),
            }),
            restart: Some(RawRestart {
                backoff_initial: Some(format_duration(self.restart.backoff_initial)),
                backoff_max: Some(format_duration(self.restart.backoff_max)),
                healthy_after: Some(format_duration(self.restart.healthy_after)),
                flapping: Some(RawFlapping {
                    exits: Some(self.restart.flapping_exits),
                    within: Some(format_duration(self.restart.flapping_within)),
                }),
            }),
            ready: Some(RawReady {
                check: Some(
                    match self.ready.check {
                        ReadyCheck::Notify => "notify",
                        ReadyCheck::Tcp => "tcp",
                        ReadyCheck::None => "none",
                    }
                    .into(),
                ),
                timeout: Some(format_duration(self.ready.timeout)),
                settle: Some(format_duration(self.ready.settle)),
            }),
            deploy: Some(RawDeploy {
                probation: Some(format_duration(self.deploy.probation)),
            }),
            logs: Some(RawLogs {
                max_size: Some(format_size(self.logs.max_size)),
                keep: Some(self.logs.keep),
            }),
            memory: self.limits.memory.map(format_size),
            pids_max: self.limits.pids_max,
            cpu_weight: self.limits.cpu_weight,
            memory_max: self.limits.worker_memory_max.map(format_size),
            memory_high: self.limits.worker_memory_high.map(format_size),
            sandbox: Some(self.sandbox.to_raw()),
        }
    }
}

impl AgentConfig {
    /// The effective configuration as TOML: the agent file, then each site.
    pub fn effective_toml(&self) -> String {
        let agent = RawAgent {
            control_socket: Some(self.control_socket.clone()),
            state_dir: Some(self.state_dir.clone()),
            sites_dir: Some(self.sites_dir.clone()),
            cgroup_base: Some(match &self.cgroup_base {
                CgroupBase::Auto => "auto".into(),
                CgroupBase::Off => "off".into(),
                CgroupBase::Path(p) => p.display().to_string(),
            }),
            logs: None,
            memory_reserve: Some(format_size(self.memory_reserve)),
        };
        let mut out = format!("# {}\n", self.file.display());
        out.push_str(&toml::to_string(&agent).unwrap_or_default());
        for site in &self.sites {
            out.push_str(&format!("\n# {}\n", site.file.display()));
            out.push_str(&toml::to_string(&site.to_raw()).unwrap_or_default());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(text: &str) -> Result<SiteConfig, ConfigError> {
        let file = Path::new("/etc/hatchery/sites.d/blog.toml");
        let raw: RawSite = parse_toml(file, text)?;
        validate_site(file, &raw, LogPolicy::default())
    }

    #[test]
    fn release_fills_command_workdir_and_env_and_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r1 = dir.path().join("r1");
        std::fs::create_dir(&r1).expect("mkdir");
        let link = dir.path().join("current");
        std::os::unix::fs::symlink(&r1, &link).expect("symlink");
        let text = format!(
            "name = \"blog\"\ncommand = [\"{{release}}/bin/server\", \"--root\", \"{{release}}\"]\nworkdir = \"{{release}}\"\nrelease = \"{}\"\n[env]\nAPP = \"{{release}}/app.ini\"\n[ready]\ncheck = \"notify\"\n[deploy]\nprobation = \"2s\"\n",
            link.display()
        );
        let s = site(&text).expect("valid");
        assert_eq!(s.deploy.probation, Duration::from_secs(2));
        let target = resolve_release(&link).expect("resolves");
        assert_eq!(target, std::fs::canonicalize(&r1).expect("canonical"));
        let g = s.for_release(&target);
        let t = target.display().to_string();
        assert_eq!(
            g.command,
            vec![format!("{t}/bin/server"), "--root".into(), t.clone()]
        );
        assert_eq!(g.workdir, Some(target.clone()));
        assert_eq!(g.env["APP"], format!("{t}/app.ini"));

        let e = site("name = \"blog\"\ncommand = [\"{release}/x\"]\n").unwrap_err();
        assert_eq!(e.key, "release");
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nrelease = \"/nonexistent/current\"\n")
            .unwrap_err();
        assert_eq!(e.key, "release");
        assert!(e.message.contains("does not resolve"), "{e}");
        let tcp = text.replace("check = \"notify\"", "check = \"tcp\"")
            + "[[listen]]\ntcp = \"127.0.0.1:1\"\n";
        // Accepted: with eBPF steering the agent probes a new generation alone (and
        // refuses the deploy without it).
        let s = site(&tcp).expect("tcp readiness with a release");
        assert_eq!(s.ready.check, ReadyCheck::Tcp);
        let e = site(&text.replace("\"2s\"", "\"soon\"")).unwrap_err();
        assert_eq!(e.key, "deploy.probation");
    }

    #[test]
    fn durations_parse_and_format_round_trip() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "-1s", "10 parsecs", "1e9h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        for d in [
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(7200),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes_parse_binary_units() {
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_size(&format_size(3 << 30)), Ok(3 << 30));
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(Signal::parse("SIGTERM"), Ok(Signal(libc::SIGTERM)));
        assert_eq!(Signal::parse("hup"), Ok(Signal(libc::SIGHUP)));
        assert_eq!(Signal::parse("9"), Ok(Signal(9)));
        assert!(Signal::parse("SIGFOO").unwrap_err().contains("TERM"));
        assert_eq!(Signal(libc::SIGUSR1).name(), "SIGUSR1");
    }

    #[test]
    fn the_documented_example_site_is_valid() {
        let s = site(
            r#"
name = "blog"
command = ["/usr/bin/python3", "-m", "blog.server"]
workers = 4
[env]
BLOG_SETTINGS = "/srv/blog/settings.ini"
[[listen]]
name = "http"
tcp = "127.0.0.1:8000"
[stop]
signal = "SIGTERM"
timeout = "30s"
[restart]
backoff_initial = "100ms"
backoff_max = "30s"
healthy_after = "60s"
flapping = { exits = 5, within = "10s" }
[ready]
check = "notify"
timeout = "30s"
"#,
        )
        .expect("valid");
        assert_eq!(s.workers, 4);
        assert_eq!(
            s.listen[0].addr,
            ListenAddr::Tcp("127.0.0.1:8000".parse().expect("addr"))
        );
        assert_eq!(s.restart.flapping_exits, 5);
        assert_eq!(s.ready.check, ReadyCheck::Notify);
    }

    #[test]
    fn errors_name_the_file_the_key_and_what_is_accepted() {
        let e =
            site("name = \"blog\"\ncommand = [\"/bin/true\"]\nworkers = \"four\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/hatchery/sites.d/blog.toml: "),
            "{e}"
        );
        assert!(e.message.contains("a number or \"auto\""), "{e}");

        let e =
            site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[stop]\ntimeout = 30\n").unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        assert!(e.to_string().contains("string"), "{e}");

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n").unwrap_err();
        assert!(
            e.to_string().contains("wrokers"),
            "unknown keys are named: {e}"
        );

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[stop]\ntimeout = \"soon\"\n")
            .unwrap_err();
        assert_eq!(e.key, "stop.timeout");
        assert!(e.message.contains("ms, s, m, h"), "{e}");

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[ready]\ncheck = \"http\"\n")
            .unwrap_err();
        assert_eq!(e.key, "ready.check");
        assert!(e.message.contains("\"notify\", \"tcp\" or \"none\""));

        let e = site("name = \"shop\"\ncommand = [\"/bin/true\"]\n").unwrap_err();
        assert_eq!(e.key, "name");
        assert!(e.message.contains("shop.toml"));

        let e = site("name = \"blog\"\ncommand = []\n").unwrap_err();
        assert_eq!(e.key, "command");

        let e = site("name = \"blog\"\ncommand = [\"x\"]\n[[listen]]\ntcp = \"localhost\"\n")
            .unwrap_err();
        assert_eq!(e.key, "listen[0].tcp");

        let e =
            site("name = \"blog\"\ncommand = [\"x\"]\n[env]\nLISTEN_FDS = \"3\"\n").unwrap_err();
        assert_eq!(e.key, "env.LISTEN_FDS");

        let e = site("name = \"blog\"\ncommand = [\"x\"]\nuser = \"no-such-user-hopefully\"\n")
            .unwrap_err();
        assert_eq!(e.key, "user");

        let e = site("name = \"blog\"\ncommand = [\"x\"]\n[ready]\ncheck = \"tcp\"\n").unwrap_err();
        assert!(e.message.contains("listen"), "{e}");
    }

    #[test]
    fn effective_config_round_trips() {
        let s = site("name = \"blog\"\ncommand = [\"/bin/sleep\", \"1\"]\n[[listen]]\nunix = \"/run/blog.sock\"\n").expect("valid");
        let text = toml::to_string(&s.to_raw()).expect("serialize");
        let again = site(&text).expect("the effective config parses");
        // The effective file names the resolved uid and gid where the original said nothing.
        assert_eq!(again.user.as_deref(), Some(s.uid.to_string().as_str()));
        assert_eq!(
            SiteConfig {
                user: None,
                group: None,
                ..again
            },
            s
        );
    }

    #[test]
    fn limits_are_validated() {
        let s = site("name = \"blog\"\ncommand = [\"x\"]\nmemory = \"512M\"\npids_max = 64\ncpu_weight = 200\nmemory_max = \"128M\"\nmemory_high = \"100M\"\n").expect("valid");
        assert_eq!(s.limits.memory, Some(512 << 20));
        assert_eq!(s.limits.worker_memory_high, Some(100 << 20));
        let e = site("name = \"blog\"\ncommand = [\"x\"]\ncpu_weight = 0\n").unwrap_err();
        assert_eq!(e.key, "cpu_weight");
        let e = site(
            "name = \"blog\"\ncommand = [\"x\"]\nmemory_max = \"64M\"\nmemory_high = \"100M\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "memory_high");
        let e =
            site("name = \"blog\"\ncommand = [\"x\"]\nmemory = \"64M\"\nmemory_max = \"100M\"\n")
                .unwrap_err();
        assert_eq!(e.key, "memory_max");
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nmemory = \"1K\"\n").unwrap_err();
        assert!(e.message.contains("4M"), "{e}");
    }

    #[test]
    fn auto_workers_need_a_budget_and_a_per_worker_figure() {
        let s = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"auto\"\nworkers_max = 10\nmemory = \"512M\"\nworker_memory = \"100M\"\n").expect("valid");
        assert_eq!(s.auto, Some(AutoWorkers { min: 1, max: 10 }));
        assert_eq!(s.limits.worker_estimate(), Some(100 << 20));
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"auto\"\n").unwrap_err();
        assert!(e.message.contains("memory budget"), "{e}");
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"many\"\n").unwrap_err();
        assert_eq!(e.key, "workers");
        let e =
            site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 3\nworkers_max = 4\n").unwrap_err();
        assert_eq!(e.key, "workers_min");
        let text = toml::to_string(&s.to_raw()).expect("ser");
        assert!(text.contains("workers = \"auto\""), "{text}");
    }

    #[test]
    fn budgets_must_fit_beside_the_reserve() {
        let a = site("name = \"blog\"\ncommand = [\"x\"]\nmemory = \"1G\"\n").expect("valid");
        let f = Path::new("/etc/hatchery/hatchery.toml");
        assert!(check_budgets(f, std::slice::from_ref(&a), 256 << 20, 2 << 30, "x").is_ok());
        let e = check_budgets(f, &[a.clone(), a], 256 << 20, 2 << 30, "the host").unwrap_err();
        assert_eq!(e.key, "memory_reserve");
        assert!(
            e.message.contains("2G") && e.message.contains("256M"),
            "{e}"
        );
    }

    #[test]
    fn site_names_are_restricted() {
        assert!(SiteName::new("blog-2_x").is_ok());
        for bad in ["", "Blog", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(SiteName::new(bad).is_err(), "{bad:?}");
        }
    }
}

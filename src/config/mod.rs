//! Configuration: the agent file and one TOML file per site, parsed and validated once.
//!
//! The raw `serde` structs ([`RawAgent`], [`RawSite`]) mirror the file format exactly
//! (`deny_unknown_fields`, so a typo is an error, not a silently ignored key); [`load`]
//! turns them into validated, immutable values with durations, sizes, signals and users
//! resolved. Every error names the file, the key and what is accepted, and loading has no
//! side effects, so a bad file on reload changes nothing that runs.
//!
//! This module holds the validated types; the work is done by its parts:
//!
//! - `raw`: the file format;
//! - `site`: validating one site file ([`validate_site`]);
//! - `load`: reading the agent file and its sites, and the checks across sites
//!   (overlapping listeners, memory budgets);
//! - `effective`: the effective configuration `check` prints ([`Effective`], the file
//!   each site was validated from with every default written in);
//! - `envfile`: a site's `env_file` (`KEY=VALUE` lines);
//! - `units`: durations, sizes and signals, parsed and formatted;
//! - `users`: users and groups, resolved through NSS (`getpwnam_r`, `getgrnam_r`);
//! - [`sandbox`]: the `[sandbox]` table.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

mod effective;
mod envfile;
mod load;
mod parse;
mod raw;
pub mod sandbox;
mod site;
mod units;
mod users;

pub use effective::Effective;

pub use load::{
    AgentAddrs, BrokenSite, DEFAULT_MEMORY_RESERVE, HOLDER_SOCKET, NOTIFY_SOCKET, START_THREADS,
    STATE_SOCKETS, check_budgets, check_fds, fd_limit, host_memory, load, load_each,
    load_each_running, load_keeping, site_from_text,
};
pub use raw::{
    RawAgent, RawDeploy, RawFlapping, RawFraction, RawHealth, RawListen, RawLogs, RawReady,
    RawRestart, RawScale, RawSite, RawStop, RawWarmup, RawWorkers,
};
pub use site::{resolve_release, validate_site};
pub use units::{Signal, format_duration, format_size, parse_duration, parse_size};
pub use users::{UserEntry, lookup_group, lookup_user};

/// The agent file read when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/hatchery/hatchery.toml";
/// Most workers one site may ask for (the agent's fd limit may allow fewer:
/// `check_fds`).
pub const MAX_WORKERS: u32 = 32_768;
/// Most listeners one site may declare.
pub const MAX_LISTENERS: usize = 16;

/// A configuration error: which file (and line, where known), which key, and what is wrong
/// or accepted; with the other problems found in the same file, if any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// The line the key is on, where the file was parsed that far.
    pub line: Option<u32>,
    /// The key at fault (dotted path, `listen[1].tcp`), or `-` for the whole file.
    pub key: String,
    /// What is wrong and what is accepted.
    pub message: String,
    /// The other problems of the file (a file's problems are all reported at once).
    pub also: Vec<ConfigError>,
}

impl ConfigError {
    /// This problem and the others of its file, each alone.
    pub fn all(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(self).chain(self.also.iter())
    }

    /// This problem alone, as one line: `file:line: key: message`.
    pub fn one(&self) -> String {
        let line = self.line.map(|l| format!(":{l}")).unwrap_or_default();
        format!(
            "{}{line}: {}: {}",
            self.file.display(),
            self.key,
            self.message
        )
    }
}

impl fmt::Display for ConfigError {
    /// `file:line: key: message`, one line per problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.all().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&e.one())?;
        }
        Ok(())
    }
}

/// The problems found while validating one file, every one kept: a check that fails
/// records its problem and validation goes on with a stand-in value, so one run reports
/// all of them (each check that depends on a failed one is skipped, not reported twice).
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    /// Records `e` (and the problems it carries).
    pub(crate) fn push(&mut self, mut e: ConfigError) {
        let also = std::mem::take(&mut e.also);
        self.0.push(e);
        self.0.extend(also);
    }

    /// The value of `r`, or `None` with its problem recorded.
    pub(crate) fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    /// The value of `r`, or `fallback` with its problem recorded.
    pub(crate) fn or<T>(&mut self, r: Result<T, ConfigError>, fallback: T) -> T {
        self.ok(r).unwrap_or(fallback)
    }

    /// Whether nothing was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `value` when nothing was recorded; else the first problem, the others in its
    /// `also`.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        match self.into_error() {
            None => Ok(value),
            Some(e) => Err(e),
        }
    }

    /// The first problem with the others in its `also`, if any.
    pub(crate) fn into_error(self) -> Option<ConfigError> {
        let mut all = self.0.into_iter();
        let mut first = all.next()?;
        first.also = all.collect();
        Some(first)
    }
}

/// `s` between double quotes as a TOML file would write it: control characters escaped
/// (`\n`, `\u0001`), so a message stays on one line; never Rust's `Debug` form.
pub(crate) fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn err(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        key: key.to_string(),
        message: message.into(),
        also: Vec::new(),
    }
}

/// A validated site name: 1 to 64 of `[a-z0-9_-]`, starting with a letter or digit.
/// Shared, not copied: the agent keeps one per worker in several maps (by pid, by
/// registration), and a clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteName(std::sync::Arc<str>);

impl Serialize for SiteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

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
                "invalid site name \"{name}\": use 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
            ));
        }
        Ok(SiteName(name.into()))
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

impl fmt::Display for CgroupBase {
    /// As written in the agent file: `auto`, `off` or the path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupBase::Auto => f.write_str("auto"),
            CgroupBase::Off => f.write_str("off"),
            CgroupBase::Path(p) => write!(f, "{}", p.display()),
        }
    }
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
    /// Where Prometheus metrics are served (`metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
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

impl ListenAddr {
    /// Whether binding both would collide: one unix path, or one TCP port with the same
    /// address (an IPv4-mapped IPv6 address is its IPv4 one) or a wildcard that covers the
    /// other (`[::]` every address, as a dual-stack socket does; `0.0.0.0` the IPv4 ones).
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        fn covers(wildcard: IpAddr, other: IpAddr) -> bool {
            match wildcard {
                IpAddr::V6(w) => w.is_unspecified(),
                IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
            }
        }
        match (self, other) {
            (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
            (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => {
                let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
                a.port() == b.port() && (x == y || covers(x, y) || covers(y, x))
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

/// Who binds a listener (`[[listen]] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    /// The agent binds it and passes it to every worker (socket activation).
    #[default]
    Agent,
    /// The app binds this TCP port itself: the agent does not bind it or pass it, the
    /// sandbox's Landlock network rules allow the bind, and deploys stop the serving
    /// generation before the new one starts (never two generations bound at once).
    Own,
}

impl ListenMode {
    /// The accepted spellings, as written in the file.
    pub const NAMES: &'static [&'static str] = &["agent", "own"];

    /// As written in the file.
    pub fn name(self) -> &'static str {
        match self {
            ListenMode::Agent => "agent",
            ListenMode::Own => "own",
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
    /// Who binds it.
    pub mode: ListenMode,
}

impl ListenSpec {
    /// Whether the agent binds it and passes it to the workers.
    pub fn agent_binds(&self) -> bool {
        self.mode == ListenMode::Agent
    }
}

/// Most signals in a stop sequence (`stop.signals`), `SIGKILL` not counted.
pub const MAX_STOP_SIGNALS: usize = 4;

/// How a site's workers are stopped: `signal`, then each of `then` in order, each sent
/// when the worker has not exited `timeout` after the one before, and `SIGKILL` to the
/// worker's tree `timeout` after the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPolicy {
    /// The first signal.
    pub signal: Signal,
    /// The signals after the first, in order (`None` past the end).
    pub then: [Option<Signal>; MAX_STOP_SIGNALS - 1],
    /// The wait after each signal before the next one (after the last: `SIGKILL`).
    pub timeout: Duration,
}

impl StopPolicy {
    /// `signal`, then `SIGKILL` to the tree `timeout` later.
    pub fn single(signal: Signal, timeout: Duration) -> StopPolicy {
        StopPolicy {
            signal,
            then: [None; MAX_STOP_SIGNALS - 1],
            timeout,
        }
    }

    /// The policy sending `signals` in order, each followed by `timeout`; `None` when
    /// `signals` is empty or longer than [`MAX_STOP_SIGNALS`].
    pub fn sequence(signals: &[Signal], timeout: Duration) -> Option<StopPolicy> {
        let (&signal, rest) = signals.split_first()?;
        if rest.len() >= MAX_STOP_SIGNALS {
            return None;
        }
        let mut then = [None; MAX_STOP_SIGNALS - 1];
        for (slot, s) in then.iter_mut().zip(rest) {
            *slot = Some(*s);
        }
        Some(StopPolicy {
            signal,
            then,
            timeout,
        })
    }

    /// The signal of step `n` (0 is the first), if the sequence has that many.
    pub fn step(&self, n: usize) -> Option<Signal> {
        match n {
            0 => Some(self.signal),
            n => self.then.get(n - 1).copied().flatten(),
        }
    }

    /// Every signal of the sequence, in order (`SIGKILL`, which follows, not included).
    pub fn signals(&self) -> impl Iterator<Item = Signal> + '_ {
        (0..MAX_STOP_SIGNALS).map_while(|n| self.step(n))
    }

    /// The longest a worker may take to stop before `SIGKILL`: `timeout` per signal.
    pub fn total(&self) -> Duration {
        let steps = u32::try_from(self.signals().count()).unwrap_or(1);
        self.timeout.saturating_mul(steps)
    }
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

/// How a site's workers start (`mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteMode {
    /// Each worker is a fresh `execve` of `command`.
    #[default]
    Exec,
    /// `command` starts one zygote per generation (the app's code loaded once); workers
    /// are forked from it when the agent asks.
    Zygote,
}

impl SiteMode {
    /// Every name, as written in a site file.
    pub const NAMES: [&'static str; 2] = ["exec", "zygote"];

    /// As written in a site file.
    pub fn name(self) -> &'static str {
        match self {
            SiteMode::Exec => "exec",
            SiteMode::Zygote => "zygote",
        }
    }
}

/// Where a site's workers' stdout and stderr go (`output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// A pipe per worker: two fds per worker in the agent (its pidfd and the pipe).
    #[default]
    Pipe,
    /// The site's one output socket (`crate::logs::OutputSocket`): one fd per worker.
    Socket,
}

impl OutputMode {
    /// Every name, as written in a site file.
    pub const NAMES: [&'static str; 2] = ["pipe", "socket"];

    /// As written in a site file.
    pub fn name(self) -> &'static str {
        match self {
            OutputMode::Pipe => "pipe",
            OutputMode::Socket => "socket",
        }
    }

    /// The fds the agent holds per worker.
    pub fn fds_per_worker(self) -> u64 {
        match self {
            OutputMode::Pipe => 3,
            OutputMode::Socket => 1,
        }
    }
}

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyCheck {
    /// `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// The site's TCP listener accepted a probe connection.
    Tcp,
    /// A probe request to the site's TCP listener got an expected HTTP status
    /// ([`HttpCheck`]).
    Http,
    /// Ready as soon as it runs.
    None,
}

impl ReadyCheck {
    /// Whether the agent probes the site's first TCP listener (`tcp`, `http`).
    pub fn probes(self) -> bool {
        matches!(self, ReadyCheck::Tcp | ReadyCheck::Http)
    }
}

/// The request of `ready.check = "http"` and the answer that counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// The path asked for (`ready.path`), from `/`.
    pub path: String,
    /// The `Host` header (`ready.host`); the listener's address when not set.
    pub host: Option<String>,
    /// The statuses that count as ready (`ready.status`), inclusive.
    pub status: (u16, u16),
}

impl HttpCheck {
    /// Whether `status` counts as ready.
    pub fn accepts(&self, status: u16) -> bool {
        (self.status.0..=self.status.1).contains(&status)
    }
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

/// `[health]`: an HTTP request to the site's first TCP listener every `interval`; a
/// worker that fails `failures` of them (not answered within `timeout`, or answered with a
/// status `http` does not accept) is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// How often.
    pub interval: Duration,
    /// How long an answer may take.
    pub timeout: Duration,
    /// Failed checks of one worker process before it is restarted.
    pub failures: u32,
    /// The request and the statuses that count as healthy.
    pub http: HttpCheck,
}

/// Deploy policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployPolicy {
    /// How long every worker of a new generation must stay up and ready before the flip.
    pub probation: Duration,
    /// A canary (`deploy --canary`) is rolled back once its workers exited this many
    /// times (0: never by itself).
    pub canary_abort_crashes: u32,
}

/// Most warm-up requests per worker.
pub const MAX_WARMUP: usize = 32;

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

/// A validated site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// Its name.
    pub name: SiteName,
    /// The file it came from.
    pub file: PathBuf,
    /// The worker argv (with `mode = "zygote"`: the zygote's).
    pub command: Vec<String>,
    /// How workers start.
    pub mode: SiteMode,
    /// Where its workers' output goes.
    pub output: OutputMode,
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
    /// The request of an `http` ready check (with `ready.check = "http"` only).
    pub ready_http: Option<HttpCheck>,
    /// Deploy policy.
    pub deploy: DeployPolicy,
    /// Periodic health checks of the serving generation (`[health]`).
    pub health: Option<HealthPolicy>,
    /// `deploy.warmup`: the requests every new worker answers before the flip, in order
    /// (empty: none).
    pub warmup: Vec<HttpCheck>,
    /// Log rotation.
    pub logs: LogPolicy,
    /// cgroup limits.
    pub limits: Limits,
    /// The sandbox.
    pub sandbox: sandbox::SandboxConfig,
    /// The file this was validated from, every default written in.
    pub effective: Effective,
}

/// `workers = "auto"`: between `min` and `max`, as many as the memory budget holds, or
/// (`[scale] by = "load"`) as the load needs within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoWorkers {
    /// The fewest.
    pub min: u32,
    /// The most.
    pub max: u32,
    /// How the count is chosen (`[scale]`).
    pub scale: ScalePolicy,
}

impl AutoWorkers {
    /// Whether the count follows the load (`[scale] by = "load"`).
    pub fn by_load(&self) -> bool {
        self.scale.by == ScaleBy::Load
    }
}

/// What sizes an automatic site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleBy {
    /// As many workers as the memory budget holds.
    Memory,
    /// As many as the load needs (busy reports, accept queues, CPU), within the budget.
    Load,
}

/// `[scale]`: how an automatic site follows its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePolicy {
    /// What sizes the site.
    pub by: ScaleBy,
    /// The utilisation aimed at, in percent (1 to 100).
    pub target_percent: u32,
    /// How often the load is sampled.
    pub interval: Duration,
    /// The least time between two growths.
    pub grow_cooldown: Duration,
    /// How long fewer workers must have done before a shrink (and between two).
    pub shrink_cooldown: Duration,
}

impl ScalePolicy {
    /// The defaults: by memory; for load, 70% utilisation, sampled every 250 ms, growing
    /// at every sample that asks for more, shrinking after 30 s of surplus.
    pub const DEFAULT: ScalePolicy = ScalePolicy {
        by: ScaleBy::Memory,
        target_percent: 70,
        interval: Duration::from_millis(250),
        grow_cooldown: Duration::ZERO,
        shrink_cooldown: Duration::from_secs(30),
    };
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
    /// The limits set here (by their key) that need a controller `offered` does not hold
    /// (`memory`, `pids`, `cpu`): not enforced on such a host.
    pub fn needing(&self, offered: &[&str]) -> Vec<&'static str> {
        [
            (self.memory.is_some(), "memory", "memory"),
            (self.worker_memory_max.is_some(), "memory_max", "memory"),
            (self.worker_memory_high.is_some(), "memory_high", "memory"),
            (self.pids_max.is_some(), "pids_max", "pids"),
            (self.cpu_weight.is_some(), "cpu_weight", "cpu"),
        ]
        .into_iter()
        .filter(|(set, _, controller)| *set && !offered.contains(controller))
        .map(|(_, key, _)| key)
        .collect()
    }

    /// The per-worker memory to assume before any worker has been measured: the
    /// configured estimate, else the per-worker hard limit, else `memory.high`.
    pub fn worker_estimate(&self) -> Option<u64> {
        self.worker_memory
            .or(self.worker_memory_max)
            .or(self.worker_memory_high)
    }
}

impl SiteConfig {
    /// The listeners the agent binds and passes to every worker, in `LISTEN_FDS` order
    /// (`mode = "own"` ones are the app's).
    pub fn agent_listeners(&self) -> impl Iterator<Item = &ListenSpec> {
        self.listen.iter().filter(|l| l.agent_binds())
    }

    /// The TCP addresses the app binds itself (`mode = "own"`).
    pub fn own_ports(&self) -> Vec<SocketAddr> {
        self.listen
            .iter()
            .filter(|l| l.mode == ListenMode::Own)
            .filter_map(|l| match l.addr {
                ListenAddr::Tcp(a) => Some(a),
                ListenAddr::Unix(_) => None,
            })
            .collect()
    }

    /// Whether a deploy must stop the serving generation before the new one starts: the
    /// app binds a port of its own, which two generations cannot hold at once.
    pub fn exclusive_deploys(&self) -> bool {
        !self.own_ports().is_empty()
    }

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
}

/// A site validated from `text`, as if read from `/etc/hatchery/sites.d/blog.toml`.
#[cfg(test)]
fn test_site(text: &str) -> Result<SiteConfig, ConfigError> {
    let file = Path::new("/etc/hatchery/sites.d/blog.toml");
    load::site_from(file, text, LogPolicy::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_needing_a_controller_not_offered() {
        let l = Limits {
            memory: Some(1 << 30),
            pids_max: Some(64),
            cpu_weight: Some(100),
            worker_memory_max: Some(1 << 28),
            worker_memory_high: None,
            worker_memory: Some(1 << 20),
        };
        assert_eq!(
            l.needing(&["hugetlb"]),
            ["memory", "memory_max", "pids_max", "cpu_weight"]
        );
        assert_eq!(l.needing(&["memory", "cpu"]), ["pids_max"]);
        assert!(l.needing(&["cpu", "memory", "pids"]).is_empty());
        assert!(
            Limits::default().needing(&[]).is_empty(),
            "nothing set, nothing needed"
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

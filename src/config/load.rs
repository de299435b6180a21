//! Reading the agent file and the site files of its `sites_dir`, and the checks across
//! sites: overlapping listeners, and budgets that together exceed the host's memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::site::{validate_logs, validate_site};
use super::{
    AgentConfig, CgroupBase, ConfigError, ListenAddr, LogPolicy, OutputMode, Problems, RawAgent,
    RawSite, SiteConfig, err, format_size, parse_size,
};

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
    let (config, broken) = load_each_keeping(path, holds, &BTreeMap::new())?;
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
    load_each_keeping(path, &|_| false, &BTreeMap::new())
}

/// As [`load_each`], for an agent that adopts the workers an earlier one left running:
/// `running` is the configuration each such site runs with (by name). As a reload would, a
/// site whose file keeps the addresses it runs with holds them against the other files; a
/// site whose file does not load runs on as it runs (see `event::recovery`), so its
/// addresses and its budget are held against the other files too (a new file that wants
/// them is the one put aside).
pub fn load_each_running(
    path: &Path,
    running: &BTreeMap<String, SiteConfig>,
) -> Result<(AgentConfig, Vec<BrokenSite>), ConfigError> {
    let holds = |sc: &SiteConfig| {
        running
            .get(sc.name.as_str())
            .is_some_and(|r| r.listen == sc.listen)
    };
    load_each_keeping(path, &holds, running)
}

fn load_each_keeping(
    path: &Path,
    holds: &dyn Fn(&SiteConfig) -> bool,
    running: &BTreeMap<String, SiteConfig>,
) -> Result<(AgentConfig, Vec<BrokenSite>), ConfigError> {
    let text = read_text(path)?;
    // Every problem of the file at once: what the parser refuses (those keys taken out)
    // beside what validation finds in the rest.
    let (raw, parsed) = parse_lenient::<RawAgent>(path, &text);
    let Some(mut raw) = raw else {
        let mut all = parsed.into_iter();
        return Err(match all.next() {
            Some(mut first) => {
                first.also = all.collect();
                first
            }
            None => err(path, "-", "the file could not be read as TOML"),
        });
    };
    let mut p = Problems::default();
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
            p.push(err(
                path,
                "cgroup_base",
                format!("invalid value \"{other}\": use \"auto\", \"off\" or an absolute path"),
            ));
            CgroupBase::Auto
        }
    };
    let default_logs = p.or(
        validate_logs(path, "logs", &mut raw.logs, LogPolicy::default()),
        LogPolicy::default(),
    );
    let memory_reserve = match &raw.memory_reserve {
        Some(s) => p.or(
            parse_size(s).map_err(|m| err(path, "memory_reserve", m)),
            DEFAULT_MEMORY_RESERVE,
        ),
        None => DEFAULT_MEMORY_RESERVE,
    };
    let metrics = match raw.metrics.as_deref() {
        None => None,
        Some(text) => p.ok(text.parse::<std::net::SocketAddr>().map_err(|_| {
            err(
                path,
                "metrics",
                format!("invalid address \"{text}\": use an IP address and a port, such as \"127.0.0.1:9464\""),
            )
        })),
    };
    let mut all: Vec<ConfigError> = parsed;
    if let Some(mut e) = p.into_error() {
        locate(&text, &mut e);
        all.extend(e.all().map(|x| ConfigError {
            also: Vec::new(),
            ..x.clone()
        }));
    }
    all.sort_by_key(|e| (e.line.is_none(), e.line));
    let mut all = all.into_iter();
    if let Some(mut first) = all.next() {
        first.also = all.collect();
        return Err(first);
    }

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
        match site_from_file(&file, default_logs) {
            Ok(site) => sites.push(site),
            Err(error) => broken.push(BrokenSite { name, error }),
        }
    }
    // What runs on as it runs, its file not loading: checked against, never returned.
    let as_running: Vec<SiteConfig> = broken
        .iter()
        .filter_map(|b| running.get(&b.name).cloned())
        .collect();
    let mut held = as_running.len();
    let own = AgentAddrs::in_file(path, &control_socket, &state_dir, metrics);
    // A site whose workers run on its addresses keeps its TCP ones against the file's
    // `metrics`: the agent serves no metrics there (`Agent::start`; a reload leaves
    // `metrics` as it is served until a restart).
    let mine = |site: &SiteConfig| {
        if holds(site) {
            own.check_paths(site)
        } else {
            own.check(site)
        }
    };
    let mut kept: Vec<SiteConfig> = as_running;
    // A running site whose file now wants the agent's own addresses runs on as recorded
    // (`event::recovery`): what it runs with is held against every other file, as for a
    // file that does not load.
    let mut others = Vec::new();
    for site in sites {
        match running.get(site.name.as_str()).map(|r| (r, mine(&site))) {
            Some((r, Err(error))) => {
                kept.insert(0, r.clone());
                held += 1;
                broken.push(BrokenSite {
                    name: site.name.to_string(),
                    error,
                });
            }
            _ => others.push(site),
        }
    }
    let mut sites = others;
    // Those that hold their addresses first (stable: then in file order).
    sites.sort_by_key(|s| !holds(s));
    for site in sites {
        if let Err(error) = mine(&site) {
            broken.push(BrokenSite {
                name: site.name.to_string(),
                error,
            });
            continue;
        }
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
        if let Some(limit) = fd_limit() {
            if let Err(error) = check_fds(&with, limit) {
                broken.push(BrokenSite {
                    name: site.name.to_string(),
                    error,
                });
                continue;
            }
        }
        kept.push(site);
    }
    broken.sort_by(|a, b| a.error.file.cmp(&b.error.file));
    kept.drain(..held);
    kept.sort_by(|a, b| a.file.cmp(&b.file));
    let sites = kept;
    let config = AgentConfig {
        file: path.to_path_buf(),
        control_socket,
        state_dir,
        sites_dir,
        cgroup_base,
        memory_reserve,
        metrics,
        sites,
    };
    Ok((config, broken))
}

/// A site's configuration from the text its file had (`site_file`), with the defaults of
/// the agent file at `agent_file` as it is now: what an earlier agent ran a site with,
/// recorded, for a new one that adopts its workers after the file changed.
pub fn site_from_text(
    agent_file: &Path,
    site_file: &Path,
    text: &str,
) -> Result<SiteConfig, ConfigError> {
    let mut raw: RawAgent = read_toml(agent_file)?;
    let default_logs = validate_logs(agent_file, "logs", &mut raw.logs, LogPolicy::default())?;
    site_from(site_file, text, default_logs)
}

/// The site file at `file`, read, parsed and validated; every problem with its line.
fn site_from_file(file: &Path, default_logs: LogPolicy) -> Result<SiteConfig, ConfigError> {
    site_from(file, &read_text(file)?, default_logs)
}

/// The site file `file` from its contents `text`; every problem with its line.
///
/// The file's parse problems (unknown keys, wrong types) and its validation problems are
/// reported together: what is left once the keys at fault are taken out is validated too,
/// and a validation problem of a key already at fault is not said twice.
pub(super) fn site_from(
    file: &Path,
    text: &str,
    default_logs: LogPolicy,
) -> Result<SiteConfig, ConfigError> {
    let (raw, parsed) = parse_lenient::<RawSite>(file, text);
    let validated = raw.map(|raw| validate_site(file, &raw, default_logs));
    let mut p = Problems::default();
    // A key at fault, one inside it, or the table holding it (whose check may only be
    // missing what was taken out).
    let at_fault = |key: &str| {
        let within = |inner: &str, outer: &str| {
            inner.starts_with(&format!("{outer}.")) || inner.starts_with(&format!("{outer}["))
        };
        parsed
            .iter()
            .any(|e| e.key == key || within(key, &e.key) || within(&e.key, key))
    };
    let value = match validated {
        Some(Ok(site)) => Some(site),
        Some(Err(mut e)) => {
            locate(text, &mut e);
            e.also.retain(|x| !at_fault(&x.key));
            let first_follows = at_fault(&e.key);
            let also = std::mem::take(&mut e.also);
            if !first_follows {
                p.push(e);
            }
            also.into_iter().for_each(|x| p.push(x));
            None
        }
        None => None,
    };
    let mut all: Vec<ConfigError> = parsed;
    if let Some(e) = p.into_error() {
        all.extend(e.all().map(|x| ConfigError {
            also: Vec::new(),
            ..x.clone()
        }));
    }
    // In the file's order; problems of another file (an env_file) and those without a
    // line after.
    all.sort_by_key(|e| (e.file != file, e.line.is_none(), e.line));
    let mut all = all.into_iter();
    match (all.next(), value) {
        (None, Some(site)) => Ok(site),
        (None, None) => Err(err(file, "-", "the file could not be validated")),
        (Some(mut first), _) => {
            first.also = all.collect();
            Err(first)
        }
    }
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

/// Fds the agent keeps whatever its sites: the control socket and its connections, the
/// notify socket, signals, the reactor, the fd holder's connection, the cgroup tree, and
/// a block of `MAX_CHILD_FDS + 2` for each thread that starts workers (at most
/// [`START_THREADS`]).
pub const AGENT_FDS: u64 =
    128 + START_THREADS as u64 * (crate::sys::spawn::MAX_CHILD_FDS as u64 + 2);

/// The most threads that start workers: the loop's, its helpers, and the one that keeps
/// the whole bounding set (`sys::spawn::set_whole_set_aside`).
pub const START_THREADS: usize = 5;

/// Fds the agent keeps for a site besides one per worker (its pidfd): the log file, the
/// output sockets' four ends (stdout, stderr), and per listener its socket in each of two generations (a
/// deploy) and steering maps.
fn site_fds(site: &SiteConfig) -> u64 {
    10 + 4 * site.listen.len() as u64
}

/// The agent's fd limit: the hard `RLIMIT_NOFILE`, which it raises its soft limit to at
/// start; `None` when unlimited.
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum
}

/// Refuses the last of `sites` when the fds the agent needs for all of them (one per
/// worker, at the most workers each may run, and `site_fds` per site, plus
/// `AGENT_FDS`) do not fit in `limit`. A deploy runs two generations for a while, so
/// a site near the limit may see spawns fail with `EMFILE` during one; `status` shows it.
pub fn check_fds(sites: &[SiteConfig], limit: u64) -> Result<(), ConfigError> {
    let Some(site) = sites.last() else {
        return Ok(());
    };
    let need = |s: &SiteConfig| u64::from(s.workers) * s.output.fds_per_worker() + site_fds(s);
    let others: u64 = sites[..sites.len() - 1].iter().map(need).sum();
    let total = AGENT_FDS + others + need(site);
    if total > limit {
        return Err(err(
            &site.file,
            "workers",
            format!(
                "{} workers need {} fds in the agent ({} each, and {} for the site), the other sites {} and the agent itself {}: {total} in all, beyond the agent's fd limit ({limit}, the hard RLIMIT_NOFILE; raise it, e.g. LimitNOFILE= in the systemd unit, {}or ask for fewer workers)",
                site.workers,
                need(site),
                match site.output {
                    OutputMode::Pipe => "a pidfd and two output pipes",
                    OutputMode::Socket => "a pidfd",
                },
                site_fds(site),
                others,
                AGENT_FDS,
                match site.output {
                    OutputMode::Pipe => "write output = \"socket\" (one fd per worker), ",
                    OutputMode::Socket => "",
                }
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

/// The socket in `state_dir` that workers' readiness (`sd_notify`) comes to.
pub const NOTIFY_SOCKET: &str = "notify.sock";
/// The socket in `state_dir` of the fd holder (`event::holder`).
pub const HOLDER_SOCKET: &str = "fdholder.sock";
/// The names of the sockets the agent binds in its `state_dir`.
pub const STATE_SOCKETS: [&str; 2] = [NOTIFY_SOCKET, HOLDER_SOCKET];

/// What the agent itself listens on, which no site may take: its control socket, the
/// sockets it binds in its state directory ([`STATE_SOCKETS`]) and its metrics address.
/// Paths resolved once, as the kernel would find them.
#[derive(Debug, Clone)]
pub struct AgentAddrs {
    /// Where the addresses come from, for the messages: `(control_socket in FILE)`, or
    /// `(served until the agent restarts)`.
    origin: String,
    control_socket: PathBuf,
    state_sockets: Vec<PathBuf>,
    state_dir: PathBuf,
    metrics: Option<std::net::SocketAddr>,
}

impl AgentAddrs {
    /// The addresses `file` gives the agent.
    fn in_file(
        file: &Path,
        control_socket: &Path,
        state_dir: &Path,
        metrics: Option<std::net::SocketAddr>,
    ) -> AgentAddrs {
        AgentAddrs::new(
            format!("in {}", file.display()),
            control_socket,
            state_dir,
            metrics,
        )
    }

    /// The addresses a running agent serves: the paths `config` has (which a reload does
    /// not change until the agent restarts), and `metrics` where it serves them.
    pub fn served(config: &AgentConfig, metrics: Option<std::net::SocketAddr>) -> AgentAddrs {
        AgentAddrs::new(
            "served until the agent restarts".to_string(),
            &config.control_socket,
            &config.state_dir,
            metrics,
        )
    }

    fn new(
        origin: String,
        control_socket: &Path,
        state_dir: &Path,
        metrics: Option<std::net::SocketAddr>,
    ) -> AgentAddrs {
        AgentAddrs {
            origin,
            control_socket: resolved(control_socket),
            state_sockets: STATE_SOCKETS
                .iter()
                .map(|n| resolved(&state_dir.join(n)))
                .collect(),
            state_dir: state_dir.to_path_buf(),
            metrics,
        }
    }

    /// Refuses `site` when it would listen where the agent does. A site's unix socket is
    /// bound by removing the socket already at its path, so one at the control socket's
    /// path would take it from the agent (and lock every client out until a restart), one
    /// at its notify or fd holder socket's path that one; and a site's TCP listener on the
    /// metrics address would join the metrics socket's `SO_REUSEPORT` group, the kernel
    /// then sharing the connections of either between the two.
    pub fn check(&self, site: &SiteConfig) -> Result<(), ConfigError> {
        self.check_in(site, true)
    }

    /// As [`AgentAddrs::check`], the unix paths only: for a site whose workers run on its
    /// TCP addresses, which the agent then does not serve metrics on (`Agent::start`).
    pub fn check_paths(&self, site: &SiteConfig) -> Result<(), ConfigError> {
        self.check_in(site, false)
    }

    fn check_in(&self, site: &SiteConfig, metrics: bool) -> Result<(), ConfigError> {
        let origin = &self.origin;
        for l in &site.listen {
            let problem = match &l.addr {
                ListenAddr::Unix(p) => {
                    let at = resolved(p);
                    if at == self.control_socket {
                        Some(format!(
                            "{} is the agent's control socket (control_socket {origin})",
                            l.addr
                        ))
                    } else if self.state_sockets.contains(&at) {
                        Some(format!(
                            "{} is one of the agent's own sockets (in its state_dir {}, {origin})",
                            l.addr,
                            self.state_dir.display()
                        ))
                    } else {
                        None
                    }
                }
                ListenAddr::Tcp(_) => self
                    .metrics
                    .filter(|m| metrics && ListenAddr::Tcp(*m).overlaps(&l.addr))
                    .map(|m| {
                        format!(
                            "{} overlaps the agent's metrics address {m} (metrics {origin})",
                            l.addr
                        )
                    }),
            };
            if let Some(message) = problem {
                return Err(err(&site.file, "listen", message));
            }
        }
        Ok(())
    }
}

/// `path` as the kernel would find it: made absolute, its longest part that exists with
/// its symlinks resolved, the rest (which holds none) with `.` and `..` taken out. Two
/// spellings of one socket compare equal.
fn resolved(path: &Path) -> PathBuf {
    use std::path::Component;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // The components past the part that exists, last first.
    let mut rest = Vec::new();
    let mut base = path.as_path();
    let mut out = loop {
        if let Ok(real) = base.canonicalize() {
            break real;
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(_)) => {
                rest.extend(base.components().next_back());
                base = parent;
            }
            // `..` or `.` last, or the root: resolved lexically from here.
            _ => {
                rest.extend(base.components().rev());
                break PathBuf::new();
            }
        }
    };
    for c in rest.into_iter().rev() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn read_toml<T: for<'de> Deserialize<'de>>(file: &Path) -> Result<T, ConfigError> {
    parse_toml(file, &read_text(file)?)
}

/// The contents of `file`.
fn read_text(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| err(file, "-", format!("cannot read the file: {e}")))
}

pub(super) use super::parse::{locate, parse_lenient, parse_toml};

#[cfg(test)]
mod tests {
    use super::super::test_site as site;
    use super::*;

    #[test]
    fn addresses_overlap_as_the_kernel_binds_them() {
        let tcp = |a: &str| ListenAddr::Tcp(a.parse().expect("address"));
        for (a, b, collide) in [
            ("127.0.0.1:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "127.0.0.1:81", false),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            ("[::]:80", "127.0.0.1:80", true),
            ("[::]:80", "[::1]:80", true),
            ("[::ffff:127.0.0.1]:80", "127.0.0.1:80", true),
            ("[::ffff:0.0.0.0]:80", "127.0.0.2:80", true),
            ("0.0.0.0:80", "[::1]:80", false),
            ("127.0.0.1:80", "127.0.0.2:80", false),
        ] {
            assert_eq!(tcp(a).overlaps(&tcp(b)), collide, "{a} {b}");
            assert_eq!(tcp(b).overlaps(&tcp(a)), collide, "{b} {a}");
        }
    }

    #[test]
    fn a_running_site_put_aside_for_the_agents_socket_still_holds_its_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("sites.d")).expect("mkdir");
        let file = d.join("hatchery.toml");
        std::fs::write(
            &file,
            format!(
                "control_socket = \"{0}/c.sock\"\nstate_dir = \"{0}/state\"\nsites_dir = \"{0}/sites.d\"\n",
                d.display()
            ),
        )
        .expect("write");
        // `web` runs on a port; its file now adds a unix socket where the agent's notify
        // socket goes, and a new file, before it in name order, wants the port.
        let web = d.join("sites.d/web.toml");
        let tcp = "[[listen]]\ntcp = \"127.0.0.1:8080\"\n";
        std::fs::write(&web, format!("name = \"web\"\ncommand = [\"x\"]\n{tcp}")).expect("write");
        let running = BTreeMap::from([(
            "web".to_string(),
            site_from_file(&web, LogPolicy::default()).expect("web"),
        )]);
        for holds in [false, true] {
            let unix = format!("[[listen]]\nunix = \"{}/state/notify.sock\"\n", d.display());
            // Held: the same listeners as it runs with (the socket was there before).
            let text = if holds {
                format!("name = \"web\"\ncommand = [\"y\"]\n{tcp}")
            } else {
                format!("name = \"web\"\ncommand = [\"x\"]\n{unix}{tcp}")
            };
            std::fs::write(&web, text).expect("write");
            std::fs::write(
                d.join("sites.d/api.toml"),
                format!("name = \"api\"\ncommand = [\"x\"]\n{tcp}"),
            )
            .expect("write");
            let (config, broken) = load_each_running(&file, &running).expect("the agent file");
            let why = |name: &str| {
                broken
                    .iter()
                    .find(|b| b.name == name)
                    .map(|b| b.error.message.clone())
            };
            assert!(
                why("api").is_some_and(|m| m.contains("overlaps tcp 127.0.0.1:8080 of site web")),
                "{holds}: {broken:?}"
            );
            if holds {
                assert_eq!(config.sites.len(), 1, "web, changed: {:?}", config.sites);
            } else {
                assert!(config.sites.is_empty(), "{:?}", config.sites);
                assert!(
                    why("web").is_some_and(|m| m.contains("one of the agent's own sockets")),
                    "{broken:?}"
                );
            }
        }
    }

    #[test]
    fn a_path_resolves_as_the_kernel_would_find_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().canonicalize().expect("real");
        std::fs::create_dir_all(real.join("state/x")).expect("mkdir");
        std::os::unix::fs::symlink(real.join("state/x"), real.join("l")).expect("symlink");
        // `..` after a symlink leaves the symlink's target, not the link's directory.
        assert_eq!(
            resolved(&real.join("l/../n.sock")),
            real.join("state/n.sock")
        );
        assert_eq!(
            resolved(&real.join("l/./n.sock")),
            real.join("state/x/n.sock")
        );
        // What does not exist yet is taken as written, past what does.
        assert_eq!(
            resolved(&real.join("l/new/n.sock")),
            real.join("state/x/new/n.sock")
        );
        assert_eq!(
            resolved(Path::new("/no/such/../dir/s")),
            Path::new("/no/dir/s")
        );
        let cwd = std::env::current_dir()
            .expect("cwd")
            .canonicalize()
            .expect("cwd");
        assert_eq!(resolved(Path::new("some.sock")), cwd.join("some.sock"));
    }

    #[test]
    fn a_site_is_held_off_the_agents_own_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let own = AgentAddrs::in_file(
            &d.join("hatchery.toml"),
            &d.join("control.sock"),
            &d.join("state"),
            Some("127.0.0.1:9464".parse().expect("address")),
        );
        let on = |listen: String| {
            let text = format!("name = \"blog\"\ncommand = [\"x\"]\n[[listen]]\n{listen}\n");
            own.check(&site(&text).expect("valid"))
                .map_err(|e| e.message)
        };
        let unix = |p: PathBuf| format!("unix = \"{}\"", p.display());
        let tcp = |a: &str| format!("tcp = \"{a}\"");
        assert!(
            on(unix(d.join("state/../control.sock"))).is_err_and(|m| m.contains("control socket"))
        );
        for name in STATE_SOCKETS {
            assert!(on(unix(d.join("state").join(name))).is_err_and(|m| m.contains("own sockets")));
        }
        assert_eq!(on(unix(d.join("state/web.sock"))), Ok(()));
        assert_eq!(on(unix(d.join("web.sock"))), Ok(()));
        let m = on(tcp("[::]:9464")).expect_err("the metrics address");
        assert!(
            m.contains("overlaps the agent's metrics address 127.0.0.1:9464 (metrics in "),
            "{m}"
        );
        assert_eq!(on(tcp("127.0.0.1:9465")), Ok(()));
        assert_eq!(on(tcp("[::1]:9464")), Ok(()));
    }

    #[test]
    fn every_problem_of_the_agent_file_is_reported_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sites.d")).expect("sites.d");
        let file = dir.path().join("hatchery.toml");
        // What validation finds (lines 2 to 4) and what the parser refuses (6 and 7).
        std::fs::write(
            &file,
            "sites_dir = \"sites.d\"\ncgroup_base = \"sometimes\"\nmemory_reserve = \"256MB\"\nmetrics = \"localhost:9464\"\n[logs]\nkeep = -1\nkep = 3\n",
        )
        .expect("write");
        let e = load(&file).expect_err("invalid");
        let all: Vec<(Option<u32>, &str)> = e.all().map(|x| (x.line, x.key.as_str())).collect();
        assert_eq!(
            all,
            vec![
                (Some(2), "cgroup_base"),
                (Some(3), "memory_reserve"),
                (Some(4), "metrics"),
                (Some(6), "logs.keep"),
                (Some(7), "logs.kep"),
            ],
            "{e}"
        );
        // Not TOML at all: said as before.
        std::fs::write(&file, "sites_dir = \n").expect("write");
        assert_eq!(load(&file).expect_err("invalid").line, Some(1));
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
    fn workers_must_fit_in_the_agents_fd_limit() {
        let big =
            site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 10000\noutput = \"socket\"\n")
                .expect("valid");
        let small = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 100\n[[listen]]\ntcp = \"127.0.0.1:8080\"\n")
            .expect("valid");
        // 10,000 workers on the output socket fit in this machine's 20,000 fds, with room
        // for the rest.
        assert!(check_fds(std::slice::from_ref(&big), 20_000).is_ok());
        assert!(check_fds(&[big.clone(), small.clone()], 20_000).is_ok());
        // The last site is the one refused, with the numbers that do not fit.
        let e = check_fds(&[big.clone(), small.clone()], 10_400).unwrap_err();
        assert_eq!(e.key, "workers");
        assert!(
            e.message.contains("100 workers need 314 fds in the agent (a pidfd and two output pipes each, and 14 for the site)")
                && e.message.contains("the other sites 10010")
                && e.message.contains("10782 in all")
                && e.message.contains("(10400, the hard RLIMIT_NOFILE")
                && e.message.contains("write output = \"socket\""),
            "{e}"
        );
        // Exactly at the limit fits.
        assert!(check_fds(&[big, small], 10_782).is_ok());
        // With two pipes each, 10,000 workers do not fit in 20,000.
        let piped = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 10000\n").expect("valid");
        let e = check_fds(&[piped], 20_000).unwrap_err();
        assert!(e.message.contains("10000 workers need 30010 fds"), "{e}");
    }

    #[test]
    fn metrics_is_an_address_or_an_error_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sites")).expect("mkdir");
        let file = dir.path().join("hatchery.toml");
        let write = |extra: &str| {
            std::fs::write(&file, format!("sites_dir = \"sites\"\n{extra}")).expect("write");
        };
        write("");
        assert_eq!(load(&file).expect("valid").metrics, None);
        write("metrics = \"127.0.0.1:9464\"\n");
        let c = load(&file).expect("valid");
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().expect("address")));
        assert!(c.effective_toml().contains("metrics = \"127.0.0.1:9464\""));
        write("metrics = \"[::1]:9464\"\n");
        assert!(load(&file).expect("valid").metrics.is_some());
        for bad in ["localhost:9464", "127.0.0.1", ":9464", "127.0.0.1:99999"] {
            write(&format!("metrics = \"{bad}\"\n"));
            let e = load(&file).expect_err(bad);
            assert_eq!(e.key, "metrics", "{bad}");
            assert!(e.message.contains("127.0.0.1:9464"), "{e}");
        }
    }
}

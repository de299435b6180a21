//! Validating one site file: every key checked, every default applied, every error
//! naming the file, the key and what is accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    AutoWorkers, ConfigError, DeployPolicy, Limits, ListenAddr, ListenSpec, LogPolicy,
    MAX_LISTENERS, MAX_WORKERS, RELEASE_PLACEHOLDER, RawDeploy, RawFlapping, RawListen, RawLogs,
    RawReady, RawRestart, RawSite, RawStop, RawWorkers, ReadyCheck, ReadyPolicy, RestartPolicy,
    Signal, SiteConfig, SiteName, StopPolicy, err, format_duration, format_size, lookup_group,
    lookup_user, parse_duration, parse_size, sandbox,
};

pub(super) fn validate_logs(
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

#[cfg(test)]
mod tests {
    use super::super::test_site as site;
    use super::*;

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
}

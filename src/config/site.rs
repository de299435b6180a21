//! Validating one site file: every key checked, every default applied, every error
//! naming the file, the key and what is accepted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    AutoWorkers, ConfigError, DeployPolicy, Effective, HealthPolicy, HttpCheck, Limits, ListenAddr,
    ListenMode, ListenSpec, LogPolicy, MAX_LISTENERS, MAX_STOP_SIGNALS, MAX_WARMUP, MAX_WORKERS,
    OutputMode, Problems, RELEASE_PLACEHOLDER, RawDeploy, RawFlapping, RawFraction, RawHealth,
    RawLogs, RawReady, RawRestart, RawScale, RawSite, RawStop, RawWarmup, RawWorkers, ReadyCheck,
    ReadyPolicy, RestartPolicy, ScaleBy, ScalePolicy, Signal, SiteConfig, SiteMode, SiteName,
    StopPolicy, envfile, err, format_duration, format_size, lookup_group, lookup_user,
    parse_duration, parse_size, quoted, sandbox,
};

/// The `[logs]` table at `slot` (`key`), with `default` for what it leaves out; every
/// default taken is written into it.
pub(super) fn validate_logs(
    file: &Path,
    key: &str,
    slot: &mut Option<RawLogs>,
    default: LogPolicy,
) -> Result<LogPolicy, ConfigError> {
    let mut p = Problems::default();
    let raw = slot.get_or_insert_with(RawLogs::default);
    let max_size = match &raw.max_size {
        Some(s) => p.or(
            parse_size(s).map_err(|m| err(file, &format!("{key}.max_size"), m)),
            default.max_size,
        ),
        None => {
            raw.max_size = Some(format_size(default.max_size));
            default.max_size
        }
    };
    if max_size < 4096 {
        p.push(err(file, &format!("{key}.max_size"), "must be at least 4K"));
    }
    let keep = *raw.keep.get_or_insert(default.keep);
    if keep > 100 {
        p.push(err(file, &format!("{key}.keep"), "must be at most 100"));
    }
    p.finish(LogPolicy { max_size, keep })
}

/// The duration at `slot` (`key`), or `default`, which is then written there.
fn duration_key(
    file: &Path,
    key: &str,
    slot: &mut Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match slot {
        Some(s) => parse_duration(s).map_err(|m| err(file, key, m)),
        None => {
            *slot = Some(format_duration(default));
            Ok(default)
        }
    }
}

/// The duration at `slot` (`key`), or `default`, which is then written there; a value
/// that does not parse is recorded in `p`, and `default` stands in for it.
fn duration_or(
    p: &mut Problems,
    file: &Path,
    key: &str,
    slot: &mut Option<String>,
    default: Duration,
) -> Duration {
    p.or(duration_key(file, key, slot, default), default)
}

/// `[scale]` of an automatic site, its defaults written in.
fn validate_scale(
    file: &Path,
    slot: &mut Option<RawScale>,
    min: u32,
    listen: &[ListenSpec],
) -> Result<ScalePolicy, ConfigError> {
    let d = ScalePolicy::DEFAULT;
    let raw = slot.get_or_insert_with(RawScale::default);
    let by = match raw.by.get_or_insert_with(|| "memory".into()).as_str() {
        "memory" => ScaleBy::Memory,
        "load" => ScaleBy::Load,
        other => {
            return Err(err(
                file,
                "scale.by",
                format!(
                    "unknown value \"{other}\": use \"memory\" (as many workers as the budget holds) or \"load\" (as many as the load needs, within the budget)"
                ),
            ));
        }
    };
    let fraction = match raw
        .target
        .get_or_insert(RawFraction::Number(f64::from(d.target_percent) / 100.0))
    {
        RawFraction::Number(f) => Some(*f),
        RawFraction::Text(t) => t
            .trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .map(|p| p / 100.0),
    };
    let target_percent = match fraction {
        Some(f) if f > 0.0 && f <= 1.0 => {
            u32::try_from(((f * 100.0).round() as i64).max(1)).unwrap_or(100)
        }
        _ => {
            return Err(err(
                file,
                "scale.target",
                "use a fraction of each worker's time above 0 and at most 1, like 0.7, or a percentage like \"70%\"",
            ));
        }
    };
    let interval = duration_key(file, "scale.interval", &mut raw.interval, d.interval)?;
    if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&interval) {
        return Err(err(file, "scale.interval", "use 50ms to 60s"));
    }
    let grow_cooldown = duration_key(
        file,
        "scale.grow_cooldown",
        &mut raw.grow_cooldown,
        d.grow_cooldown,
    )?;
    let shrink_cooldown = duration_key(
        file,
        "scale.shrink_cooldown",
        &mut raw.shrink_cooldown,
        d.shrink_cooldown,
    )?;
    if shrink_cooldown < interval {
        return Err(err(
            file,
            "scale.shrink_cooldown",
            "must be at least scale.interval: a shrink needs samples that say fewer workers do",
        ));
    }
    // With no worker running, only a queue of connections can say that one is needed.
    let queue = listen
        .iter()
        .any(|l| l.agent_binds() && matches!(l.addr, ListenAddr::Tcp(_)));
    if by == ScaleBy::Load && min == 0 && !queue {
        return Err(err(
            file,
            "workers_min",
            "0 with scale.by = \"load\" needs a TCP listener bound by the agent: its accept queue is the only sign of load while no worker runs",
        ));
    }
    Ok(ScalePolicy {
        by,
        target_percent,
        interval,
        grow_cooldown,
        shrink_cooldown,
    })
}

const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Whether the agent sets `name` for every worker (a site may not).
fn reserved_env(name: &str) -> bool {
    RESERVED_ENV.contains(&name) || name.starts_with("HATCHERY_")
}

/// Validates one site file's contents.
///
/// Each default is applied in one place, where it is written into a copy of `raw` as the
/// file would spell it; the configuration keeps that copy ([`SiteConfig::effective`]), so
/// the effective file `check` prints is the one validated here, not a second description
/// of the defaults.
pub fn validate_site(
    file: &Path,
    raw: &RawSite,
    default_logs: LogPolicy,
) -> Result<SiteConfig, ConfigError> {
    let mut eff = raw.clone();
    // Every problem is recorded and validation goes on with a stand-in value, so that
    // one run reports all of them; the stand-ins are never returned.
    let mut p = Problems::default();
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("site");
    let name = match eff.name.as_deref() {
        None => {
            p.push(err(
                file,
                "name",
                "missing: every site file needs name = \"...\"",
            ));
            SiteName(stem.into())
        }
        Some(n) => p.or(
            SiteName::new(n).map_err(|m| err(file, "name", m)),
            SiteName(stem.into()),
        ),
    };
    if stem != name.as_str() && p.is_empty() {
        p.push(err(
            file,
            "name",
            format!(
                "the site is named \"{name}\" but its file is {stem}.toml: name the file {name}.toml"
            ),
        ));
    }
    let command = eff.command.clone().unwrap_or_default();
    if command.is_empty() || command[0].is_empty() {
        p.push(err(
            file,
            "command",
            "missing or empty: give the worker's argv, e.g. [\"/usr/bin/python3\", \"-m\", \"app\"]",
        ));
    } else if command.iter().any(|a| a.contains('\0')) {
        p.push(err(file, "command", "arguments must not contain NUL bytes"));
    }
    let (workers, auto) = match eff.workers.get_or_insert(RawWorkers::Count(1)) {
        RawWorkers::Count(n) => (*n, None),
        RawWorkers::Auto(a) if a == "auto" => {
            let min = *eff.workers_min.get_or_insert(1);
            let max = *eff.workers_max.get_or_insert(64);
            if min > max || max == 0 || max > MAX_WORKERS {
                p.push(err(
                    file,
                    "workers_max",
                    format!("use 1 to {MAX_WORKERS}, at least workers_min ({min})"),
                ));
            }
            (max.min(MAX_WORKERS), Some((min.min(max), max)))
        }
        RawWorkers::Auto(other) => {
            p.push(err(
                file,
                "workers",
                format!("invalid value \"{other}\": use a number or \"auto\""),
            ));
            (1, None)
        }
    };
    // Filled above only for "auto": anything here was written.
    if auto.is_none() && (eff.workers_min.is_some() || eff.workers_max.is_some()) {
        p.push(err(
            file,
            "workers_min",
            "workers_min and workers_max need workers = \"auto\"",
        ));
    }
    if workers > MAX_WORKERS {
        p.push(err(
            file,
            "workers",
            format!("{workers} is too many: use 0 to {MAX_WORKERS}"),
        ));
    }

    // Users: default to the agent's own identity.
    let (uid, user_gid) = match &eff.user {
        Some(u) => match lookup_user(u) {
            Some(entry) => (entry.uid, entry.gid),
            None => {
                p.push(err(file, "user", format!("no such user `{u}`")));
                (u32::MAX, u32::MAX)
            }
        },
        None => (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
    };
    let gid = match &eff.group {
        Some(g) => lookup_group(g).unwrap_or_else(|| {
            p.push(err(file, "group", format!("no such group `{g}`")));
            u32::MAX
        }),
        None => user_gid,
    };

    // The environment file's variables under the file's own `env` (which wins).
    let mut env = eff.env.clone();
    if let Some(path) = &eff.env_file {
        let path = file.parent().unwrap_or(Path::new("/")).join(path);
        let (vars, bad) = p.ok(envfile::read(file, &path)).unwrap_or_default();
        if let Some(bad) = bad {
            p.push(bad);
        }
        for (k, v) in vars {
            if reserved_env(&k) {
                let mut e = err(
                    &path,
                    "env_file",
                    format!("{k} is set by the agent for every worker and cannot be overridden"),
                );
                e.line = Some(v.line);
                p.push(e);
            }
            env.entry(k).or_insert(v.value);
        }
    }
    for (k, v) in &eff.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            p.push(err(
                file,
                &format!("env.{k}"),
                "names must be non-empty without '=' or NUL, values without NUL",
            ));
        } else if reserved_env(k) {
            p.push(err(
                file,
                &format!("env.{k}"),
                "is set by the agent for every worker and cannot be overridden",
            ));
        }
    }

    if eff.listen.len() > MAX_LISTENERS {
        p.push(err(
            file,
            "listen",
            format!("at most {MAX_LISTENERS} listeners"),
        ));
    }
    let mut listen = Vec::new();
    for (i, l) in eff.listen.iter_mut().enumerate() {
        let key = format!("listen[{i}]");
        let addr = match (&l.tcp, &l.unix) {
            (Some(t), None) => match t.parse() {
                Ok(a) => ListenAddr::Tcp(a),
                Err(_) => {
                    p.push(err(file, &format!("{key}.tcp"), format!("invalid address \"{t}\": use host:port, e.g. \"127.0.0.1:8000\" or \"[::1]:8000\"")));
                    // A stand-in, so the checks that need a TCP listener say nothing more.
                    ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))
                }
            },
            (None, Some(u)) if u.is_absolute() => ListenAddr::Unix(u.clone()),
            (None, Some(_)) => {
                p.push(err(
                    file,
                    &format!("{key}.unix"),
                    "must be an absolute path",
                ));
                ListenAddr::Unix(PathBuf::from("/"))
            }
            _ => {
                p.push(err(
                    file,
                    &key,
                    "give exactly one of tcp = \"host:port\" or unix = \"/path\"",
                ));
                continue;
            }
        };
        let mode = match l
            .mode
            .get_or_insert_with(|| ListenMode::Agent.name().into())
            .as_str()
        {
            "agent" => ListenMode::Agent,
            "own" => ListenMode::Own,
            other => {
                let names: Vec<String> = ListenMode::NAMES
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect();
                p.push(err(
                    file,
                    &format!("{key}.mode"),
                    format!(
                        "unknown mode \"{other}\": use {} (the agent binds it and passes it as an fd; the app binds this TCP port itself)",
                        names.join(" or ")
                    ),
                ));
                ListenMode::Agent
            }
        };
        if mode == ListenMode::Own {
            p.ok(validate_own(file, &key, l, &addr));
        }
        let lname = l.name.get_or_insert_with(|| format!("listen{i}")).clone();
        if lname.is_empty()
            || lname.len() > 255
            || !lname.chars().all(|c| c.is_ascii_graphic() && c != ':')
        {
            p.push(err(
                file,
                &format!("{key}.name"),
                "use 1 to 255 printable characters without ':'",
            ));
        }
        // Out of range is clamped; the file then says what is used. The app chooses the
        // backlog of a port it binds itself (refused above), so none is written for it.
        let backlog = l.backlog.unwrap_or(1024).clamp(1, 65535);
        if mode == ListenMode::Agent {
            l.backlog = Some(backlog);
        }
        listen.push(ListenSpec {
            name: lname,
            addr,
            backlog,
            mode,
        });
    }

    let stop = validate_stop(file, &mut eff.stop, &mut p);

    let r = eff.restart.get_or_insert_with(RawRestart::default);
    let backoff_initial = duration_or(
        &mut p,
        file,
        "restart.backoff_initial",
        &mut r.backoff_initial,
        Duration::from_millis(100),
    );
    let backoff_max = duration_or(
        &mut p,
        file,
        "restart.backoff_max",
        &mut r.backoff_max,
        Duration::from_secs(30),
    );
    let healthy_after = duration_or(
        &mut p,
        file,
        "restart.healthy_after",
        &mut r.healthy_after,
        Duration::from_secs(60),
    );
    let fl = r.flapping.get_or_insert_with(RawFlapping::default);
    let restart = RestartPolicy {
        backoff_initial,
        backoff_max,
        healthy_after,
        flapping_exits: *fl.exits.get_or_insert(5),
        flapping_within: duration_or(
            &mut p,
            file,
            "restart.flapping.within",
            &mut fl.within,
            Duration::from_secs(10),
        ),
    };
    if restart.backoff_max < restart.backoff_initial {
        p.push(err(
            file,
            "restart.backoff_max",
            "must not be less than restart.backoff_initial",
        ));
    }
    if restart.flapping_exits == 0 {
        p.push(err(file, "restart.flapping.exits", "must be at least 1"));
    }

    let mode = match eff
        .mode
        .get_or_insert_with(|| SiteMode::Exec.name().into())
        .as_str()
    {
        "exec" => SiteMode::Exec,
        "zygote" => SiteMode::Zygote,
        other => {
            let names: Vec<String> = SiteMode::NAMES.iter().map(|n| format!("\"{n}\"")).collect();
            p.push(err(
                file,
                "mode",
                format!(
                    "unknown mode \"{other}\": use {} (each worker runs command; command starts a zygote that workers are forked from)",
                    names.join(" or ")
                ),
            ));
            SiteMode::Exec
        }
    };

    let output = match eff
        .output
        .get_or_insert_with(|| OutputMode::Pipe.name().into())
        .as_str()
    {
        "pipe" => OutputMode::Pipe,
        "socket" => OutputMode::Socket,
        other => {
            let names: Vec<String> = OutputMode::NAMES
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect();
            p.push(err(
                file,
                "output",
                format!(
                    "unknown output \"{other}\": use {} (a pipe per worker; one socket for the site's workers, one fd per worker in the agent)",
                    names.join(" or ")
                ),
            ));
            OutputMode::Pipe
        }
    };

    let rd = eff.ready.get_or_insert_with(RawReady::default);
    let check = match rd.check.get_or_insert_with(|| "none".into()).as_str() {
        "none" => ReadyCheck::None,
        "notify" => ReadyCheck::Notify,
        "tcp" => ReadyCheck::Tcp,
        "http" => ReadyCheck::Http,
        other => {
            p.push(err(
                file,
                "ready.check",
                format!("unknown check \"{other}\": use \"notify\", \"tcp\", \"http\" or \"none\""),
            ));
            ReadyCheck::None
        }
    };
    let probes = matches!(check, ReadyCheck::Tcp | ReadyCheck::Http);
    if probes && !listen.iter().any(|l| matches!(l.addr, ListenAddr::Tcp(_))) {
        let name = if check == ReadyCheck::Http {
            "http"
        } else {
            "tcp"
        };
        p.push(err(
            file,
            "ready.check",
            format!("\"{name}\" needs at least one [[listen]] with tcp = \"host:port\""),
        ));
    }
    let ready_http = if check == ReadyCheck::Http {
        p.ok(validate_http_check(
            file,
            "ready",
            &mut rd.path,
            &mut rd.status,
            &mut rd.host,
        ))
    } else {
        for (key, set) in [
            ("ready.path", rd.path.is_some()),
            ("ready.status", rd.status.is_some()),
            ("ready.host", rd.host.is_some()),
        ] {
            if set {
                p.push(err(file, key, "only used with ready.check = \"http\""));
            }
        }
        None
    };
    let health = p.or(
        validate_health(file, &mut eff.health, ready_http.as_ref(), &listen),
        None,
    );
    let ready = ReadyPolicy {
        check,
        timeout: duration_or(
            &mut p,
            file,
            "ready.timeout",
            &mut rd.timeout,
            Duration::from_secs(30),
        ),
        settle: duration_or(
            &mut p,
            file,
            "ready.settle",
            &mut rd.settle,
            Duration::from_secs(1),
        ),
    };
    let logs = p.or(
        validate_logs(file, "logs", &mut eff.logs, default_logs),
        default_logs,
    );
    let limits = p.ok(validate_limits(file, &eff));
    let auto = match auto {
        Some((min, max)) => Some(AutoWorkers {
            min,
            max,
            scale: p.or(
                validate_scale(file, &mut eff.scale, min, &listen),
                ScalePolicy::DEFAULT,
            ),
        }),
        None if eff.scale.is_some() => {
            p.push(err(file, "scale", "[scale] needs workers = \"auto\""));
            None
        }
        None => None,
    };
    // Said only of limits that are themselves valid.
    let limits_known = limits.is_some();
    let limits = limits.unwrap_or_default();
    if limits_known
        && auto.is_some()
        && (limits.memory.is_none() || limits.worker_estimate().is_none())
    {
        p.push(err(
            file,
            "workers",
            "\"auto\" needs a memory budget (memory = ...) and a per-worker figure (worker_memory or memory_max)",
        ));
    }
    if let Some(w) = &eff.workdir {
        if !w.is_absolute() && !w.starts_with(RELEASE_PLACEHOLDER) {
            p.push(err(
                file,
                "workdir",
                "must be an absolute path (or start with {release})",
            ));
        }
    }
    let raw_deploy = eff.deploy.get_or_insert_with(RawDeploy::default);
    let deploy = DeployPolicy {
        probation: duration_or(
            &mut p,
            file,
            "deploy.probation",
            &mut raw_deploy.probation,
            Duration::from_secs(1),
        ),
        canary_abort_crashes: *raw_deploy
            .canary_abort
            .get_or_insert_with(Default::default)
            .crashes
            .get_or_insert(1),
    };
    let warmup = p.or(
        validate_warmup(file, eff.deploy.as_ref(), ready_http.as_ref(), &listen),
        Vec::new(),
    );
    let release = p.or(validate_release(file, &eff), None);

    // The user as written: its supplementary groups come from the group database by its
    // name.
    let sandbox = p.ok(sandbox::validate(
        file,
        &mut eff.sandbox,
        raw.user.as_deref(),
    ));
    if sandbox.as_ref().is_some_and(|s| s.root.is_some()) && ready.check == ReadyCheck::Notify {
        p.push(err(
            file,
            "ready.check",
            "\"notify\" cannot reach the agent's notify socket from inside sandbox.root: use \"tcp\", \"http\" or \"none\"",
        ));
    }
    // Where the file names no identity, the effective file names the agent's own (the one
    // resolved above), in numbers.
    eff.user.get_or_insert_with(|| uid.to_string());
    eff.group.get_or_insert_with(|| gid.to_string());

    let Some(sandbox) = sandbox else {
        return Err(p.into_error().expect("the sandbox's problem was recorded"));
    };
    p.finish(SiteConfig {
        name,
        file: file.to_path_buf(),
        command,
        mode,
        output,
        workers,
        auto,
        user: raw.user.clone(),
        group: raw.group.clone(),
        uid,
        gid,
        workdir: eff.workdir.clone(),
        release,
        env,
        listen,
        stop,
        restart,
        ready,
        ready_http,
        deploy,
        health,
        warmup,
        logs,
        limits,
        sandbox,
        effective: Effective(eff),
    })
}

/// `[stop]`: `signal` or `signals` (not both), then `timeout` after each; its defaults
/// written in.
fn validate_stop(file: &Path, slot: &mut Option<RawStop>, p: &mut Problems) -> StopPolicy {
    let raw = slot.get_or_insert_with(RawStop::default);
    let term = Signal(libc::SIGTERM);
    let mut signals = Vec::new();
    match (&raw.signal, &raw.signals) {
        (Some(_), Some(_)) => p.push(err(
            file,
            "stop.signals",
            "give either stop.signal (one signal) or stop.signals (a sequence), not both",
        )),
        (Some(s), None) => {
            signals.extend(p.ok(Signal::parse(s).map_err(|m| err(file, "stop.signal", m))));
        }
        (None, Some(list)) => {
            if list.is_empty() || list.len() > MAX_STOP_SIGNALS {
                p.push(err(
                    file,
                    "stop.signals",
                    format!("give 1 to {MAX_STOP_SIGNALS} signals, e.g. [\"SIGHUP\", \"SIGTERM\"]; SIGKILL follows the last"),
                ));
            }
            for (i, s) in list.iter().take(MAX_STOP_SIGNALS).enumerate() {
                let key = format!("stop.signals[{i}]");
                signals.extend(p.ok(Signal::parse(s).map_err(|m| err(file, &key, m))));
            }
        }
        (None, None) => raw.signal = Some(term.name()),
    }
    let timeout = p.or(
        duration_key(
            file,
            "stop.timeout",
            &mut raw.timeout,
            Duration::from_secs(30),
        ),
        Duration::from_secs(30),
    );
    StopPolicy::sequence(&signals, timeout).unwrap_or(StopPolicy::single(term, timeout))
}

/// A `[[listen]]` with `mode = "own"` (at `key`): a TCP port, not 0, with no backlog
/// (the app's `listen(2)` chooses it).
fn validate_own(
    file: &Path,
    key: &str,
    l: &super::RawListen,
    addr: &ListenAddr,
) -> Result<(), ConfigError> {
    match addr {
        ListenAddr::Unix(_) => Err(err(
            file,
            &format!("{key}.mode"),
            "\"own\" is for tcp = \"host:port\" only: a unix socket the app creates itself needs no [[listen]] (allow its directory in sandbox.landlock.read_write), or let the agent bind it (mode = \"agent\") and pass it as fd 3",
        )),
        ListenAddr::Tcp(a) if a.port() == 0 => Err(err(
            file,
            &format!("{key}.tcp"),
            "with mode = \"own\" give the port the app binds, not 0: the sandbox allows a bind to that port only, and the ready check probes it",
        )),
        ListenAddr::Tcp(_) if l.backlog.is_some() => Err(err(
            file,
            &format!("{key}.backlog"),
            "the app binds a mode = \"own\" port itself and chooses its backlog: remove backlog, or let the agent bind it (mode = \"agent\")",
        )),
        ListenAddr::Tcp(_) => Ok(()),
    }
}

/// `release`: an absolute symlink path resolving to a directory; `{release}` anywhere
/// needs it.
/// `path`, `status` and `host` of an `http` check under `table` (`ready` or `health`),
/// their defaults written in.
fn validate_http_check(
    file: &Path,
    table: &str,
    path: &mut Option<String>,
    status: &mut Option<String>,
    host: &mut Option<String>,
) -> Result<HttpCheck, ConfigError> {
    // What goes into the request line and headers: visible ASCII, no space.
    let token = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic());
    let path = path.get_or_insert_with(|| "/".into()).clone();
    if !path.starts_with('/') || !token(&path) {
        return Err(err(
            file,
            &format!("{table}.path"),
            format!(
                "{}: a path from / (visible ASCII, no spaces), e.g. \"/health\"",
                quoted(&path)
            ),
        ));
    }
    let host = host.clone();
    if let Some(h) = host.as_deref().filter(|h| !token(h)) {
        return Err(err(
            file,
            &format!("{table}.host"),
            format!(
                "{}: a host name (visible ASCII, no spaces), e.g. \"example.com\"",
                quoted(h)
            ),
        ));
    }
    let text = status.get_or_insert_with(|| "2xx".into()).clone();
    let status = parse_status_range(&text).ok_or_else(|| {
        err(
            file,
            &format!("{table}.status"),
            format!("{}: use a class (\"2xx\"), a status (\"200\") or a range (\"200-399\") within 100-599", quoted(&text)),
        )
    })?;
    Ok(HttpCheck { path, host, status })
}

/// `deploy.warmup`: a number of requests of the ready path, or paths; every answer counts.
fn validate_warmup(
    file: &Path,
    raw: Option<&RawDeploy>,
    ready_http: Option<&HttpCheck>,
    listen: &[ListenSpec],
) -> Result<Vec<HttpCheck>, ConfigError> {
    let Some(w) = raw.and_then(|d| d.warmup.as_ref()) else {
        return Ok(Vec::new());
    };
    let key = "deploy.warmup";
    if !listen.iter().any(|l| matches!(l.addr, ListenAddr::Tcp(_))) {
        return Err(err(
            file,
            key,
            "a warm-up needs at least one [[listen]] with tcp = \"host:port\"",
        ));
    }
    let host = ready_http.and_then(|h| h.host.clone());
    let request = |path: String| HttpCheck {
        path,
        host: host.clone(),
        status: (100, 599),
    };
    let too_many = || {
        err(
            file,
            key,
            format!("from 1 to {MAX_WARMUP} requests per worker"),
        )
    };
    match w {
        RawWarmup::Count(n) => {
            let n = usize::try_from(*n).unwrap_or(usize::MAX);
            if n == 0 || n > MAX_WARMUP {
                return Err(too_many());
            }
            let path = ready_http.map_or_else(|| "/".to_string(), |h| h.path.clone());
            Ok(vec![request(path); n])
        }
        RawWarmup::Paths(paths) => {
            if paths.is_empty() || paths.len() > MAX_WARMUP {
                return Err(too_many());
            }
            paths
                .iter()
                .map(|p| {
                    if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) {
                        Ok(request(p.clone()))
                    } else {
                        Err(err(
                            file,
                            key,
                            format!(
                                "{}: a path from / (visible ASCII, no spaces), e.g. \"/\"",
                                quoted(p)
                            ),
                        ))
                    }
                })
                .collect()
        }
    }
}

/// `[health]`, if the file has one: its request defaults to the `http` ready check's.
fn validate_health(
    file: &Path,
    raw: &mut Option<RawHealth>,
    ready_http: Option<&HttpCheck>,
    listen: &[ListenSpec],
) -> Result<Option<HealthPolicy>, ConfigError> {
    let Some(h) = raw.as_mut() else {
        return Ok(None);
    };
    if !listen.iter().any(|l| matches!(l.addr, ListenAddr::Tcp(_))) {
        return Err(err(
            file,
            "health",
            "health checks need at least one [[listen]] with tcp = \"host:port\"",
        ));
    }
    if let Some(r) = ready_http {
        h.path.get_or_insert_with(|| r.path.clone());
        if h.host.is_none() {
            h.host.clone_from(&r.host);
        }
        h.status.get_or_insert_with(|| {
            if r.status.0 / 100 == r.status.1 / 100
                && r.status.0 % 100 == 0
                && r.status.1 % 100 == 99
            {
                format!("{}xx", r.status.0 / 100)
            } else if r.status.0 == r.status.1 {
                r.status.0.to_string()
            } else {
                format!("{}-{}", r.status.0, r.status.1)
            }
        });
    }
    let interval = duration_key(
        file,
        "health.interval",
        &mut h.interval,
        Duration::from_secs(10),
    )?;
    let timeout = duration_key(
        file,
        "health.timeout",
        &mut h.timeout,
        Duration::from_secs(2),
    )?;
    if interval.is_zero() || timeout.is_zero() {
        return Err(err(
            file,
            "health",
            "interval and timeout must be more than 0",
        ));
    }
    let failures = *h.failures.get_or_insert(2);
    if failures == 0 {
        return Err(err(file, "health.failures", "at least 1"));
    }
    let http = validate_http_check(file, "health", &mut h.path, &mut h.status, &mut h.host)?;
    Ok(Some(HealthPolicy {
        interval,
        timeout,
        failures,
        http,
    }))
}

/// `2xx`, `204` or `200-399` as an inclusive range of HTTP statuses (100 to 599).
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let one = |t: &str| t.parse::<u16>().ok().filter(|n| (100..=599).contains(n));
    let (lo, hi) = if let Some(class) = text.strip_suffix("xx") {
        let c: u16 = class.parse().ok().filter(|c| (1..=5).contains(c))?;
        (c * 100, c * 100 + 99)
    } else if let Some((a, b)) = text.split_once('-') {
        (one(a)?, one(b)?)
    } else {
        let n = one(text)?;
        (n, n)
    };
    (lo <= hi).then_some((lo, hi))
}

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
    let mut p = Problems::default();
    let mut size = |key: &str, v: &Option<String>| -> Option<u64> {
        let n = p.ok(parse_size(v.as_deref()?).map_err(|m| err(file, key, m)))?;
        if n < (4 << 20) {
            p.push(err(file, key, "must be at least 4M"));
            return None;
        }
        Some(n)
    };
    let limits = Limits {
        memory: size("memory", &raw.memory),
        pids_max: raw.pids_max,
        cpu_weight: raw.cpu_weight,
        worker_memory_max: size("memory_max", &raw.memory_max),
        worker_memory_high: size("memory_high", &raw.memory_high),
        worker_memory: size("worker_memory", &raw.worker_memory),
    };
    if limits.pids_max == Some(0) {
        p.push(err(file, "pids_max", "must be at least 1"));
    }
    if let Some(w) = limits.cpu_weight {
        if !(1..=10_000).contains(&w) {
            p.push(err(
                file,
                "cpu_weight",
                format!("{w} is out of range: use 1 to 10000"),
            ));
        }
    }
    if let (Some(high), Some(max)) = (limits.worker_memory_high, limits.worker_memory_max) {
        if high > max {
            p.push(err(file, "memory_high", "must not exceed memory_max"));
        }
    }
    if let (Some(w), Some(site)) = (
        limits.worker_memory_max.or(limits.worker_memory_high),
        limits.memory,
    ) {
        if w > site {
            p.push(err(
                file,
                "memory_max",
                "a worker's limit must not exceed the site's memory budget",
            ));
        }
    }
    p.finish(limits)
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
    fn a_warmup_is_paths_or_a_number_of_requests_of_the_ready_path() {
        let base =
            "name = \"blog\"\ncommand = [\"/bin/true\"]\n[[listen]]\ntcp = \"127.0.0.1:1\"\n";
        assert!(site(base).expect("none").warmup.is_empty());
        let s = site(&format!(
            "{base}[deploy]\nwarmup = [\"/\", \"/search?q=x\"]\n"
        ))
        .expect("paths");
        let paths: Vec<&str> = s.warmup.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(paths, ["/", "/search?q=x"]);
        let s = site(&format!(
            "{base}[ready]\ncheck = \"http\"\npath = \"/up\"\nhost = \"a.example\"\n[deploy]\nwarmup = 3\n"
        ))
        .expect("count");
        assert_eq!(s.warmup.len(), 3);
        assert!(
            s.warmup
                .iter()
                .all(|w| w.path == "/up" && w.host.as_deref() == Some("a.example"))
        );
        for bad in [
            "warmup = 0",
            "warmup = 33",
            "warmup = []",
            "warmup = [\"up\"]",
            "warmup = [\"/a b\"]",
        ] {
            let e = site(&format!("{base}[deploy]\n{bad}\n")).unwrap_err();
            assert_eq!(e.key, "deploy.warmup", "{bad}: {e}");
        }
        let e =
            site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[deploy]\nwarmup = 2\n").unwrap_err();
        assert!(e.message.contains("tcp"), "{e}");
    }

    #[test]
    fn health_checks_take_their_request_from_the_http_ready_check_and_need_tcp() {
        let base =
            "name = \"blog\"\ncommand = [\"/bin/true\"]\n[[listen]]\ntcp = \"127.0.0.1:1\"\n";
        assert_eq!(site(base).expect("none").health, None);
        let s = site(&format!("{base}[health]\n")).expect("defaults");
        let h = s.health.expect("health");
        assert_eq!(
            (h.interval, h.timeout, h.failures),
            (Duration::from_secs(10), Duration::from_secs(2), 2)
        );
        assert_eq!((h.http.path.as_str(), h.http.status), ("/", (200, 299)));
        let eff = s.effective.raw().health.as_ref().expect("written in");
        assert_eq!(eff.interval.as_deref(), Some("10s"));
        assert_eq!(eff.failures, Some(2));
        // An http ready check lends its request.
        let text = format!(
            "{base}[ready]\ncheck = \"http\"\npath = \"/up\"\nstatus = \"200-399\"\nhost = \"a.example\"\n[health]\ninterval = \"5s\"\n"
        );
        let h = site(&text).expect("valid").health.expect("health");
        assert_eq!(
            (h.http.path.as_str(), h.http.host.as_deref(), h.http.status),
            ("/up", Some("a.example"), (200, 399))
        );
        assert_eq!(h.interval, Duration::from_secs(5));
        // Its own keys win.
        let h = site(&format!(
            "{text}path = \"/deep\"\nstatus = \"204\"\nfailures = 1\n"
        ))
        .expect("valid")
        .health
        .expect("health");
        assert_eq!(
            (h.http.path.as_str(), h.http.status, h.failures),
            ("/deep", (204, 204), 1)
        );
        for (key, line) in [
            ("health.failures", "failures = 0"),
            ("health.interval", "interval = \"often\""),
            ("health", "timeout = \"0s\""),
            ("health.path", "path = \"up\""),
            ("health.status", "status = \"7xx\""),
        ] {
            let e = site(&format!("{base}[health]\n{line}\n")).unwrap_err();
            assert_eq!(e.key, key, "{line}: {e}");
        }
        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[health]\n").unwrap_err();
        assert_eq!(e.key, "health");
        assert!(e.message.contains("tcp"), "{e}");
    }

    #[test]
    fn an_http_check_asks_a_path_and_accepts_a_range_of_statuses() {
        let base =
            "name = \"blog\"\ncommand = [\"/bin/true\"]\n[[listen]]\ntcp = \"127.0.0.1:1\"\n";
        let s = site(&format!("{base}[ready]\ncheck = \"http\"\n")).expect("defaults");
        assert_eq!(s.ready.check, ReadyCheck::Http);
        let h = s.ready_http.as_ref().expect("an http check");
        assert_eq!(
            (h.path.as_str(), h.host.as_deref(), h.status),
            ("/", None, (200, 299))
        );
        let ready = s.effective.raw().ready.as_ref().expect("ready");
        assert_eq!(ready.path.as_deref(), Some("/"));
        assert_eq!(ready.status.as_deref(), Some("2xx"));
        for (status, range) in [
            ("204", (204, 204)),
            ("200-399", (200, 399)),
            ("3xx", (300, 399)),
        ] {
            let text = format!(
                "{base}[ready]\ncheck = \"http\"\npath = \"/health?deep=1\"\nhost = \"example.com\"\nstatus = \"{status}\"\n"
            );
            let s = site(&text).expect("valid");
            let h = s.ready_http.expect("an http check");
            assert_eq!(h.status, range, "{status}");
            assert_eq!(h.path, "/health?deep=1");
            assert_eq!(h.host.as_deref(), Some("example.com"));
        }
        for (key, line) in [
            ("ready.status", "status = \"600\""),
            ("ready.status", "status = \"399-200\""),
            ("ready.status", "status = \"ok\""),
            ("ready.path", "path = \"health\""),
            ("ready.path", "path = \"/a b\""),
            ("ready.host", "host = \"a\\r\\nX: y\""),
        ] {
            let e = site(&format!("{base}[ready]\ncheck = \"http\"\n{line}\n")).unwrap_err();
            assert_eq!(e.key, key, "{line}: {e}");
        }
        // The keys mean nothing to another check: said, not ignored.
        let e = site(&format!(
            "{base}[ready]\ncheck = \"tcp\"\npath = \"/health\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "ready.path");
        assert!(
            e.message.contains("only used with ready.check = \"http\""),
            "{e}"
        );
        // And it needs a TCP listener to probe.
        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[ready]\ncheck = \"http\"\n")
            .unwrap_err();
        assert_eq!(e.key, "ready.check");
        assert!(
            e.message.contains("\"http\" needs at least one [[listen]]"),
            "{e}"
        );
    }

    #[test]
    fn a_port_the_app_binds_itself_is_declared_with_mode_own() {
        let base = "name = \"blog\"\ncommand = [\"/bin/true\"]\n";
        let s = site(&format!(
            "{base}[[listen]]\ntcp = \"127.0.0.1:8000\"\nmode = \"own\"\n[[listen]]\nname = \"admin\"\ntcp = \"127.0.0.1:8001\"\n[ready]\ncheck = \"http\"\n"
        ))
        .expect("valid");
        assert_eq!(s.listen[0].mode, ListenMode::Own);
        assert_eq!(s.listen[1].mode, ListenMode::Agent, "the default");
        let agent: Vec<&str> = s.agent_listeners().map(|l| l.name.as_str()).collect();
        assert_eq!(agent, ["admin"], "the agent binds only its own listeners");
        assert_eq!(
            s.own_ports(),
            vec![
                "127.0.0.1:8000"
                    .parse::<std::net::SocketAddr>()
                    .expect("addr")
            ]
        );
        assert!(s.exclusive_deploys());
        // The effective file says the mode, and gives no backlog to the app's port.
        let raw = &s.effective.raw().listen;
        assert_eq!(raw[0].mode.as_deref(), Some("own"));
        assert_eq!(raw[0].backlog, None);
        assert_eq!(raw[1].mode.as_deref(), Some("agent"));
        assert_eq!(raw[1].backlog, Some(1024));
        let plain = site(&format!("{base}[[listen]]\ntcp = \"127.0.0.1:8000\"\n")).expect("valid");
        assert!(!plain.exclusive_deploys());

        for (key, text, says) in [
            (
                "listen[0].mode",
                "tcp = \"127.0.0.1:8000\"\nmode = \"app\"",
                "unknown mode \"app\": use \"agent\" or \"own\"",
            ),
            (
                "listen[0].mode",
                "unix = \"/run/blog.sock\"\nmode = \"own\"",
                "\"own\" is for tcp = \"host:port\" only",
            ),
            (
                "listen[0].tcp",
                "tcp = \"127.0.0.1:0\"\nmode = \"own\"",
                "not 0",
            ),
            (
                "listen[0].backlog",
                "tcp = \"127.0.0.1:8000\"\nmode = \"own\"\nbacklog = 64",
                "chooses its backlog",
            ),
        ] {
            let e = site(&format!("{base}[[listen]]\n{text}\n")).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.message.contains(says), "{text}: {e}");
        }
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
                .starts_with("/etc/hatchery/sites.d/blog.toml:3: workers: "),
            "{e}"
        );
        assert!(e.message.contains("a number or \"auto\""), "{e}");

        let e =
            site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[stop]\ntimeout = 30\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/hatchery/sites.d/blog.toml:4: stop.timeout: "),
            "the line and the key's path: {e}"
        );
        assert!(
            e.to_string()
                .ends_with("expected a duration like \"30s\", found integer 30"),
            "{e}"
        );

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n").unwrap_err();
        assert!(
            e.to_string().contains("wrokers"),
            "unknown keys are named: {e}"
        );

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[stop]\ntimeout = \"soon\"\n")
            .unwrap_err();
        assert_eq!(e.key, "stop.timeout");
        assert!(e.message.contains("ms, s, m, h"), "{e}");

        let e = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n[ready]\ncheck = \"grpc\"\n")
            .unwrap_err();
        assert_eq!(e.key, "ready.check");
        assert!(
            e.message
                .contains("\"notify\", \"tcp\", \"http\" or \"none\"")
        );

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

    /// Every problem of a file, each as `check` prints it.
    fn all_problems(text: &str) -> Vec<String> {
        site(text)
            .expect_err("problems")
            .all()
            .map(ConfigError::one)
            .collect()
    }

    #[test]
    fn every_problem_of_a_file_is_reported_at_once_with_its_line() {
        let text = "name = \"blog\"\n\
                    command = [\"/bin/true\"]\n\
                    wrokers = 2\n\
                    user = \"no-such-user-hopefully\"\n\
                    cpu_weight = 0\n\
                    memory = 512\n\
                    memory_max = \"lots\"\n\
                    [stop]\n\
                    signal = \"SIGFOO\"\n\
                    timeout = 30\n\
                    [restart]\n\
                    backoff_initial = \"10s\"\n\
                    backoff_max = \"1s\"\n\
                    [sandbox]\n\
                    private_tmp = \"yes\"\n";
        let f = "/etc/hatchery/sites.d/blog.toml";
        assert_eq!(
            all_problems(text),
            [
                format!("{f}:3: wrokers: unknown key `wrokers`; did you mean `workers`?"),
                format!("{f}:4: user: no such user `no-such-user-hopefully`"),
                format!("{f}:5: cpu_weight: 0 is out of range: use 1 to 10000"),
                format!("{f}:6: memory: expected a size like \"512MiB\", found integer 512"),
                format!(
                    "{f}:7: memory_max: invalid size \"lots\": use a number of bytes or a number with K, M, G or T (binary: KiB, MiB, GiB, TiB), e.g. \"512M\" or \"2GiB\""
                ),
                format!(
                    "{f}:9: stop.signal: unknown signal \"SIGFOO\": use a name (HUP, INT, QUIT, ILL, TRAP, ABRT, BUS, FPE, KILL, USR1, SEGV, USR2, PIPE, ALRM, TERM, STKFLT, CHLD, CONT, STOP, TSTP, TTIN, TTOU, URG, XCPU, XFSZ, VTALRM, PROF, WINCH, IO, PWR, SYS, RTMIN+N, RTMAX-N) with or without SIG, or a number from 1 to 64"
                ),
                format!("{f}:10: stop.timeout: expected a duration like \"30s\", found integer 30"),
                format!(
                    "{f}:13: restart.backoff_max: must not be less than restart.backoff_initial"
                ),
                format!(
                    "{f}:15: sandbox.private_tmp: expected true or false, found string \"yes\""
                ),
            ]
        );
    }

    #[test]
    fn wrong_types_name_the_key_and_what_it_expects() {
        let base = "name = \"blog\"\ncommand = [\"/bin/true\"]\n";
        for (line, says) in [
            (
                "workers = -1",
                "workers: expected a number of workers like 4, or \"auto\"",
            ),
            (
                "pids_max = \"many\"",
                "pids_max: expected a whole number from 0 to 4294967295, found string \"many\"",
            ),
            (
                "command = \"/bin/true\"",
                "command: expected an array like [\"...\"], found string \"/bin/true\"",
            ),
            ("env = 3", "env: expected a table, found integer 3"),
            ("stop = 3", "stop: expected a table, found integer 3"),
            (
                "[stop]\nsignal = 15",
                "stop.signal: expected a signal name like \"SIGTERM\", found integer 15",
            ),
            (
                "[stop]\nsignals = \"SIGTERM\"",
                "stop.signals: expected an array like [\"...\"], found string \"SIGTERM\"",
            ),
            (
                "[[listen]]\ntcp = 8000",
                "listen[0].tcp: expected an address like \"127.0.0.1:8000\", found integer 8000",
            ),
            (
                "[logs]\nmax_size = 10",
                "logs.max_size: expected a size like \"512MiB\", found integer 10",
            ),
            (
                "[ready]\ntimeout = 1.5",
                "ready.timeout: expected a duration like \"30s\", found floating point 1.5",
            ),
            (
                "[ready]\ncheck = true",
                "ready.check: expected a string in double quotes, found boolean true",
            ),
        ] {
            let text = if line.starts_with("command") {
                format!("name = \"blog\"\n{line}\n")
            } else {
                format!("{base}{line}\n")
            };
            let found = all_problems(&text);
            assert!(found.iter().any(|p| p.contains(says)), "{line}: {found:?}");
        }
    }

    #[test]
    fn a_stop_sequence_is_signals_with_a_timeout_after_each() {
        let base = "name = \"blog\"\ncommand = [\"/bin/true\"]\n";
        let s = site(&format!(
            "{base}[stop]\nsignals = [\"SIGHUP\", \"term\", \"SIGRTMIN+1\"]\ntimeout = \"2s\"\n"
        ))
        .expect("valid");
        let names: Vec<String> = s.stop.signals().map(|g| g.name()).collect();
        assert_eq!(names, ["SIGHUP", "SIGTERM", "SIGRTMIN+1"]);
        assert_eq!(s.stop.timeout, Duration::from_secs(2));
        assert_eq!(s.stop.total(), Duration::from_secs(6));
        // The effective file keeps the sequence and adds no single signal.
        let eff = s.effective.raw().stop.as_ref().expect("stop");
        assert_eq!(eff.signal, None);
        assert_eq!(eff.signals.as_ref().map(Vec::len), Some(3));
        // The single signal stays valid.
        let s = site(&format!("{base}[stop]\nsignal = \"INT\"\n")).expect("valid");
        assert_eq!(s.stop.signals().collect::<Vec<_>>(), [Signal(libc::SIGINT)]);
        let f = "/etc/hatchery/sites.d/blog.toml";
        assert_eq!(
            all_problems(&format!(
                "{base}[stop]\nsignal = \"TERM\"\nsignals = [\"HUP\", \"TERM\"]\n"
            )),
            [format!(
                "{f}:5: stop.signals: give either stop.signal (one signal) or stop.signals (a sequence), not both"
            )]
        );
        assert_eq!(
            all_problems(&format!("{base}[stop]\nsignals = []\n")),
            [format!(
                "{f}:4: stop.signals: give 1 to 4 signals, e.g. [\"SIGHUP\", \"SIGTERM\"]; SIGKILL follows the last"
            )]
        );
        let found = all_problems(&format!("{base}[stop]\nsignals = [\"HUP\", \"TREM\"]\n"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!(
                "{f}:4: stop.signals[1]: unknown signal \"TREM\": use a name (HUP,"
            )),
            "{found:?}"
        );
    }

    #[test]
    fn an_env_file_adds_to_env_which_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sites = dir.path().join("sites.d");
        std::fs::create_dir(&sites).expect("mkdir");
        std::fs::write(
            sites.join("blog.env"),
            "# secrets\nDB_URL=\"postgres://db/blog\"\nMODE=from-file\n",
        )
        .expect("write");
        let file = sites.join("blog.toml");
        let text = "name = \"blog\"\ncommand = [\"/bin/true\"]\nenv_file = \"blog.env\"\n[env]\nMODE = \"explicit\"\n";
        let s = super::super::load::site_from(&file, text, LogPolicy::default()).expect("valid");
        assert_eq!(s.env["DB_URL"], "postgres://db/blog");
        assert_eq!(s.env["MODE"], "explicit");
        // The effective file names the file, not its contents.
        let eff = s.effective.raw();
        assert_eq!(eff.env_file.as_deref(), Some(Path::new("blog.env")));
        assert!(!eff.env.contains_key("DB_URL"));

        let problems = |env: &str| -> Vec<String> {
            std::fs::write(sites.join("blog.env"), env).expect("write");
            let e = super::super::load::site_from(&file, text, LogPolicy::default())
                .expect_err("a bad line");
            e.all().map(ConfigError::one).collect()
        };
        let env_file = sites.join("blog.env");
        assert_eq!(
            problems("OK=1\nnot a line\n"),
            [format!(
                "{}:2: env_file: expected NAME=VALUE, found \"not a line\"",
                env_file.display()
            )],
        );
        assert_eq!(
            problems("OK=1\n\nLISTEN_FDS=3\n"),
            [format!(
                "{}:3: env_file: LISTEN_FDS is set by the agent for every worker and cannot be overridden",
                env_file.display()
            )],
        );
        // A bad line and a reserved name: both said.
        assert_eq!(
            problems("oops\nOK=1\nLISTEN_FDS=3\n"),
            [
                format!(
                    "{}:1: env_file: expected NAME=VALUE, found \"oops\"",
                    env_file.display()
                ),
                format!(
                    "{}:3: env_file: LISTEN_FDS is set by the agent for every worker and cannot be overridden",
                    env_file.display()
                ),
            ],
        );
        std::fs::remove_file(sites.join("blog.env")).expect("rm");
        let e =
            super::super::load::site_from(&file, text, LogPolicy::default()).expect_err("no file");
        assert!(
            e.one().starts_with(&format!(
                "{}:3: env_file: cannot read {}: No such file",
                file.display(),
                sites.join("blog.env").display()
            )),
            "{e}"
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
    fn scale_by_load_is_checked_key_by_key() {
        let auto = "name = \"blog\"\ncommand = [\"x\"]\nworkers = \"auto\"\nmemory = \"1G\"\nworker_memory = \"50M\"\n";
        let s = site(&format!("{auto}[scale]\nby = \"load\"\ntarget = 0.6\ninterval = \"100ms\"\ngrow_cooldown = \"1s\"\nshrink_cooldown = \"1m\"\n")).expect("valid");
        let a = s.auto.expect("auto");
        assert!(a.by_load());
        assert_eq!(a.scale.target_percent, 60);
        assert_eq!(a.scale.interval, Duration::from_millis(100));
        assert_eq!(a.scale.grow_cooldown, Duration::from_secs(1));
        assert_eq!(a.scale.shrink_cooldown, Duration::from_secs(60));
        let refused = |extra: &str| site(&format!("{auto}{extra}")).expect_err(extra);
        let e = refused("[scale]\nby = \"cpu\"\n");
        assert_eq!(e.key, "scale.by");
        assert!(e.message.contains("\"load\""), "{e}");
        for bad in ["0", "1.5", "\"70\"", "\"lots%\"", "nan"] {
            let e = refused(&format!("[scale]\ntarget = {bad}\n"));
            assert_eq!(e.key, "scale.target", "{bad}");
            assert!(e.message.contains("\"70%\""), "{e}");
        }
        assert_eq!(
            site(&format!("{auto}[scale]\ntarget = \"85%\"\n"))
                .expect("a percentage")
                .auto
                .map(|a| a.scale.target_percent),
            Some(85)
        );
        let e = refused("[scale]\ninterval = \"10ms\"\n");
        assert_eq!(e.key, "scale.interval");
        let e = refused("[scale]\ninterval = \"2s\"\nshrink_cooldown = \"1s\"\n");
        assert_eq!(e.key, "scale.shrink_cooldown");
        // Nothing but an accept queue can ask for a first worker.
        let e = refused("workers_min = 0\n[scale]\nby = \"load\"\n");
        assert_eq!(e.key, "workers_min");
        assert!(e.message.contains("TCP listener"), "{e}");
        site(&format!(
            "{auto}workers_min = 0\n[[listen]]\ntcp = \"127.0.0.1:0\"\n[scale]\nby = \"load\"\n"
        ))
        .expect("scale to zero with a TCP listener");
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 2\n[scale]\nby = \"load\"\n")
            .expect_err("a fixed count");
        assert_eq!(e.key, "scale");
        assert!(e.message.contains("workers = \"auto\""), "{e}");
    }

    #[test]
    fn auto_workers_need_a_budget_and_a_per_worker_figure() {
        let s = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"auto\"\nworkers_max = 10\nmemory = \"512M\"\nworker_memory = \"100M\"\n").expect("valid");
        assert_eq!(
            s.auto,
            Some(AutoWorkers {
                min: 1,
                max: 10,
                scale: ScalePolicy::DEFAULT
            })
        );
        assert_eq!(s.limits.worker_estimate(), Some(100 << 20));
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"auto\"\n").unwrap_err();
        assert!(e.message.contains("memory budget"), "{e}");
        let e = site("name = \"blog\"\ncommand = [\"x\"]\nworkers = \"many\"\n").unwrap_err();
        assert_eq!(e.key, "workers");
        let e =
            site("name = \"blog\"\ncommand = [\"x\"]\nworkers = 3\nworkers_max = 4\n").unwrap_err();
        assert_eq!(e.key, "workers_min");
        let text = toml::to_string(s.effective.raw()).expect("ser");
        assert!(text.contains("workers = \"auto\""), "{text}");
    }

    #[test]
    fn mode_is_exec_or_zygote() {
        let base = "name = \"blog\"\ncommand = [\"/bin/true\"]\n";
        assert_eq!(site(base).expect("default").mode, SiteMode::Exec);
        let s = site(&format!("{base}mode = \"zygote\"\n")).expect("zygote");
        assert_eq!(s.mode, SiteMode::Zygote);
        let text = toml::to_string(s.effective.raw()).expect("ser");
        assert!(text.contains("mode = \"zygote\""), "{text}");
        let e = site(&format!("{base}mode = \"fork\"\n")).expect_err("unknown");
        assert_eq!(e.key, "mode");
        assert!(e.message.contains("\"fork\""), "{e}");
        assert!(e.message.contains("\"exec\" or \"zygote\""), "{e}");
    }
}

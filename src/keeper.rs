//! The keeper: under systemd, the unit's main process is a small loop that starts the agent
//! as its child and starts another when it dies, so that the agent's crash is never the
//! unit's.
//!
//! Why: when a unit's main process dies, systemd 252 stops the unit before it restarts it,
//! and with `KillMode=mixed` (or the default `control-group`) that kills every worker in
//! the unit's cgroup. `KillMode=process` keeps them, but then the restart itself fails with
//! `219/CGROUP` under `Delegate=yes`: systemd starts the new main process in the unit's
//! cgroup, where the agent has enabled controllers for the sites, and the kernel's
//! no-internal-process rule refuses it (`../shared/research/recovery-and-scaling.md`;
//! `DelegateSubgroup=` that would avoid it is systemd 254). So the main process must not die:
//! the keeper does nothing that can fail once it runs (no configuration, no sites, no
//! allocation that grows), and the agent, which does everything, runs beside it. A crashed
//! agent is started again by the keeper within 100 ms; the new agent adopts the workers
//! (`event::recovery`), and no worker is restarted.
//!
//! What the keeper does, in order:
//!
//! 1. Moves itself into the `keeper/` leaf of the unit's delegated cgroup (the agent then
//!    moves into `agent/` beside it: both leave the unit's cgroup free to hand controllers
//!    to `sites/`), and tells the agent the unit's cgroup in `HATCHERY_DELEGATED_CGROUP`.
//! 2. Binds the agent's `NOTIFY_SOCKET`, an abstract socket of its own, and relays what the
//!    agent sends (`READY=1`, `STATUS=`, `STOPPING=1`, `RELOADING=1`,
//!    `EXTEND_TIMEOUT_USEC=`) to systemd: only what the kernel says comes from the agent's
//!    pid, so a worker cannot speak for the unit.
//! 3. Starts the agent (`/proc/self/exe` with the keeper's own arguments: the same image,
//!    even once the file was replaced; `hatchery upgrade` is how a new binary comes in) and
//!    watches its pidfd.
//! 4. Forwards `SIGTERM`, `SIGINT` and `SIGHUP` to the agent (not a `SIGHUP` the kernel
//!    sent: see the agent's signals in `event`); after a `SIGTERM` or `SIGINT` it exits with
//!    the agent's status once the agent has exited.
//! 5. Pings systemd's watchdog itself (`WATCHDOG_USEC`), and holds the agent to the same
//!    watchdog: an agent that sends no `WATCHDOG=1` for `WATCHDOG_USEC` is sent `SIGABRT`,
//!    then `SIGKILL` 10 s later, and replaced. A stuck agent costs its own restart, not the
//!    workers'.
//! 6. When the agent dies of anything else, starts another: at once (100 ms) if it had run
//!    10 s, else after a delay that doubles up to 10 s, and says so in its log and in
//!    `STATUS=`. An agent that exits 0 by itself (a `SIGTERM` sent to it alone) has stopped
//!    every site: the keeper exits 0 too.
//! 7. Is the child subreaper of what the agent leaves: a dead agent's workers become the
//!    keeper's children (it reaps them when they exit; the next agent watches them by
//!    pidfd). This keeps a stopped worker stopped: each worker leads a process group in the
//!    agent's session, and a group none of whose processes has a parent in another group of
//!    the session (PID 1 is in none) is orphaned, which makes the kernel send it `SIGHUP` and
//!    `SIGCONT` when one of them is stopped; the keeper is in the session.
//!
//! It is on when the agent is started by systemd (`INVOCATION_ID` and `NOTIFY_SOCKET` set)
//! unless `HATCHERY_KEEPER=off` is in its environment (`Environment=` in the unit). What it
//! does not survive: a `kill -9` of the keeper itself, which systemd treats as the unit's
//! crash (it kills the workers and starts everything again).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};
use tracing::{error, info, warn};

use crate::net::{NotifySocket, sd_notify};
use crate::process::{SigSet, block_signals, signalfd};
use crate::sys::signals::read_signal_info;

/// Names the unit's delegated cgroup (relative to the cgroup2 mount) for the agent.
pub const DELEGATED_ENV: &str = "HATCHERY_DELEGATED_CGROUP";
/// Set for the agent the keeper starts (its value: the keeper's pid); `off` turns the
/// keeper off.
pub const KEEPER_ENV: &str = "HATCHERY_KEEPER";

/// The shortest delay before a new agent, and the longest.
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// An agent that ran this long before it died is replaced at once.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How long an agent sent `SIGABRT` by the watchdog has before `SIGKILL`.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// What the keeper relays from the agent to systemd (`WATCHDOG=1` is the keeper's own).
const RELAYED: &[&str] = &[
    "READY=1",
    "STATUS=",
    "STOPPING=1",
    "RELOADING=1",
    "EXTEND_TIMEOUT_USEC=",
];

/// Whether this process should be the keeper (see the module's doc).
pub fn wanted() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
        && std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var_os(KEEPER_ENV).is_none()
}

/// The agent the keeper runs.
struct Agent {
    child: Child,
    pidfd: OwnedFd,
    started: Instant,
    /// Its last `WATCHDOG=1` (its start until the first).
    last_ping: Instant,
    /// When the watchdog sent it `SIGABRT`.
    aborted: Option<Instant>,
    /// The watchdog sent it `SIGKILL` too: only its exit is awaited.
    killed: bool,
}

impl Agent {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }
}

/// Runs the keeper with the agent's arguments (`agent --config PATH`); returns the exit
/// status for the unit.
pub fn run(args: &[OsString]) -> u8 {
    match keep(args) {
        Ok(code) => code,
        Err(e) => {
            error!("the keeper failed: {e}");
            1
        }
    }
}

fn keep(args: &[OsString]) -> std::io::Result<u8> {
    let unit = move_to_leaf();
    // The workers' parent once the agent is dead (see the module's doc, 7.).
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        warn!(
            "keeper: cannot become the workers' reaper ({e}): a worker stopped when the agent dies is sent SIGHUP"
        );
    }
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];
    block_signals(&SigSet::of(&signals))?;
    let sigfd = signalfd(&SigSet::of(&signals))?;
    let name = format!("hatchery-keeper/{}", std::process::id());
    let socket = NotifySocket::bind_abstract(&name).map_err(std::io::Error::other)?;
    let watchdog = watchdog_usec();
    let mut next_ping = watchdog.map(|_| Instant::now());
    let mut agent: Option<Agent> = None;
    let mut start_at = Some(Instant::now());
    let mut quick_deaths = 0u32;
    let mut stopping = false;
    info!(
        "keeper {}: starting the agent (it is started again if it dies; its workers keep running)",
        std::process::id()
    );
    loop {
        let now = Instant::now();
        if agent.is_none() && !stopping && start_at.is_some_and(|t| t <= now) {
            start_at = None;
            match spawn(args, &socket.path, unit.as_deref()) {
                Ok(a) => agent = Some(a),
                Err(e) => {
                    error!("failed to start the agent: {e}; trying again in {MAX_DELAY:?}");
                    start_at = Some(now + MAX_DELAY);
                }
            }
        }
        // The watchdog, ours to systemd and the agent's to us.
        if let (Some(usec), Some(due)) = (watchdog, next_ping) {
            if due <= now {
                let _ = sd_notify("WATCHDOG=1");
                next_ping = Some(now + usec / 2);
            }
        }
        if let (Some(usec), Some(a)) = (watchdog, &mut agent) {
            match a.aborted {
                None if now.duration_since(a.last_ping) >= usec => {
                    warn!(
                        "the agent (pid {}) sent no watchdog ping for {usec:?}: aborting it; another one takes over its workers",
                        a.pid()
                    );
                    a.signal(Signal::ABORT);
                    a.aborted = Some(now);
                }
                Some(t) if !a.killed && now.duration_since(t) >= ABORT_GRACE => {
                    warn!(
                        "the agent (pid {}) did not die of SIGABRT in {ABORT_GRACE:?}: killing it",
                        a.pid()
                    );
                    a.signal(Signal::KILL);
                    a.killed = true;
                }
                _ => {}
            }
        }
        let deadline = [
            next_ping,
            start_at.filter(|_| agent.is_none() && !stopping),
            agent.as_ref().filter(|a| !a.killed).and_then(|a| {
                watchdog.map(|w| a.aborted.map_or(a.last_ping + w, |t| t + ABORT_GRACE))
            }),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline
            .map(|d| Timespec::try_from(d.saturating_duration_since(Instant::now())))
            .transpose()
            .map_err(std::io::Error::other)?;
        let mut fds = vec![
            PollFd::new(&sigfd, PollFlags::IN),
            PollFd::new(&socket, PollFlags::IN),
        ];
        if let Some(a) = &agent {
            fds.push(PollFd::new(&a.pidfd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let exited = fds.get(2).is_some_and(|f| !f.revents().is_empty());
        drop(fds);

        while let Some(received) = read_signal_info(sigfd.as_fd())? {
            let signal = received.signal;
            // A SIGHUP from the kernel is not relayed: the agent ignores it too.
            if signal == libc::SIGCHLD || (signal == libc::SIGHUP && received.sent_by_kernel()) {
                continue;
            }
            if signal != libc::SIGHUP {
                stopping = true;
            }
            match &agent {
                Some(a) => a.signal(Signal::from_named_raw(signal).unwrap_or(Signal::TERM)),
                None if stopping => {
                    info!("keeper: stopping (no agent runs)");
                    return Ok(0);
                }
                None => {}
            }
        }
        relay(&socket, agent.as_mut());
        if exited {
            let Some(mut a) = agent.take() else { continue };
            let status = a.child.wait()?;
            if stopping {
                return Ok(exit_code(status));
            }
            if status.success() {
                info!("the agent stopped every site and exited: so does the keeper");
                return Ok(0);
            }
            let ran = a.started.elapsed();
            quick_deaths = if ran >= HEALTHY_RUN {
                0
            } else {
                quick_deaths + 1
            };
            let delay = FIRST_DELAY
                .saturating_mul(1 << quick_deaths.min(7))
                .min(MAX_DELAY);
            let how = describe(status);
            warn!(
                "the agent (pid {}) {how} after {ran:.1?}: starting another in {delay:?}; its workers keep running",
                a.pid()
            );
            let _ = sd_notify(&format!(
                "STATUS=the agent {how}: starting another, its workers keep running"
            ));
            start_at = Some(Instant::now() + delay);
        }
        reap_workers(agent.as_ref());
    }
}

/// Reaps the children the keeper inherited from a dead agent (its workers, its fd holder)
/// once they exit; never the agent, reaped by [`Child::wait`] once its pidfd says so.
fn reap_workers(agent: Option<&Agent>) {
    while let Ok(Some(pid)) = crate::sys::wait::peek_zombie() {
        if agent.is_some_and(|a| a.pid() == pid) {
            return;
        }
        let Some(pid) = Pid::from_raw(pid) else {
            return;
        };
        if rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG).is_err() {
            return;
        }
    }
}

/// Relays what the agent sent to systemd; its `WATCHDOG=1` is noted.
fn relay(socket: &NotifySocket, mut agent: Option<&mut Agent>) {
    while let Ok(Some((pid, text))) = socket.recv_text() {
        let Some(a) = agent.as_deref_mut().filter(|a| a.pid() == pid) else {
            continue;
        };
        let mut out = String::new();
        for line in text.lines() {
            if line == "WATCHDOG=1" {
                a.last_ping = Instant::now();
            } else if RELAYED
                .iter()
                .any(|r| line == *r || (r.ends_with('=') && line.starts_with(r)))
            {
                out.push_str(line);
                out.push('\n');
            }
        }
        if !out.is_empty() {
            if let Err(e) = sd_notify(&out) {
                warn!("failed to notify systemd: {e}");
            }
        }
    }
}

/// Starts the agent.
fn spawn(args: &[OsString], notify: &Path, unit: Option<&Path>) -> std::io::Result<Agent> {
    let mut cmd = Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    }
    cmd.args(args)
        .env("NOTIFY_SOCKET", notify)
        .env(KEEPER_ENV, std::process::id().to_string())
        .env_remove("WATCHDOG_PID");
    if let Some(unit) = unit {
        cmd.env(DELEGATED_ENV, unit);
    }
    let child = cmd.spawn()?;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0))
        .ok_or_else(|| std::io::Error::other("the agent has no pid"))?;
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
    let now = Instant::now();
    info!("keeper: the agent runs as pid {pid:?}");
    Ok(Agent {
        child,
        pidfd,
        started: now,
        last_ping: now,
        aborted: None,
        killed: false,
    })
}

/// Moves the keeper into `keeper/` of its cgroup when that cgroup is delegated to it;
/// returns that cgroup (relative to the mount) for the agent.
fn move_to_leaf() -> Option<PathBuf> {
    let mount = crate::cgroup::cgroup2_mount()?;
    let own = crate::cgroup::own_cgroup(&mount)?;
    rustix::fs::access(
        own.join("cgroup.subtree_control"),
        rustix::fs::Access::WRITE_OK,
    )
    .ok()?;
    let leaf = own.join("keeper");
    if let Err(e) = std::fs::create_dir(&leaf) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            warn!("keeper: cannot create {}: {e}", leaf.display());
            return None;
        }
    }
    if let Err(e) = std::fs::write(leaf.join("cgroup.procs"), "0") {
        warn!("keeper: cannot move into {}: {e}", leaf.display());
        return None;
    }
    own.strip_prefix(&mount)
        .ok()
        .map(|rel| Path::new("/").join(rel))
}

/// `WATCHDOG_USEC` if the watchdog is on for this process.
fn watchdog_usec() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str() != Some(std::process::id().to_string().as_str()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by {}", crate::config::Signal(sig).name()),
        _ => "ended".to_string(),
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

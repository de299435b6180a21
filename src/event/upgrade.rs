//! `hatchery upgrade`: the agent replaces its own binary in place (same pid, so the
//! workers stay its children) and keeps every worker, listener, steering map and output
//! pipe. It is crash recovery (`recovery.rs`), planned and without a gap.
//!
//! The old image, answering `Upgrade { binary }` from root or the agent's user:
//!
//! 1. refuses while a site has a deploy under way or queued (its clients wait for it);
//! 2. runs `BINARY __upgrade-check --config <file>` for at most [`CHECK_TIMEOUT`] (its
//!    pidfd polled, killed after): it must exit 0 and print `{"version", "record_version"}`
//!    with this agent's [`FORMAT_VERSION`], having loaded the configuration; anything else
//!    refuses the upgrade with what it said, and nothing changed;
//! 3. writes the record of live workers now (the fd holder already holds every worker's
//!    output pipe: each is handed over at spawn);
//! 4. clears `FD_CLOEXEC` on exactly these, and names them in [`UPGRADE_ENV`]: the control
//!    socket (clients connecting meanwhile wait in its backlog), its lock (never released,
//!    so no other agent can start in between), the notify socket (datagrams queued
//!    meanwhile are read by the new image), the client's connection (the new image
//!    answers it), and `/proc/self/exe` opened read-only (to resume the old binary);
//! 5. `execve`s the binary with its own arguments, its signals blocked again after `std`
//!    unblocked them (the signals pending before were handled just before, in step 3;
//!    one arriving in the microseconds between is delivered with its default action: a
//!    `SIGCHLD` is lost, which the pidfds of the workers make up for). If that fails, the flags are restored and the
//!    client told why.
//!
//! The new image (`Agent::new`) removes [`UPGRADE_ENV`] from its environment at once,
//! takes the fds it names (each checked to be what it should: the lock file's inode, the
//! sockets' bound paths), checks that the record can be read, and recovers as after a
//! crash; the workers whose parent is
//! itself are its children again, so their exits are reaped with `waitid`. It answers the
//! client from `run`. If it fails before that, it executes the old binary through
//! `/proc/self/fd/<previous>` with `failed=<reason>` added; that image comes up the same
//! way and tells the client the upgrade failed. An image started with `failed=` that
//! fails as well exits with its error (crash recovery applies at the next start): never
//! a loop.
//!
//! Connections accepted whose request was not read yet are passed too (`pending=`), and
//! read by the new image. Not kept: `logs -f` and `exec` clients and every other waiting
//! connection (their fds close at `execve`); `exec` commands get `SIGHUP` first.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rustix::io::FdFlags;
use tracing::{error, info, warn};

use super::recovery::{FORMAT_VERSION, Unsaved};
use super::{Agent, AgentError, setup_err};
use crate::control::{ErrorKind, Reply, UpgradeCheck, Upgraded};
use crate::sys::inherit;
use crate::sys::signals::SigSet;

/// The environment variable naming the fds an old image passes to the new one.
pub(super) const UPGRADE_ENV: &str = "HATCHERY_UPGRADE";
/// Set (to anything) in a new image's environment, makes it fail as it takes over: the
/// tests' way to see the previous binary resume.
pub(super) const FAIL_ENV: &str = "HATCHERY_TEST_FAIL_UPGRADE";
/// How long the new binary has to answer `__upgrade-check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of the check's output kept (its stderr's tail is shown).
const MAX_CHECK_OUTPUT: usize = 64 << 10;
/// How much of the check's stderr a refusal shows.
const STDERR_TAIL: usize = 1000;

/// What an old image passed, by fd number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passed {
    control: i32,
    lock: i32,
    notify: i32,
    client: i32,
    previous: i32,
    /// Connections accepted whose request has not been read yet: the new image reads it.
    pending: Vec<i32>,
    /// The cgroup base's lock (`crate::cgroup::CgroupTree::lock_fd`), when the agent has
    /// cgroups and the new binary takes it (`UpgradeCheck::cgroup_lock`).
    cgroup_lock: Option<i32>,
    /// The old image's version.
    from: String,
    /// Set by a new image that failed and resumed the old one: why.
    failed: Option<String>,
}

impl Passed {
    fn to_env(&self) -> String {
        let pending: Vec<String> = self.pending.iter().map(i32::to_string).collect();
        let mut s = format!(
            "control={},lock={},notify={},client={},previous={},pending={},from={}",
            self.control,
            self.lock,
            self.notify,
            self.client,
            self.previous,
            pending.join(":"),
            self.from
        );
        if let Some(fd) = self.cgroup_lock {
            s.push_str(&format!(",cgroup_lock={fd}"));
        }
        // Last: the reason may hold commas.
        if let Some(f) = &self.failed {
            s.push_str(",failed=");
            s.push_str(f);
        }
        s
    }

    fn parse(text: &str) -> Result<Passed, String> {
        let (text, failed) = match text.split_once(",failed=") {
            Some((a, f)) => (a, Some(f.to_string())),
            None => (text, None),
        };
        let mut fds = [None; 5];
        let mut from = None;
        let mut pending = Vec::new();
        let mut cgroup_lock = None;
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
            let i = match k {
                "control" => 0,
                "lock" => 1,
                "notify" => 2,
                "client" => 3,
                "previous" => 4,
                "from" => {
                    from = Some(v.to_string());
                    continue;
                }
                "pending" => {
                    for n in v.split(':').filter(|n| !n.is_empty()) {
                        pending.push(n.parse().map_err(|_| format!("pending={v:?}"))?);
                    }
                    continue;
                }
                "cgroup_lock" => {
                    cgroup_lock = Some(
                        v.parse::<i32>()
                            .map_err(|_| format!("{k}={v:?} is not an fd"))?,
                    );
                    continue;
                }
                _ => return Err(format!("unknown key {k:?}")),
            };
            fds[i] = Some(
                v.parse::<i32>()
                    .map_err(|_| format!("{k}={v:?} is not an fd"))?,
            );
        }
        let need = |i: usize, k: &str| fds[i].ok_or_else(|| format!("no {k}="));
        Ok(Passed {
            control: need(0, "control")?,
            lock: need(1, "lock")?,
            notify: need(2, "notify")?,
            client: need(3, "client")?,
            previous: need(4, "previous")?,
            pending,
            cgroup_lock,
            from: from.ok_or("no from=")?,
            failed,
        })
    }
}

/// The fds an old image passed, owned by the new one, close-on-exec again (what this image
/// starts must not hold them) until they are passed back to the old binary
/// ([`Inherited::resume_previous`]); the agent works on duplicates.
#[derive(Debug)]
pub(super) struct Inherited {
    control: OwnedFd,
    lock: OwnedFd,
    notify: OwnedFd,
    client: OwnedFd,
    previous: OwnedFd,
    /// Connections whose request is yet to be read.
    pending: Vec<OwnedFd>,
    /// The cgroup base's lock, when the old image passed it.
    cgroup_lock: Option<OwnedFd>,
    pub from: String,
    pub failed: Option<String>,
}

/// Why the passed fds cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Mismatch(String);

impl Inherited {
    /// What an old image passed, if this image was started by `hatchery upgrade`; the
    /// variable is removed from the environment either way.
    pub(super) fn from_env() -> Option<Result<Inherited, String>> {
        let text = inherit::take_env(UPGRADE_ENV)?;
        Some(Self::take(&text))
    }

    fn take(text: &OsString) -> Result<Inherited, String> {
        let text = text
            .to_str()
            .ok_or_else(|| format!("{UPGRADE_ENV} is not UTF-8"))?;
        let p = Passed::parse(text).map_err(|e| format!("{UPGRADE_ENV}={text:?}: {e}"))?;
        // Close-on-exec from now on: a process this image starts (the fd holder) must not
        // hold the locks or sockets past this agent. Cleared again only to resume the
        // previous binary (`Inherited::resume_previous`).
        let take = |what: &str, raw: i32| {
            inherit::take_inherited(raw)
                .and_then(|fd| {
                    rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
                    Ok(fd)
                })
                .map_err(|e| format!("the {what} fd {raw}: {e}"))
        };
        Ok(Inherited {
            control: take("control socket", p.control)?,
            lock: take("lock", p.lock)?,
            notify: take("notify socket", p.notify)?,
            client: take("client", p.client)?,
            previous: take("previous binary", p.previous)?,
            pending: p
                .pending
                .iter()
                .map(|&n| take("pending connection", n))
                .collect::<Result<_, _>>()?,
            cgroup_lock: p
                .cgroup_lock
                .map(|n| take("cgroup base lock", n))
                .transpose()?,
            from: p.from,
            failed: p.failed,
        })
    }

    /// A duplicate of the lock fd, if it is an open file description of `socket`'s lock
    /// file (the lock is held by that description).
    pub(super) fn lock(&self, socket: &Path) -> Result<OwnedFd, AgentError> {
        let mut name = socket.as_os_str().to_os_string();
        name.push(".lock");
        let path = PathBuf::from(name);
        let held = rustix::fs::fstat(&self.lock).map_err(|e| mismatch("lock", e.into()))?;
        let there = rustix::fs::stat(&path).map_err(|e| mismatch("lock", e.into()))?;
        if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino) {
            return Err(setup_err(
                "take the inherited lock",
                Mismatch(format!("the lock fd is not {}", path.display())),
            ));
        }
        dup("lock", self.lock.as_fd())
    }

    /// A duplicate of the cgroup base's lock, when one was passed (`CgroupTree::setup`
    /// uses it if it is the base's).
    pub(super) fn cgroup_lock(&self) -> Result<Option<OwnedFd>, AgentError> {
        self.cgroup_lock
            .as_ref()
            .map(|fd| dup("cgroup base lock", fd.as_fd()))
            .transpose()
    }

    /// A duplicate of the control socket, if it is bound at `path`.
    pub(super) fn control(&self, path: &Path) -> Result<OwnedFd, AgentError> {
        check_bound("control socket", self.control.as_fd(), path)?;
        dup("control socket", self.control.as_fd())
    }

    /// A duplicate of the notify socket, if it is bound at `path`.
    pub(super) fn notify(&self, path: &Path) -> Result<OwnedFd, AgentError> {
        check_bound("notify socket", self.notify.as_fd(), path)?;
        dup("notify socket", self.notify.as_fd())
    }

    /// Duplicates of the connections whose request is yet to be read.
    pub(super) fn pending(&self) -> Result<Vec<OwnedFd>, AgentError> {
        self.pending
            .iter()
            .map(|fd| dup("pending connection", fd.as_fd()))
            .collect()
    }

    /// The client's connection, to be answered (`FD_CLOEXEC` set again).
    pub(super) fn client(&self) -> Result<OwnedFd, AgentError> {
        dup("client connection", self.client.as_fd())
    }

    /// Executes the binary this one replaced, with the same arguments and the same fds,
    /// adding `failed=<reason>`. Returns only if that fails.
    pub(super) fn resume_previous(&self, reason: &str) -> std::io::Error {
        let passed = Passed {
            control: self.control.as_raw_fd(),
            lock: self.lock.as_raw_fd(),
            notify: self.notify.as_raw_fd(),
            client: self.client.as_raw_fd(),
            previous: self.previous.as_raw_fd(),
            pending: self.pending.iter().map(AsRawFd::as_raw_fd).collect(),
            cgroup_lock: self.cgroup_lock.as_ref().map(AsRawFd::as_raw_fd),
            from: self.from.clone(),
            // One line, and the separator stays unambiguous.
            failed: Some(reason.replace('\n', " ")),
        };
        let mut kept = vec![
            self.control.as_fd(),
            self.lock.as_fd(),
            self.notify.as_fd(),
            self.client.as_fd(),
            self.previous.as_fd(),
        ];
        kept.extend(self.pending.iter().map(AsFd::as_fd));
        kept.extend(self.cgroup_lock.as_ref().map(AsFd::as_fd));
        if let Err(e) = set_cloexec(&kept, false) {
            return e.into();
        }
        let program = format!("/proc/self/fd/{}", self.previous.as_raw_fd());
        let e = exec_agent(Path::new(&program), &passed.to_env());
        let _ = set_cloexec(&kept, true);
        e
    }
}

/// Executes `program` in place of this agent, with the agent's arguments and `passed` in
/// [`UPGRADE_ENV`], from a thread that keeps its whole bounding set (the new image's
/// capabilities come from the calling thread's credentials, and the agent's own thread
/// drops from its set what its workers' sandboxes drop: `sys::spawn::set_whole_set_aside`).
/// Returns only if that fails. Every other thread ends with the `execve`, and so do the
/// threads' parent-death signals to the children they started (as they did when the
/// agent's own thread executed it, for the helpers' children).
fn exec_agent(program: &Path, passed: &str) -> std::io::Error {
    crate::sys::spawn::with_whole_set(&|| {
        if !crate::sys::spawn::keeps_whole_set() {
            return std::io::Error::other(
                "no thread of the agent keeps the whole bounding set for the new binary",
            );
        }
        let mut cmd = Command::new(program);
        cmd.args(std::env::args_os().skip(1))
            .env(UPGRADE_ENV, passed);
        inherit::exec_keeping_mask(&mut cmd, &SigSet::of(&super::setup::agent_signals()))
    })
}

fn mismatch(what: &str, e: std::io::Error) -> AgentError {
    setup_err(format!("check the inherited {what}"), e)
}

fn dup(what: &str, fd: BorrowedFd<'_>) -> Result<OwnedFd, AgentError> {
    fd.try_clone_to_owned()
        .map_err(|e| setup_err(format!("duplicate the inherited {what}"), e))
}

fn check_bound(what: &str, fd: BorrowedFd<'_>, path: &Path) -> Result<(), AgentError> {
    let addr = rustix::net::getsockname(fd).map_err(|e| mismatch(what, e.into()))?;
    let bound = rustix::net::SocketAddrUnix::try_from(addr)
        .ok()
        .and_then(|a| {
            a.path()
                .map(|p| PathBuf::from(p.to_string_lossy().into_owned()))
        });
    if bound.as_deref() != Some(path) {
        return Err(setup_err(
            format!("check the inherited {what}"),
            Mismatch(format!("it is bound at {bound:?}, not {}", path.display())),
        ));
    }
    Ok(())
}

/// Sets or clears `FD_CLOEXEC` on each of `fds`.
fn set_cloexec(fds: &[BorrowedFd<'_>], on: bool) -> rustix::io::Result<()> {
    let flags = if on {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    for fd in fds {
        rustix::io::fcntl_setfd(fd, flags)?;
    }
    Ok(())
}

/// Runs `binary __upgrade-check --config <config>` for at most [`CHECK_TIMEOUT`] and reads
/// its answer; the error says what it did instead.
fn preflight(binary: &Path, config: &Path) -> Result<UpgradeCheck, String> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    // As the agent it will be: with the whole bounding set (see `exec_agent`).
    let mut child = crate::sys::spawn::with_whole_set(&|| {
        Command::new(binary)
            .arg("__upgrade-check")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    })
    .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let pidfd = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let exited = match &pidfd {
        Some(pidfd) => loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(n) if n > 0 => break true,
                Ok(_) => break false,
                Err(rustix::io::Errno::INTR) if !left.is_zero() => {}
                Err(_) => break false,
            }
        },
        // A child that is already reaped cannot be; pidfd_open failing means no pidfd
        // support, which the agent needs anyway.
        None => false,
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{} __upgrade-check did not answer within {}",
            binary.display(),
            crate::config::format_duration(CHECK_TIMEOUT)
        ));
    }
    let status = child
        .wait()
        .map_err(|e| format!("failed to wait for {}: {e}", binary.display()))?;
    let out = child.stdout.take().map(read_available).unwrap_or_default();
    let err = child.stderr.take().map(read_available).unwrap_or_default();
    let err = String::from_utf8_lossy(&err);
    let err = err.trim();
    let tail = match err.char_indices().rev().nth(STDERR_TAIL) {
        Some((i, _)) => format!("...{}", &err[i..]),
        None => err.to_string(),
    };
    let said = if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    };
    if !status.success() {
        return Err(format!(
            "{} __upgrade-check failed ({status}){said}",
            binary.display()
        ));
    }
    let out = String::from_utf8_lossy(&out);
    let line = out.lines().next().unwrap_or("");
    serde_json::from_str::<UpgradeCheck>(line).map_err(|e| {
        format!(
            "{} __upgrade-check printed {:?}, not {{\"version\":...,\"record_version\":N}} ({e}){said}",
            binary.display(),
            line.chars().take(200).collect::<String>()
        )
    })
}

/// What a pipe holds now, without waiting for its other end (a child of the check may
/// still hold it).
fn read_available(mut r: impl Read + AsFd) -> Vec<u8> {
    let _ = rustix::fs::fcntl_setfl(&r, rustix::fs::OFlags::NONBLOCK);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while out.len() < MAX_CHECK_OUTPUT {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

impl Agent {
    /// `upgrade`: refused (with the reason, nothing changed) or this process becomes the
    /// new binary and never returns here.
    pub(super) fn upgrade(&mut self, conn: u64, binary: Option<String>) {
        let why = self.try_upgrade(conn, binary);
        warn!("upgrade refused: {why}");
        self.finish(
            conn,
            &Reply::error(ErrorKind::Failed, format!("upgrade refused: {why}")),
        );
    }

    /// Steps 1–5 of the module doc; returns why not if it does not exec.
    fn try_upgrade(&mut self, conn: u64, binary: Option<String>) -> String {
        if self.shutting_down {
            return "the agent is shutting down".into();
        }
        // 1. Deploys keep their clients waiting, and their stages are not in the record.
        for (name, site) in &self.sites {
            if site.machine.deploy().is_some() || site.machine.queued_deploys() > 0 {
                return format!("site {name} has a deploy under way; try again once it is done");
            }
        }
        let binary = match binary {
            Some(b) => PathBuf::from(b),
            None => self.exe.clone(),
        };
        if !binary.is_absolute() {
            return format!("{} is not an absolute path", binary.display());
        }
        // The new image reads its control socket, record, cgroups and metrics address where
        // the file says: changed there since this agent started, it would fail to take over
        // (and the previous image, resumed, the same way).
        match crate::config::load_each(&self.config.file) {
            Ok((file, _)) => {
                let now = &self.config;
                let show = |p: &std::path::Path| p.display().to_string();
                let metrics = |m: Option<std::net::SocketAddr>| {
                    m.map_or_else(|| "none".to_string(), |a| a.to_string())
                };
                let changed = [
                    (
                        "control_socket",
                        show(&now.control_socket),
                        show(&file.control_socket),
                    ),
                    ("state_dir", show(&now.state_dir), show(&file.state_dir)),
                    (
                        "cgroup_base",
                        now.cgroup_base.to_string(),
                        file.cgroup_base.to_string(),
                    ),
                    ("metrics", metrics(now.metrics), metrics(file.metrics)),
                ]
                .into_iter()
                .find(|(_, was, is)| was != is);
                if let Some((key, was, is)) = changed {
                    return format!(
                        "{key} changed in {} since the agent started ({was}, now {is}): it takes effect when the agent restarts (which stops its sites); or put it back",
                        now.file.display()
                    );
                }
            }
            Err(e) => return e.to_string(),
        }
        // 2. A bad binary never replaces a working agent.
        let check = match preflight(&binary, &self.config.file) {
            Ok(c) => c,
            Err(e) => return e,
        };
        if check.record_version != FORMAT_VERSION {
            return format!(
                "{} (version {}) reads records of format {}, this agent writes {FORMAT_VERSION}",
                binary.display(),
                check.version,
                check.record_version
            );
        }
        // Signals that arrived meanwhile are handled now: `std` unblocks every signal for a
        // moment before `execve`, and a pending `SIGTERM` would then end the agent by
        // default action instead of stopping it.
        self.handle_pending_signals();
        if self.shutting_down {
            return "the agent is shutting down".into();
        }
        // Workers whose exit was handled are reaped, and the look for other zombies made,
        // now (it may feed a machine, which may ask for signals); then every signal the
        // machines asked for is sent: the new image knows of neither.
        self.reap_held();
        if self.scan_owed {
            self.reap();
        }
        self.send_signals(usize::MAX);
        debug_assert!(self.zombies.is_empty() && self.signals_to_send.is_empty());
        // What other clients are owed is written now: the new image starts with none (the
        // history's buffers too).
        self.flush_history(true);
        self.flush_pending();
        // 3. The record, now, whatever was written before.
        self.unsaved(Unsaved::Changes);
        self.last_record = None;
        self.save_workers_now();
        if self.last_record.is_none() {
            return "the record of live workers could not be written (see the agent's log)".into();
        }
        // 4. The fds the new image needs, and nothing else. `exec` commands lose their
        // client: hang them up as a disconnection would.
        self.hang_up_execs(None);
        let previous = match std::fs::File::open("/proc/self/exe") {
            Ok(f) => OwnedFd::from(f),
            Err(e) => return format!("failed to open /proc/self/exe: {e}"),
        };
        let Some(client) = self.conns.get(&conn).map(|c| c.fd.as_fd()) else {
            return "the client hung up".into();
        };
        // Connections accepted whose request was not read yet (it may be in the socket's
        // buffer): the new image reads it, instead of their client losing the connection.
        // One that sent part of a line, waits for an operation or streams is closed.
        let pending: Vec<BorrowedFd<'_>> = self
            .conns
            .iter()
            .filter(|(id, c)| {
                **id != conn && !c.done && !c.held && c.backlog.is_none() && c.inbuf.is_empty()
            })
            .map(|(_, c)| c.fd.as_fd())
            .collect();
        let mut kept = vec![
            self.control.as_fd(),
            self._lock.as_fd(),
            self.notify.as_fd(),
            client,
            previous.as_fd(),
        ];
        kept.extend(pending.iter().copied());
        // Not to a binary that does not take it (an older one, which knows no such lock:
        // it runs without, and this image's closes at the `execve`).
        let cgroup_lock = self
            .cgroups
            .as_ref()
            .filter(|_| check.cgroup_lock)
            .map(|tree| tree.lock_fd());
        kept.extend(cgroup_lock);
        let passed = Passed {
            control: self.control.as_raw_fd(),
            lock: self._lock.as_raw_fd(),
            notify: self.notify.as_fd().as_raw_fd(),
            client: client.as_raw_fd(),
            previous: previous.as_raw_fd(),
            pending: pending.iter().map(AsRawFd::as_raw_fd).collect(),
            cgroup_lock: cgroup_lock.map(|fd| fd.as_raw_fd()),
            from: crate::version().to_string(),
            failed: None,
        };
        if let Err(e) = set_cloexec(&kept, false) {
            let _ = set_cloexec(&kept, true);
            return format!("failed to keep the agent's fds across execve: {e}");
        }
        info!(
            binary = %binary.display(),
            version = check.version,
            "upgrading: executing the new binary"
        );
        // The summaries of folded log lines still owed are written now: the new image
        // starts with none.
        super::fold::LogFold::agent().flush_all();
        // 5. Same pid, same children; signals stay blocked and pending ones wait.
        let e = exec_agent(&binary, &passed.to_env());
        let _ = set_cloexec(&kept, true);
        format!("failed to execute {}: {e}", binary.display())
    }

    /// After `Agent::new` with inherited fds: what `status` shows and what the client is
    /// told once the agent runs.
    pub(super) fn upgraded(&mut self, inherited: &Inherited) -> Result<(), AgentError> {
        let client = inherited.client()?;
        let me = crate::version();
        let pid = std::process::id();
        let reply = match &inherited.failed {
            Some(reason) => {
                warn!("the upgrade failed and this binary resumed: {reason}");
                Reply::error(
                    ErrorKind::Failed,
                    format!("upgrade failed: {reason}; the previous binary resumed"),
                )
            }
            None => {
                let workers = self
                    .sites
                    .values()
                    .flat_map(|s| s.io.gens.values())
                    .map(|g| g.workers.len())
                    .sum::<usize>();
                let workers = u32::try_from(workers).unwrap_or(u32::MAX);
                self.upgraded_from = Some(crate::status::UpgradedFrom {
                    version: inherited.from.clone(),
                    at: crate::logs::utc_timestamp(SystemTime::now()),
                });
                let message = format!(
                    "upgraded from {} to {me}; pid {pid} unchanged; {workers} workers kept",
                    inherited.from
                );
                info!("{message}");
                Reply::ok(&Upgraded {
                    message,
                    from: inherited.from.clone(),
                    to: me.to_string(),
                    pid,
                    workers,
                })
            }
        };
        self.upgrade_reply = Some((client, reply));
        self.upgrade_pending = inherited.pending()?;
        Ok(())
    }

    /// Answers the client of the upgrade and reads the requests the old image had not
    /// (from `run`, once the reactor watches).
    pub(super) fn answer_upgrade(&mut self) {
        for fd in std::mem::take(&mut self.upgrade_pending) {
            if let Some(id) = self.add_conn(fd, Some(Instant::now() + super::REQUEST_TIMEOUT)) {
                self.arm_conn_read(id);
            }
        }
        let Some((fd, reply)) = self.upgrade_reply.take() else {
            return;
        };
        if let Some(id) = self.add_conn(fd, None) {
            self.finish(id, &reply);
        }
    }

    /// A connection passed by the old image, as a new one.
    fn add_conn(&mut self, fd: OwnedFd, deadline: Option<Instant>) -> Option<u64> {
        let uid = match rustix::net::sockopt::socket_peercred(&fd) {
            Ok(c) => c.uid.as_raw(),
            Err(e) => {
                error!("a client passed across the upgrade is gone: {e}");
                return None;
            }
        };
        let _ = rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, super::Conn::new(fd, uid, deadline));
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passed_fds_round_trip_with_a_reason_holding_commas() {
        let p = Passed {
            control: 5,
            lock: 6,
            notify: 7,
            client: 9,
            previous: 10,
            pending: vec![11, 12],
            cgroup_lock: Some(13),
            from: "0.1.0+a".into(),
            failed: Some("bad state: a, b=c".into()),
        };
        assert_eq!(Passed::parse(&p.to_env()), Ok(p.clone()));
        let q = Passed {
            failed: None,
            pending: Vec::new(),
            cgroup_lock: None,
            ..p
        };
        assert_eq!(Passed::parse(&q.to_env()), Ok(q));
    }

    #[test]
    fn a_malformed_variable_is_an_error() {
        for bad in [
            "",
            "control=5",
            "control=x,lock=6,notify=7,client=9,previous=10,from=1",
            "control=5,lock=6,notify=7,client=9,previous=10",
            "control=5,lock=6,notify=7,client=9,previous=10,from=1,other=2",
            "control=5,lock=6,notify=7,client=9,previous=10,from=1,cgroup_lock=x",
        ] {
            assert!(Passed::parse(bad).is_err(), "{bad}");
        }
    }
}

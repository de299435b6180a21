//! What the agent sets up around the loop: the lock on its control socket (one agent per
//! socket), the socket itself, the signals it reads, its file limit, and its word to
//! systemd.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use rustix::net::SocketFlags;
use tracing::warn;

use super::{AgentError, setup_err};

/// Every signal the agent reads from its signalfd: those it acts on (`SIGTERM`, `SIGINT`,
/// `SIGHUP`, `SIGCHLD`), and every other one whose default action would end it, which it
/// only logs. A stray `kill -USR1` must not take every site's supervisor down. Faults the
/// kernel raises itself (a real `SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGILL`, `SIGSYS`, `SIGTRAP`)
/// still end the agent: the kernel delivers them even when blocked, with the default
/// action; `abort()` unblocks `SIGABRT` before raising it. Blocked here, a signal sent with
/// `kill` is the same event every time (logged), never swallowed once and fatal the next.
/// `SIGPIPE` stays ignored (writes report `EPIPE`); stop signals (`SIGTSTP`, `SIGTTIN`,
/// `SIGTTOU`) keep their default.
pub(super) fn agent_signals() -> Vec<i32> {
    let mut out = vec![
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGCHLD,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGTRAP,
        libc::SIGSYS,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGABRT,
    ];
    out.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    out
}

pub(super) fn bind_control(path: &std::path::Path) -> Result<OwnedFd, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup_err(format!("create {}", dir.display()), e))?;
    }
    // No agent runs on this socket (`lock_control` says so): whatever is at the path is
    // stale. A connect could still succeed: io_uring tears a killed agent's ring down
    // asynchronously, and the ring's poll on the old listening socket keeps it alive
    // (and accepting into its backlog) for a while after the agent died.
    let _ = std::fs::remove_file(path);
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| setup_err("create the control socket", io::Error::from(e)))?;
    let addr = rustix::net::SocketAddrUnix::new(path)
        .map_err(|e| setup_err("name the control socket", io::Error::from(e)))?;
    rustix::net::bind(&fd, &addr)
        .map_err(|e| setup_err(format!("bind {}", path.display()), io::Error::from(e)))?;
    // Everyone may connect; SO_PEERCRED decides what each peer may do.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| setup_err(format!("chmod {}", path.display()), e))?;
    rustix::net::listen(&fd, 128)
        .map_err(|e| setup_err("listen on the control socket", io::Error::from(e)))?;
    Ok(fd)
}

/// The pid of the agent running on `socket`, if one holds its lock.
pub fn running_agent(socket: &std::path::Path) -> Option<u32> {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    let mut file = File::open(PathBuf::from(name)).ok()?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok() {
        // Nobody holds it: no agent.
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).ok()?;
    text.trim().parse().ok()
}

/// Takes the lock `<control socket>.lock` for the agent's lifetime (an `flock`, released
/// by the kernel when the agent exits, however it exits), before anything else is touched:
/// a second agent on the same socket would otherwise sweep the first one's cgroups.
pub(super) fn lock_control(socket: &std::path::Path) -> Result<OwnedFd, AgentError> {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup_err(format!("create {}", dir.display()), e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| setup_err(format!("open {}", path.display()), e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // The pid, for `check` to tell the running agent's listeners from strangers.
            use std::io::Write as _;
            let mut f = file;
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            Ok(OwnedFd::from(f))
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Err(setup_err(
            format!("lock {}", path.display()),
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another agent is running on the control socket {}",
                    socket.display()
                ),
            ),
        )),
        Err(e) => Err(setup_err(
            format!("lock {}", path.display()),
            io::Error::from(e),
        )),
    }
}

pub(super) fn raise_nofile_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Sends `state` to systemd's `NOTIFY_SOCKET`, if the agent runs under it.
pub(super) fn notify_systemd(state: &str) {
    if let Err(e) = crate::net::sd_notify(state) {
        warn!("failed to notify systemd: {e}");
    }
}

//! Readiness reactors: io_uring (default) and epoll (fallback), one interface.
//!
//! Both deliver one-shot readiness: [`Reactor::arm`] asks for one notification that an fd
//! is readable (or writable), identified by a caller-chosen token; after it fires the
//! caller re-arms if it wants more. One-shot matches how the agent uses fds: a pidfd
//! becomes readable once, at exit; a pipe or socket is read until `EAGAIN`, then re-armed.
//!
//! The io_uring backend is chosen unless `HATCHERY_REACTOR=epoll` is set or the ring
//! cannot be created (seccomp in containers, `kernel.io_uring_disabled`, a missing opcode).
//! Tokens are never reused by the caller, so a stale completion (a poll that fired just
//! as it was cancelled) names a token nobody owns and is dropped.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::epoll;

use crate::sys::uring::Uring;

/// What readiness to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Readable (for a pidfd: the process exited).
    Readable,
    /// Writable.
    Writable,
    /// An exceptional condition (`POLLPRI`: a PSI trigger fired).
    Priority,
}

/// Which backend is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// io_uring `POLL_ADD` and `TIMEOUT`.
    IoUring,
    /// epoll with `EPOLLONESHOT`.
    Epoll,
}

impl Backend {
    /// The name shown in `check` and `status`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// A one-shot readiness reactor.
#[derive(Debug)]
pub enum Reactor {
    /// The io_uring backend.
    Uring(Box<Uring>),
    /// The epoll backend.
    Epoll(EpollReactor),
}

impl Reactor {
    /// Creates the reactor `HATCHERY_REACTOR` asks for (`io_uring`, the default, or
    /// `epoll`), falling back to epoll when io_uring is unavailable. The second value says
    /// why io_uring is not in use, if it is not.
    pub fn from_env() -> io::Result<(Reactor, Option<String>)> {
        let wanted = std::env::var("HATCHERY_REACTOR").unwrap_or_default();
        if wanted == "epoll" {
            return Ok((
                Reactor::Epoll(EpollReactor::new()?),
                Some("HATCHERY_REACTOR=epoll".into()),
            ));
        }
        match Uring::new(16384) {
            Ok(u) => Ok((Reactor::Uring(Box::new(u)), None)),
            Err(e) => Ok((
                Reactor::Epoll(EpollReactor::new()?),
                Some(format!("io_uring unavailable: {e}")),
            )),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self {
            Reactor::Uring(_) => Backend::IoUring,
            Reactor::Epoll(_) => Backend::Epoll,
        }
    }

    /// How the backend posts what is ready, where it has a choice (io_uring: see
    /// [`crate::sys::uring::TaskRun`]).
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            Reactor::Uring(u) => Some(u.taskrun().name()),
            Reactor::Epoll(_) => None,
        }
    }

    /// Asks for one notification carrying `token` when `fd` is ready for `interest`.
    pub fn arm(&mut self, fd: BorrowedFd<'_>, interest: Interest, token: u64) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => {
                let events = match interest {
                    Interest::Readable => libc::POLLIN,
                    Interest::Writable => libc::POLLOUT,
                    Interest::Priority => libc::POLLPRI,
                };
                u.poll(fd, u32::from(events.unsigned_abs()), token)
            }
            Reactor::Epoll(e) => e.arm(fd, interest, token),
        }
    }

    /// Withdraws the notification armed with `token` on `fd`. Call before closing `fd`.
    pub fn disarm(&mut self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.cancel(token),
            Reactor::Epoll(e) => e.disarm(fd),
        }
    }

    /// Waits until something is ready or `timeout` passes; appends ready tokens.
    pub fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<u64>) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.wait(timeout, ready),
            Reactor::Epoll(e) => e.wait(timeout, ready),
        }
    }
}

/// The epoll backend: `EPOLLONESHOT` registrations, re-armed with `EPOLL_CTL_MOD`.
pub struct EpollReactor {
    epoll: OwnedFd,
    registered: HashMap<RawFd, u64>,
    events: Vec<epoll::Event>,
}

impl std::fmt::Debug for EpollReactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollReactor")
            .field("registered", &self.registered.len())
            .finish()
    }
}

impl EpollReactor {
    fn new() -> io::Result<EpollReactor> {
        Ok(EpollReactor {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            registered: HashMap::new(),
            events: Vec::with_capacity(1024),
        })
    }

    fn arm(&mut self, fd: BorrowedFd<'_>, interest: Interest, token: u64) -> io::Result<()> {
        let flags = epoll::EventFlags::ONESHOT
            | match interest {
                Interest::Readable => epoll::EventFlags::IN,
                Interest::Writable => epoll::EventFlags::OUT,
                Interest::Priority => epoll::EventFlags::PRI,
            };
        let data = epoll::EventData::new_u64(token);
        let raw = fd.as_raw_fd();
        // An fd number may have been closed (which drops its epoll entry) and reused, so
        // "registered" is a hint: fall back between ADD and MOD on ENOENT/EEXIST.
        let result = if self.registered.contains_key(&raw) {
            match epoll::modify(&self.epoll, fd, data, flags) {
                Err(rustix::io::Errno::NOENT) => epoll::add(&self.epoll, fd, data, flags),
                r => r,
            }
        } else {
            match epoll::add(&self.epoll, fd, data, flags) {
                Err(rustix::io::Errno::EXIST) => epoll::modify(&self.epoll, fd, data, flags),
                r => r,
            }
        };
        result?;
        self.registered.insert(raw, token);
        Ok(())
    }

    fn disarm(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.registered.remove(&fd.as_raw_fd()).is_some() {
            match epoll::delete(&self.epoll, fd) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<u64>) -> io::Result<()> {
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        self.events.clear();
        match epoll::wait(
            self.epoll.as_fd(),
            rustix::buffer::spare_capacity(&mut self.events),
            ts.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for event in &self.events {
            ready.push(event.data.u64());
        }
        Ok(())
    }
}

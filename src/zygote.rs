//! Zygote mode: a site's `command` starts a *zygote* per generation, a process that loads
//! the application once and then forks workers on the agent's request, so that workers
//! start in milliseconds and share the loaded memory copy-on-write. This module holds the
//! protocol between the agent and a zygote (version 3), the agent's side of it
//! ([`ZygoteLink`]) and the zygote's side for zygotes written in Rust ([`serve`], used by
//! `hatchery __demo-zygote`). The Python side is the `hatchery_zygote` package in
//! `zygote/python/`.
//!
//! # The protocol, version 3
//!
//! Transport: a `SOCK_SEQPACKET` unix socket pair ([`ZygoteLink::pair`]). The zygote's end
//! is inherited (not close-on-exec) at the fd number given in the environment variable
//! `HATCHERY_ZYGOTE_FD` ([`ZYGOTE_FD_ENV`]). One message is one datagram of ASCII text
//! (at most [`MAX_MESSAGE_BYTES`] bytes, printable characters only), fields separated by
//! single spaces; fds travel with it as `SCM_RIGHTS`. Like an exec worker, the zygote
//! also inherits the generation's listeners at fds 3.. with `LISTEN_FDS=n` (but no
//! `LISTEN_PID`: each worker sets its own), `NOTIFY_SOCKET`, `HATCHERY_GENERATION`, and
//! its stdout/stderr (the zygote's own output pipe), and `HATCHERY_ZYGOTE_PROTOCOL`
//! ([`PROTOCOL_ENV`]): the highest version the agent speaks (absent: 2).
//!
//! 1. zygote → agent: `READY <version>` once the code is loaded, the lower of the
//!    zygote's own version and the agent's (`READY 3` between two of this version; the
//!    agent takes 1 to 3). Sent once, before anything else.
//! 2. agent → zygote: `FORK <slot> <request-id>` with the write end of the new worker's
//!    output: to a zygote of version 2, two fds, its stdout's and its stderr's (so that
//!    the agent tells the streams apart); to one of version 1, one fd for both. A zygote
//!    of version 2 takes either.
//! 3. The zygote creates a "go" pipe and forks **twice**: an intermediate child forks the
//!    worker and `_exit(0)`s at once. Once the intermediate has exited, the worker is
//!    re-parented to the agent (a child subreaper, and the zygote's parent), so it is the
//!    agent's own child: waitable, its exit status known, its pid not reusable until the
//!    agent reaps it. The zygote may answer before that (the exit of a large process takes
//!    longer than a fork: the Python helper does not wait; `serve` here does), and reaps
//!    the intermediate in its own time. A zygote may also fork a worker ahead of its
//!    `FORK` (the Python helper keeps one such spare), as long as the worker runs no
//!    application code before its go. The worker closes the zygote socket and everything
//!    else it must not keep, then blocks reading the go pipe.
//!
//!    Version 3, optional: zygote → agent `SPARE <pid>` (no fds), at any time after
//!    `READY`, names a worker forked ahead of its `FORK`, blocked as above. The agent
//!    checks it as in step 5 (but for the go pipe) and moves it at once into the leaf of the slot it expects
//!    that worker to get: the slot of the oldest `FORK` not answered yet, else the
//!    lowest slot its generation does not use. When a `FORKED` then names it for that
//!    slot, step 5's move is already done (a move can wait for an RCU grace period, 5 to
//!    20 ms, on a cgroup2 mount without `favordynmods`); for another slot it is moved
//!    again. A hint only: nothing needs it, and a zygote may never send one. The agent
//!    moves only a process that is still in the zygote's own leaf (so it was forked
//!    there, and moved by no one) and that it does not know already (a worker, a zygote,
//!    another spare): a zygote is trusted less than the agent.
//! 4. zygote → agent: `FORKED <request-id> <pid>` with exactly one fd, the write end of
//!    that worker's go pipe (the zygote then closes its copies of the go pipe and of the
//!    output pipe); or `FAILED <request-id> <reason…>` without fds.
//! 5. The agent opens `<pid>`'s pidfd, checks that it is its own child, or the child of a
//!    child of the zygote (`/proc/<pid>/stat` field 4), still alive, and holding the
//!    read end of the go pipe whose write end came with the `FORKED` (one of
//!    `/proc/<pid>/fd`: only the zygote's own fork can), and (in the agent's event loop)
//!    no process the agent already knows; moves it into its cgroup leaf (writes the pid
//!    to `cgroup.procs`), then writes `go\n` to the go pipe and closes it
//!    ([`Forked::proceed`]).
//! 6. The worker, on reading exactly `go\n`, sets `HATCHERY_WORKER_ID=<slot>` and
//!    `LISTEN_PID=<its pid>`, makes the first output fd its stdout and the second (or the
//!    first, if it came alone) its stderr, closes the go
//!    pipe and runs the application's worker entry. On end of file without `go\n` (the
//!    agent refused it, or died) it `_exit(1)`s without running application code.
//!
//! The zygote exits when its socket reaches end of file (the agent is gone or closed it)
//! and on its stop signal (`SIGTERM` by default). Its workers are not its children and are
//! unaffected either way.
//!
//! Request ids are chosen by the agent, increasing; an answer to an earlier request that
//! the agent gave up waiting for is discarded (its go pipe closed, so that worker exits 1).
//!
//! Kernel requirements: `SOCK_SEQPACKET` unix sockets and `PR_SET_CHILD_SUBREAPER`
//! (Linux 3.4), pidfds (5.3). What this module does not do: the cgroup move (step 5's
//! middle is the caller's, between [`ZygoteLink::fork`] and [`Forked::proceed`]),
//! starting or stopping the zygote, and any decision about when to fork.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};

use crate::sys::fork::{ForkSide, exit_now, fork_single_threaded, set_env_in_forked_child};

/// The environment variable naming the zygote's end of the link.
pub const ZYGOTE_FD_ENV: &str = "HATCHERY_ZYGOTE_FD";
/// The environment variable giving the zygote the highest protocol version the agent
/// speaks (a zygote started by an agent that does not set it says at most 2).
pub const PROTOCOL_ENV: &str = "HATCHERY_ZYGOTE_PROTOCOL";
/// The protocol version this module speaks: 3, version 2 with `SPARE`; version 2 is
/// version 1 with a `FORK`'s stderr as an fd of its own.
pub const PROTOCOL_VERSION: u32 = 3;
/// The version a zygote says when the agent does not say its own.
pub const UNSAID_AGENT_VERSION: u32 = 2;
/// The first version with `SPARE`.
pub const SPARE_VERSION: u32 = 3;
/// The oldest version the agent still takes from a zygote (one fd for both streams).
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
/// The largest message either side sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// What the agent writes to a worker's go pipe.
pub const GO: &[u8] = b"go\n";
/// Room for this many fds when receiving, so that a message with too many is seen (and
/// its fds closed) rather than truncated.
const MAX_RECEIVED_FDS: usize = 4;

/// A message from the zygote to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// `READY <version>`: the code is loaded.
    Ready { version: u32 },
    /// `FORKED <request-id> <pid>` (with the go pipe's write end).
    Forked { request: u64, pid: i32 },
    /// `FAILED <request-id> <reason…>`.
    Failed { request: u64, reason: String },
    /// `SPARE <pid>` (version 3): a worker forked ahead of its `FORK`.
    Spare { pid: i32 },
}

/// A message from the agent to the zygote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToZygote {
    /// `FORK <slot> <request-id>` (with the output's write ends: stdout's and stderr's,
    /// or one for both).
    Fork { slot: u32, request: u64 },
}

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed zygote message {text:?}: {reason}")]
pub struct ParseError {
    /// The message, lossily decoded and cut to [`MAX_MESSAGE_BYTES`].
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Splits a message into its fields, checking the character set and the spacing.
fn fields(bytes: &[u8]) -> Result<Vec<&str>, ParseError> {
    let bad = |reason| ParseError {
        text: String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_MESSAGE_BYTES)]).into_owned(),
        reason,
    };
    if bytes.is_empty() {
        return Err(bad("empty message"));
    }
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(bad("longer than 512 bytes"));
    }
    if !bytes.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(bad("not printable ASCII"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not printable ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    if fields.iter().any(|f| f.is_empty()) {
        return Err(bad("fields must be separated by single spaces"));
    }
    Ok(fields)
}

/// A decimal number of digits only (no sign, no spaces).
fn number<T: std::str::FromStr>(field: &str) -> Option<T> {
    if field.is_empty() || field.len() > 20 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

impl ToAgent {
    /// The message's text.
    pub fn format(&self) -> String {
        match self {
            ToAgent::Ready { version } => format!("READY {version}"),
            ToAgent::Forked { request, pid } => format!("FORKED {request} {pid}"),
            ToAgent::Spare { pid } => format!("SPARE {pid}"),
            ToAgent::Failed { request, reason } => {
                // Printable ASCII only, single spaces, and short enough to fit.
                let clean: String = reason
                    .chars()
                    .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
                    .collect();
                let mut words = clean.split_whitespace().collect::<Vec<_>>().join(" ");
                if words.is_empty() {
                    words = "unknown".into();
                }
                let mut text = format!("FAILED {request} {words}");
                text.truncate(MAX_MESSAGE_BYTES);
                text.truncate(text.trim_end().len());
                text
            }
        }
    }

    /// Parses one message.
    pub fn parse(bytes: &[u8]) -> Result<ToAgent, ParseError> {
        let f = fields(bytes)?;
        let bad = |reason| ParseError {
            text: String::from_utf8_lossy(bytes).into_owned(),
            reason,
        };
        match f.as_slice() {
            ["READY", v] => Ok(ToAgent::Ready {
                version: number(v).ok_or_else(|| bad("bad version"))?,
            }),
            ["FORKED", r, p] => {
                let pid: i32 = number(p).ok_or_else(|| bad("bad pid"))?;
                if pid < 2 {
                    return Err(bad("bad pid"));
                }
                Ok(ToAgent::Forked {
                    request: number(r).ok_or_else(|| bad("bad request id"))?,
                    pid,
                })
            }
            ["FAILED", r, reason @ ..] if !reason.is_empty() => Ok(ToAgent::Failed {
                request: number(r).ok_or_else(|| bad("bad request id"))?,
                reason: reason.join(" "),
            }),
            ["SPARE", p] => {
                let pid: i32 = number(p).ok_or_else(|| bad("bad pid"))?;
                if pid < 2 {
                    return Err(bad("bad pid"));
                }
                Ok(ToAgent::Spare { pid })
            }
            ["READY", ..] | ["FORKED", ..] | ["FAILED", ..] | ["SPARE", ..] => {
                Err(bad("wrong number of fields"))
            }
            _ => Err(bad("unknown message")),
        }
    }
}

impl ToZygote {
    /// The message's text.
    pub fn format(&self) -> String {
        match self {
            ToZygote::Fork { slot, request } => format!("FORK {slot} {request}"),
        }
    }

    /// Parses one message.
    pub fn parse(bytes: &[u8]) -> Result<ToZygote, ParseError> {
        let f = fields(bytes)?;
        let bad = |reason| ParseError {
            text: String::from_utf8_lossy(bytes).into_owned(),
            reason,
        };
        match f.as_slice() {
            ["FORK", s, r] => Ok(ToZygote::Fork {
                slot: number(s).ok_or_else(|| bad("bad slot"))?,
                request: number(r).ok_or_else(|| bad("bad request id"))?,
            }),
            ["FORK", ..] => Err(bad("wrong number of fields")),
            _ => Err(bad("unknown message")),
        }
    }
}

/// What went wrong on a link, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// A syscall on the link, a pipe or a process failed.
    #[error("failed to {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The other side closed its end (the zygote exited, or the agent is gone).
    #[error("the other end of the zygote link is closed")]
    Closed,
    /// The other side does not follow the protocol.
    #[error("zygote protocol violation")]
    Malformed(#[from] ParseError),
    /// A well-formed message that is wrong here.
    #[error("zygote protocol violation: {0}")]
    Unexpected(String),
    /// The zygote speaks another version.
    #[error("the zygote speaks protocol version {0}, this agent speaks versions 1 to 3")]
    UnsupportedVersion(u32),
    /// No answer to a `FORK` in time.
    #[error("the zygote did not answer the fork of worker {slot} within {timeout:?}")]
    TimedOut { slot: u32, timeout: Duration },
    /// The zygote answered `FAILED`.
    #[error("the zygote failed to fork worker {slot}: {reason}")]
    Failed { slot: u32, reason: String },
    /// The pid the zygote named is not a child of this process (its go pipe was closed,
    /// so if it is a worker, it exits 1 without running application code).
    #[error("the zygote named pid {pid} for worker {slot}, whose parent is {parent}, not us")]
    NotOurChild { slot: u32, pid: i32, parent: i32 },
}

impl ZygoteError {
    /// Whether the link is unusable from now on (restart the zygote), as opposed to one
    /// failed fork (retry with backoff).
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            ZygoteError::TimedOut { .. } | ZygoteError::Failed { .. }
        )
    }
}

fn io_err(what: &'static str) -> impl FnOnce(Errno) -> ZygoteError {
    move |e| ZygoteError::Io {
        what,
        source: e.into(),
    }
}

enum Received {
    /// Its length and its fds (close-on-exec).
    Message(usize, Vec<OwnedFd>),
    /// The peer closed the connection.
    End,
}

use crate::scm::Datagram;

/// Receives one message and its fds into `buf`; a truncated message is malformed.
fn receive(
    socket: BorrowedFd<'_>,
    buf: &mut [u8; MAX_MESSAGE_BYTES + 1],
    flags: RecvFlags,
) -> Result<Received, ZygoteError> {
    let got = crate::scm::recv_with_fds(socket, buf, flags, MAX_RECEIVED_FDS)
        .map_err(io_err("receive from the zygote link"))?;
    match got {
        Datagram::End => Ok(Received::End),
        Datagram::Message(Some(len), fds) if len <= MAX_MESSAGE_BYTES => {
            Ok(Received::Message(len, fds))
        }
        Datagram::Message(..) => Err(ParseError {
            text: String::from_utf8_lossy(&buf[..MAX_MESSAGE_BYTES]).into_owned(),
            reason: "truncated (too long, or too many fds)",
        }
        .into()),
    }
}

/// Sends one message carrying `fds` (at most two here: a `FORK`'s stdout and stderr).
fn send(socket: BorrowedFd<'_>, text: &str, fds: &[BorrowedFd<'_>]) -> Result<(), ZygoteError> {
    if fds.len() > 2 {
        return Err(ZygoteError::Unexpected(format!(
            "{} fds in one message",
            fds.len()
        )));
    }
    match crate::scm::send_with_fds(socket, text.as_bytes(), fds) {
        Ok(()) => Ok(()),
        Err(Errno::PIPE | Errno::CONNRESET) => Err(ZygoteError::Closed),
        Err(e) => Err(io_err("send on the zygote link")(e)),
    }
}

/// The agent's end of the link to one zygote.
#[derive(Debug)]
pub struct ZygoteLink {
    socket: OwnedFd,
    /// The last request id used.
    last_request: u64,
    /// The version the zygote said in its `READY` (0 before).
    version: u32,
}

/// A worker the zygote forked, checked to be our child and waiting for its go.
#[derive(Debug)]
pub struct Forked {
    /// Its pid: our child, so not reusable until we reap it.
    pub pid: i32,
    /// Its pidfd, opened once it was known to be our child.
    pub pidfd: OwnedFd,
    /// The write end of its go pipe. Dropping it without [`Forked::proceed`] makes the
    /// worker exit 1 without running application code.
    pub go: OwnedFd,
}

impl Forked {
    /// Lets the worker run: writes `go\n` to its go pipe and closes it.
    pub fn proceed(self) -> io::Result<()> {
        let_go(self.go)
    }
}

/// Writes `go\n` to a forked worker's go pipe (the write end `go`) and closes it: the
/// worker runs from then on.
pub fn let_go(go: OwnedFd) -> io::Result<()> {
    let written = rustix::io::retry_on_intr(|| rustix::io::write(&go, GO))?;
    if written != GO.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to a go pipe",
        ));
    }
    Ok(())
}

impl ZygoteLink {
    /// A new link: the agent's end, and the zygote's end (close-on-exec: the spawner
    /// places it, without the flag, at the number it puts in [`ZYGOTE_FD_ENV`]).
    pub fn pair() -> io::Result<(ZygoteLink, OwnedFd)> {
        let (agent, zygote) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((
            ZygoteLink {
                socket: agent,
                last_request: 0,
                version: 0,
            },
            zygote,
        ))
    }

    /// The socket, for the reactor (readable when the zygote sent something or exited).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Reads what the zygote sent, without blocking: `Ok(Some(version))` for `READY`,
    /// `Ok(None)` when nothing came yet; an error at end of file, for anything else than
    /// `READY 1` or `READY 2` (fds included), or any other version.
    pub fn read_ready(&mut self) -> Result<Option<u32>, ZygoteError> {
        let mut buf = [0u8; MAX_MESSAGE_BYTES + 1];
        let (n, fds) = match receive(self.socket.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
            Ok(Received::Message(n, fds)) => (n, fds),
            Ok(Received::End) => return Err(ZygoteError::Closed),
            Err(ZygoteError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match ToAgent::parse(&buf[..n])? {
            ToAgent::Ready { .. } if !fds.is_empty() => {
                Err(ZygoteError::Unexpected("fds sent with READY".to_string()))
            }
            ToAgent::Ready { version }
                if (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
            {
                self.version = version;
                Ok(Some(version))
            }
            ToAgent::Ready { version } => Err(ZygoteError::UnsupportedVersion(version)),
            other => Err(ZygoteError::Unexpected(format!(
                "{:?} before READY",
                other.format()
            ))),
        }
    }

    /// Asks for worker `slot`, whose stdout goes to `output` (the write end of its pipe)
    /// and its stderr to `errors` (only to a zygote that said version 2 or later), or to
    /// `output` too; without waiting: the answer comes later from
    /// [`ZygoteLink::read_answer`], under the request id returned here.
    pub fn request_fork(
        &mut self,
        slot: u32,
        output: BorrowedFd<'_>,
        errors: Option<BorrowedFd<'_>>,
    ) -> Result<u64, ZygoteError> {
        self.last_request += 1;
        let request = self.last_request;
        let message = ToZygote::Fork { slot, request }.format();
        match errors {
            Some(errors) => send(self.socket.as_fd(), &message, &[output, errors])?,
            None => send(self.socket.as_fd(), &message, &[output])?,
        }
        Ok(request)
    }

    /// Reads one message of a ready zygote without blocking (`Ok(None)` when none came
    /// yet): an answer to a [`ZygoteLink::request_fork`], whose own result is the fork's
    /// (the worker, our child, its pidfd open, blocked until [`Forked::proceed`], or why
    /// there is none: [`ZygoteError::Failed`], [`ZygoteError::NotOurChild`], ...), or a
    /// `SPARE` (from a zygote that said version 3 or later). The outer error is the
    /// link's: closed, or a protocol violation (the zygote is not to be trusted further).
    pub fn read_answer(&mut self) -> Result<Option<Reply>, ZygoteError> {
        let mut buf = [0u8; MAX_MESSAGE_BYTES + 1];
        let (n, mut received) = match receive(self.socket.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
            Ok(Received::Message(n, fds)) => (n, fds),
            Ok(Received::End) => return Err(ZygoteError::Closed),
            Err(ZygoteError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let (request, slot_result) = match ToAgent::parse(&buf[..n])? {
            ToAgent::Forked { request, pid } => {
                if received.len() != 1 {
                    return Err(ZygoteError::Unexpected(format!(
                        "FORKED with {} fds",
                        received.len()
                    )));
                }
                (request, Ok((pid, received.remove(0))))
            }
            ToAgent::Failed { request, reason } => {
                if !received.is_empty() {
                    return Err(ZygoteError::Unexpected("fds sent with FAILED".into()));
                }
                (request, Err(reason))
            }
            ToAgent::Ready { .. } => {
                return Err(ZygoteError::Unexpected("a second READY".into()));
            }
            ToAgent::Spare { .. } if self.version < SPARE_VERSION => {
                return Err(ZygoteError::Unexpected(format!(
                    "SPARE from a zygote of version {}",
                    self.version
                )));
            }
            ToAgent::Spare { .. } if !received.is_empty() => {
                return Err(ZygoteError::Unexpected("fds sent with SPARE".into()));
            }
            ToAgent::Spare { pid } => return Ok(Some(Reply::Spare { pid })),
        };
        if request == 0 || request > self.last_request {
            return Err(ZygoteError::Unexpected(format!(
                "an answer to request {request}, which was never made"
            )));
        }
        Ok(Some(Reply::Answer(Answer {
            request,
            pid: slot_result.as_ref().ok().map(|(pid, _)| *pid),
            result: slot_result,
        })))
    }

    /// Asks for worker `slot`, whose output goes to `output` (the write end of its
    /// pipe), and waits at most `timeout` (in `poll`) for the answer. On success the
    /// worker is our child (or, given the pid of the `zygote`, still the child of its
    /// exiting intermediate child: ours once that has exited), with its pidfd open,
    /// blocked until [`Forked::proceed`]. Answers to earlier requests that come meanwhile
    /// are dropped (their workers exit without running application code).
    pub fn fork(
        &mut self,
        slot: u32,
        output: BorrowedFd<'_>,
        timeout: Duration,
        zygote: Option<i32>,
    ) -> Result<Forked, ZygoteError> {
        let deadline = Instant::now() + timeout;
        let request = self.request_fork(slot, output, None)?;
        loop {
            match self.read_answer()? {
                Some(Reply::Answer(answer)) if answer.request == request => {
                    return answer.into_forked(slot, zygote);
                }
                // A late answer to a request we gave up on, or a spare: dropped here.
                Some(_) => continue,
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ZygoteError::TimedOut { slot, timeout });
            }
            let mut fds = [rustix::event::PollFd::new(
                &self.socket,
                rustix::event::PollFlags::IN,
            )];
            let limit =
                rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                });
            match rustix::event::poll(&mut fds, Some(&limit)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(io_err("poll the zygote link")(e)),
            }
        }
    }
}

/// What a ready zygote sends.
#[derive(Debug)]
pub enum Reply {
    /// An answer to a `FORK`.
    Answer(Answer),
    /// `SPARE <pid>`: a worker forked ahead of its `FORK` (not checked yet:
    /// [`check_spare`]).
    Spare { pid: i32 },
}

/// The zygote's answer to one `FORK`, as it came: the worker's pid and go pipe, or the
/// zygote's reason for failing. [`Answer::into_forked`] checks the worker.
#[derive(Debug)]
pub struct Answer {
    /// The request it answers.
    pub request: u64,
    /// The pid the zygote named (not yet checked).
    pub pid: Option<i32>,
    result: Result<(i32, OwnedFd), String>,
}

impl Answer {
    /// The worker of slot `slot` (the slot the request was made for): checked to be our
    /// child (or, with the pid of the `zygote` that answered, the child of that zygote's
    /// child, re-parented to us once that intermediate exits), its pidfd opened; or why
    /// not. Dropping the go pipe on failure makes a worker that exists exit 1 without
    /// running application code.
    pub fn into_forked(self, slot: u32, zygote: Option<i32>) -> Result<Forked, ZygoteError> {
        match self.result {
            Ok((pid, go)) => own_child(slot, pid, go, zygote),
            Err(reason) => Err(ZygoteError::Failed { slot, reason }),
        }
    }
}

/// Checks that `pid` is our child, or on its way to being one (its parent is a child of
/// `zygote`: the intermediate of the double fork, about to exit), and opens its pidfd;
/// drops `go` (the worker then exits 1) if it is neither. It must also hold the read end
/// of the go pipe whose write end is `go`: a zygote can name any child of ours (another
/// site's worker, an orphan we reaped for), but only its own fork waits on that pipe.
fn own_child(slot: u32, pid: i32, go: OwnedFd, zygote: Option<i32>) -> Result<Forked, ZygoteError> {
    let pidfd = open_if_ours(pid, zygote, Some(slot))?;
    // Its pidfd is open and it was alive after: the pid is still that process's.
    if !holds_read_end(pid, &go).map_err(|source| ZygoteError::Io {
        what: "read the forked worker's fds",
        source,
    })? {
        return Err(ZygoteError::Unexpected(format!(
            "the zygote named pid {pid} for worker {slot}, which does not hold the go pipe it sent"
        )));
    }
    Ok(Forked { pid, pidfd, go })
}

/// Whether process `pid` has the pipe whose write end is `write_end` open (its read end,
/// as a forked worker waiting for its go does): one of `/proc/<pid>/fd` links to the same
/// pipe.
fn holds_read_end(pid: i32, write_end: &OwnedFd) -> io::Result<bool> {
    let stat = rustix::fs::fstat(write_end)?;
    let pipe = format!("pipe:[{}]", stat.st_ino);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == pipe.as_str()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Checks the worker a `SPARE` named as [`Answer::into_forked`] checks a `FORKED`'s (our
/// child or our child-to-be, alive): its pidfd, or why it is not to be touched.
pub fn check_spare(pid: i32, zygote: Option<i32>) -> Result<OwnedFd, ZygoteError> {
    open_if_ours(pid, zygote, None)
}

/// `pid`'s pidfd if it is our child, or on its way to being one (its parent is a child of
/// `zygote`: the intermediate of the double fork, about to exit), and alive. `slot`, for
/// the errors, is the one a `FORKED` was for (`None`: a `SPARE`'s).
fn open_if_ours(pid: i32, zygote: Option<i32>, slot: Option<u32>) -> Result<OwnedFd, ZygoteError> {
    let raw = rustix::process::Pid::from_raw(pid)
        .ok_or(ZygoteError::Unexpected("pid 0 from the zygote".to_string()))?;
    // The pidfd first: once the parentage is read, its process being alive still proves
    // the pid was not reused in between.
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(io_err("open the forked worker's pidfd"))?;
    let read = |pid: i32| {
        crate::process::read_stat(pid).map_err(|source| ZygoteError::Io {
            what: "read the forked worker's /proc/<pid>/stat (it exited before its go?)",
            source,
        })
    };
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let parent = read(pid)?.ppid;
    // The intermediate may exit (the worker re-parented to us) between the two reads.
    let ours = parent == me
        || zygote.is_some_and(|z| read(parent).is_ok_and(|p| p.ppid == z))
        || read(pid)?.ppid == me;
    if !ours {
        return Err(match slot {
            Some(slot) => ZygoteError::NotOurChild { slot, pid, parent },
            None => ZygoteError::Unexpected(format!(
                "SPARE named pid {pid}, whose parent is {parent}, not us"
            )),
        });
    }
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    if rustix::event::poll(&mut fds, Some(&zero))
        .map_err(io_err("poll the forked worker's pidfd"))?
        > 0
    {
        return Err(ZygoteError::Unexpected(match slot {
            Some(slot) => format!("worker {slot} (pid {pid}) exited before its go"),
            None => format!("the spare (pid {pid}) exited"),
        }));
    }
    Ok(pidfd)
}

/// What a worker forked by [`serve`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStart {
    /// Its slot (also in `HATCHERY_WORKER_ID`).
    pub slot: u32,
    /// The request id it was forked for.
    pub request: u64,
}

/// The zygote's end of the link, if this process was started as a zygote: the fd named
/// by [`ZYGOTE_FD_ENV`], now owned and close-on-exec. `None` when the variable is unset;
/// an error when it does not name an open fd.
pub fn inherited_link() -> io::Result<Option<OwnedFd>> {
    let Some(value) = std::env::var_os(ZYGOTE_FD_ENV) else {
        return Ok(None);
    };
    let raw: i32 = value
        .to_str()
        .and_then(number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad HATCHERY_ZYGOTE_FD"))?;
    let fd = crate::sys::inherit::take_inherited(raw)?;
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(Some(fd))
}

/// The version a zygote of this version says in its `READY`: the lower of its own and
/// the agent's ([`PROTOCOL_ENV`]; 2 if unset or unreadable).
pub fn version_to_say() -> u32 {
    let agent = std::env::var(PROTOCOL_ENV)
        .ok()
        .and_then(|v| number::<u32>(&v))
        .unwrap_or(UNSAID_AGENT_VERSION);
    agent.clamp(OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION)
}

/// The zygote's side, for a zygote written in Rust: sends `READY` ([`version_to_say`];
/// this side never sends `SPARE`: it forks each worker on its `FORK`), then serves `FORK`
/// requests until the link reaches end of file (`Ok(())`). Each worker runs `worker` after
/// its go, then `_exit`s with its return value; it never returns here. Must be called on
/// the process's only thread (forking is refused otherwise: each fork answers `FAILED`).
pub fn serve(
    mut link: OwnedFd,
    mut worker: impl FnMut(WorkerStart) -> i32,
) -> Result<(), ZygoteError> {
    send(
        link.as_fd(),
        &ToAgent::Ready {
            version: version_to_say(),
        }
        .format(),
        &[],
    )?;
    let mut buf = [0u8; MAX_MESSAGE_BYTES + 1];
    loop {
        let (n, mut fds) = match receive(link.as_fd(), &mut buf, RecvFlags::empty())? {
            Received::Message(n, fds) => (n, fds),
            Received::End => return Ok(()),
        };
        let ToZygote::Fork { slot, request } = ToZygote::parse(&buf[..n])?;
        if !(1..=2).contains(&fds.len()) {
            let reason = format!("FORK needs 1 or 2 fds, got {}", fds.len());
            send(
                link.as_fd(),
                &ToAgent::Failed { request, reason }.format(),
                &[],
            )?;
            continue;
        }
        let output = fds.remove(0);
        let errors = fds.pop();
        let start = WorkerStart { slot, request };
        match fork_worker(&mut link, (output, errors), start, &mut worker) {
            Ok((pid, go)) => send(
                link.as_fd(),
                &ToAgent::Forked { request, pid }.format(),
                &[go.as_fd()],
            )?,
            Err(e) => send(
                link.as_fd(),
                &ToAgent::Failed {
                    request,
                    reason: e.to_string(),
                }
                .format(),
                &[],
            )?,
        }
    }
}

/// The double fork of step 3; in the parent (the zygote), the worker's pid and the write
/// end of its go pipe. `output` (stdout's, and stderr's if apart) is closed here on return.
fn fork_worker(
    link: &mut OwnedFd,
    output: (OwnedFd, Option<OwnedFd>),
    start: WorkerStart,
    worker: &mut impl FnMut(WorkerStart) -> i32,
) -> io::Result<(i32, OwnedFd)> {
    let (go_read, go_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // The intermediate tells the zygote the worker's pid through this pipe.
    let (pid_read, pid_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    match fork_single_threaded()? {
        ForkSide::Child => {
            // The intermediate: fork the worker, report its pid, exit at once.
            drop(pid_read);
            match fork_single_threaded() {
                Ok(ForkSide::Child) => {
                    drop(pid_write);
                    worker_child(link, output, go_read, go_write, start, worker)
                }
                Ok(ForkSide::Parent(pid)) => {
                    let ok = rustix::io::write(&pid_write, &pid.to_ne_bytes()) == Ok(4);
                    exit_now(if ok { 0 } else { 1 })
                }
                Err(_) => exit_now(1),
            }
        }
        ForkSide::Parent(intermediate) => {
            drop(pid_write);
            drop(go_read);
            drop(output);
            let raw =
                rustix::process::Pid::from_raw(intermediate).expect("fork returned a positive pid");
            rustix::process::waitpid(Some(raw), rustix::process::WaitOptions::empty())?;
            // Once the intermediate is reaped, the worker has been re-parented (the
            // kernel re-parents children before their parent becomes a zombie).
            let mut bytes = [0u8; 4];
            let n = rustix::io::retry_on_intr(|| rustix::io::read(&pid_read, &mut bytes))?;
            if n != 4 {
                return Err(io::Error::other(
                    "the intermediate child exited without forking the worker",
                ));
            }
            Ok((i32::from_ne_bytes(bytes), go_write))
        }
    }
}

/// The worker's path after the second fork: never returns.
fn worker_child(
    link: &mut OwnedFd,
    output: (OwnedFd, Option<OwnedFd>),
    go_read: OwnedFd,
    go_write: OwnedFd,
    start: WorkerStart,
    worker: &mut impl FnMut(WorkerStart) -> i32,
) -> ! {
    // A process group of its own, as every worker the agent starts (`sys::spawn`, step 2):
    // without cgroups the agent kills a worker's tree by its group.
    if rustix::process::setpgid(None, None).is_err() {
        exit_now(1)
    }
    // Close the zygote's end of the link (the worker must not be able to talk for the
    // zygote, nor keep it open past the zygote's exit) and our copy of the go pipe's write
    // end (else its end of file would never come).
    // The caller's `OwnedFd` is never dropped (this function does not return), so the
    // socket is closed by swapping in the read end of a fresh pipe (whose write end is
    // closed at once): no file system needed, so it works in any sandbox root (one
    // without `/dev/null`).
    let Ok((placeholder, unused)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
    else {
        exit_now(1)
    };
    drop(unused);
    drop(std::mem::replace(link, placeholder));
    drop(go_write);
    let mut got = Vec::with_capacity(GO.len() + 1);
    let mut byte = [0u8; 4];
    loop {
        match rustix::io::read(&go_read, &mut byte) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&byte[..n]);
                if got.len() >= GO.len() {
                    break;
                }
            }
            Err(Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    if got != GO {
        // Refused, or the agent died: no application code runs.
        exit_now(1);
    }
    drop(go_read);
    let pid = std::process::id().to_string();
    let slot = start.slot.to_string();
    let env = [
        ("HATCHERY_WORKER_ID", Some(slot.as_str())),
        ("LISTEN_PID", Some(pid.as_str())),
        (ZYGOTE_FD_ENV, None),
        (PROTOCOL_ENV, None),
    ];
    for (name, value) in env {
        if set_env_in_forked_child(name, value.map(std::ffi::OsStr::new)).is_err() {
            exit_now(1);
        }
    }
    let (out, err) = output;
    let err_fd = err.as_ref().unwrap_or(&out);
    if rustix::stdio::dup2_stdout(&out).is_err() || rustix::stdio::dup2_stderr(err_fd).is_err() {
        exit_now(1);
    }
    drop(out);
    drop(err);
    let code = worker(start);
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    exit_now(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            ToAgent::Ready { version: 1 },
            ToAgent::Forked {
                request: 7,
                pid: 4242,
            },
            ToAgent::Failed {
                request: 9,
                reason: "fork: Resource temporarily unavailable".into(),
            },
            ToAgent::Spare { pid: 4243 },
        ] {
            assert_eq!(ToAgent::parse(m.format().as_bytes()), Ok(m));
        }
        let f = ToZygote::Fork {
            slot: 3,
            request: 12,
        };
        assert_eq!(f.format(), "FORK 3 12");
        assert_eq!(ToZygote::parse(b"FORK 3 12"), Ok(f));
    }

    #[test]
    fn failed_reasons_are_cleaned_to_fit() {
        let m = ToAgent::Failed {
            request: 1,
            reason: "line one\nline\ttwo  é".into(),
        };
        assert_eq!(m.format(), "FAILED 1 line one line two");
        let long = ToAgent::Failed {
            request: 1,
            reason: "x ".repeat(1000),
        };
        let text = long.format();
        assert!(text.len() <= MAX_MESSAGE_BYTES);
        assert!(ToAgent::parse(text.as_bytes()).is_ok());
        let empty = ToAgent::Failed {
            request: 2,
            reason: " \n".into(),
        };
        assert_eq!(empty.format(), "FAILED 2 unknown");
    }

    #[test]
    fn malformed_messages_are_refused() {
        let to_agent: &[&[u8]] = &[
            b"",
            b"READY",
            b"READY 1 2",
            b"READY x",
            b"READY -1",
            b"READY +1",
            b"READY  1",
            b"READY 1 ",
            b" READY 1",
            b"ready 1",
            b"READY 1\n",
            b"FORKED 1",
            b"FORKED 1 0",
            b"FORKED 1 1",
            b"FORKED 1 -5",
            b"FORKED 1 99999999999",
            b"FORKED x 5",
            b"FAILED 1",
            b"FAILED x why",
            b"FAILED 1 caf\xc3\xa9",
            b"HELLO 1",
            b"FORK 1 2",
            b"SPARE",
            b"SPARE 1",
            b"SPARE 0",
            b"SPARE x",
            b"SPARE 5 6",
            b"SPARE -5",
        ];
        for m in to_agent {
            assert!(
                ToAgent::parse(m).is_err(),
                "{:?}",
                String::from_utf8_lossy(m)
            );
        }
        let long = format!("FAILED 1 {}", "x".repeat(MAX_MESSAGE_BYTES));
        assert!(ToAgent::parse(long.as_bytes()).is_err());
        let to_zygote: &[&[u8]] = &[
            b"",
            b"FORK",
            b"FORK 1",
            b"FORK 1 2 3",
            b"FORK -1 2",
            b"FORK 1 x",
            b"FORK 4294967296 1",
            b"FORK 1\x002",
            b"READY 1",
        ];
        for m in to_zygote {
            assert!(
                ToZygote::parse(m).is_err(),
                "{:?}",
                String::from_utf8_lossy(m)
            );
        }
    }

    #[test]
    fn spare_is_taken_from_a_zygote_of_version_3_only_and_without_fds() {
        let (mut link, zygote) = ZygoteLink::pair().expect("socketpair");
        send(zygote.as_fd(), "READY 3", &[]).expect("send");
        assert_eq!(link.read_ready().expect("ready"), Some(3));
        send(zygote.as_fd(), "SPARE 4242", &[]).expect("send");
        assert!(matches!(
            link.read_answer(),
            Ok(Some(Reply::Spare { pid: 4242 }))
        ));
        let (_r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        send(zygote.as_fd(), "SPARE 4242", &[w.as_fd()]).expect("send");
        assert!(matches!(
            link.read_answer(),
            Err(ZygoteError::Unexpected(_))
        ));
        let (mut old, zygote) = ZygoteLink::pair().expect("socketpair");
        send(zygote.as_fd(), "READY 2", &[]).expect("send");
        assert_eq!(old.read_ready().expect("ready"), Some(2));
        send(zygote.as_fd(), "SPARE 4242", &[]).expect("send");
        assert!(matches!(old.read_answer(), Err(ZygoteError::Unexpected(_))));
    }

    #[test]
    fn a_spare_that_is_not_our_child_is_refused() {
        // This test process is not its own child, nor its parent's grandchild.
        let me = rustix::process::getpid().as_raw_nonzero().get();
        assert!(matches!(
            check_spare(me, None),
            Err(ZygoteError::Unexpected(m)) if m.contains("not us")
        ));
    }

    #[test]
    fn read_ready_reports_nothing_yet_ready_and_end() {
        let (mut link, zygote) = ZygoteLink::pair().expect("socketpair");
        assert_eq!(link.read_ready().expect("nothing yet"), None);
        send(zygote.as_fd(), "READY 1", &[]).expect("send");
        assert_eq!(link.read_ready().expect("ready"), Some(1));
        send(zygote.as_fd(), "READY 2", &[]).expect("send");
        assert_eq!(link.read_ready().expect("ready"), Some(2));
        send(zygote.as_fd(), "READY 3", &[]).expect("send");
        assert_eq!(link.read_ready().expect("ready"), Some(3));
        send(zygote.as_fd(), "READY 4", &[]).expect("send");
        assert!(matches!(
            link.read_ready(),
            Err(ZygoteError::UnsupportedVersion(4))
        ));
        send(zygote.as_fd(), "FORKED 1 5", &[]).expect("send");
        assert!(matches!(link.read_ready(), Err(ZygoteError::Unexpected(_))));
        send(zygote.as_fd(), "SPARE 5", &[]).expect("send");
        assert!(matches!(link.read_ready(), Err(ZygoteError::Unexpected(_))));
        send(zygote.as_fd(), "garbage", &[]).expect("send");
        assert!(matches!(link.read_ready(), Err(ZygoteError::Malformed(_))));
        drop(zygote);
        assert!(matches!(link.read_ready(), Err(ZygoteError::Closed)));
    }

    /// The first child of `parent` found in /proc, waiting (at most 10 s) for one.
    fn child_of(parent: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .find(|p| crate::process::read_stat(*p).is_ok_and(|s| s.ppid == parent));
            if let Some(p) = found {
                return p;
            }
            assert!(Instant::now() < deadline, "no child of {parent}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_worker_is_accepted_while_its_parent_is_the_zygotes_exiting_child() {
        // A stand-in zygote (sh) whose child (sh) has a child (sleep): the tree a double
        // fork leaves until its intermediate child has exited. The worker holds the read
        // end of its go pipe (inherited: not close-on-exec), as a forked worker does.
        let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        rustix::io::fcntl_setfd(&go_r, rustix::io::FdFlags::empty()).expect("inheritable");
        let mut zygote_process = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 60 & wait' & wait"])
            .spawn()
            .expect("spawn sh");
        drop(go_r);
        let zpid = i32::try_from(zygote_process.id()).expect("pid");
        let intermediate = child_of(zpid);
        let worker = child_of(intermediate);
        let (mut link, zygote) = ZygoteLink::pair().expect("socketpair");
        let (_r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        // `held`: with the write end of the pipe the worker holds, else of a new one.
        let answer = |request: u64, held: bool| {
            let (_other_r, other_w) =
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
            let text = format!("FORKED {request} {worker}");
            let go = if held { go_w.as_fd() } else { other_w.as_fd() };
            send(zygote.as_fd(), &text, &[go]).expect("send");
        };
        // A go pipe it does not hold: not its fork, refused.
        answer(1, false);
        let e = link
            .fork(3, w.as_fd(), Duration::from_secs(5), Some(zpid))
            .expect_err("not holding that go pipe");
        assert!(
            matches!(&e, ZygoteError::Unexpected(m) if m.contains("does not hold the go pipe")),
            "{e:?}"
        );
        // Named by its zygote with its own go pipe: accepted, its pidfd open.
        answer(2, true);
        let forked = link
            .fork(0, w.as_fd(), Duration::from_secs(5), Some(zpid))
            .expect("a grandchild of the zygote is accepted");
        assert_eq!(forked.pid, worker);
        // Without the zygote's pid, or by another one, it is refused.
        answer(3, true);
        let e = link
            .fork(1, w.as_fd(), Duration::from_secs(5), None)
            .expect_err("not our child");
        assert!(matches!(e, ZygoteError::NotOurChild { .. }), "{e:?}");
        answer(4, true);
        let e = link
            .fork(2, w.as_fd(), Duration::from_secs(5), Some(worker))
            .expect_err("not the child of that zygote's child");
        assert!(matches!(e, ZygoteError::NotOurChild { .. }), "{e:?}");
        for pid in [worker, intermediate, zpid] {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = zygote_process.wait();
    }

    #[test]
    fn fork_reports_failed_timeout_and_a_pid_that_is_not_our_child() {
        let (mut link, zygote) = ZygoteLink::pair().expect("socketpair");
        let (_r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        // Nobody answers.
        let e = link
            .fork(0, w.as_fd(), Duration::from_millis(20), None)
            .expect_err("no answer");
        assert!(matches!(e, ZygoteError::TimedOut { slot: 0, .. }));
        assert!(!e.is_permanent());
        // The late answer to request 1 is skipped; request 2 failed.
        send(zygote.as_fd(), "FAILED 1 late", &[]).expect("send");
        send(zygote.as_fd(), "FAILED 2 out of memory", &[]).expect("send");
        let e = link
            .fork(1, w.as_fd(), Duration::from_secs(5), None)
            .expect_err("failed");
        assert!(
            matches!(&e, ZygoteError::Failed { slot: 1, reason } if reason == "out of memory"),
            "{e:?}"
        );
        // This test process is not its own child: FORKED 3 naming it, with a go pipe.
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        send(zygote.as_fd(), &format!("FORKED 3 {me}"), &[go_w.as_fd()]).expect("send");
        drop(go_w);
        let e = link
            .fork(2, w.as_fd(), Duration::from_secs(5), None)
            .expect_err("not ours");
        assert!(
            matches!(e, ZygoteError::NotOurChild { pid, .. } if pid == me),
            "{e:?}"
        );
        // Its go pipe was closed unwritten.
        let mut b = [0u8; 4];
        assert_eq!(rustix::io::read(&go_r, &mut b), Ok(0));
        // A FORK carries the output fd.
        let mut buf = [0u8; MAX_MESSAGE_BYTES + 1];
        for expected in ["FORK 0 1", "FORK 1 2", "FORK 2 3"] {
            match receive(zygote.as_fd(), &mut buf, RecvFlags::DONTWAIT).expect("a FORK") {
                Received::Message(n, fds) => {
                    assert_eq!(&buf[..n], expected.as_bytes());
                    assert_eq!(fds.len(), 1);
                }
                Received::End => panic!("end"),
            }
        }
        drop(zygote);
        assert!(matches!(
            link.fork(3, w.as_fd(), Duration::from_secs(5), None),
            Err(ZygoteError::Closed)
        ));
    }
}

//! The fd holder: a tiny separate process that keeps duplicates of fds by name (the read
//! ends of workers' stdout/stderr pipes), so that they outlive the agent, and gives them
//! back to the next agent.
//!
//! Without it, the read ends of a worker's output pipes are held by the agent alone: when
//! the agent dies (`kill -9`, a crash), the workers keep running and die of `SIGPIPE` at
//! their next write. The holder never reads what it holds; it watches every held fd for
//! `EPOLLHUP`/`EPOLLERR` only (an empty epoll event mask: the kernel always reports those
//! two, and asking for `EPOLLIN` would make a pipe with unread data wake the loop forever)
//! and closes an fd that reports either: a pipe's read end reports `EPOLLHUP` once every
//! writer is gone, that is once the worker has exited. This is systemd's fd store with
//! `FDPOLL`.
//!
//! The process ([`serve`], run as `hatchery fd-holder --socket PATH`), in order:
//!
//! 1. `setsid()`: a session of its own, so a hang-up of the agent's terminal or session
//!    does not reach it (fails with `EPERM` when it already leads a process group, as when
//!    started by hand from a shell; it goes on then).
//! 2. Blocks `SIGHUP` and `SIGPIPE` (a blocked signal is never delivered, so both are as
//!    good as ignored; writes report `EPIPE`). `SIGTERM` and `SIGINT` keep their default.
//! 3. Raises its soft `RLIMIT_NOFILE` to the hard limit: it may hold tens of thousands
//!    of fds.
//! 4. Binds a `SOCK_SEQPACKET` unix socket at PATH, mode 0600. A socket file already there
//!    is removed only when nothing answers on it; when another holder answers, this one
//!    exits 0 at once: one holder per path.
//! 5. Replaces its stdout with `/dev/null`: the starter ([`HolderClient::connect_or_start`])
//!    gives it a pipe as stdout and waits for its end of file, so it connects once the
//!    holder listens, without polling.
//! 6. Runs one epoll loop over the listener, its clients and the held fds, blocking in
//!    `epoll_wait` with no timeout: no threads, no timers.
//!
//! Only peers with the holder's own uid (`SO_PEERCRED`) are served; at most
//! [`MAX_CLIENTS`] at once.
//!
//! The protocol: a text header in each `SEQPACKET` message, fds as `SCM_RIGHTS`, at most
//! [`MAX_FDS_PER_MESSAGE`] fds per message. Names are 1 to [`MAX_NAME_BYTES`] bytes of
//! UTF-8 without `\n` or NUL.
//!
//! - Each connection opens with `HELLO 1` from the client, answered `HELLO 1`.
//! - `PUT\n<name1>\n<name2>...`, with one fd per name in order: stored, replacing (and
//!   closing) an fd held under the same name. No reply.
//! - `DROP\n<name1>\n...`: those fds are closed and forgotten. No reply.
//! - `DUMP`: answered by zero or more `FDS\n<name>\n...` messages carrying duplicates of
//!   the held fds (the holder keeps its own), then `END <count>`.
//! - `EXIT`: the holder removes its socket file, closes everything and exits 0.
//!
//! An unknown version or command, or a malformed message (a `PUT` whose names and fds do
//! not match one to one, a bad name, fds on any other message, a truncated message) is
//! logged to stderr and closes that connection, closing the fds it carried; the holder
//! goes on.
//!
//! Messages on one connection are handled in order; the holder reads every queued message
//! of a connection before it looks at the next event, and epoll reports connections in the
//! order they became readable, so a `PUT` sent before another client connects is stored
//! before that client's `DUMP` is answered.
//!
//! Not done here: anything about what the names mean (the agent chooses them), and
//! any use of the held fds beyond holding and handing them back.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt};
use rustix::process::{Resource, Rlimit};

/// The protocol version, sent in `HELLO` by both sides.
pub const PROTOCOL_VERSION: u32 = 1;
/// At most this many fds travel in one message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;
/// The longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// At most this many clients are connected at once; more are closed at once.
pub const MAX_CLIENTS: usize = 16;

/// The largest message either side sends: a command and 250 names with their newlines.
const MAX_MESSAGE_BYTES: usize = 8 + MAX_FDS_PER_MESSAGE * (MAX_NAME_BYTES + 1);
/// How long a blocking send or receive may take, on both sides, before it fails: a stuck
/// holder must never hang the agent, and a client that stops reading a `DUMP` must not
/// hang the holder.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`HolderClient::connect_or_start`] waits for a new holder to listen.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// The listener's backlog: connections waiting to be accepted.
const LISTEN_BACKLOG: i32 = 16;
/// The epoll token of the listener; clients and held fds get tokens counting up from 1.
const LISTENER: u64 = 0;

/// What went wrong in the holder or in talking to it.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// A step on the holder's socket file failed (naming, binding, connecting, removing).
    #[error("failed to {op} the fd holder socket {}", path.display())]
    Socket {
        /// The step: "bind", "connect to", ...
        op: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the holder's path: left alone.
    #[error("refused to replace {}: it is not a socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A send, a receive or another call on an open connection or on the holder's own
    /// fds failed (a timeout shows as `EAGAIN`).
    #[error("failed to {op}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The other side broke the protocol or closed the connection.
    #[error("fd holder protocol error: {0}")]
    Protocol(String),
    /// A name that the protocol cannot carry.
    #[error("invalid fd name {name:?}: a name is 1 to 200 bytes without newline or NUL")]
    InvalidName {
        /// The name refused.
        name: String,
    },
    /// The holder process could not be started.
    #[error("failed to start {} fd-holder", exe.display())]
    Start {
        /// The executable.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A holder was started but nothing listens at its socket.
    #[error("the fd holder started for {} does not listen", path.display())]
    NotListening {
        /// The socket's path.
        path: PathBuf,
    },
}

impl HolderError {
    fn io(op: &'static str) -> impl FnOnce(Errno) -> HolderError {
        move |e| HolderError::Io {
            op,
            source: e.into(),
        }
    }

    fn socket<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> HolderError + 'a {
        move |e| HolderError::Socket {
            op,
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// Whether `name` can be carried by the protocol: 1 to 200 bytes, no `\n`, no NUL.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_BYTES).contains(&name.len()) && !name.bytes().any(|b| b == b'\n' || b == 0)
}

/// A request from a client, as parsed by the holder.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Hello(u32),
    Put(Vec<String>),
    Drop(Vec<String>),
    Dump,
    Exit,
}

/// Parses one request message; the error says what is wrong with it.
fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the message is not UTF-8".to_string())?;
    if let Some(version) = text.strip_prefix("HELLO ") {
        return version
            .parse()
            .map(Request::Hello)
            .map_err(|_| format!("bad HELLO {version:?}"));
    }
    let (command, rest) = match text.split_once('\n') {
        Some((command, rest)) => (command, Some(rest)),
        None => (text, None),
    };
    let names = || -> Result<Vec<String>, String> {
        let names: Vec<String> = rest
            .ok_or_else(|| format!("{command} without names"))?
            .split('\n')
            .map(str::to_string)
            .collect();
        if names.len() > MAX_FDS_PER_MESSAGE {
            return Err(format!("{command} with {} names", names.len()));
        }
        match names.iter().find(|n| !valid_name(n)) {
            Some(bad) => Err(format!("{command} with the invalid name {bad:?}")),
            None => Ok(names),
        }
    };
    match (command, rest) {
        ("PUT", _) => names().map(Request::Put),
        ("DROP", _) => names().map(Request::Drop),
        ("DUMP", None) => Ok(Request::Dump),
        ("EXIT", None) => Ok(Request::Exit),
        _ => Err(format!(
            "unknown request {:?}",
            text.chars().take(40).collect::<String>()
        )),
    }
}

/// Runs the holder process at `socket_path` (the steps in the module doc) until `EXIT`
/// is received (then `Ok`), or returns at once, `Ok`, when another holder answers there.
///
/// Meant for the `hatchery fd-holder` process only: it changes process-wide state
/// (session, signal mask, fd limit, stdout).
pub fn serve(socket_path: &Path) -> Result<(), HolderError> {
    // 1. A session of its own. EPERM: already a process group leader, started by hand.
    let _ = rustix::process::setsid();
    // 2. Blocked for good: a terminal hang-up or a write to a closed pipe never ends it.
    crate::sys::signals::block(&crate::sys::signals::SigSet::of(&[
        libc::SIGHUP,
        libc::SIGPIPE,
    ]))
    .map_err(|source| HolderError::Io {
        op: "block SIGHUP and SIGPIPE",
        source,
    })?;
    // 3. As many fds as we are allowed. Best effort: a lower limit only holds fewer.
    let limit = rustix::process::getrlimit(Resource::Nofile);
    if let Err(e) = rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    ) {
        eprintln!("fd holder: failed to raise RLIMIT_NOFILE to its hard limit: {e}");
    }
    // 4. Bind, or leave it to the holder already there.
    let Some(holder) = Holder::bind(socket_path)? else {
        return Ok(());
    };
    // 5. Ready: the starter waits for the end of file on our stdout.
    let null = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(HolderError::io("open /dev/null"))?;
    rustix::stdio::dup2_stdout(&null).map_err(HolderError::io("replace stdout by /dev/null"))?;
    drop(null);
    // 6. The loop.
    holder.run()
}

/// What an epoll token stands for.
enum Source {
    /// A connected client.
    Client(Connection),
    /// A held fd, by its name.
    Held(String),
}

/// A client's connection, on the holder's side.
struct Connection {
    fd: OwnedFd,
    /// Whether it has sent its `HELLO`.
    greeted: bool,
}

/// A held fd.
struct Held {
    fd: OwnedFd,
    /// Its epoll token, or `None` for a file that cannot be polled (a regular file):
    /// such an fd is held until dropped.
    token: Option<u64>,
}

/// What to do with a connection after its messages were handled.
enum Outcome {
    Keep(Connection),
    Close,
    /// `EXIT`, received on this connection: closed only once the socket file is gone, so
    /// that the client's end of file means it is.
    Exit(Connection),
}

/// The holder's state: its listener, clients and held fds, and the epoll set over them.
pub struct Holder {
    path: PathBuf,
    /// Device and inode of the socket file we bound, so that `EXIT` removes our file only.
    identity: (u64, u64),
    listener: OwnedFd,
    epoll: OwnedFd,
    /// An fd kept open to be closed when `accept` fails with `EMFILE`, so that the pending
    /// connection can be accepted and closed rather than waking the loop forever.
    reserve: Option<OwnedFd>,
    uid: rustix::process::Uid,
    next_token: u64,
    sources: HashMap<u64, Source>,
    held: HashMap<String, Held>,
    clients: usize,
}

impl Holder {
    /// Binds and listens at `path` (mode 0600): `Ok(None)` when another holder answers
    /// there. A socket file nothing answers on is removed first.
    pub fn bind(path: &Path) -> Result<Option<Holder>, HolderError> {
        let addr =
            SocketAddrUnix::new(path).map_err(HolderError::socket("use the path of", path))?;
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(HolderError::socket("create", path))?;
        // Linux's unix_bind gives the new file the socket inode's mode (less the umask):
        // 0600 from the start, with no window where another user could connect. The
        // chmod after bind covers kernels where this has no effect.
        let _ = rustix::fs::fchmod(&listener, Mode::from_raw_mode(0o600));
        match rustix::net::bind(&listener, &addr) {
            Ok(()) => {}
            Err(Errno::ADDRINUSE) => {
                if answers(&addr) {
                    return Ok(None);
                }
                // Only a socket file is ours to remove; anything else there is a mistake
                // to report, not to delete.
                let stat = rustix::fs::lstat(path).map_err(HolderError::socket("stat", path))?;
                if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket
                {
                    return Err(HolderError::NotASocket {
                        path: path.to_path_buf(),
                    });
                }
                match rustix::fs::unlink(path) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(HolderError::socket("remove the stale", path)(e)),
                }
                rustix::net::bind(&listener, &addr).map_err(HolderError::socket("bind", path))?;
            }
            Err(e) => return Err(HolderError::socket("bind", path)(e)),
        }
        rustix::fs::chmod(path, Mode::from_raw_mode(0o600))
            .map_err(HolderError::socket("chmod", path))?;
        let stat = rustix::fs::stat(path).map_err(HolderError::socket("stat", path))?;
        rustix::net::listen(&listener, LISTEN_BACKLOG)
            .map_err(HolderError::socket("listen on", path))?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(HolderError::io("create an epoll instance"))?;
        epoll::add(
            &epoll,
            &listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN,
        )
        .map_err(HolderError::io("watch the listener"))?;
        Ok(Some(Holder {
            path: path.to_path_buf(),
            identity: (stat.st_dev, stat.st_ino),
            listener,
            epoll,
            reserve: open_reserve(),
            uid: rustix::process::getuid(),
            next_token: LISTENER + 1,
            sources: HashMap::new(),
            held: HashMap::new(),
            clients: 0,
        }))
    }

    /// Serves clients and watches held fds until `EXIT` is received: then removes the
    /// socket file, closes everything and returns `Ok`. Returns an error only when
    /// `epoll_wait` itself fails.
    pub fn run(mut self) -> Result<(), HolderError> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        loop {
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                None,
            ) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(HolderError::io("wait for events")(e)),
            }
            for event in &events {
                let token = event.data.u64();
                if token == LISTENER {
                    self.accept_all();
                    continue;
                }
                // A token already removed (its fd was dropped earlier in this batch) is
                // stale: tokens are never reused.
                match self.sources.remove(&token) {
                    None => {}
                    Some(Source::Held(name)) => {
                        // Only HUP or ERR can be reported for an empty mask: every writer
                        // of the pipe is gone.
                        self.release(&name);
                    }
                    Some(Source::Client(conn)) => match self.handle_client(conn) {
                        Outcome::Keep(conn) => {
                            self.sources.insert(token, Source::Client(conn));
                        }
                        Outcome::Close => {
                            // Closing the fd removes it from the epoll set: it is never
                            // duplicated.
                            self.clients -= 1;
                        }
                        Outcome::Exit(conn) => {
                            self.shut_down();
                            drop(conn);
                            return Ok(());
                        }
                    },
                }
            }
        }
    }

    /// Accepts every pending connection, keeping those of our uid.
    fn accept_all(&mut self) {
        loop {
            let fd = match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR | Errno::CONNABORTED) => continue,
                Err(e @ (Errno::MFILE | Errno::NFILE)) => {
                    // The pending connection would wake the loop forever: free one fd,
                    // accept it and close it.
                    eprintln!("fd holder: refused a connection: {e}");
                    self.reserve = None;
                    drop(rustix::net::accept_with(
                        &self.listener,
                        SocketFlags::CLOEXEC,
                    ));
                    self.reserve = open_reserve();
                    return;
                }
                Err(e) => {
                    eprintln!("fd holder: failed to accept a connection: {e}");
                    return;
                }
            };
            match sockopt::socket_peercred(&fd) {
                Ok(cred) if cred.uid == self.uid => {}
                Ok(cred) => {
                    eprintln!(
                        "fd holder: refused a connection from uid {} (pid {})",
                        cred.uid.as_raw(),
                        cred.pid.as_raw_nonzero()
                    );
                    continue;
                }
                Err(e) => {
                    eprintln!("fd holder: failed to read a peer's credentials: {e}");
                    continue;
                }
            }
            if self.clients >= MAX_CLIENTS {
                eprintln!("fd holder: refused a connection: {MAX_CLIENTS} clients already");
                continue;
            }
            // Receives are non-blocking (MSG_DONTWAIT); the replies to DUMP block, at most
            // IO_TIMEOUT per message.
            if let Err(e) =
                sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(IO_TIMEOUT))
            {
                eprintln!("fd holder: failed to set a send timeout: {e}");
                continue;
            }
            let token = self.token();
            if let Err(e) = epoll::add(
                &self.epoll,
                &fd,
                epoll::EventData::new_u64(token),
                epoll::EventFlags::IN,
            ) {
                eprintln!("fd holder: failed to watch a connection: {e}");
                continue;
            }
            self.clients += 1;
            self.sources
                .insert(token, Source::Client(Connection { fd, greeted: false }));
        }
    }

    /// Handles every message queued on `conn`.
    fn handle_client(&mut self, mut conn: Connection) -> Outcome {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        loop {
            let (len, fds) = match receive(
                conn.fd.as_fd(),
                &mut buf,
                RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(Received::Message(len, fds)) => (len, fds),
                Ok(Received::End) => return Outcome::Close,
                Err(Errno::AGAIN) => return Outcome::Keep(conn),
                Err(Errno::INTR) => continue,
                Err(e) => {
                    eprintln!("fd holder: closed a connection: failed to receive: {e}");
                    return Outcome::Close;
                }
            };
            let request = match len {
                None => Err("a truncated message (fd limit reached?)".to_string()),
                Some(len) => parse_request(&buf[..len.min(buf.len())]),
            };
            let reply = match (conn.greeted, request) {
                (_, Err(why)) => Err(why),
                (false, Ok(Request::Hello(PROTOCOL_VERSION))) if fds.is_empty() => {
                    conn.greeted = true;
                    let hello = format!("HELLO {PROTOCOL_VERSION}");
                    send(conn.fd.as_fd(), hello.as_bytes(), &[])
                        .map_err(|e| format!("failed to answer HELLO: {e}"))
                }
                (false, Ok(Request::Hello(v))) => Err(format!("unsupported version {v}")),
                (false, Ok(_)) => Err("a request before HELLO".to_string()),
                (true, Ok(Request::Hello(_))) => Err("a second HELLO".to_string()),
                (true, Ok(Request::Put(names))) if names.len() == fds.len() => {
                    for (name, fd) in names.into_iter().zip(fds) {
                        self.store(name, fd);
                    }
                    Ok(())
                }
                (true, Ok(Request::Put(names))) => Err(format!(
                    "PUT with {} names and {} fds",
                    names.len(),
                    fds.len()
                )),
                (true, Ok(_)) if !fds.is_empty() => Err("fds on a request other than PUT".into()),
                (true, Ok(Request::Drop(names))) => {
                    for name in &names {
                        self.release(name);
                    }
                    Ok(())
                }
                (true, Ok(Request::Dump)) => self.dump_to(conn.fd.as_fd()),
                (true, Ok(Request::Exit)) => return Outcome::Exit(conn),
            };
            if let Err(why) = reply {
                // The fds it carried, if any, were closed with the request.
                eprintln!("fd holder: closed a connection: {why}");
                return Outcome::Close;
            }
        }
    }

    /// Sends duplicates of every held fd to `conn`, then `END <count>`.
    fn dump_to(&self, conn: BorrowedFd<'_>) -> Result<(), String> {
        let mut names: Vec<&String> = self.held.keys().collect();
        names.sort();
        for chunk in names.chunks(MAX_FDS_PER_MESSAGE) {
            let mut header = String::from("FDS");
            let mut fds = Vec::with_capacity(chunk.len());
            for name in chunk {
                header.push('\n');
                header.push_str(name);
                fds.push(self.held[*name].fd.as_fd());
            }
            send(conn, header.as_bytes(), &fds).map_err(|e| format!("failed to send fds: {e}"))?;
        }
        let end = format!("END {}", names.len());
        send(conn, end.as_bytes(), &[]).map_err(|e| format!("failed to send END: {e}"))
    }

    /// Holds `fd` under `name`, closing an fd held under that name before.
    fn store(&mut self, name: String, fd: OwnedFd) {
        self.release(&name);
        let token = self.token();
        // An empty mask: only EPOLLHUP and EPOLLERR, which epoll always reports. Never
        // EPOLLIN: a pipe with unread data would be reported on every wait.
        let token = match epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::empty(),
        ) {
            Ok(()) => {
                self.sources.insert(token, Source::Held(name.clone()));
                Some(token)
            }
            // A regular file or a directory cannot be polled (EPERM): held until dropped.
            Err(Errno::PERM) => None,
            Err(e) => {
                eprintln!("fd holder: failed to watch {name:?}, held until dropped: {e}");
                None
            }
        };
        self.held.insert(name, Held { fd, token });
    }

    /// Closes and forgets the fd held under `name`, if any.
    fn release(&mut self, name: &str) {
        let Some(held) = self.held.remove(name) else {
            return;
        };
        if let Some(token) = held.token {
            self.sources.remove(&token);
            // Explicitly: epoll keeps watching a file while any duplicate of it is open
            // (a client may hold one from a DUMP), and would report it under a stale token.
            let _ = epoll::delete(&self.epoll, &held.fd);
        }
    }

    /// Removes our socket file (if it is still ours); everything else closes on drop.
    fn shut_down(&self) {
        match rustix::fs::stat(&self.path) {
            Ok(stat) if (stat.st_dev, stat.st_ino) == self.identity => {
                if let Err(e) = rustix::fs::unlink(&self.path) {
                    eprintln!("fd holder: failed to remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }
}

/// `/dev/null`, opened to be closed when the fd table is full.
fn open_reserve() -> Option<OwnedFd> {
    rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// Whether something accepts connections at `addr`.
fn answers(addr: &SocketAddrUnix) -> bool {
    let Ok(probe) = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    ) else {
        return false;
    };
    let _ = sockopt::set_socket_timeout(&probe, sockopt::Timeout::Send, Some(IO_TIMEOUT));
    // EAGAIN: a full backlog, so someone listens.
    matches!(
        rustix::net::connect(&probe, addr),
        Ok(()) | Err(Errno::AGAIN)
    )
}

use crate::scm::Datagram as Received;

/// Receives one message and its fds (close-on-exec) into `buf`.
fn receive(socket: BorrowedFd<'_>, buf: &mut [u8], flags: RecvFlags) -> Result<Received, Errno> {
    crate::scm::recv_with_fds(socket, buf, flags, MAX_FDS_PER_MESSAGE)
}

/// Sends one message carrying `fds`.
fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    crate::scm::send_with_fds(socket, bytes, fds)
}

/// A connection to the fd holder, for the agent. Every call blocks at most about 2 s per
/// message exchanged (`SO_SNDTIMEO`/`SO_RCVTIMEO`), so a stuck holder cannot hang it.
#[derive(Debug)]
pub struct HolderClient {
    socket: OwnedFd,
}

impl HolderClient {
    /// Connects to the holder at `path`: `Ok(None)` when none listens there (no file, or
    /// `ECONNREFUSED`).
    pub fn connect(path: &Path) -> Result<Option<HolderClient>, HolderError> {
        let addr =
            SocketAddrUnix::new(path).map_err(HolderError::socket("use the path of", path))?;
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(HolderError::socket("create a socket to reach", path))?;
        // Set before connect: a unix connect to a full backlog waits up to SO_SNDTIMEO.
        for which in [sockopt::Timeout::Send, sockopt::Timeout::Recv] {
            sockopt::set_socket_timeout(&socket, which, Some(IO_TIMEOUT))
                .map_err(HolderError::io("set a timeout on the fd holder connection"))?;
        }
        match rustix::net::connect(&socket, &addr) {
            Ok(()) => {}
            Err(Errno::NOENT | Errno::CONNREFUSED) => return Ok(None),
            Err(e) => return Err(HolderError::socket("connect to", path)(e)),
        }
        let client = HolderClient { socket };
        let hello = format!("HELLO {PROTOCOL_VERSION}");
        client.send(hello.as_bytes(), &[], "send HELLO to the fd holder")?;
        let (reply, fds) = client.receive("receive HELLO from the fd holder")?;
        if reply != hello.as_bytes() || !fds.is_empty() {
            return Err(HolderError::Protocol(format!(
                "answered HELLO with {:?}",
                String::from_utf8_lossy(&reply)
            )));
        }
        Ok(Some(client))
    }

    /// Connects to the holder at `path`, or starts `exe fd-holder --socket path` and
    /// connects once it listens; the `bool` says whether it was started now.
    ///
    /// The holder is started as a child of the caller, which reaps it: in a new session
    /// (it calls `setsid` itself), stdin and stderr on `/dev/null`, stdout on a pipe whose
    /// end of file says it listens (or has exited); no other fd is inherited (all are
    /// close-on-exec). Waits at most 5 s for it.
    pub fn connect_or_start(path: &Path, exe: &Path) -> Result<(HolderClient, bool), HolderError> {
        if let Some(client) = HolderClient::connect(path)? {
            return Ok((client, false));
        }
        let (ready, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(HolderError::io("create the fd holder's readiness pipe"))?;
        // The Command, and with it our copy of the write end, is dropped at the end of
        // this statement: the end of file then comes from the child alone. Started by a
        // thread that keeps the whole bounding set, as the agent's other own programs.
        let ready_w = std::sync::Mutex::new(Some(ready_w));
        let child = crate::sys::spawn::with_whole_set(&|| {
            let ready_w = ready_w
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .ok_or_else(|| std::io::Error::other("started once"))?;
            std::process::Command::new(exe)
                .arg("fd-holder")
                .arg("--socket")
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::from(ready_w))
                .stderr(Stdio::null())
                .spawn()
        })
        .map_err(|source| HolderError::Start {
            exe: exe.to_path_buf(),
            source,
        })?;
        // Not waited for here: the caller reaps its children.
        drop(child);
        wait_for_end_of_file(ready.as_fd(), START_TIMEOUT)?;
        match HolderClient::connect(path)? {
            Some(client) => Ok((client, true)),
            None => Err(HolderError::NotListening {
                path: path.to_path_buf(),
            }),
        }
    }

    /// Hands the holder duplicates of `fds`, each under its name (replacing what it held
    /// under that name), in messages of at most 250 fds. The caller keeps its own fds.
    pub fn put(&mut self, fds: &[(&str, BorrowedFd<'_>)]) -> Result<(), HolderError> {
        check_names(fds.iter().map(|(name, _)| *name))?;
        for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
            let mut header = String::from("PUT");
            for (name, _) in chunk {
                header.push('\n');
                header.push_str(name);
            }
            let borrowed: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
            self.send(header.as_bytes(), &borrowed, "send PUT to the fd holder")?;
        }
        Ok(())
    }

    /// Makes the holder close and forget the fds held under `names`.
    pub fn drop_names(&mut self, names: &[&str]) -> Result<(), HolderError> {
        check_names(names.iter().copied())?;
        for chunk in names.chunks(MAX_FDS_PER_MESSAGE) {
            let header = format!("DROP\n{}", chunk.join("\n"));
            self.send(header.as_bytes(), &[], "send DROP to the fd holder")?;
        }
        Ok(())
    }

    /// Duplicates of every fd the holder holds, with their names, sorted by name.
    pub fn dump(&mut self) -> Result<Vec<(String, OwnedFd)>, HolderError> {
        self.send(b"DUMP", &[], "send DUMP to the fd holder")?;
        let mut out = Vec::new();
        loop {
            let (reply, fds) = self.receive("receive the fd holder's DUMP")?;
            let text = String::from_utf8(reply)
                .map_err(|_| HolderError::Protocol("a reply that is not UTF-8".into()))?;
            if let Some(names) = text.strip_prefix("FDS\n") {
                let names: Vec<&str> = names.split('\n').collect();
                if names.len() != fds.len() {
                    return Err(HolderError::Protocol(format!(
                        "FDS with {} names and {} fds",
                        names.len(),
                        fds.len()
                    )));
                }
                out.extend(names.into_iter().map(str::to_string).zip(fds));
            } else if let Some(count) = text.strip_prefix("END ") {
                if count.parse() != Ok(out.len()) || !fds.is_empty() {
                    return Err(HolderError::Protocol(format!(
                        "END {count} after {} fds",
                        out.len()
                    )));
                }
                return Ok(out);
            } else {
                return Err(HolderError::Protocol(format!(
                    "answered DUMP with {:?}",
                    text.chars().take(40).collect::<String>()
                )));
            }
        }
    }

    /// Makes the holder close everything, remove its socket file and exit; returns once
    /// its process has exited (at most 2 s after it closed this connection; its socket
    /// file is gone by then).
    pub fn exit(self) -> Result<(), HolderError> {
        // Its process, pinned first: the caller may need it gone (out of its cgroup).
        let process = rustix::net::sockopt::socket_peercred(&self.socket)
            .ok()
            .and_then(|c| {
                rustix::process::pidfd_open(c.pid, rustix::process::PidfdFlags::empty()).ok()
            });
        self.send(b"EXIT", &[], "send EXIT to the fd holder")?;
        let mut buf = [0u8; 64];
        loop {
            match receive(self.socket.as_fd(), &mut buf, RecvFlags::empty()) {
                Ok(Received::End) => break,
                Ok(Received::Message(..)) | Err(Errno::INTR) => {}
                Err(e) => return Err(HolderError::io("wait for the fd holder to exit")(e)),
            }
        }
        // It closes the connection just before it exits: wait (briefly) until it has.
        if let Some(pidfd) = process {
            let mut fds = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            let limit = rustix::event::Timespec {
                tv_sec: 2,
                tv_nsec: 0,
            };
            let _ = rustix::event::poll(&mut fds, Some(&limit));
        }
        Ok(())
    }

    fn send(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        op: &'static str,
    ) -> Result<(), HolderError> {
        send(self.socket.as_fd(), bytes, fds).map_err(HolderError::io(op))
    }

    fn receive(&self, op: &'static str) -> Result<(Vec<u8>, Vec<OwnedFd>), HolderError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        loop {
            match receive(self.socket.as_fd(), &mut buf, RecvFlags::empty()) {
                Ok(Received::Message(Some(len), fds)) => {
                    buf.truncate(len);
                    return Ok((buf, fds));
                }
                Ok(Received::Message(None, _)) => {
                    return Err(HolderError::Protocol(
                        "a truncated message (fd limit reached?)".into(),
                    ));
                }
                Ok(Received::End) => {
                    return Err(HolderError::Protocol(
                        "the holder closed the connection".into(),
                    ));
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(HolderError::io(op)(e)),
            }
        }
    }
}

/// Fails on the first name the protocol cannot carry.
fn check_names<'a>(mut names: impl Iterator<Item = &'a str>) -> Result<(), HolderError> {
    match names.find(|n| !valid_name(n)) {
        Some(bad) => Err(HolderError::InvalidName {
            name: bad.to_string(),
        }),
        None => Ok(()),
    }
}

/// Reads `fd` until its end of file, or until `timeout` has passed (then returns `Ok`
/// too: the caller's connect says whether the holder listens).
fn wait_for_end_of_file(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), HolderError> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let ts = rustix::time::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut pfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(HolderError::io("wait for the fd holder to listen")(e)),
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) | Err(Errno::INTR | Errno::AGAIN) => {}
            Err(e) => return Err(HolderError::io("wait for the fd holder to listen")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    /// A holder served by a thread of the test, at a socket in its own temporary directory.
    struct TestHolder {
        _dir: tempfile::TempDir,
        path: PathBuf,
        thread: Option<JoinHandle<Result<(), HolderError>>>,
    }

    impl TestHolder {
        fn start() -> TestHolder {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("fdholder.sock");
            let holder = Holder::bind(&path)
                .expect("bind")
                .expect("nothing listens yet");
            let thread = Some(std::thread::spawn(move || holder.run()));
            TestHolder {
                _dir: dir,
                path,
                thread,
            }
        }

        fn client(&self) -> HolderClient {
            HolderClient::connect(&self.path)
                .expect("connect")
                .expect("the holder listens")
        }

        /// Sends EXIT and waits for the serving thread to end.
        fn exit(mut self) {
            self.client().exit().expect("exit");
            // The client's end of file comes after the socket file is removed.
            assert!(!self.path.exists(), "the socket outlived EXIT's answer");
            let thread = self.thread.take().expect("running");
            thread.join().expect("no panic").expect("run ends with Ok");
        }
    }

    impl Drop for TestHolder {
        fn drop(&mut self) {
            if let Some(thread) = self.thread.take() {
                if let Ok(Some(client)) = HolderClient::connect(&self.path) {
                    let _ = client.exit();
                }
                let _ = thread.join();
            }
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
    }

    fn names(dump: &[(String, OwnedFd)]) -> Vec<&str> {
        dump.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// A raw, unchecked connection, for sending what the client never sends.
    fn raw(path: &Path) -> OwnedFd {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(IO_TIMEOUT))
            .expect("timeout");
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).expect("addr")).expect("connect");
        fd
    }

    /// Whether the holder closed `fd` (end of file), skipping replies before it.
    fn closed_by_holder(fd: &OwnedFd) -> bool {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        loop {
            match receive(fd.as_fd(), &mut buf, RecvFlags::empty()) {
                Ok(Received::End) => return true,
                Ok(Received::Message(..)) => {}
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn parses_requests_and_refuses_malformed_ones() {
        assert_eq!(parse_request(b"HELLO 1"), Ok(Request::Hello(1)));
        assert_eq!(parse_request(b"HELLO 7"), Ok(Request::Hello(7)));
        assert_eq!(
            parse_request(b"PUT\na\nb"),
            Ok(Request::Put(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_request(b"DROP\na"),
            Ok(Request::Drop(vec!["a".into()]))
        );
        assert_eq!(parse_request(b"DUMP"), Ok(Request::Dump));
        assert_eq!(parse_request(b"EXIT"), Ok(Request::Exit));
        for bad in [
            &b"HELLO x"[..],
            b"PUT",
            b"PUT\n",
            b"PUT\na\n",
            b"PUT\na\0b",
            b"DUMP\na",
            b"EXIT\n",
            b"FOO",
            b"",
            b"\xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("PUT\n{}", "x".repeat(MAX_NAME_BYTES + 1));
        assert!(parse_request(long.as_bytes()).is_err());
        let longest = format!("PUT\n{}", "x".repeat(MAX_NAME_BYTES));
        assert!(parse_request(longest.as_bytes()).is_ok());
        let many = format!("DROP\n{}", vec!["n"; MAX_FDS_PER_MESSAGE + 1].join("\n"));
        assert!(parse_request(many.as_bytes()).is_err());
    }

    #[test]
    fn a_held_pipe_keeps_its_writer_alive_and_comes_back_in_a_dump() {
        let holder = TestHolder::start();
        let (r, w) = pipe();
        let mut client = holder.client();
        client.put(&[("w-1.out", r.as_fd())]).expect("put");
        drop(r);
        drop(client);
        // Our read end is closed; the holder's duplicate (in flight or received) remains.
        assert_eq!(rustix::io::write(&w, b"hello"), Ok(5));
        let dump = holder.client().dump().expect("dump");
        assert_eq!(names(&dump), ["w-1.out"]);
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&dump[0].1, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"hello");
        // Received fds are close-on-exec.
        let flags = rustix::io::fcntl_getfd(&dump[0].1).expect("getfd");
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        holder.exit();
    }

    #[test]
    fn dropped_names_are_closed() {
        // The test harness leaves SIGPIPE ignored (Rust's runtime): a write to a pipe
        // without readers returns EPIPE. Checked first, so that the test cannot pass by
        // dying of SIGPIPE-less luck.
        let (probe_r, probe_w) = pipe();
        drop(probe_r);
        assert_eq!(rustix::io::write(&probe_w, b"x"), Err(Errno::PIPE));

        let holder = TestHolder::start();
        let (r, w) = pipe();
        let (r2, _w2) = pipe();
        let mut client = holder.client();
        client
            .put(&[("a", r.as_fd()), ("b", r2.as_fd())])
            .expect("put");
        drop(r);
        client.drop_names(&["a"]).expect("drop");
        // A DUMP on the same connection is answered after the DROP was handled.
        assert_eq!(names(&client.dump().expect("dump")), ["b"]);
        assert_eq!(rustix::io::write(&w, b"x"), Err(Errno::PIPE));
        assert!(client.drop_names(&["bad\nname"]).is_err());
        holder.exit();
    }

    #[test]
    fn put_replaces_and_closes_the_fd_of_the_same_name() {
        let holder = TestHolder::start();
        let (r1, w1) = pipe();
        let (r2, _w2) = pipe();
        let mut client = holder.client();
        client.put(&[("out", r1.as_fd())]).expect("put");
        drop(r1);
        client.put(&[("out", r2.as_fd())]).expect("put");
        let dump = client.dump().expect("dump");
        assert_eq!(names(&dump), ["out"]);
        drop(dump);
        assert_eq!(rustix::io::write(&w1, b"x"), Err(Errno::PIPE));
        holder.exit();
    }

    #[test]
    fn a_pipe_whose_writers_are_gone_is_dropped() {
        let holder = TestHolder::start();
        let (r, w) = pipe();
        let (keep_r, _keep_w) = pipe();
        let mut client = holder.client();
        client
            .put(&[("gone", r.as_fd()), ("kept", keep_r.as_fd())])
            .expect("put");
        drop(r);
        assert_eq!(names(&client.dump().expect("dump")), ["gone", "kept"]);
        drop(w);
        // The HUP is an event of the holder's loop, independent of our connection: each
        // DUMP is a round trip through that loop, bounded by the deadline.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let dump = client.dump().expect("dump");
            if names(&dump) == ["kept"] {
                break;
            }
            assert!(Instant::now() < deadline, "still held: {:?}", names(&dump));
        }
        holder.exit();
    }

    #[test]
    fn malformed_messages_close_their_connection_only() {
        let holder = TestHolder::start();
        let (r, _w) = pipe();
        let cases: [(&[u8], usize); 7] = [
            (b"DUMP", 0),      // before HELLO
            (b"HELLO 2", 0),   // unknown version
            (b"BOGUS", 0),     // after HELLO below
            (b"PUT\na\nb", 1), // two names, one fd
            (b"PUT\n", 1),     // an empty name
            (b"DROP\na", 1),   // fds on DROP
            (b"HELLO 1", 0),   // a second HELLO
        ];
        for (i, (message, nfds)) in cases.iter().enumerate() {
            let conn = raw(&holder.path);
            if i >= 2 {
                send(conn.as_fd(), b"HELLO 1", &[]).expect("send");
            }
            let fds = vec![r.as_fd(); *nfds];
            send(conn.as_fd(), message, &fds).expect("send");
            assert!(
                closed_by_holder(&conn),
                "{:?} did not close the connection",
                String::from_utf8_lossy(message)
            );
        }
        // The holder goes on, and kept nothing of what came with the bad messages.
        assert!(holder.client().dump().expect("dump").is_empty());
        holder.exit();
    }

    #[test]
    fn more_than_250_fds_travel_in_batches() {
        let holder = TestHolder::start();
        let (r, _w) = pipe();
        // One pipe under many names: the holder shares the test's fd table, so 260 fds
        // held and 260 dumped stay well under the default limit of 1024.
        let names_owned: Vec<String> = (0..260).map(|i| format!("w-{i:03}.err")).collect();
        let fds: Vec<(&str, BorrowedFd<'_>)> = names_owned
            .iter()
            .map(|n| (n.as_str(), r.as_fd()))
            .collect();
        let mut client = holder.client();
        client.put(&fds).expect("put");
        let dump = client.dump().expect("dump");
        assert_eq!(names(&dump), names_owned);
        let ino = rustix::fs::fstat(&r).expect("fstat").st_ino;
        assert!(
            dump.iter()
                .all(|(_, fd)| rustix::fs::fstat(fd).expect("fstat").st_ino == ino)
        );
        drop(dump);
        let all: Vec<&str> = names_owned.iter().map(String::as_str).collect();
        client.drop_names(&all).expect("drop");
        assert!(client.dump().expect("dump").is_empty());
        holder.exit();
    }

    #[test]
    fn exit_removes_the_socket_and_ends_the_loop() {
        let holder = TestHolder::start();
        let path = holder.path.clone();
        let mode = rustix::fs::stat(&path).expect("stat").st_mode & 0o777;
        assert_eq!(mode, 0o600);
        holder.exit();
        assert!(!path.exists());
        assert!(HolderClient::connect(&path).expect("connect").is_none());
    }

    #[test]
    fn one_holder_per_path_and_stale_sockets_are_replaced() {
        let holder = TestHolder::start();
        assert!(Holder::bind(&holder.path).expect("bind").is_none());
        holder.exit();

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stale.sock");
        // A socket file nothing listens on, as a killed holder leaves it.
        drop(std::os::unix::net::UnixDatagram::bind(&path).expect("bind"));
        assert!(path.exists());
        assert!(HolderClient::connect(&path).expect("connect").is_none());
        let holder = Holder::bind(&path)
            .expect("bind")
            .expect("stale socket replaced");
        drop(holder);

        // Whatever else is at the path stays, and is reported.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"data").expect("write");
        assert!(matches!(
            Holder::bind(&file),
            Err(HolderError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&file).expect("read"), b"data");
    }
}

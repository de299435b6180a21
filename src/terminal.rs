//! `hatchery exec SITE [--] CMD...`, the client side: ask the agent to start `CMD` in the
//! site's sandbox, receive its terminal (or pipes) over the control socket, relay bytes
//! until it exits, and return its exit status.
//!
//! With a terminal on stdin, the agent creates a new pseudo-terminal for the command
//! (never the caller's own terminal, which a sandboxed process could otherwise inject
//! input into with `TIOCSTI`) and passes its master side with `SCM_RIGHTS`. The caller's
//! terminal is put in raw mode, so keys such as Ctrl-C reach the command's terminal and
//! its line discipline signals the command; `SIGWINCH` copies the window size to the
//! master (`TIOCSWINSZ`). Without a terminal, the agent passes a socket (the command's
//! stdin and stdout) and a pipe (its stderr). In both modes `SIGINT` (without a
//! terminal), `SIGTERM`, `SIGHUP` and `SIGQUIT` received by this process are forwarded to
//! the command with `pidfd_send_signal` (the caller is root or the site's user, so it
//! may signal it). The exit code is the command's, or 128 + the signal that ended it.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::event::{PollFd, PollFlags};
use rustix::termios;

use crate::control::{ErrorKind, Reply, Request};
use crate::sys::signals::{self, SigSet};

/// Why `exec` could not run the command; the CLI maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {path}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent refused or failed the request.
    #[error("{message}")]
    Refused {
        /// The agent's kind of error.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// The connection or the relay failed.
    #[error("exec failed")]
    Io(#[from] io::Error),
}

/// The request for `command` in `site` (`tty`: with a terminal of this size).
pub fn request(site: &str, command: Vec<String>) -> Request {
    let stdin = io::stdin();
    let tty = termios::isatty(&stdin);
    let (rows, cols) = if tty {
        termios::tcgetwinsize(&stdin)
            .map(|w| (w.ws_row, w.ws_col))
            .unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    Request::Exec {
        site: site.to_string(),
        command,
        tty,
        rows,
        cols,
        term: std::env::var("TERM").ok().filter(|_| tty),
    }
}

/// Runs `req` (an `Exec` request) through the agent at `socket`; returns the command's
/// exit code.
pub fn run(socket: &Path, req: &Request) -> Result<u8, ExecError> {
    let tty = matches!(req, Request::Exec { tty: true, .. });
    // Held from before the request: one that comes while the command starts (it may run
    // before its answer reaches us) is forwarded to it once it runs, not the end of this
    // process with the command left to be hung up.
    let mut set = vec![libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
    if tty {
        set.push(libc::SIGWINCH);
    } else {
        set.push(libc::SIGINT);
    }
    let sigset = SigSet::of(&set);
    signals::block(&sigset)?;
    let mut stream = UnixStream::connect(socket).map_err(|e| ExecError::Unreachable {
        path: socket.display().to_string(),
        source: e,
    })?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    // The first line: an error, or the start event with the fds attached.
    let mut inbuf = Vec::new();
    let mut fds = Vec::new();
    let first = loop {
        if let Some(pos) = inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = inbuf.drain(..=pos).collect();
            break serde_json::from_slice::<Reply>(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let mut buf = [0u8; 4096];
        let n = recv_with_fds(stream.as_fd(), &mut buf, &mut fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without an answer",
            )
            .into());
        }
        inbuf.extend_from_slice(&buf[..n]);
    };
    let pid = match first {
        Reply::Error(e) => {
            return Err(ExecError::Refused {
                kind: e.kind,
                message: e.message,
            });
        }
        Reply::Event(e) => e
            .strip_prefix("started pid ")
            .and_then(|p| p.parse::<i32>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected answer"))?,
        _ => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected answer").into());
        }
    };
    // The command is the agent's child, running as the site's user: root or that user
    // may signal it. Open its pidfd now, while it cannot have been reaped (the agent
    // reaps it only after telling us it exited).
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let expected = if tty { 1 } else { 2 };
    if fds.len() != expected {
        return Err(
            io::Error::new(io::ErrorKind::InvalidData, "no terminal or pipes received").into(),
        );
    }
    let sigfd = signals::signalfd(&sigset)?;
    let saved = if tty {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(&stdin).map_err(io::Error::from)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, termios::OptionalActions::Flush, &raw)
            .map_err(io::Error::from)?;
        Some(saved)
    } else {
        None
    };
    let relay = Relay {
        stream: stream.as_fd(),
        inbuf,
        sigfd: sigfd.as_fd(),
        pidfd: pidfd.as_ref().map(|f| f.as_fd()),
        tty,
    };
    let result = relay.run(&fds);
    if let Some(saved) = saved {
        let _ = termios::tcsetattr(io::stdin(), termios::OptionalActions::Flush, &saved);
    }
    result
}

fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut anc, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Ok(msg.bytes)
}

struct Relay<'a> {
    stream: BorrowedFd<'a>,
    inbuf: Vec<u8>,
    sigfd: BorrowedFd<'a>,
    pidfd: Option<BorrowedFd<'a>>,
    tty: bool,
}

impl Relay<'_> {
    fn run(mut self, fds: &[OwnedFd]) -> Result<u8, ExecError> {
        let stdin = io::stdin();
        let mut stdin_open = true;
        // Outputs: (fd, where it goes: 1 stdout, 2 stderr).
        let mut outputs: Vec<(BorrowedFd<'_>, i32)> = if self.tty {
            vec![(fds[0].as_fd(), 1)]
        } else {
            vec![(fds[0].as_fd(), 1), (fds[1].as_fd(), 2)]
        };
        let input = fds[0].as_fd();
        let mut exit: Option<u8> = None;
        loop {
            if exit.is_none() {
                exit = self.final_reply()?;
            }
            if exit.is_some() && outputs.is_empty() {
                break;
            }
            let mut polls = vec![
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(&self.sigfd, PollFlags::IN),
            ];
            let stdin_fd = stdin.as_fd();
            let watch_stdin = stdin_open && exit.is_none();
            if watch_stdin {
                polls.push(PollFd::new(&stdin_fd, PollFlags::IN));
            }
            let first_out = polls.len();
            for (fd, _) in &outputs {
                polls.push(PollFd::new(fd, PollFlags::IN));
            }
            // Once the command has exited, drain what its outputs still hold, briefly.
            let timeout = exit.map(|_| rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            });
            match rustix::event::poll(&mut polls, timeout.as_ref()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
            let ready = |p: &PollFd<'_>| !p.revents().is_empty();
            let stream_ready = ready(&polls[0]);
            let sig_ready = ready(&polls[1]);
            let stdin_ready = watch_stdin && ready(&polls[2]);
            let outs_ready: Vec<bool> = polls[first_out..].iter().map(ready).collect();
            drop(polls);
            if sig_ready {
                self.on_signal(input)?;
            }
            if stdin_ready {
                let mut buf = [0u8; 4096];
                match rustix::io::read(&stdin, &mut buf) {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        if !self.tty {
                            let _ = rustix::net::shutdown(input, rustix::net::Shutdown::Write);
                        }
                    }
                    Ok(n) => write_all(input, &buf[..n])?,
                }
            }
            let mut closed = Vec::new();
            for (i, r) in outs_ready.iter().enumerate() {
                if !r {
                    continue;
                }
                let (fd, to) = outputs[i];
                let mut buf = [0u8; 8192];
                match rustix::io::read(fd, &mut buf) {
                    // EIO: the terminal's last slave fd closed.
                    Ok(0) | Err(_) => closed.push(i),
                    Ok(n) => {
                        if to == 1 {
                            write_all(io::stdout().as_fd(), &buf[..n])?;
                        } else {
                            write_all(io::stderr().as_fd(), &buf[..n])?;
                        }
                    }
                }
            }
            for i in closed.into_iter().rev() {
                outputs.remove(i);
            }
            if stream_ready && exit.is_none() {
                let mut buf = [0u8; 4096];
                let n = match rustix::io::read(self.stream, &mut buf) {
                    Ok(n) => n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(io::Error::from(e).into()),
                };
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection before the command exited",
                    )
                    .into());
                }
                self.inbuf.extend_from_slice(&buf[..n]);
            }
        }
        Ok(exit.unwrap_or(1))
    }

    /// The exit code, once the agent's final line has arrived.
    fn final_reply(&mut self) -> Result<Option<u8>, ExecError> {
        let Some(pos) = self.inbuf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line: Vec<u8> = self.inbuf.drain(..=pos).collect();
        match serde_json::from_slice::<Reply>(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            Reply::Ok(v) => Ok(Some(
                v["exit_code"]
                    .as_u64()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
            )),
            Reply::Error(e) => Err(ExecError::Refused {
                kind: e.kind,
                message: e.message,
            }),
            _ => Ok(None),
        }
    }

    fn on_signal(&mut self, terminal: BorrowedFd<'_>) -> io::Result<()> {
        while let Some(sig) = signals::read_signal(self.sigfd)? {
            if sig == libc::SIGWINCH {
                if let Ok(ws) = termios::tcgetwinsize(io::stdin()) {
                    let _ = termios::tcsetwinsize(terminal, ws);
                }
            } else if let (Some(pidfd), Some(s)) =
                (self.pidfd, rustix::process::Signal::from_named_raw(sig))
            {
                let _ = rustix::process::pidfd_send_signal(pidfd, s);
            }
        }
        Ok(())
    }
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                let mut p = [PollFd::new(&fd, PollFlags::OUT)];
                let _ = rustix::event::poll(&mut p, None);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

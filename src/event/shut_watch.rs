//! Listeners shut down under a site: `shutdown(2)` on a listening socket, by any process
//! holding it (a worker that shuts down a socket it inherited), closes it for all of them,
//! and the generation accepts nothing more. The agent's copies of every generation's
//! listeners are in an epoll set of their own that asks only for a hang-up (`EPOLLRDHUP`,
//! `EPOLLHUP` and `EPOLLERR` come with it): a TCP listener shut down hangs up, a unix one
//! says `EPOLLRDHUP`. Connections arriving wake nothing (not asked for), and the set holds
//! no socket open (an entry goes when its socket is closed by every holder, workers
//! included: the agent forgets a generation's listeners before it closes its copies). The
//! loop waits on the set's fd; what it finds is told to the site's machine
//! (`Input::ListenerShut`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;

use crate::config::SiteName;
use crate::supervisor::ids::GenId;

/// A listener watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watched {
    pub site: SiteName,
    pub generation: GenId,
    /// As the log names it (`http (tcp 127.0.0.1:8000)`).
    pub listener: String,
    /// Its socket's cookie (`SO_COOKIE`): the socket, whatever fd numbers it has.
    pub cookie: u64,
}

/// The epoll set, and what each of its entries is.
pub(super) struct ShutWatch {
    epoll: OwnedFd,
    watched: HashMap<u64, Watched>,
    next: u64,
    events: Vec<epoll::Event>,
}

impl std::fmt::Debug for ShutWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutWatch")
            .field("watched", &self.watched)
            .finish()
    }
}

impl ShutWatch {
    pub(super) fn new() -> io::Result<ShutWatch> {
        Ok(ShutWatch {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            watched: HashMap::new(),
            next: 0,
            events: Vec::with_capacity(16),
        })
    }

    /// The set's fd: readable once a listener watched is shut down.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Watches `fd`, a listener of `site`'s `generation`, until it is shut down (told once)
    /// or forgotten.
    pub(super) fn watch(&mut self, fd: BorrowedFd<'_>, what: Watched) -> io::Result<()> {
        let id = self.next;
        self.next += 1;
        let flags = epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(id), flags)?;
        self.watched.insert(id, what);
        Ok(())
    }

    /// Stops watching `fds` (a generation's listeners, before the agent closes its
    /// copies). One never watched, or already told, is left alone.
    pub(super) fn forget<'a>(&mut self, fds: impl IntoIterator<Item = BorrowedFd<'a>>) {
        for fd in fds {
            // A fired entry stays in the set, disabled, until deleted; `ENOENT` for one
            // never added.
            let _ = epoll::delete(&self.epoll, fd);
            if let Ok(cookie) = rustix::net::sockopt::socket_cookie(fd) {
                self.watched.retain(|_, w| w.cookie != cookie);
            }
        }
    }

    /// The listeners found shut down since the last look (each told once: its entry
    /// fired and is gone).
    pub(super) fn shut(&mut self) -> Vec<Watched> {
        self.events.clear();
        let now = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match epoll::wait(
            self.epoll.as_fd(),
            rustix::buffer::spare_capacity(&mut self.events),
            Some(&now),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return Vec::new(),
        }
        let mut out = Vec::new();
        for e in &self.events {
            if let Some(w) = self.watched.remove(&e.data.u64()) {
                out.push(w);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ListenAddr, ListenMode, ListenSpec};
    use crate::net::Listener;

    fn bind(addr: ListenAddr) -> Listener {
        let spec = ListenSpec {
            name: "http".into(),
            addr,
            backlog: 16,
            mode: ListenMode::Agent,
        };
        Listener::bind(&spec, 0, 0).expect("bind")
    }

    fn watched(l: &Listener, g: u32) -> Watched {
        Watched {
            site: SiteName::new("web").expect("name"),
            generation: GenId(g),
            listener: l.spec.addr.to_string(),
            cookie: rustix::net::sockopt::socket_cookie(&l.fd).expect("cookie"),
        }
    }

    #[test]
    fn a_shutdown_is_told_once_and_a_connection_or_a_forgotten_listener_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tcp = bind(ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
        let unix = bind(ListenAddr::Unix(dir.path().join("web.sock")));
        let gone = bind(ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
        let mut w = ShutWatch::new().expect("epoll");
        for (l, g) in [(&tcp, 1), (&unix, 1), (&gone, 2)] {
            w.watch(l.fd.as_fd(), watched(l, g)).expect("watch");
        }
        // Connections waiting to be accepted are not a shutdown.
        let local = rustix::net::getsockname(&tcp.fd).expect("name");
        let addr = std::net::SocketAddr::try_from(local).expect("inet");
        let _c = std::net::TcpStream::connect(addr).expect("connect");
        let _u =
            std::os::unix::net::UnixStream::connect(dir.path().join("web.sock")).expect("connect");
        assert_eq!(w.shut(), vec![]);
        // Shut down through other fds, as workers do with theirs.
        w.forget([gone.fd.as_fd()]);
        for l in [&tcp, &unix, &gone] {
            let copy = l.fd.try_clone().expect("dup");
            rustix::net::shutdown(&copy, rustix::net::Shutdown::Both).expect("shutdown");
        }
        let mut told = w.shut();
        told.sort_by_key(|x| x.cookie);
        let mut expected = vec![watched(&tcp, 1), watched(&unix, 1)];
        expected.sort_by_key(|x| x.cookie);
        assert_eq!(told, expected, "each once; the forgotten one not");
        assert_eq!(w.shut(), vec![], "told once");
    }
}

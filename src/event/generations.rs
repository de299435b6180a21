//! The kernel's side of generations: their listeners (bound beside the serving
//! generation's, or shared), the eBPF steering that decides which generation new
//! connections reach, the `tcp` ready probe that reaches a new generation alone, and the
//! files that outlive the agent (the previous release of each site).
//!
//! What to do and when is the site machine's (`supervisor::machine`); these functions
//! carry out its [`Action`](crate::supervisor::machine::Action)s on a site's [`SiteIo`].

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use tracing::{debug, error, warn};

use super::sites::{GenIo, SiteIo};
use crate::config::{self, HttpCheck, ListenAddr, SiteName};
use crate::net::Listener;
use crate::steering::{Steering as Program, SteeringSupport};
use crate::supervisor::deploy::Share;
use crate::supervisor::ids::GenId;
use crate::supervisor::machine::{ProbeAnswer, Steering};

/// `CLOCK_MONOTONIC` in nanoseconds (the clock Rust's `Instant` reads on Linux).
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Attaches eBPF steering to each TCP listener's reuseport group where the kernel allows
/// it, steering it to that listener; `None` entries use the shared-listener fallback.
pub(super) fn attach_steering(
    support: &SteeringSupport,
    site: &SiteName,
    listeners: &[Listener],
) -> Vec<Option<Program>> {
    listeners
        .iter()
        .map(|l| {
            if matches!(support, SteeringSupport::Unavailable(_))
                || !matches!(l.spec.addr, ListenAddr::Tcp(_))
            {
                return None;
            }
            let attached = Program::attach(l.fd.as_fd()).and_then(|mut s| {
                s.steer_to(l.fd.as_fd())?;
                Ok(s)
            });
            match attached {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(site = %site, "no eBPF steering for {} (generations share its listener): {e}", l.spec.addr);
                    None
                }
            }
        })
        .collect()
}

/// The steering an earlier agent attached to `listeners` (taken back from its workers),
/// recovered by the recorded ids of its maps; listeners recorded without steering get it
/// attached afresh where the kernel allows. Where recovery fails the generations share
/// that listener (said in the log).
pub(super) fn recover_steering(
    support: &SteeringSupport,
    site: &SiteName,
    listeners: &[Listener],
    ids: &[Option<[u32; 2]>],
) -> Vec<Option<Program>> {
    listeners
        .iter()
        .enumerate()
        .map(|(i, l)| match ids.get(i).copied().flatten() {
            Some(ids) => {
                let migrate = matches!(support, SteeringSupport::Migrate);
                match Program::recover(ids, l.fd.as_fd(), migrate) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        warn!(site = %site, "no eBPF steering for {} (generations share its listener): {e}: {}", l.spec.addr, super::error_chain(&e));
                        None
                    }
                }
            }
            None => attach_steering(support, site, std::slice::from_ref(l))
                .pop()
                .flatten(),
        })
        .collect()
}

/// How connections reach the serving generation, for `status`.
pub(super) fn steering_mode(io: &SiteIo) -> &'static str {
    if io.steering.iter().any(Option::is_some) {
        "ebpf"
    } else {
        "shared listener"
    }
}

/// Whether the site's first TCP listener is steered, so that a `tcp` ready check can
/// reach a new generation alone; why not, if not.
pub(super) fn probe_alone(
    io: &SiteIo,
    serving: GenId,
    support: &SteeringSupport,
) -> Result<(), String> {
    let steered = io.gens.get(&serving).is_some_and(|g| {
        g.listeners
            .iter()
            .position(|l| matches!(l.spec.addr, ListenAddr::Tcp(_)))
            .is_some_and(|i| io.steering.get(i).is_some_and(Option::is_some))
    });
    if steered {
        return Ok(());
    }
    let has_tcp = io.gens.get(&serving).is_some_and(|g| {
        g.listeners
            .iter()
            .any(|l| matches!(l.spec.addr, ListenAddr::Tcp(_)))
    });
    if !has_tcp {
        return Err("the site has no TCP listener".into());
    }
    Err(match support {
        SteeringSupport::Unavailable(why) => format!("unavailable: {why}"),
        _ => "it could not be attached to that listener, see the agent's log".into(),
    })
}

/// Binds (or shares) the listeners of a new generation beside `serving`'s: a new
/// `SO_REUSEPORT` socket per steered TCP address, the serving generation's socket (a
/// duplicate of its fd) for the rest. `share_all` (stop-then-start deploys): every
/// socket is shared, so connections queued while no generation runs are served by the
/// new one. A socket shut down (by a worker: it accepts nothing more) is never shared: a
/// new one is bound for its address, as for a new site (refused if another process
/// listens there now); it is in no `SO_REUSEPORT` group with the old one, which left its
/// group when shut down, so its steering is to be attached anew: their indexes are
/// returned too.
pub(super) fn bind_beside(
    io: &SiteIo,
    serving: GenId,
    uid: u32,
    gid: u32,
    share_all: bool,
) -> Result<(Vec<Listener>, Vec<usize>), String> {
    let Some(cur) = io.gens.get(&serving) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut out = Vec::new();
    let mut anew = Vec::new();
    for (i, l) in cur.listeners.iter().enumerate() {
        let steered = !share_all
            && matches!(l.spec.addr, ListenAddr::Tcp(_))
            && io.steering.get(i).is_some_and(Option::is_some);
        let fresh = if l.shut_down() {
            anew.push(i);
            Listener::bind(&l.spec, uid, gid)
                .map_err(|e| format!("{e}: {}", super::error_chain(&e)))?
        } else if steered {
            Listener::bind_beside(&l.spec, uid, gid)
                .map_err(|e| format!("{e}: {}", super::error_chain(&e)))?
        } else {
            Listener {
                spec: l.spec.clone(),
                fd: l
                    .fd
                    .try_clone()
                    .map_err(|e| format!("failed to share {}: {e}", l.spec.addr))?,
            }
        };
        out.push(fresh);
    }
    Ok((out, anew))
}

/// Whether two listeners are one socket (shared between generations).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    let (Ok(x), Ok(y)) = (
        rustix::fs::fstat(a.fd.as_fd()),
        rustix::fs::fstat(b.fd.as_fd()),
    ) else {
        return false;
    };
    x.st_ino == y.st_ino && x.st_dev == y.st_dev
}

/// Whether the accept queues of `old`'s own listeners are empty. Only listeners of their
/// own (steered away from) can drain; shared ones are served by the new generation as
/// soon as the old one stops accepting.
pub(super) fn queues_empty(io: &SiteIo, old: GenId, new: GenId) -> bool {
    match (io.gens.get(&old), io.gens.get(&new)) {
        (Some(old), Some(new)) => old
            .listeners
            .iter()
            .zip(&new.listeners)
            .all(|(o, n)| same_socket(o, n) || o.queued().is_none_or(|q| q == 0)),
        _ => true,
    }
}

/// Points every steered address of the site at generation `to`'s listeners; returns how
/// (or why not), and `CLOCK_MONOTONIC` just before and after (a connection the kernel
/// placed before the first went to the old generation, one placed after the second to the
/// new one). A flip to a new generation (`all_or_nothing`) leaves no address half-flipped:
/// a new listener already shut down (by a worker of the new generation) is refused before
/// any address flips; where one cannot be steered while flipping, those flipped already go
/// back to the listeners they served. The error says which address and why (the site
/// machine rolls the deploy back and logs it).
/// A steer back to a generation that serves again moves every address it can, and logs
/// those it cannot.
pub(super) fn steer(
    io: &mut SiteIo,
    site: &SiteName,
    to: GenId,
    all_or_nothing: bool,
) -> (Result<Steering, String>, [u64; 2]) {
    let before = monotonic_ns();
    // The addresses flipped, with the slot each served before.
    let mut flipped = Vec::new();
    let mut failed = Vec::new();
    if let Some(g) = io.gens.get(&to) {
        // A listener already shut down is refused before any address flips: no window in
        // which one flipped sends connections to a generation that is rolled back.
        if all_or_nothing {
            for (i, _) in io.steering.iter().enumerate().filter(|(_, s)| s.is_some()) {
                if let Some(l) = g.listeners.get(i).filter(|l| l.shut_down()) {
                    failed.push(format!(
                        "{}: its listener was shut down (it accepts no connection)",
                        l.spec.addr
                    ));
                }
            }
        }
        for (i, steering) in io.steering.iter_mut().enumerate() {
            if !failed.is_empty() && all_or_nothing {
                break;
            }
            let (Some(st), Some(l)) = (steering.as_mut(), g.listeners.get(i)) else {
                continue;
            };
            let served = st.serving_slot();
            match st.steer_to(l.fd.as_fd()) {
                Ok(()) => flipped.push((i, served, l.spec.addr.to_string())),
                Err(e) => {
                    failed.push(format!("{}: {e}: {}", l.spec.addr, super::error_chain(&e)));
                    if all_or_nothing {
                        break;
                    }
                }
            }
        }
        // A canary ends with the flip (to it, or back from it), or with its failure (the
        // deploy is rolled back).
        for (i, steering) in io.steering.iter_mut().enumerate() {
            let (Some(st), Some(l)) = (steering.as_mut(), g.listeners.get(i)) else {
                continue;
            };
            if let Err(e) = st.clear_canary() {
                error!(site = %site, gen = to.0, "failed to end the canary on {}: {e}", l.spec.addr);
            }
        }
    }
    if !failed.is_empty() && all_or_nothing {
        for (i, served, addr) in &flipped {
            let Some(st) = io.steering.get_mut(*i).and_then(Option::as_mut) else {
                continue;
            };
            if let Err(e) = st.select(*served) {
                error!(site = %site, gen = to.0, "failed to steer {addr} back: {e}: {}", super::error_chain(&e));
            }
        }
    } else {
        for why in &failed {
            error!(site = %site, gen = to.0, "failed to steer {why}");
        }
    }
    let window = [before, monotonic_ns()];
    let result = if !failed.is_empty() {
        Err(failed.join("; "))
    } else if flipped.is_empty() {
        Ok(Steering::Shared)
    } else {
        Ok(Steering::Ebpf)
    };
    (result, window)
}

/// Sends `share` of the new connections of every steered address to generation `g`'s
/// listeners beside the serving ones (a canary), or with `None` ends the canary. Setting
/// fails unless every steered address takes it (none half-set: those set are cleared).
pub(super) fn canary(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    share: Option<Share>,
) -> Result<(), String> {
    let Some(share) = share else {
        for st in io.steering.iter_mut().flatten() {
            if let Err(e) = st.clear_canary() {
                error!(site = %site, gen = g.0, "failed to end the canary: {e}");
            }
        }
        return Ok(());
    };
    let Some(gen_io) = io.gens.get(&g) else {
        return Err(format!("gen-{g} has no listeners"));
    };
    let mut result = Err("no listener of the site is steered".to_string());
    for (i, steering) in io.steering.iter_mut().enumerate() {
        let (Some(st), Some(l)) = (steering.as_mut(), gen_io.listeners.get(i)) else {
            continue;
        };
        if let Err(e) = st.canary(l.fd.as_fd(), share.threshold()) {
            result = Err(format!("{}: {e}: {}", l.spec.addr, super::error_chain(&e)));
            break;
        }
        result = Ok(());
    }
    if result.is_err() {
        for st in io.steering.iter_mut().flatten() {
            let _ = st.clear_canary();
        }
    }
    result
}

/// Ends the steering probe of a generation that goes (its probe socket with it).
pub(super) fn end_probe(io: &mut SiteIo, site: &SiteName, g: GenId) {
    let probing = io
        .gens
        .get_mut(&g)
        .is_some_and(|x| x.probe.take().is_some());
    if !probing {
        return;
    }
    for st in io.steering.iter_mut().flatten() {
        if let Err(e) = st.clear_probe() {
            warn!(site = %site, "failed to clear the steering probe: {e}");
        }
    }
}

/// A ready probe under way: its connection, and for an `http` check the request still to
/// send and the answer read so far.
#[derive(Debug)]
pub(super) struct Probe {
    sock: TcpStream,
    unsent: Vec<u8>,
    answer: Vec<u8>,
}

/// What an `http` probe's answer says so far.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Not all of the status line yet.
    Incomplete,
    /// The status.
    Status(u16),
    /// Not HTTP.
    Garbled,
}

/// The status of an HTTP response whose first bytes are `head`.
fn status_of(head: &[u8]) -> Answer {
    let Some(end) = head.windows(2).position(|w| w == b"\r\n") else {
        return if head.len() > 1024 {
            Answer::Garbled
        } else {
            Answer::Incomplete
        };
    };
    let line = String::from_utf8_lossy(&head[..end]);
    let mut words = line.split(' ');
    match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && code.len() == 3 => code
            .parse()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .map_or(Answer::Garbled, Answer::Status),
        _ => Answer::Garbled,
    }
}

/// What a look at a ready probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probed {
    /// Nothing yet.
    Waiting,
    /// Accepted (`tcp`), or answered as `ready.status` asks (`http`).
    Accepted,
    /// Answered otherwise (`http`): probed again at the next tick.
    Refused(ProbeAnswer),
}

/// The ready check of generation `g` (`tcp`, or `http` with `http`): a probe connection
/// is made to the first port the app binds itself (`own`, `mode = "own"`), directly: only
/// one generation ever runs then (stop-then-start), and for `tcp` a connection the kernel
/// completes is enough (the app listens). Otherwise to the first TCP listener: for `tcp`,
/// once that listener's accept queue no longer holds it (a worker accepted it), it is
/// accepted: every starting worker of `g` counts as ready. For `http`, the probe sends its
/// request and is accepted once the answer's status is one `http` accepts; another status
/// (or no HTTP at all) is refused, logged, and the next tick probes again. A generation
/// that is not serving yet is reached through the steering program's probe entry, from the
/// port the probe socket was bound to; nothing else reaches it before the flip.
pub(super) fn probe(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    serving: GenId,
    http: Option<&HttpCheck>,
    own: Option<SocketAddr>,
) -> Probed {
    if let Some(addr) = own {
        return probe_own(io, site, g, addr, http);
    }
    let Some((index, addr)) = io.gens.get(&g).and_then(|gen_| {
        gen_.listeners
            .iter()
            .enumerate()
            .find_map(|(i, l)| match l.spec.addr {
                ListenAddr::Tcp(a) => Some((i, a)),
                ListenAddr::Unix(_) => None,
            })
    }) else {
        return Probed::Waiting;
    };
    let SiteIo { gens, steering, .. } = io;
    let Some(gen_) = gens.get_mut(&g) else {
        return Probed::Waiting;
    };
    let target = loopback_for(addr);
    let result = match &mut gen_.probe {
        None => {
            let st = if g == serving {
                None
            } else {
                match steering.get_mut(index).and_then(Option::as_mut) {
                    Some(st) => Some(st),
                    None => {
                        // Refused when the deploy is asked for; nothing to probe here.
                        debug!(site = %site, gen = g.0, "ready probe: no steering");
                        return Probed::Waiting;
                    }
                }
            };
            let through = st.map(|st| (st, gen_.listeners[index].fd.as_fd()));
            match Probe::ready(target, through, http) {
                Ok(p) => gen_.probe = Some(p),
                Err(e) => debug!(site = %site, gen = g.0, "ready probe: {e}"),
            }
            Probed::Waiting
        }
        Some(p) => {
            if rustix::net::getpeername(&p.sock).is_err() {
                // Not connected yet, or refused: look again (or start over) next tick.
                if p.sock.take_error().ok().flatten().is_some() {
                    gen_.probe = None;
                }
                Probed::Waiting
            } else if let Some(h) = http {
                match exchange(p) {
                    Answer::Incomplete => Probed::Waiting,
                    Answer::Status(code) if h.accepts(code) => Probed::Accepted,
                    answer => {
                        let (said, answer) = match answer {
                            Answer::Status(code) => {
                                (format!("answered {code}"), ProbeAnswer::Status(code))
                            }
                            _ => ("did not answer with HTTP".into(), ProbeAnswer::NotHttp),
                        };
                        let (lo, hi) = h.status;
                        warn!(site = %site, gen = g.0, "ready probe: GET {} {said} (ready.status: {lo}-{hi}); probing again", h.path);
                        gen_.probe = None;
                        Probed::Refused(answer)
                    }
                }
            } else if gen_.listeners[index].queued() == Some(0) {
                Probed::Accepted
            } else {
                Probed::Waiting
            }
        }
    };
    if result == Probed::Accepted {
        gen_.probe = None;
        if g != serving {
            if let Some(st) = steering.get_mut(index).and_then(Option::as_mut) {
                if let Err(e) = st.clear_probe() {
                    warn!(site = %site, gen = g.0, "failed to clear the steering probe: {e}");
                }
            }
        }
    }
    result
}

/// The ready probe of a port the app binds itself: connected to directly (no steering:
/// the generation probed is the only one that runs). `tcp`: the connection completes
/// once the app listens; `http`: its answer counts as for any other listener.
fn probe_own(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    addr: SocketAddr,
    http: Option<&HttpCheck>,
) -> Probed {
    let Some(gen_) = io.gens.get_mut(&g) else {
        return Probed::Waiting;
    };
    let target = loopback_for(addr);
    let Some(p) = &mut gen_.probe else {
        match Probe::ready(target, None, http) {
            Ok(p) => gen_.probe = Some(p),
            Err(e) => debug!(site = %site, gen = g.0, "ready probe: {e}"),
        }
        return Probed::Waiting;
    };
    if rustix::net::getpeername(&p.sock).is_err() {
        // Not connected yet, or refused (nothing listens yet): start over next tick.
        if p.sock.take_error().ok().flatten().is_some() {
            gen_.probe = None;
        }
        return Probed::Waiting;
    }
    let result = match http {
        None => Probed::Accepted,
        Some(h) => match exchange(p) {
            Answer::Incomplete => Probed::Waiting,
            Answer::Status(code) if h.accepts(code) => Probed::Accepted,
            Answer::Status(code) => {
                let (lo, hi) = h.status;
                warn!(site = %site, gen = g.0, "ready probe: GET {} answered {code} (ready.status: {lo}-{hi}); probing again", h.path);
                Probed::Refused(ProbeAnswer::Status(code))
            }
            Answer::Garbled => {
                warn!(site = %site, gen = g.0, "ready probe: GET {} did not answer with HTTP; probing again", h.path);
                Probed::Refused(ProbeAnswer::NotHttp)
            }
        },
    };
    if result != Probed::Waiting {
        gen_.probe = None;
    }
    result
}

/// The request of an `http` check sent to `target`.
fn request(h: &HttpCheck, target: SocketAddr, agent: &str) -> Vec<u8> {
    let host = h.host.clone().unwrap_or_else(|| target.to_string());
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        h.path
    )
    .into_bytes()
}

/// What a look at an HTTP probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Look {
    /// Not connected, or no status line yet.
    Waiting,
    /// The connection failed (refused, reset).
    Failed(String),
    /// Answered with this status.
    Status(u16),
    /// Answered with something that is not HTTP, or closed first.
    NotHttp,
}

impl Probe {
    /// An HTTP probe of `h` to `target` (the serving generation: steered as any client),
    /// sent as `agent`.
    pub(super) fn http(target: SocketAddr, h: &HttpCheck, agent: &str) -> Result<Probe, String> {
        Ok(Probe {
            sock: start_tcp_probe(loopback_for(target), None)?,
            unsent: request(h, loopback_for(target), agent),
            answer: Vec::new(),
        })
    }

    /// A ready probe of `target` (already a loopback address when the listener's is
    /// unspecified), through the steering probe entry when given, with `http`'s request.
    fn ready(
        target: SocketAddr,
        through: Option<(&mut Program, BorrowedFd<'_>)>,
        http: Option<&HttpCheck>,
    ) -> Result<Probe, String> {
        Ok(Probe {
            sock: start_tcp_probe(target, through)?,
            unsent: http
                .map(|h| request(h, target, "hatchery-ready-check"))
                .unwrap_or_default(),
            answer: Vec::new(),
        })
    }

    /// A connection to a generation's listener through the steering probe entry (the
    /// entry is set to this connection's port), with no request yet.
    pub(super) fn through(
        target: SocketAddr,
        steering: &mut Program,
        listener: BorrowedFd<'_>,
    ) -> Result<Probe, String> {
        Ok(Probe {
            sock: start_tcp_probe(loopback_for(target), Some((steering, listener)))?,
            unsent: Vec::new(),
            answer: Vec::new(),
        })
    }

    /// Sends request `h` (as `agent`) on the connection.
    pub(super) fn ask(&mut self, h: &HttpCheck, agent: &str) {
        let target = self
            .sock
            .peer_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
        self.unsent = request(h, target, agent);
    }

    /// Whether the connection is established.
    pub(super) fn connected(&self) -> bool {
        rustix::net::getpeername(&self.sock).is_ok()
    }

    /// Sends and reads what it can without blocking.
    pub(super) fn look(&mut self) -> Look {
        if rustix::net::getpeername(&self.sock).is_err() {
            return match self.sock.take_error() {
                Ok(Some(e)) => Look::Failed(e.to_string()),
                Err(e) => Look::Failed(e.to_string()),
                Ok(None) => Look::Waiting,
            };
        }
        match exchange(self) {
            Answer::Incomplete => Look::Waiting,
            Answer::Status(code) => Look::Status(code),
            Answer::Garbled => Look::NotHttp,
        }
    }

    /// Its connection's two ends (local, peer), once connected.
    pub(super) fn ends(&self) -> Option<(SocketAddr, SocketAddr)> {
        Some((self.sock.local_addr().ok()?, self.sock.peer_addr().ok()?))
    }
}

/// Sends what is left of the probe's request and reads what has come of the answer,
/// without blocking; says what the answer is so far (a connection closed before a
/// status line is no HTTP).
fn exchange(p: &mut Probe) -> Answer {
    use std::io::{ErrorKind, Read, Write};
    while !p.unsent.is_empty() {
        match p.sock.write(&p.unsent) {
            Ok(n) => {
                p.unsent.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Answer::Incomplete,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Answer::Garbled,
        }
    }
    let mut buf = [0u8; 1024];
    loop {
        match p.sock.read(&mut buf) {
            Ok(0) => {
                return match status_of(&p.answer) {
                    Answer::Incomplete => Answer::Garbled,
                    a => a,
                };
            }
            Ok(n) => {
                p.answer.extend_from_slice(&buf[..n]);
                if status_of(&p.answer) != Answer::Incomplete {
                    return status_of(&p.answer);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return status_of(&p.answer),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Answer::Garbled,
        }
    }
}

/// Connects a non-blocking probe socket to `target`; with `steering`, its connection goes
/// to `listener` (a generation that is not serving yet) through the probe entry.
fn start_tcp_probe(
    target: SocketAddr,
    through: Option<(&mut Program, BorrowedFd<'_>)>,
) -> Result<TcpStream, String> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (family, any): (AddressFamily, SocketAddr) = if target.is_ipv4() {
        (
            AddressFamily::INET,
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        )
    } else {
        (
            AddressFamily::INET6,
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        )
    };
    let sock = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    if let Some((st, listener)) = through {
        // The port is chosen at bind, so the probe entry can name it before the SYN.
        rustix::net::bind(&sock, &any).map_err(|e| format!("bind: {e}"))?;
        let local = rustix::net::getsockname(&sock).map_err(|e| format!("getsockname: {e}"))?;
        let port = SocketAddr::try_from(local)
            .map_err(|e| format!("getsockname: {e}"))?
            .port();
        st.probe_from(port, listener)
            .map_err(|e| format!("{e}: {}", super::error_chain(&e)))?;
    }
    match rustix::net::connect(&sock, &target) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(sock)),
        Err(e) => Err(format!("connect to {target}: {e}")),
    }
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

/// A new generation's kernel side.
pub(super) fn new_generation(listeners: Vec<Listener>) -> GenIo {
    GenIo {
        listeners,
        workers: Default::default(),
        probe: None,
        warmup: None,
        ruleset: None,
    }
}

/// The release directory `dir` a site's owner asked to deploy (its `release` symlink, or
/// a directory it named), resolved with the permissions of the site's user (never the
/// agent's) and, for a named one (`contained`), required to be inside the directory that
/// holds the site's `release` symlink. Every refusal reads the same, so the answer tells
/// nothing about paths the user may not see.
pub(super) fn release_for_owner(
    site: &config::SiteConfig,
    dir: &Path,
    contained: bool,
) -> Result<PathBuf, String> {
    let Some(parent) = site.release.as_deref().and_then(Path::parent) else {
        return Err(format!(
            "site {} has no release symlink: only root may deploy a directory of its choice",
            site.name
        ));
    };
    let refused = || {
        if contained {
            format!(
                "release {}: not a directory inside {} that uid {} can reach",
                dir.display(),
                parent.display(),
                site.uid
            )
        } else {
            format!(
                "release {}: does not resolve to a directory that uid {} can reach",
                dir.display(),
                site.uid
            )
        }
    };
    let allowed = std::fs::canonicalize(parent).map_err(|_| refused())?;
    let resolved = {
        let _as_user = crate::sys::creds::become_fs(site.uid, site.gid, &site.sandbox.groups)
            .map_err(|e| format!("failed to take the identity of uid {}: {e}", site.uid))?;
        std::fs::canonicalize(dir).and_then(|r| {
            std::fs::metadata(&r).and_then(|m| {
                if m.is_dir() {
                    Ok(r)
                } else {
                    Err(std::io::ErrorKind::NotADirectory.into())
                }
            })
        })
    };
    match resolved {
        Ok(r) if !contained || (r.starts_with(&allowed) && r != allowed) => Ok(r),
        _ => Err(refused()),
    }
}

/// Where the previous release of `site` is recorded.
fn previous_release_file(state_dir: &Path, site: &SiteName) -> PathBuf {
    state_dir.join("releases").join(site.as_str())
}

/// The recorded previous release of `site`, if any.
pub(super) fn read_previous_release(state_dir: &Path, site: &SiteName) -> Option<PathBuf> {
    let text = std::fs::read_to_string(previous_release_file(state_dir, site)).ok()?;
    let path = PathBuf::from(text.trim_end_matches('\n'));
    path.is_absolute().then_some(path)
}

/// Records the release the serving generation replaced (for `rollback` after a restart
/// of the agent).
pub(super) fn write_previous_release(state_dir: &Path, site: &SiteName, release: &Path) {
    let file = previous_release_file(state_dir, site);
    let result = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, format!("{}\n", release.display()))?;
            std::fs::rename(&tmp, &file)
        });
    if let Err(e) = result {
        warn!(site = %site, "failed to record the previous release in {}: {e}", file.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_of_an_answer_is_read_as_it_comes() {
        assert_eq!(status_of(b""), Answer::Incomplete);
        assert_eq!(status_of(b"HTTP/1.1 20"), Answer::Incomplete);
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Answer::Status(200));
        assert_eq!(status_of(b"HTTP/1.0 503\r\nx: y\r\n"), Answer::Status(503));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), Answer::Garbled);
        assert_eq!(status_of(b"HTTP/1.1 2000 big\r\n"), Answer::Garbled);
        assert_eq!(status_of(&[b'x'; 2000]), Answer::Garbled);
    }

    #[test]
    fn the_request_names_the_path_and_the_host() {
        let h = HttpCheck {
            path: "/health?full=1".into(),
            host: None,
            status: (200, 299),
        };
        let target: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let text = String::from_utf8(request(&h, target, "hatchery-ready-check")).expect("ascii");
        assert!(
            text.starts_with("GET /health?full=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"),
            "{text}"
        );
        assert!(text.ends_with("Connection: close\r\n\r\n"), "{text}");
        let h = HttpCheck {
            host: Some("example.com".into()),
            ..h
        };
        let text = String::from_utf8(request(&h, target, "hatchery-ready-check")).expect("ascii");
        assert!(text.contains("\r\nHost: example.com\r\n"), "{text}");
        assert!(h.accepts(204) && !h.accepts(301) && !h.accepts(500));
    }
}

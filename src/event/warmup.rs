//! The kernel's side of warm-ups (`deploy.warmup`): every worker of a new generation
//! answers each warm-up request before any client reaches it.
//!
//! The workers share their listener, so a request cannot be addressed to one of them; it
//! reaches whichever accepts it. Connections are made one at a time through the steering
//! program's probe entry (each from its own port, so nothing else reaches the new
//! generation) and held without a request; each is pinned, once accepted, on the worker
//! that holds its server end (one `sock_diag` lookup, then the workers' sockets), and
//! asked that worker's next request; one that landed on a worker asked every request
//! already is closed unused. A synchronous worker holding a connection accepts no other,
//! so the next lands on another worker; a worker that accepts many (threads, an event
//! loop) is asked several requests at once, and the others are reached as they win
//! accepts. It is over when every worker has answered every request, or when the machine
//! gives it up (`ready.timeout`).

use std::collections::{BTreeMap, BTreeSet};

use tracing::debug;

use super::generations::{Look, Probe};
use super::sites::SiteIo;
use crate::config::{HttpCheck, ListenAddr, SiteName};
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::WarmupReport;

/// Most connections a warm-up may make, per worker and request.
const CONNECTIONS_PER_REQUEST: usize = 8;

/// A warm-up under way.
#[derive(Debug, Default)]
pub(super) struct Run {
    /// Its connections: the worker each landed on, once known, and whether it was asked.
    conns: Vec<Conn>,
    /// By worker: requests asked so far (the next one to ask), and answers.
    progress: BTreeMap<Slot, (usize, usize)>,
    /// Connections made.
    made: usize,
    /// Answers in all.
    answers: u32,
}

#[derive(Debug)]
struct Conn {
    probe: Probe,
    worker: Option<Slot>,
    asked: bool,
}

/// Starts, moves on, or (`give_up`) ends the warm-up of generation `g`: `Some` once it is
/// over.
pub(super) fn step(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    requests: &[HttpCheck],
    give_up: bool,
) -> Option<WarmupReport> {
    let workers: BTreeSet<Slot> = io
        .gens
        .get(&g)
        .map(|x| x.workers.keys().copied().collect())
        .unwrap_or_default();
    let Some(index) = io.gens.get(&g).and_then(|x| {
        x.listeners
            .iter()
            .position(|l| matches!(l.spec.addr, ListenAddr::Tcp(_)))
    }) else {
        return Some(report(&Run::default(), &workers, requests.len()));
    };
    let mut run = io
        .gens
        .get_mut(&g)
        .and_then(|x| x.warmup.take())
        .unwrap_or_default();
    let done = give_up || advance(io, site, g, index, requests, &workers, &mut run);
    if done {
        if let Some(st) = io.steering.get_mut(index).and_then(Option::as_mut) {
            if let Err(e) = st.clear_probe() {
                debug!(site = %site, gen = g.0, "warm-up: failed to clear the probe: {e}");
            }
        }
        return Some(report(&run, &workers, requests.len()));
    }
    if let Some(x) = io.gens.get_mut(&g) {
        x.warmup = Some(run);
    }
    None
}

fn report(run: &Run, workers: &BTreeSet<Slot>, requests: usize) -> WarmupReport {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let warmed = workers
        .iter()
        .filter(|w| run.progress.get(w).is_some_and(|(_, a)| *a >= requests))
        .count();
    WarmupReport {
        warmed: count(warmed),
        of: count(workers.len()),
        answered: run.answers,
    }
}

/// One look: answers read, connections pinned on workers and asked, more made. Whether
/// every worker has answered every request.
fn advance(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    index: usize,
    requests: &[HttpCheck],
    workers: &BTreeSet<Slot>,
    run: &mut Run,
) -> bool {
    // Answers.
    let mut i = 0;
    while i < run.conns.len() {
        let c = &mut run.conns[i];
        if !c.asked {
            i += 1;
            continue;
        }
        match c.probe.look() {
            Look::Waiting => i += 1,
            answer => {
                debug!(site = %site, gen = g.0, worker = ?c.worker, ?answer, "warm-up answer");
                if let Some(w) = c.worker {
                    run.progress.entry(w).or_default().1 += 1;
                }
                run.answers += 1;
                run.conns.swap_remove(i);
            }
        }
    }
    // Connections pinned on the worker that accepted them (the workers' sockets listed
    // once per look, and only when a connection needs it).
    let unpinned: Vec<(usize, (std::net::SocketAddr, std::net::SocketAddr))> = run
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.worker.is_none())
        .filter_map(|(i, c)| c.probe.ends().map(|(local, peer)| (i, (peer, local))))
        .collect();
    let ends: Vec<_> = unpinned.iter().map(|(_, e)| *e).collect();
    let inodes = crate::net::accepted_sockets(&ends);
    let mut sockets = None;
    for ((i, _), inode) in unpinned.iter().zip(inodes) {
        let Some(inode) = inode else {
            continue;
        };
        let by_worker =
            sockets.get_or_insert_with(|| super::health::sockets_by_worker(io, Some(g)));
        run.conns[*i].worker = by_worker.get(&inode).map(|(_, s, _)| *s);
    }
    // A connection on a worker is asked that worker's next request; one on a worker that
    // was asked them all is closed unused.
    let progress = &mut run.progress;
    run.conns.retain_mut(|c| match c.worker {
        Some(_) if c.asked => true,
        Some(w) => {
            let (next, _) = progress.entry(w).or_default();
            match requests.get(*next) {
                Some(request) => {
                    c.probe.ask(request, "hatchery-warmup");
                    c.asked = true;
                    *next += 1;
                    // Sent at once: the answer is read at the next look.
                    let _ = c.probe.look();
                    true
                }
                None => false,
            }
        }
        None => true,
    });
    let answered = |w: &Slot| run.progress.get(w).map_or(0, |(_, a)| *a);
    if workers.iter().all(|w| answered(w) >= requests.len()) {
        return true;
    }
    // Another connection, once the last one is established (the probe entry names one
    // port at a time), while some worker still has requests to be asked.
    let to_ask = workers
        .iter()
        .filter(|w| run.progress.get(w).map_or(0, |(n, _)| *n) < requests.len())
        .count();
    let pending = run.conns.iter().filter(|c| c.worker.is_none()).count();
    let last_connected = run.conns.last().is_none_or(|c| c.probe.connected());
    let room = run.made < CONNECTIONS_PER_REQUEST * requests.len() * workers.len().max(1);
    if to_ask > 0 && pending < 2 * to_ask && last_connected && room {
        let SiteIo { gens, steering, .. } = &mut *io;
        let (Some(gen_io), Some(Some(st))) = (gens.get(&g), steering.get_mut(index)) else {
            return true;
        };
        let listener = &gen_io.listeners[index];
        let ListenAddr::Tcp(target) = listener.spec.addr else {
            return true;
        };
        use std::os::fd::AsFd;
        match Probe::through(target, st, listener.fd.as_fd()) {
            Ok(probe) => {
                run.made += 1;
                run.conns.push(Conn {
                    probe,
                    worker: None,
                    asked: false,
                });
            }
            Err(e) => debug!(site = %site, gen = g.0, "warm-up connection: {e}"),
        }
    }
    false
}

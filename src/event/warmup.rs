//! The kernel's side of warm-ups (`deploy.warmup`): every worker of a new generation
//! answers each warm-up request before any client reaches it.
//!
//! The workers share their listener, so a request cannot be addressed to one of them; it
//! reaches whichever accepts it. A round per request: connections are made one at a time
//! through the steering program's probe entry (each from its own port, so nothing else
//! reaches the new generation) and held without a request; each is pinned, once
//! accepted, on the worker that holds its server end (as for health checks). A worker
//! that holds one gets the request on it; connections that landed on a worker already
//! served this round are closed unused. A worker that is busy with a held connection
//! (a synchronous server) accepts no other, so the next one lands on another worker; a
//! worker that accepts many (threads, an event loop) is covered, and the others are
//! reached as they win accepts. A round ends when every worker has answered; the warm-up
//! when every round has, or when the machine gives it up (`ready.timeout`).

use std::collections::BTreeSet;

use tracing::debug;

use super::generations::{Look, Probe};
use super::sites::SiteIo;
use crate::config::{HttpCheck, ListenAddr, SiteName};
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::WarmupReport;

/// Most connections one round may make, per worker.
const CONNECTIONS_PER_WORKER: usize = 16;

/// A warm-up under way.
#[derive(Debug, Default)]
pub(super) struct Run {
    /// The request being asked (index in `deploy.warmup`).
    round: usize,
    /// Its connections: the worker each landed on, once known, and whether it was asked.
    conns: Vec<Conn>,
    /// Workers that answered this round.
    answered: BTreeSet<Slot>,
    /// Workers that answered every round so far.
    warmed: BTreeSet<Slot>,
    /// Connections made this round.
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
        return Some(report(&Run::default(), &workers));
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
        return Some(report(&run, &workers));
    }
    if let Some(x) = io.gens.get_mut(&g) {
        x.warmup = Some(run);
    }
    None
}

fn report(run: &Run, workers: &BTreeSet<Slot>) -> WarmupReport {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    WarmupReport {
        warmed: count(run.warmed.intersection(workers).count()),
        of: count(workers.len()),
        answered: run.answers,
    }
}

/// One look: answers read, connections pinned on workers and asked, the next one made.
/// Whether every round is done.
fn advance(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    index: usize,
    requests: &[HttpCheck],
    workers: &BTreeSet<Slot>,
    run: &mut Run,
) -> bool {
    loop {
        let Some(request) = requests.get(run.round) else {
            return true;
        };
        // Answers.
        let mut i = 0;
        while i < run.conns.len() {
            let c = &mut run.conns[i];
            if c.asked {
                match c.probe.look() {
                    Look::Waiting => i += 1,
                    answer => {
                        debug!(site = %site, gen = g.0, worker = ?c.worker, ?answer, "warm-up answer");
                        if let Some(w) = c.worker {
                            run.answered.insert(w);
                        }
                        run.answers += 1;
                        run.conns.swap_remove(i);
                    }
                }
            } else {
                i += 1;
            }
        }
        // Connections pinned on the worker that accepted them (the workers' sockets
        // listed once per look, and only when a connection needs it).
        let mut sockets = None;
        for c in run.conns.iter_mut().filter(|c| c.worker.is_none()) {
            let Some(inode) = c
                .probe
                .ends()
                .and_then(|(local, peer)| crate::net::accepted_socket(peer, local))
            else {
                continue;
            };
            let by_worker =
                sockets.get_or_insert_with(|| super::health::sockets_by_worker(io, Some(g)));
            c.worker = by_worker.get(&inode).map(|(_, s, _)| *s);
        }
        // Each worker that still has to answer is asked on one connection it holds; the
        // others' connections are closed unused.
        let mut asked: BTreeSet<Slot> = run
            .conns
            .iter()
            .filter(|c| c.asked)
            .filter_map(|c| c.worker)
            .collect();
        run.conns.retain_mut(|c| match c.worker {
            Some(w) if c.asked => {
                let _ = w;
                true
            }
            Some(w) if run.answered.contains(&w) || asked.contains(&w) => false,
            Some(w) => {
                c.probe.ask(request, "hatchery-warmup");
                c.asked = true;
                asked.insert(w);
                // Sent at the next look.
                true
            }
            None => true,
        });
        let missing: Vec<Slot> = workers
            .iter()
            .filter(|w| !run.answered.contains(w))
            .copied()
            .collect();
        if missing.is_empty() {
            // The round is over: on to the next request.
            if run.round == 0 {
                run.warmed = run.answered.clone();
            } else {
                run.warmed = run.warmed.intersection(&run.answered).copied().collect();
            }
            run.round += 1;
            run.conns.clear();
            run.answered.clear();
            run.made = 0;
            continue;
        }
        // Another connection, once the last one is established (the probe entry names one
        // port at a time), while workers wait for one.
        let pending = run.conns.iter().filter(|c| c.worker.is_none()).count();
        let last_connected = run.conns.last().is_none_or(|c| c.probe.connected());
        let room = run.made < CONNECTIONS_PER_WORKER * workers.len().max(1);
        let waiting = missing.iter().filter(|w| !asked.contains(w)).count();
        if last_connected && room && pending < waiting {
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
        return false;
    }
}

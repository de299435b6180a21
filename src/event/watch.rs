//! `watch`: snapshots pushed to subscribers (`hatchery top`) from the loop, on a timer.
//!
//! A subscriber's connection is held (like `logs -f`): the agent sends one
//! [`Snapshot`] at once, then one each time the subscriber's deadline comes, which
//! [`Agent::watch_deadline`] adds to the loop's wait timeout; nothing is polled, and
//! with no subscriber nothing is due. Reads on the connection only notice the hang-up,
//! which forgets the subscriber.
//!
//! Cost: a snapshot is the `status` of what the subscriber may see. The overview (no
//! site named) leaves the sites' workers out, so it reads one cgroup per site and walks
//! each site's slots in memory for its [`SiteSummary`], whatever the number of workers;
//! only a subscriber to one site gets that site's workers and the usage of their cgroup
//! leaves. A subscriber whose previous snapshot is still unsent (it does not read) is
//! skipped until it has caught up, so a slow one costs no memory beyond one snapshot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::debug;

use super::Agent;
use crate::config::SiteName;
use crate::control::{Reply, SiteSummary, Snapshot, WATCH_INTERVAL_MS};

/// One subscriber.
#[derive(Debug)]
pub(super) struct Watcher {
    /// The peer's uid, and whether it may see every site.
    uid: u32,
    admin: bool,
    /// The site it watches with its workers, or `None` for every site without theirs.
    site: Option<String>,
    /// Time between snapshots.
    interval: Duration,
    /// When the next snapshot is due.
    next: Instant,
}

/// The subscribers, by connection.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    by_conn: HashMap<u64, Watcher>,
}

impl Agent {
    /// Holds connection `conn` as a subscriber of peer `uid` (authorized already) and
    /// sends its first snapshot.
    pub(super) fn start_watch(
        &mut self,
        conn: u64,
        uid: u32,
        admin: bool,
        site: Option<&str>,
        interval_ms: u64,
    ) {
        let interval_ms = interval_ms.clamp(*WATCH_INTERVAL_MS.start(), *WATCH_INTERVAL_MS.end());
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.held = true;
        debug!(uid, site = ?site, interval_ms, "a client watches");
        let interval = Duration::from_millis(interval_ms);
        self.watchers.by_conn.insert(
            conn,
            Watcher {
                uid,
                admin,
                site: site.map(str::to_string),
                interval,
                next: Instant::now() + interval,
            },
        );
        // Reads now only notice a hang-up.
        self.arm_conn_read(conn);
        self.send_snapshot(conn);
    }

    /// Forgets the subscriber on connection `conn`, if it is one.
    pub(super) fn forget_watch(&mut self, conn: u64) {
        self.watchers.by_conn.remove(&conn);
    }

    /// When the next snapshot is due, if anyone watches.
    pub(super) fn watch_deadline(&self) -> Option<Instant> {
        self.watchers.by_conn.values().map(|w| w.next).min()
    }

    /// Sends the snapshots due at `now`.
    pub(super) fn send_watches(&mut self, now: Instant) {
        if self.watchers.by_conn.is_empty() {
            return;
        }
        let mut due = Vec::new();
        for (conn, w) in &mut self.watchers.by_conn {
            if w.next <= now {
                // On the subscriber's rhythm, not drifting by the loop's delays; after a
                // long stall (a suspended host), from now.
                w.next += w.interval;
                if w.next <= now {
                    w.next = now + w.interval;
                }
                due.push(*conn);
            }
        }
        for conn in due {
            self.send_snapshot(conn);
        }
    }

    /// Builds and queues the snapshot of subscriber `conn`, unless it has not read the
    /// previous one yet.
    fn send_snapshot(&mut self, conn: u64) {
        let Some(c) = self.conns.get(&conn) else {
            // Closed without a hang-up seen by a read (the agent shut it).
            self.forget_watch(conn);
            return;
        };
        if !c.outbuf.is_empty() {
            return;
        }
        let Some(w) = self.watchers.by_conn.get(&conn) else {
            return;
        };
        let snapshot = self.snapshot(w);
        self.send(conn, &Reply::Snapshot(Box::new(snapshot)));
    }

    /// What subscriber `w` may see now.
    fn snapshot(&self, w: &Watcher) -> Snapshot {
        let one = w.site.as_deref().and_then(|s| SiteName::new(s).ok());
        let with_workers = w.site.is_some();
        let mut status = self.status_of(
            one.as_ref(),
            w.uid,
            w.admin,
            with_workers,
            with_workers,
            false,
        );
        if let Some(site) = &w.site {
            // A site that could not be started may have a name `SiteName` refuses.
            status.sites.retain(|s| &s.name == site);
        }
        let summaries = status
            .sites
            .iter()
            .filter_map(|s| {
                let name = SiteName::new(&s.name).ok()?;
                self.sites.get(&name).map(|site| summary(&name, site))
            })
            .collect();
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let monotonic_ms = u64::try_from(now.tv_sec).unwrap_or(0) * 1000
            + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000;
        Snapshot {
            monotonic_ms,
            interval_ms: u64::try_from(w.interval.as_millis()).unwrap_or(u64::MAX),
            status,
            summaries,
        }
    }
}

/// A site's workers summed up, from its machine's slots (no file read).
fn summary(name: &SiteName, site: &super::Site) -> SiteSummary {
    let mut s = SiteSummary {
        site: name.to_string(),
        workers: 0,
        live: 0,
        busy: 0,
        restarts: 0,
        last_exit: None,
    };
    let mut latest: Option<(Instant, String)> = None;
    let several = site.machine.generations().count() > 1;
    for g in site.machine.generations() {
        for slot in g.slots.slots.values() {
            s.workers += 1;
            s.live += u32::from(slot.pid.is_some());
            s.busy += u32::from(slot.busy());
            s.restarts = s.restarts.saturating_add(slot.restarts);
            if let (Some(exit), Some(started)) = (&slot.last_exit, slot.started) {
                if latest.as_ref().is_none_or(|(t, _)| started > *t) {
                    let worker = if several {
                        format!("g{}/w-{}", g.id.0, slot.id.0)
                    } else {
                        format!("w-{}", slot.id.0)
                    };
                    latest = Some((started, format!("{worker} {exit}")));
                }
            }
        }
    }
    s.last_exit = latest.map(|(_, text)| text);
    s
}

//! The random steps of a sequence: what operators ask, what the world does, time.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::{MAX_WORKERS, ReadyCheck};
use crate::supervisor::deploy::Share;
use crate::supervisor::ids::{ClientId, GenId, Slot};
use crate::supervisor::machine::{CancelReason, Input};
use crate::supervisor::slots::{self, ExitReason};

use super::*;

impl Sim {
    pub(super) fn random_proc(&mut self) -> Option<(GenId, Slot)> {
        if self.w.procs.is_empty() {
            return None;
        }
        let i = self.rng.index(self.w.procs.len());
        self.w.procs.keys().nth(i).copied()
    }

    pub(super) fn one_step(&mut self) -> Step {
        let roll = self.rng.range(0, 99);
        // After `Remove` the site is no one's to ask: only the world and time move.
        let roll = if self.removed && roll >= 60 { 0 } else { roll };
        match roll {
            0..=19 => {
                let dt = self.rng.ms(1, 300);
                self.advance(dt, true)
            }
            20..=29 => {
                let dt = self.rng.ms(300, 5000);
                self.advance(dt, true)
            }
            30..=32 => {
                let dt = self.rng.ms(5000, 120_000);
                self.advance(dt, false)
            }
            33..=39 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                let reason = match self.rng.range(0, 2) {
                    0 => ExitReason::Exited { code: 1 },
                    1 => ExitReason::Exited { code: 0 },
                    _ => ExitReason::Signaled {
                        signal: libc::SIGSEGV,
                    },
                };
                self.exit(g, slot, reason)
            }
            40..=42 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                self.exit(g, slot, ExitReason::OomKilled)
            }
            43..=45 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                let busy = self.rng.chance(50);
                self.feed(Input::Worker {
                    generation: g,
                    input: slots::Input::BusyReported { id: slot, busy },
                })
            }
            46..=47 => {
                // A worker says READY=1 again (or early, as a buggy one may).
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                if self.w.check != ReadyCheck::Notify {
                    return Ok(());
                }
                self.feed(Input::Worker {
                    generation: g,
                    input: slots::Input::ReadyNotified { id: slot },
                })
            }
            48..=51 => {
                let Some(k) = self.random_proc() else {
                    return Ok(());
                };
                let mem = self.w.mem_base * self.rng.range(40, 250) / 100;
                if let Some(p) = self.w.procs.get_mut(&k) {
                    p.mem = mem;
                }
                Ok(())
            }
            52..=55 => {
                self.w.queues_empty = self.rng.chance(60);
                // The load moves: connections waiting, CPU and stall time, memory limits
                // hit now and then.
                let l = &mut self.w.load;
                l.queued = Some(if self.rng.chance(50) {
                    0
                } else {
                    u32::try_from(self.rng.range(1, 40)).unwrap_or(1)
                });
                l.cpu_usec = l.cpu_usec.map(|c| c + self.rng.range(0, 4_000_000));
                l.cpu_stall_usec = l.cpu_stall_usec.map(|c| c + self.rng.range(0, 1_000_000));
                if self.rng.chance(10) {
                    l.memory_events = l.memory_events.map(|m| m + 1);
                }
                Ok(())
            }
            56..=57 => {
                self.w.link_dangles = self.rng.chance(15);
                let n = self.next_release;
                self.next_release += 1;
                let kind = self.release_kind();
                self.w.link = PathBuf::from(format!("/srv/web/releases/r{n}-{kind}"));
                Ok(())
            }
            58..=59 => {
                // A client goes away: mostly one that waits.
                let waiting: Vec<ClientId> = self
                    .clients
                    .iter()
                    .filter(|(_, a)| !a.answered && !a.gone)
                    .map(|(c, _)| *c)
                    .collect();
                let c = if !waiting.is_empty() && self.rng.chance(80) {
                    waiting[self.rng.index(waiting.len())]
                } else {
                    ClientId(self.rng.range(1, self.next_client))
                };
                if let Some(a) = self.clients.get_mut(&c) {
                    a.gone = true;
                }
                self.feed(Input::ClientGone(c))
            }
            60..=65 => self.scale(),
            66..=68 => {
                let c = self.client("start");
                self.epoch += 1;
                self.up = true;
                self.feed(Input::Start(Some(c)))
            }
            69..=70 => {
                self.epoch += 1;
                self.up = false;
                if self.rng.chance(80) {
                    let c = self.client("stop");
                    self.feed(Input::Stop {
                        client: Some(c),
                        why: CancelReason::SiteStopped,
                    })
                } else {
                    self.feed(Input::Stop {
                        client: None,
                        why: CancelReason::AgentStopping,
                    })
                }
            }
            71..=73 => {
                let c = self.client("restart");
                self.epoch += 1;
                // A restart starts a stopped site, unless a deploy refuses it.
                if self.m.deploy().is_none() {
                    self.up = true;
                }
                self.feed(Input::Restart(c))
            }
            74..=77 => self.reconfigure(),
            78..=90 => self.deploy(),
            91..=93 if self.rng.chance(40) => {
                let c = self.client("promote");
                self.epoch += 1;
                self.feed(Input::Promote(c))
            }
            91..=93 => {
                let c = self.client("rollback");
                self.epoch += 1;
                self.feed(Input::Rollback(c))
            }
            95 => self.agent_crashes(),
            96 => {
                // A worker shuts a listener down: mostly the serving generation's.
                let generation = match self.m.deploy() {
                    Some(d) if self.rng.chance(50) => d.to,
                    _ => self.m.serving(),
                };
                self.epoch += 1;
                self.feed(Input::ListenerShut {
                    generation,
                    listener: "http (tcp 127.0.0.1:8000)".into(),
                })
            }
            94 if self.rng.chance(30) => {
                self.epoch += 1;
                self.up = false;
                self.removed = true;
                self.feed(Input::Remove)
            }
            _ => {
                let dt = self.rng.ms(1, 100);
                self.advance(dt, true)
            }
        }
    }

    /// The agent crashes and a new one adopts the site's workers. While no agent runs,
    /// the world goes on: what was due happens unseen (a `READY=1` goes to the agent that
    /// died), and some workers die. The new agent reads the record the old one wrote,
    /// keeps the workers still alive (the loop checks each by pidfd), and builds the
    /// machine from it; the clients were the old agent's connections: gone.
    pub(super) fn agent_crashes(&mut self) -> Step {
        if self.dropped {
            return Ok(());
        }
        let mut record = self.m.record();
        if self.rng.chance(50) {
            self.now += self.rng.ms(1, 3000);
        }
        let now = self.now;
        let due = |x: &Option<(Instant, ExitReason)>| x.as_ref().is_some_and(|(t, _)| *t <= now);
        let mut dead = Vec::new();
        for (k, p) in &mut self.w.procs {
            if p.ready_at.is_some_and(|t| t <= now) {
                p.ready = true;
            }
            if due(&p.crash_at) || due(&p.exit_at) {
                dead.push(*k);
            }
        }
        let keys: Vec<(GenId, Slot)> = self.w.procs.keys().copied().collect();
        for k in keys {
            if self.rng.chance(10) {
                dead.push(k);
            }
        }
        for k in dead {
            self.w.procs.remove(&k);
        }
        // Zygotes end when their socket to the agent closes.
        self.w.zygotes.clear();
        let mid_deploy = record.gens.len() > 1;
        for g in &mut record.gens {
            let procs = &self.w.procs;
            g.workers.retain(|w| {
                procs
                    .get(&(GenId(g.id), Slot(w.slot)))
                    .is_some_and(|p| p.pid == w.pid)
            });
        }
        for a in self.clients.values_mut() {
            if !a.answered {
                a.gone = true;
            }
        }
        // A new agent: no rolling restart, no crash history, no probe, no canary entry.
        self.rolling_starts.clear();
        self.epoch += 1;
        self.up = record.running;
        self.w.probing.clear();
        self.w.canary = None;
        if self.trace {
            eprintln!(
                "  [{:?}] agent crashed; adopting {record:?}",
                self.elapsed()
            );
        }
        let previous = self.m.previous_release().map(Path::to_path_buf);
        let (m, out) = SiteMachine::adopt(self.cfg.clone(), record, previous, self.now);
        self.m = m;
        if self.trace {
            for a in &out {
                eprintln!("  [{:?}]    -> {a:?}", self.elapsed());
            }
        }
        if !self.adopted {
            self.adopted = true;
            REACHED.adopting.fetch_add(1, Ordering::Relaxed);
        }
        REACHED.adoptions.fetch_add(1, Ordering::Relaxed);
        if mid_deploy {
            REACHED.adopted_mid_deploy.fetch_add(1, Ordering::Relaxed);
        }
        self.answers(&out)?;
        self.carry_out(out)
    }

    pub(super) fn release_kind(&mut self) -> &'static str {
        match self.rng.range(0, 99) {
            0..=59 => "good",
            60..=71 => "crash",
            72..=83 => "hang",
            84..=91 => "broken",
            _ => "missing",
        }
    }

    pub(super) fn scale(&mut self) -> Step {
        let allowed = self.cfg.auto.map_or(self.cfg.workers, |a| a.max);
        let (workers, owner) = match self.rng.range(0, 9) {
            0..=5 => (self.rng.small(0, 6), None),
            6 => (self.rng.small(0, allowed + 3), Some(1000)),
            7 => (MAX_WORKERS + self.rng.small(1, 100), None),
            // Everything any site may have: only where the memory cap bounds it.
            8 if self.m.capacity().is_some() => (MAX_WORKERS, None),
            _ => (self.rng.small(0, 3), Some(1000)),
        };
        if self.rng.chance(15) {
            let c = self.client("scale auto");
            self.epoch += 1;
            return self.feed(Input::ScaleAuto(c));
        }
        let c = self.client("scale");
        self.epoch += 1;
        self.feed(Input::Scale {
            client: c,
            workers,
            owner,
        })
    }

    pub(super) fn reconfigure(&mut self) -> Step {
        let mut new = self.cfg.clone();
        let what = self.rng.range(0, 5);
        match what {
            0 => {
                if let Some(a) = &mut new.auto {
                    a.max = self.rng.small(a.min, 8);
                    new.workers = a.max;
                } else {
                    new.workers = self.rng.small(0, 6);
                }
            }
            1 => {
                // The budget (or the estimate) changes, appears or goes.
                let estimate = self.rng.range(32, 256) * M;
                let budget = estimate * self.rng.range(1, 8);
                if new.auto.is_some() || self.rng.chance(70) {
                    new.limits.memory = Some(budget);
                    new.limits.worker_memory = Some(estimate);
                } else {
                    new.limits.memory = None;
                    new.limits.worker_memory = None;
                }
            }
            2 => {
                let kind = self
                    .rng
                    .pick(&["", " --v2", " --crash", " --hang", " --broken"]);
                let head = if new.release.is_some() {
                    "{release}/bin/app"
                } else {
                    "/usr/bin/app"
                };
                new.command = format!("{head}{kind}")
                    .split(' ')
                    .map(String::from)
                    .collect();
            }
            3 => {
                new.stop.timeout = self.rng.ms(200, 8000);
                new.ready.timeout = self.rng.ms(500, 10_000);
                if self.rng.chance(30) {
                    new.mode = match new.mode {
                        crate::config::SiteMode::Exec => crate::config::SiteMode::Zygote,
                        crate::config::SiteMode::Zygote => crate::config::SiteMode::Exec,
                    };
                }
            }
            _ => {
                new.restart.backoff_initial = self.rng.ms(20, 1000);
                new.restart.backoff_max = new.restart.backoff_initial * self.rng.small(1, 64);
                new.deploy.probation = self.rng.ms(0, 3000);
            }
        }
        // The loop refuses a reload the site cannot take now, and changes nothing.
        if self.m.reconfigure_refusal(&new).is_some() {
            return Ok(());
        }
        self.epoch += 1;
        self.cfg = new.clone();
        self.feed(Input::Reconfigure(Box::new(new)))
    }

    pub(super) fn deploy(&mut self) -> Step {
        let release = if self.rng.chance(60) {
            None
        } else {
            let n = self.next_release;
            self.next_release += 1;
            let kind = self.release_kind();
            Some(PathBuf::from(format!("/srv/web/releases/r{n}-{kind}")))
        };
        let canary = self
            .rng
            .chance(30)
            .then(|| u16::try_from(self.rng.small(1, 9999)).ok())
            .flatten()
            .and_then(Share::from_basis_points);
        let c = self.client("deploy");
        self.epoch += 1;
        self.feed(Input::Deploy {
            client: c,
            release,
            canary,
        })
    }
}

//! The zygote of a `mode = "zygote"` generation: when it is started and stopped, and what
//! its workers' spawns do meanwhile. Pure policy; the loop starts and stops the process
//! ([`Action::StartZygote`], [`Action::StopZygote`]) and reports back
//! ([`Input::ZygoteReady`], [`Input::ZygoteExited`]).
//!
//! A worker spawn of a zygote-mode generation is a fork asked of its ready zygote. A spawn
//! its slots ask for while the zygote is not ready is *held*: not passed on, its slot left
//! `Starting` with no ready deadline ([`SiteCore::hold_spawn`]); the zygote is started if
//! it is not running or backing off. The zygote has its own deadline, `ready.timeout` from
//! its start, so loading the app never eats a worker's.
//!
//! | phase      | process | leaves on                                                      |
//! |------------|---------|----------------------------------------------------------------|
//! | `Stopped`  | no      | a spawn held (→ `Starting`)                                     |
//! | `Starting` | yes     | `READY` (→ `Ready`, held spawns carried out in slot order, each  |
//! |            |         | with its ready deadline from now); exit (→ `Backoff`) or its     |
//! |            |         | deadline (→ `Stopping`, then `Backoff`): held spawns fail       |
//! | `Ready`    | yes     | exit (→ `Backoff`, degraded: workers run on, spawns are held)   |
//! | `Backoff`  | no      | its time (→ `Starting` if a spawn is held, or it was lost while  |
//! |            |         | ready and the generation runs and is not leaving; else `Stopped`)|
//! | `Stopping` | yes     | exit (→ `Backoff` after a failed start, else `Stopped`, then     |
//! |            |         | started again at once if a spawn is held)                        |
//!
//! - Held spawns that fail (the zygote did not become ready) fail as
//!   `SpawnFailed { permanent: false }`: crash counting, backoff, flapping and a deploy's
//!   rollback apply as for a worker that cannot start.
//! - The backoff is the restart policy's, growing with the zygote's `restarts`.
//! - A zygote is stopped when its generation's slots have all stopped by request, and
//!   just before the generation is retired; a site started again starts it again through
//!   a held spawn.
//! - A slot whose held spawn is no longer wanted (stopped, scaled away) ends as a spawn
//!   asked to stop before it was reported does.
//!
//! Invariants (checked by the simulation): no [`Action::Spawn`] for a generation whose
//! zygote is not ready; never a `StartZygote` while its zygote has a process (at most one
//! per generation); an exec-mode generation has no zygote and never holds a spawn.
//!
//! What it does not do: kill a zygote that ignores its stop signal (the loop escalates),
//! or keep a zygote across an agent crash (it ends when its socket to the agent closes;
//! an adopted generation starts a new one when a spawn needs it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{Action, Event, Generation, SiteMachine};
use crate::config::{SiteConfig, SiteMode};
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::policy::backoff;
use crate::supervisor::slots::{self, Phase, RunState};

/// Where a generation's zygote is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZygotePhase {
    /// Started, not yet `READY`.
    Starting {
        /// When it must be ready by (`ready.timeout` from its start).
        deadline: Instant,
    },
    /// Ready: workers are forked from it.
    Ready,
    /// Ended (or never ready): started again at this time.
    Backoff {
        /// When.
        until: Instant,
    },
    /// Asked to stop.
    Stopping {
        /// After a start that failed: not started again before this time.
        retry: Option<Instant>,
    },
    /// No process, nothing due.
    Stopped,
}

impl ZygotePhase {
    /// Whether a zygote process exists in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            ZygotePhase::Starting { .. } | ZygotePhase::Ready | ZygotePhase::Stopping { .. }
        )
    }

    /// The name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            ZygotePhase::Starting { .. } => "starting",
            ZygotePhase::Ready => "ready",
            ZygotePhase::Backoff { .. } => "backoff",
            ZygotePhase::Stopping { .. } => "stopping",
            ZygotePhase::Stopped => "stopped",
        }
    }
}

/// A generation's zygote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZygoteState {
    /// Where it is.
    pub phase: ZygotePhase,
    /// How many times it ended (or failed to start) without being asked.
    pub restarts: u32,
    /// It died while ready and no new one is ready yet.
    pub degraded: bool,
    /// Slots whose spawn waits for it to be ready.
    pub held: BTreeSet<Slot>,
}

impl ZygoteState {
    /// When it must be looked at again.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            ZygotePhase::Starting { deadline } => Some(deadline),
            ZygotePhase::Backoff { until } => Some(until),
            _ => None,
        }
    }
}

/// The zygote a generation running `config` has: none in exec mode, a stopped one in
/// zygote mode.
pub(super) fn for_config(config: &SiteConfig) -> Option<ZygoteState> {
    (config.mode == SiteMode::Zygote).then(|| ZygoteState {
        phase: ZygotePhase::Stopped,
        restarts: 0,
        degraded: false,
        held: BTreeSet::new(),
    })
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl SiteMachine {
    /// Holds the spawn of `slot` of generation `g` if `g` has a zygote that is not ready
    /// (`start_zygotes` starts it once the input is handled). Whether it did.
    pub(super) fn hold_spawn(&mut self, g: GenId, slot: Slot) -> bool {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return false;
        };
        if gen_.config.mode != SiteMode::Zygote {
            return false;
        }
        let Some(z) = &mut gen_.zygote else {
            return false;
        };
        if z.phase == ZygotePhase::Ready || !gen_.slots.hold_spawn(slot) {
            return false;
        }
        z.held.insert(slot);
        true
    }

    /// Starts the stopped zygotes that a spawn waits for. Called once an input is handled,
    /// not at the spawn: a spawn held and dropped within one input (a slot restarted, then
    /// stopped by the deploy) starts no zygote.
    pub(super) fn start_zygotes(&mut self, now: Instant, out: &mut Vec<Action>) {
        for gen_ in self.gens.values_mut() {
            let wanted = gen_
                .zygote
                .as_ref()
                .is_some_and(|z| z.phase == ZygotePhase::Stopped && !z.held.is_empty());
            if wanted {
                start(gen_, now, out);
            }
        }
    }

    /// Held spawns whose slot no longer waits for them: dropped; a slot asked to stop
    /// meanwhile ends as a spawn asked to stop before it was reported does.
    pub(super) fn drop_held(&mut self, g: GenId, now: Instant, out: &mut Vec<Action>) {
        let Some(Generation { zygote, slots, .. }) = self.gens.get_mut(&g) else {
            return;
        };
        let Some(z) = zygote else {
            return;
        };
        let mut stopped = Vec::new();
        z.held
            .retain(|id| match slots.slots.get(id).map(|s| (s.phase, s.pid)) {
                Some((Phase::Starting { .. }, None)) => true,
                Some((Phase::Stopping { .. }, None)) => {
                    stopped.push(*id);
                    false
                }
                _ => false,
            });
        for id in stopped {
            let input = slots::Input::SpawnFailed {
                id,
                error: "stopped while it waited for the zygote".into(),
                permanent: false,
            };
            self.feed(g, input, now, out);
        }
    }

    /// The zygote of generation `g` said `READY`: the spawns held are carried out.
    pub(super) fn zygote_ready(&mut self, g: GenId, now: Instant, out: &mut Vec<Action>) {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return;
        };
        let Some(z) = &mut gen_.zygote else {
            return;
        };
        // A zygote asked to stop (or one already given up on) serves no spawn.
        if !matches!(z.phase, ZygotePhase::Starting { .. }) {
            return;
        }
        z.phase = ZygotePhase::Ready;
        let restored = std::mem::replace(&mut z.degraded, false);
        let held = std::mem::take(&mut z.held);
        let mut spawns = 0;
        for slot in held {
            if gen_.slots.release_spawn(slot, now) {
                spawns += 1;
                out.push(Action::Spawn {
                    generation: g,
                    slot,
                });
            }
        }
        out.push(Action::Log(Event::ZygoteReady {
            generation: g,
            spawns,
            restored,
        }));
    }

    /// The zygote of generation `g` ended.
    pub(super) fn zygote_exited(
        &mut self,
        g: GenId,
        reason: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return;
        };
        let restart = gen_.config.restart;
        let Some(z) = &mut gen_.zygote else {
            return;
        };
        match z.phase {
            ZygotePhase::Starting { .. } => {
                z.restarts += 1;
                let retry_in = backoff(&restart, z.restarts);
                z.phase = ZygotePhase::Backoff {
                    until: now + retry_in,
                };
                self.fail_held(g, format!("it ended: {reason}"), retry_in, now, out);
            }
            ZygotePhase::Ready => {
                z.restarts += 1;
                z.degraded = true;
                let retry_in = backoff(&restart, z.restarts);
                z.phase = ZygotePhase::Backoff {
                    until: now + retry_in,
                };
                out.push(Action::Log(Event::ZygoteLost {
                    generation: g,
                    reason,
                    retry_in,
                }));
            }
            ZygotePhase::Stopping { retry } => {
                z.phase = match retry {
                    Some(until) if until > now => ZygotePhase::Backoff { until },
                    _ => ZygotePhase::Stopped,
                };
                out.push(Action::Log(Event::ZygoteStopped {
                    generation: g,
                    reason,
                }));
                // Started again by `start_zygotes` if a spawn waits.
                if z.phase == ZygotePhase::Stopped && gen_.config.mode == SiteMode::Exec {
                    // The last of a generation reloaded to exec mode.
                    gen_.zygote = None;
                }
            }
            // Already given up on: nothing more to learn.
            ZygotePhase::Backoff { .. } | ZygotePhase::Stopped => {}
        }
    }

    /// Time passed: a zygote not ready by its deadline is stopped (its held spawns fail);
    /// one whose backoff is over starts again if anything wants it.
    pub(super) fn zygote_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due: Vec<GenId> = self
            .gens
            .values()
            .filter(|g| {
                g.zygote
                    .as_ref()
                    .and_then(ZygoteState::deadline)
                    .is_some_and(|d| d <= now)
            })
            .map(|g| g.id)
            .collect();
        for g in due {
            let Some(gen_) = self.gens.get_mut(&g) else {
                continue;
            };
            let restart = gen_.config.restart;
            let timeout = gen_.config.ready.timeout;
            // A zygote lost while ready is replaced for the workers to come; one that never
            // became ready is tried again when a spawn needs it.
            let wanted = !gen_.leaving
                && gen_.slots.run == RunState::Running
                && !gen_.slots.slots.is_empty()
                && gen_.zygote.as_ref().is_some_and(|z| z.degraded);
            let Some(z) = &mut gen_.zygote else {
                continue;
            };
            match z.phase {
                ZygotePhase::Starting { .. } => {
                    z.restarts += 1;
                    let retry_in = backoff(&restart, z.restarts);
                    z.phase = ZygotePhase::Stopping {
                        retry: Some(now + retry_in),
                    };
                    out.push(Action::StopZygote(g));
                    let why = format!("not ready within {} ms", timeout.as_millis());
                    self.fail_held(g, why, retry_in, now, out);
                }
                ZygotePhase::Backoff { .. } => {
                    // Started again by `start_zygotes` if a spawn waits.
                    z.phase = ZygotePhase::Stopped;
                    if wanted {
                        start(gen_, now, out);
                    }
                }
                _ => {}
            }
        }
    }

    /// Stops generation `g`'s zygote (its slots all stopped, or the site is done with it).
    pub(super) fn stop_zygote(&mut self, g: GenId, out: &mut Vec<Action>) {
        let Some(z) = self.gens.get_mut(&g).and_then(|g| g.zygote.as_mut()) else {
            return;
        };
        match z.phase {
            ZygotePhase::Starting { .. } | ZygotePhase::Ready => {
                z.phase = ZygotePhase::Stopping { retry: None };
                out.push(Action::StopZygote(g));
            }
            ZygotePhase::Backoff { .. } => z.phase = ZygotePhase::Stopped,
            ZygotePhase::Stopping { .. } | ZygotePhase::Stopped => {}
        }
    }

    /// Generation `g`'s configuration changed (a reload, not only its worker count): its
    /// zygote, which runs the old one, is stopped; the next spawn starts a new one (never
    /// two: one still stopping is waited for). Its workers run on until the rolling restart
    /// reaches them.
    pub(super) fn replace_zygote(&mut self, g: GenId, out: &mut Vec<Action>) {
        self.stop_zygote(g, out);
        // Started again at once when a spawn needs it: the old configuration's failures
        // say nothing of the new one's.
        if let Some(z) = self.gens.get_mut(&g).and_then(|g| g.zygote.as_mut()) {
            if let ZygotePhase::Stopping { retry: Some(_) } = z.phase {
                z.phase = ZygotePhase::Stopping { retry: None };
            }
        }
    }

    /// The spawns generation `g` held fail: its zygote did not become ready.
    fn fail_held(
        &mut self,
        g: GenId,
        why: String,
        retry_in: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(z) = self.gens.get_mut(&g).and_then(|g| g.zygote.as_mut()) else {
            return;
        };
        let held = std::mem::take(&mut z.held);
        out.push(Action::Log(Event::ZygoteNotReady {
            generation: g,
            why: why.clone(),
            failed: count(held.len()),
            retry_in,
        }));
        for id in held {
            let input = slots::Input::SpawnFailed {
                id,
                error: format!("the zygote did not become ready: {why}"),
                permanent: false,
            };
            // As the loop's report of a spawn that failed: it counts as a crash.
            self.worker_input(g, input, now, out);
        }
    }

    /// A reload changed generation `g`'s mode (its configuration already says the new
    /// one): to zygote mode, it has a zygote from its next spawn on (one still stopping is
    /// waited for: never two); to exec mode, its zygote is stopped (and kept, stopping,
    /// until it has ended) and the spawns it held are carried out as execs.
    pub(super) fn mode_changed(&mut self, g: GenId, now: Instant, out: &mut Vec<Action>) {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return;
        };
        match gen_.config.mode {
            SiteMode::Zygote => {
                if gen_.zygote.is_none() {
                    gen_.zygote = for_config(&gen_.config);
                }
            }
            SiteMode::Exec => {
                let Some(z) = &mut gen_.zygote else {
                    return;
                };
                if matches!(z.phase, ZygotePhase::Starting { .. } | ZygotePhase::Ready) {
                    z.phase = ZygotePhase::Stopping { retry: None };
                    out.push(Action::StopZygote(g));
                }
                z.degraded = false;
                let held = std::mem::take(&mut z.held);
                if !z.phase.has_process() {
                    gen_.zygote = None;
                }
                for slot in held {
                    if gen_.slots.release_spawn(slot, now) {
                        out.push(Action::Spawn {
                            generation: g,
                            slot,
                        });
                    }
                }
            }
        }
    }
}

/// Starts `gen_`'s zygote.
fn start(gen_: &mut Generation, now: Instant, out: &mut Vec<Action>) {
    let Some(z) = &mut gen_.zygote else {
        return;
    };
    z.phase = ZygotePhase::Starting {
        deadline: now + gen_.config.ready.timeout,
    };
    out.push(Action::StartZygote(gen_.id));
    out.push(Action::Log(Event::ZygoteStarting(gen_.id)));
}

#[cfg(test)]
mod tests;

//! Health checks of the serving generation (`[health]`): every `interval` the loop sends
//! one HTTP request to the site's first TCP listener and reports how it went, and which
//! worker process had accepted it when it failed. A worker process that fails
//! `health.failures` checks is restarted (stop signal, SIGKILL at the stop timeout, then
//! started again at once), and said so.
//!
//! Policy only: the loop carries out [`Action::Health`] and feeds back
//! [`Input::HealthChecked`](super::Input::HealthChecked).

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Action, Event, SiteMachine, TCP_PROBE_INTERVAL};
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::slots::{self, Phase, RunState};

/// How a health check went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthResult {
    /// Answered with a status `health.status` accepts.
    Healthy,
    /// Not.
    Failed {
        /// How.
        answer: HealthAnswer,
        /// The worker that had accepted the check's connection (generation, slot, pid),
        /// when one had.
        worker: Option<(GenId, Slot, i32)>,
    },
}

/// How a failed health check was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAnswer {
    /// Not within `health.timeout`.
    TimedOut,
    /// With a status `health.status` does not accept.
    Status(u16),
    /// Not with HTTP (or the connection closed first).
    NotHttp,
    /// The connection was refused or reset.
    Refused(String),
}

/// The health checks of a site.
#[derive(Debug, Clone, Default)]
pub(super) struct HealthState {
    /// When the next check starts.
    next: Option<Instant>,
    /// The check under way: its generation, and when it is given up.
    under_way: Option<(GenId, Instant)>,
    /// Failed checks by worker slot, for the process (pid) they failed on.
    failures: BTreeMap<(GenId, Slot), (i32, u32)>,
}

impl SiteMachine {
    /// When the health checks need the machine again.
    pub(super) fn health_deadline(&self, now: Instant) -> Option<Instant> {
        self.config.health.as_ref()?;
        match self.health.under_way {
            Some((_, give_up)) => Some(give_up.min(now + TCP_PROBE_INTERVAL)),
            None => self.health.next,
        }
    }

    /// Whether the serving generation can be checked: running, with a ready worker.
    fn health_up(&self) -> bool {
        let cur = self.current();
        !self.removing && cur.slots.run == RunState::Running && cur.slots.ready() > 0
    }

    /// After every input: the first check is due one interval after the site is up; a
    /// site that is not up has none due.
    pub(super) fn health_arm(&mut self, now: Instant) {
        let Some(interval) = self.config.health.as_ref().map(|h| h.interval) else {
            return;
        };
        if !self.health_up() {
            self.health.next = None;
        } else if self.health.next.is_none() {
            self.health.next = Some(now + interval);
        }
    }

    /// Starts a check when one is due, looks at the one under way, or gives it up.
    pub(super) fn health_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(policy) = self.config.health.clone() else {
            // Health checks were configured away: the one under way ends.
            if let Some((generation, _)) = self.health.under_way {
                out.push(Action::Health {
                    generation,
                    give_up: true,
                });
            }
            self.health = HealthState::default();
            return;
        };
        if let Some((generation, give_up)) = self.health.under_way {
            return out.push(Action::Health {
                generation,
                give_up: now >= give_up,
            });
        }
        if !self.health_up() {
            // Checked again one interval after the site is up.
            self.health.next = None;
            return;
        }
        let next = *self.health.next.get_or_insert(now + policy.interval);
        if now < next {
            return;
        }
        let generation = self.serving;
        self.health.under_way = Some((generation, now + policy.timeout));
        self.health.next = Some(now + policy.interval);
        out.push(Action::Health {
            generation,
            give_up: false,
        });
    }

    /// A check ended: a worker that failed `health.failures` of them is restarted.
    pub(super) fn health_checked(
        &mut self,
        result: HealthResult,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.health.under_way = None;
        let Some(policy) = self.config.health.clone() else {
            return;
        };
        let HealthResult::Failed { answer, worker } = result else {
            return;
        };
        let Some((generation, slot, pid)) = worker else {
            return out.push(Action::Log(Event::HealthFailed {
                generation: self.serving,
                worker: None,
                answer,
                failures: 0,
                of: policy.failures,
            }));
        };
        // The process that failed must still be the slot's (not one started since).
        let current = self
            .gens
            .get(&generation)
            .filter(|g| !g.leaving)
            .and_then(|g| g.slots.slots.get(&slot))
            .is_some_and(|s| s.pid == Some(pid) && s.phase == Phase::Ready);
        // Counts of processes that are gone mean nothing any more.
        self.health.failures.retain(|(g, s), (p, _)| {
            self.gens
                .get(g)
                .and_then(|x| x.slots.slots.get(s))
                .is_some_and(|x| x.pid == Some(*p))
        });
        if !current {
            return;
        }
        let entry = self
            .health
            .failures
            .entry((generation, slot))
            .or_insert((pid, 0));
        entry.1 += 1;
        let failures = entry.1;
        out.push(Action::Log(Event::HealthFailed {
            generation,
            worker: Some(slot),
            answer: answer.clone(),
            failures,
            of: policy.failures,
        }));
        if failures >= policy.failures {
            self.health.failures.remove(&(generation, slot));
            out.push(Action::Log(Event::Unhealthy {
                generation,
                worker: slot,
                pid,
                failures,
            }));
            // A failure nobody asked for, as a crash: a deploy under way (a canary, a new
            // generation still draining the old one) is rolled back or steered back.
            if let Some(g) = self.gens.get_mut(&generation) {
                g.crashes += 1;
                g.unhealthy = Some(slot);
            }
            self.feed(generation, slots::Input::RestartSlot(slot), now, out);
        }
    }
}

//! What operators ask of a running site: stop, restart (one worker at a time) and scale
//! (within the owner's limit and the memory cap). Each client waits for the outcome it
//! asked for, answered from the notes of the serving generation's slots.

use std::time::Instant;

use super::{Action, CancelReason, Done, Event, Failure, Outcome, SiteMachine, WaitFor, Waiter};
use crate::supervisor::ids::{ClientId, GenId};
use crate::supervisor::slots::{self, RunState};

impl SiteMachine {
    pub(super) fn stop(
        &mut self,
        client: Option<ClientId>,
        why: CancelReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.is_stopped() {
            if let Some(client) = client {
                out.push(Action::Reply {
                    client,
                    outcome: Outcome::Done(Done::AlreadyStopped),
                });
            }
            // A stop-then-start deploy may be between generations, none running: it ends
            // here, and nothing starts again.
            self.start_deferred = false;
            self.cancel_deploys(why, now, out);
            return;
        }
        // Clients waiting for the site to settle or for a restart to finish would wait for
        // as long as it stays stopped: they are answered now.
        let (stopped, cancelled): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.until == WaitFor::Stopped);
        self.waiters = stopped;
        for w in cancelled {
            out.push(Action::Reply {
                client: w.client,
                outcome: Outcome::Failed(Failure::Cancelled(why)),
            });
        }
        if let Some(client) = client {
            self.hold(client, WaitFor::Stopped);
        }
        self.start_deferred = false;
        let gens: Vec<GenId> = self.gens.keys().copied().collect();
        for g in gens {
            self.feed(g, slots::Input::StopRequested, now, out);
        }
        // After the stop: a deploy rolled back gives the old generation its workers back,
        // which must not start them now.
        self.cancel_deploys(why, now, out);
    }

    /// A start while a stop is under way ends that stop: its clients, who would wait
    /// until the site next stops, are told.
    pub(super) fn stop_superseded(&mut self, out: &mut Vec<Action>) {
        let (stopped, keep): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.until == WaitFor::Stopped);
        self.waiters = keep;
        for w in stopped {
            out.push(Action::Reply {
                client: w.client,
                outcome: Outcome::Failed(Failure::StartedAgain),
            });
        }
    }

    pub(super) fn restart(&mut self, client: ClientId, now: Instant, out: &mut Vec<Action>) {
        if let Some(busy) = self.deploy_busy() {
            return out.push(Action::Reply {
                client,
                outcome: Outcome::Failed(busy),
            });
        }
        let serving = self.serving;
        // A site being stopped is started again (`SiteCore` takes a restart as a start
        // then): no rolling restart follows, so the client waits for it to settle.
        if matches!(
            self.current().slots.run,
            RunState::Stopped | RunState::Stopping
        ) {
            self.stop_superseded(out);
            self.hold(client, WaitFor::Settled);
            self.start_serving(now, out);
            self.reply_if_settled(client, out);
        } else {
            self.hold(client, WaitFor::RestartDone);
            self.feed(serving, slots::Input::RestartRequested, now, out);
        }
    }

    pub(super) fn scale(
        &mut self,
        client: ClientId,
        workers: u32,
        owner: Option<u32>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let refuse = |failure| Action::Reply {
            client,
            outcome: Outcome::Failed(failure),
        };
        if let Some(busy) = self.deploy_busy() {
            return out.push(refuse(busy));
        }
        if workers > crate::config::MAX_WORKERS {
            return out.push(refuse(Failure::TooManyWorkers(workers)));
        }
        // A site's owner may scale up to what its configuration allows; more is root's
        // decision (and the memory cap bounds everyone).
        let allowed = self.config.auto.map_or(self.config.workers, |a| a.max);
        if let Some(uid) = owner.filter(|_| workers > allowed) {
            return out.push(refuse(Failure::BeyondOwnersLimit {
                uid,
                allowed,
                auto: self.config.auto.is_some(),
            }));
        }
        self.requested = workers;
        // A site that follows its load runs what was asked until `scale SITE auto`.
        self.pinned = self.config.auto.is_some_and(|a| a.by_load());
        let cap = self.capacity.filter(|c| c.workers < workers);
        let target = match (self.config.auto, cap) {
            (_, Some(c)) => c.workers.min(workers),
            // Sites sized by memory grow toward the request one worker at a time.
            (Some(a), None) if !a.by_load() => self.current().slots.desired.max(a.min).min(workers),
            _ => workers,
        };
        // Generations still leaving (after a rollback) hold processes in the same budget:
        // the capacity check gives back the rest once they are gone.
        let leaving: u32 = self
            .gens
            .values()
            .filter(|g| g.id != self.serving)
            .map(|g| u32::try_from(g.slots.slots.len()).unwrap_or(u32::MAX))
            .sum();
        let target = match self.capacity {
            Some(c) => target.min(c.workers.saturating_sub(leaving)),
            None => target,
        };
        if let Some(c) = cap {
            out.push(Action::Progress {
                clients: vec![client],
                event: Event::Capped(c),
            });
        }
        let serving = self.serving;
        // A site being stopped settles at nothing: the count applies when it is started.
        if matches!(
            self.current().slots.run,
            RunState::Stopped | RunState::Stopping
        ) {
            self.feed(serving, slots::Input::ScaleRequested(target), now, out);
            return out.push(Action::Reply {
                client,
                outcome: Outcome::Done(Done::WhenStarted(target)),
            });
        }
        self.hold(client, WaitFor::Settled);
        self.feed(serving, slots::Input::ScaleRequested(target), now, out);
        self.reply_if_settled(client, out);
    }

    /// `scale SITE auto`: the count of an automatic site is its policy's again (load
    /// scaling decides at its next sample; a site sized by memory grows toward its cap).
    pub(super) fn scale_auto(&mut self, client: ClientId, now: Instant, out: &mut Vec<Action>) {
        let Some(auto) = self.config.auto else {
            return out.push(Action::Reply {
                client,
                outcome: Outcome::Failed(Failure::NotAutomatic),
            });
        };
        if let Some(busy) = self.deploy_busy() {
            return out.push(Action::Reply {
                client,
                outcome: Outcome::Failed(busy),
            });
        }
        self.requested = auto.max;
        self.pinned = false;
        if self.config.limits.memory.is_some() {
            self.next_capacity_check = Some(now);
        }
        // A pinned count above the bounds comes back within them at once (one below
        // `workers_min` grows at the capacity check, which waits for generations still
        // leaving: their processes hold the same budget).
        let desired = self.current().slots.desired;
        let ceiling = auto.max.min(self.capacity.map_or(u32::MAX, |c| c.workers));
        if auto.by_load() && desired > ceiling {
            let within = ceiling;
            let serving = self.serving;
            self.feed(serving, slots::Input::ScaleRequested(within), now, out);
        }
        out.push(Action::Reply {
            client,
            outcome: Outcome::Done(Done::Automatic {
                by_load: auto.by_load(),
                workers: self.current().slots.desired,
            }),
        });
    }
}

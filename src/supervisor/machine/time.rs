//! What time does to a site: deadlines of its slots, the `tcp` ready probe of starting
//! generations, and the memory cap of a budgeted site re-derived from what its workers
//! really use (automatic sites grow one worker per check, once memory holds still).

use std::time::Instant;

use super::{Action, Event, Observe, SiteMachine};
use crate::supervisor::capacity;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::slots::{self, RunState};

impl SiteMachine {
    pub(super) fn tick(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        // The cap first: slots whose restart is due are then the first removed if it fell,
        // rather than started above it.
        if self.next_capacity_check.is_some_and(|d| d <= now) {
            self.refresh_capacity(obs, now, out);
        }
        if self.next_sample.is_some_and(|d| d <= now) {
            self.sample_load(obs, now, out);
        }
        let due: Vec<GenId> = self
            .gens
            .values()
            .filter(|g| g.slots.next_deadline().is_some_and(|d| d <= now))
            .map(|g| g.id)
            .collect();
        for g in due {
            self.feed(g, slots::Input::DeadlineReached, now, out);
        }
        self.zygote_tick(now, out);
        // The deploy is looked at after every input anyway (see `after`).
        let probing: Vec<GenId> = self.needs_probe().collect();
        for g in probing {
            out.push(Action::Probe(g));
        }
        self.health_tick(now, out);
        self.warmup_tick(now, out);
    }

    /// Re-derives a budgeted site's cap from its workers' measured memory and moves the
    /// desired count toward it (automatic sites grow one worker per check).
    pub(super) fn refresh_capacity(
        &mut self,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(budget) = self.config.limits.memory else {
            return;
        };
        if self.deploy.is_some() || self.gens.len() > 1 {
            // The deploy plan moves workers between generations, and a generation leaving
            // still holds its processes: measure (and grow) once they are gone.
            self.next_capacity_check = Some(now + capacity::SETTLE);
            return;
        }
        let cur = self.current();
        let running: Vec<(Slot, Instant)> = cur
            .slots
            .slots
            .values()
            .filter(|s| s.pid.is_some())
            .filter_map(|s| s.started.map(|t| (s.id, t)))
            .collect();
        let settled: Vec<Slot> = running
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(*t) >= capacity::SETTLE)
            .map(|(s, _)| *s)
            .collect();
        let measured = if settled.is_empty() {
            None
        } else {
            obs.measured_memory(cur.id, &settled)
        };
        let cap = capacity::capacity(
            budget,
            obs.zygote_memory(cur.id).unwrap_or(0),
            self.config.limits.worker_estimate(),
            measured,
            self.requested,
        );
        let desired = cur.slots.desired;
        let newest_settled = settled.len() == running.len();
        // Memory still growing (a worker still warming up) would under-estimate the
        // per-worker figure: only grow once the peak held within 5% since the last check.
        let stable = match (measured, self.last_peak) {
            (Some(now_peak), Some(before)) => now_peak <= before.saturating_add(before / 20),
            // Nothing to measure on this host (no memory controller): once the workers
            // settled, the estimate is all there is, and it does not grow.
            (None, _) => !obs.memory_measurable() && !settled.is_empty(),
            _ => false,
        };
        let core = &cur.slots;
        let settled = newest_settled
            && stable
            && core.slots.len() == desired as usize
            && core.ready() == desired as usize
            && core.run == RunState::Running;
        self.last_peak = measured;
        self.capacity = cap;
        let target = match (self.config.auto, cap) {
            // Load scaling sizes the site; the cap only bounds it (at once when it fell).
            (Some(a), Some(c)) if a.by_load() => {
                let ceiling = c.workers.min(self.requested);
                Some(desired.max(a.min).min(ceiling)).filter(|t| *t != desired)
            }
            (Some(a), Some(c)) => {
                capacity::auto_step(desired, c.workers.min(self.requested), a.min, settled)
            }
            (None, Some(c)) => Some(self.requested.min(c.workers)).filter(|t| *t != desired),
            (_, None) => None,
        };
        let growing = self.config.auto.is_some_and(|a| !a.by_load())
            && cap.is_some_and(|c| desired < c.workers.min(self.requested));
        self.next_capacity_check = Some(
            now + if growing {
                capacity::SETTLE
            } else {
                capacity::SETTLE * 5
            },
        );
        if let Some(t) = target {
            if let Some(capacity) = cap {
                out.push(Action::Log(Event::Resized {
                    from: desired,
                    to: t,
                    capacity,
                }));
            }
            let serving = self.serving;
            self.feed(serving, slots::Input::ScaleRequested(t), now, out);
        }
    }
}

//! Load scaling of an automatic site (`[scale] by = "load"`): when the machine samples
//! its load, and what it does with a decision. The policy itself is
//! [`crate::supervisor::load`].
//!
//! The serving generation is sampled every `scale.interval` while the site runs, nothing
//! pins its count (`scale N` does, until `scale SITE auto`), no deploy is under way and
//! no other generation is left, and there is something to look at: an accept queue (a
//! TCP listener the agent binds), `BUSY` reports, or more workers than `workers_min` (a
//! shrink to wait for). Otherwise nothing wakes the agent for it. A new period starts
//! whenever sampling stops (the counters of another generation, or of a stopped site,
//! say nothing of this one). While every ready worker says it is busy, samples come five
//! times as often: a burst that fills the pool is seen within a fifth of the interval.

use std::time::Instant;

use super::{Action, Event, Observe, SiteMachine};
use crate::config::ListenAddr;
use crate::supervisor::load::{Bounds, Workers};
use crate::supervisor::slots::{self, RunState};

/// How much sooner the next sample comes while the pool is full.
const SATURATED_SOONER: u32 = 5;

impl SiteMachine {
    /// Whether the serving generation's load is sampled now.
    fn load_sampled(&self) -> bool {
        let Some(auto) = self.config.auto.filter(|a| a.by_load()) else {
            return false;
        };
        if self.pinned || self.deploy.is_some() || self.gens.len() > 1 {
            return false;
        }
        let cur = &self.current().slots;
        if cur.run != RunState::Running {
            return false;
        }
        let queue = self
            .config
            .agent_listeners()
            .any(|l| matches!(l.addr, ListenAddr::Tcp(_)));
        queue || cur.busy_reported() || cur.desired > auto.min
    }

    /// Arms or disarms sampling after an input. While every ready worker says it is busy
    /// (a full pool: the next connection waits), the next sample comes after a fifth of
    /// the interval: a burst is seen that much sooner.
    pub(super) fn arm_load(&mut self, now: Instant) {
        let Some(interval) = self.config.auto.map(|a| a.scale.interval) else {
            return;
        };
        if !self.load_sampled() {
            if self.next_sample.take().is_some() {
                self.load.restart_period();
            }
            return;
        }
        let next = *self.next_sample.get_or_insert(now + interval);
        if self.current().slots.saturated() {
            let soon = self
                .load
                .last_sample()
                .map_or(now, |t| t + interval / SATURATED_SOONER)
                .max(now);
            self.next_sample = Some(next.min(soon));
        }
    }

    /// Samples the serving generation's load (due at `next_sample`) and applies the
    /// decision.
    pub(super) fn sample_load(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        let Some(auto) = self.config.auto else {
            return;
        };
        self.next_sample = Some(now + auto.scale.interval);
        let serving = self.serving;
        let cur = &self.current().slots;
        let workers = Workers {
            desired: cur.desired,
            ready: u32::try_from(cur.ready()).unwrap_or(u32::MAX),
            busy: cur.busy_time(now),
        };
        let ceiling = auto
            .max
            .min(self.requested)
            .min(self.capacity.map_or(u32::MAX, |c| c.workers));
        let bounds = Bounds {
            min: auto.min.min(ceiling),
            ceiling,
        };
        let counters = obs.load(serving);
        let Some(decision) = self
            .load
            .sample(&auto.scale, now, counters, workers, bounds)
        else {
            return;
        };
        out.push(Action::Log(Event::LoadScaled {
            decision,
            target_percent: auto.scale.target_percent,
        }));
        self.feed(serving, slots::Input::ScaleRequested(decision.to), now, out);
    }
}

#[cfg(test)]
mod tests;

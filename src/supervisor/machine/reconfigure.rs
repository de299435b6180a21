//! A reload that changed a site: what the new configuration means for what runs.
//!
//! Only `workers` (or `workers_min`, `workers_max`, `[scale]`) changed: the site scales. Anything else: the new policies apply, and
//! the serving generation's workers restart one at a time (a rolling restart, which stops
//! at a worker that does not stay up). A changed `mode` gives the generation a zygote (started
//! by the first spawn that needs it), or stops its zygote; any other change to a zygote-mode
//! site replaces its zygote (the workers the rolling restart starts are forked from one
//! that runs the new configuration). Changed limits are written to the cgroups; with a
//! budget, the cap decides how many of the requested workers run. The loop binds what is
//! new (listeners) before, and refuses the whole reload when any site cannot take it
//! ([`SiteMachine::reconfigure_refusal`]), so nothing here can fail.

use std::time::Instant;

use super::{Action, Failure, Observe, SiteMachine, policies};
use crate::config::SiteConfig;
use crate::supervisor::slots::{self, RunState};

impl SiteMachine {
    /// Why the site cannot take `new` now (a deploy under way, or a generation still
    /// draining), if it cannot.
    pub fn reconfigure_refusal(&self, new: &SiteConfig) -> Option<Failure> {
        if self.config == *new {
            return None;
        }
        if let Some(busy) = self.deploy_busy() {
            return Some(busy);
        }
        (self.gens.len() > 1).then(|| Failure::DeployUnderWay {
            to: self.current().id,
            stage: "draining",
        })
    }

    pub(super) fn reconfigure(
        &mut self,
        config: SiteConfig,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.config == config {
            return;
        }
        // The count and how it is chosen (`workers_min`, `workers_max`, `[scale]`) change
        // no worker's configuration: the site scales, nothing restarts.
        let only_count = SiteConfig {
            workers: self.config.workers,
            auto: self.config.auto,
            ..config.clone()
        } == self.config;
        let limits_changed = self.config.limits != config.limits;
        let mode_changed = self.config.mode != config.mode;
        let workers = config.workers;
        let serving = self.serving;
        if let Some(cur) = self.gens.get_mut(&serving) {
            cur.slots.policies = policies(&config);
            cur.config = match &cur.release {
                Some(r) => config.for_release(r),
                None => config.clone(),
            };
        }
        let to_zygote = config.mode == crate::config::SiteMode::Zygote;
        if mode_changed && to_zygote {
            // Before the count changes: the spawns it asks for wait for the zygote.
            self.mode_changed(serving, now, out);
        } else if !mode_changed && !only_count {
            // The zygote runs the old configuration: workers restarted from now on are
            // forked from one that runs the new one.
            self.replace_zygote(serving, out);
        }
        self.config = config;
        self.requested = workers;
        if self.config.limits.memory.is_some() && self.next_capacity_check.is_none() {
            self.next_capacity_check = Some(now);
        }
        if self.config.limits.memory.is_none() {
            // No budget any more: no cap, and nothing to measure (a check left due would
            // be due for ever: the loop would spin).
            self.capacity = None;
            self.next_capacity_check = None;
            self.last_peak = None;
        }
        if limits_changed {
            out.push(Action::ApplyLimits);
        }
        if self.config.limits.memory.is_some() {
            // The cap decides how many of the requested workers run.
            self.refresh_capacity(obs, now, out);
        } else {
            self.feed(serving, slots::Input::ScaleRequested(workers), now, out);
        }
        // After the cap and the count: the spawns a zygote held and exec mode now carries
        // out are only those of slots still wanted.
        if mode_changed && !to_zygote {
            self.mode_changed(serving, now, out);
        }
        // A site stopped (or stopping) stays so: it runs the new configuration when it is
        // started. (`RestartRequested` would start it: that is `restart` of a stopped site.)
        let running = self
            .gens
            .get(&serving)
            .is_some_and(|g| matches!(g.slots.run, RunState::Running | RunState::Failed));
        if !only_count && running {
            self.feed(serving, slots::Input::RestartRequested, now, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{FULL_BUDGET, Quiet, send, site, spawned};
    use super::*;
    use crate::supervisor::ids::ClientId;
    use crate::supervisor::machine::{CancelReason, Input};

    #[test]
    fn a_reload_leaves_a_stopped_site_stopped() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
        let mut new = m.config().clone();
        new.command = vec!["/bin/false".into()];
        let a = send(&mut m, Input::Reconfigure(Box::new(new.clone())), &Quiet, t);
        assert_eq!(spawned(&a), vec![], "{a:?}");
        // Nor does one whose stop is under way start again.
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        let stop = Input::Stop {
            client: None,
            why: CancelReason::SiteStopped,
        };
        send(&mut m, stop, &Quiet, t);
        new.stop.timeout = Duration::from_secs(1);
        let a = send(&mut m, Input::Reconfigure(Box::new(new)), &Quiet, t);
        assert_eq!(spawned(&a), vec![], "{a:?}");
        assert_eq!(m.current().slots.run, RunState::Stopping);
    }

    #[test]
    fn a_reload_of_the_scale_policy_restarts_no_worker() {
        let t = Instant::now();
        let load = "workers = \"auto\"\nworkers_min = 2\nworkers_max = 8\nmemory = \"1G\"\nworker_memory = \"50M\"\n[[listen]]\ntcp = \"127.0.0.1:8000\"\n[scale]\nby = \"load\"\n";
        let (mut m, _) = SiteMachine::new(site(load), None, None, t);
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        assert_eq!(m.current().slots.desired, 2);
        let mut new = m.config().clone();
        let mut auto = new.auto.expect("auto");
        auto.scale.target_percent = 50;
        auto.min = 3;
        new.auto = Some(auto);
        let a = send(&mut m, Input::Reconfigure(Box::new(new)), &Quiet, t);
        assert!(
            !a.iter()
                .any(|x| matches!(x, crate::supervisor::machine::Action::Signal { .. })),
            "no worker stopped: {a:?}"
        );
        assert_eq!(spawned(&a), vec![(1, 2)], "workers_min 3: one more");
        assert_eq!(m.config().auto.map(|a| a.scale.target_percent), Some(50));
    }

    #[test]
    fn a_reload_without_the_budget_lifts_the_cap_and_its_checks() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
        assert!(m.capacity().is_some());
        let mut new = m.config().clone();
        new.limits.memory = None;
        send(&mut m, Input::Reconfigure(Box::new(new)), &Quiet, t);
        assert_eq!(m.capacity(), None);
        let later = t + Duration::from_secs(20);
        send(&mut m, Input::Tick, &Quiet, later);
        assert!(
            m.next_deadline(later).is_none_or(|d| d > later),
            "a check due for ever: the loop would spin"
        );
    }
}

//! The invariants, checked at every action and after every input.

use std::time::Duration;

use crate::supervisor::deploy::Stage;
use crate::supervisor::ids::GenId;
use crate::supervisor::machine::{CancelReason, Input, ZygotePhase};
use crate::supervisor::slots::{AfterStop, Phase, RunState};

use super::*;

impl Sim {
    pub(super) fn check(&self) -> Step {
        if self.dropped {
            if !self.w.procs.is_empty() {
                return Err("processes left after the site was dropped".into());
            }
            return Ok(());
        }
        let serving = self.m.serving();
        let Some(cur) = self.m.generation(serving) else {
            return Err(format!("the serving generation {serving} does not exist"));
        };
        // A serving generation with a listener shut down is deployed again (or was, or was
        // refused for a reason that holds) once no deploy is under way, unless the site
        // stops or it replaced one.
        let runs = !self.removed
            && matches!(
                cur.slots.run,
                crate::supervisor::slots::RunState::Running
                    | crate::supervisor::slots::RunState::Failed
            );
        let others = self
            .m
            .generations()
            .any(|g| g.id != serving && g.slots.live() > 0);
        if cur.shut.is_some()
            && runs
            && !others
            && self.m.deploy().is_none()
            && !cur.repaired
            && !cur.replaces_shut
        {
            // Refused only for a reason that still holds (the machine checks again at
            // every step; what the reasons read of the world does not change between).
            let now = self.m.deploy_refusal(None, &self.w).or_else(|| {
                self.m
                    .deploy_plan(cur.release.as_deref(), None, &self.w)
                    .err()
            });
            match (&cur.repair_refused, &now) {
                (None, _) => {
                    return Err(format!(
                        "serving {serving} has a listener shut down and was not deployed again"
                    ));
                }
                (Some(was), Some(is))
                    if crate::supervisor::machine::deploy::same_reason(was, is) => {}
                (Some(was), is) => {
                    return Err(format!(
                        "serving {serving} has a listener shut down, refused ({was:?}), which no longer holds ({is:?})"
                    ));
                }
            }
        }
        // A deploy waits in the queue only behind one under way.
        if self.m.queued_deploys() > 0 && self.m.deploy().is_none() {
            return Err(format!(
                "{} deploys queued behind none",
                self.m.queued_deploys()
            ));
        }
        // The machine's processes are the world's.
        for g in self.m.generations() {
            let mut keeping = 0;
            for s in g.slots.slots.values() {
                if !matches!(
                    s.phase,
                    Phase::Stopping {
                        then: AfterStop::Remove,
                        ..
                    }
                ) {
                    keeping += 1;
                }
                let world = self.w.procs.get(&(g.id, s.id));
                let held = g.zygote.as_ref().is_some_and(|z| z.held.contains(&s.id));
                let waits = matches!(s.phase, Phase::Starting { .. }) && s.pid.is_none();
                let zygote_mode = g.config.mode == crate::config::SiteMode::Zygote;
                if held != (waits && zygote_mode) {
                    return Err(format!(
                        "gen {} slot {}: {:?} (pid {:?}), held for the zygote: {held}",
                        g.id, s.id, s.phase, s.pid
                    ));
                }
                match (s.phase.has_process(), world) {
                    (true, Some(p)) if s.pid == Some(p.pid) => {}
                    (true, None) if held => {}
                    (false, None) => {}
                    (has, p) => {
                        return Err(format!(
                            "gen {} slot {}: the machine says {:?} (pid {:?}, process: {has}), \
                             the world has {:?}",
                            g.id,
                            s.id,
                            s.phase,
                            s.pid,
                            p.map(|p| p.pid)
                        ));
                    }
                }
            }
            // A generation that runs leaves no slot at rest: each has a process, or waits
            // for its restart, or failed, or (stopped) waits for a slot on its way out to
            // make room.
            if matches!(g.slots.run, RunState::Running | RunState::Failed) {
                let full = g.slots.live() >= g.slots.desired as usize;
                if let Some(s) = g.slots.slots.values().find(|s| match s.phase {
                    Phase::Stopped => !full,
                    Phase::Stopping {
                        then: AfterStop::Rest,
                        ..
                    } => true,
                    _ => false,
                }) {
                    return Err(format!(
                        "gen {} runs ({:?}) and slot {} is left {:?}",
                        g.id, g.slots.run, s.id, s.phase
                    ));
                }
            }
            if keeping > g.slots.desired as usize {
                return Err(format!(
                    "gen {} keeps {keeping} slots for {} desired",
                    g.id, g.slots.desired
                ));
            }
        }
        // The machine's zygotes are the world's; the world's others were told to stop.
        for g in self.m.generations() {
            let Some(z) = &g.zygote else {
                continue;
            };
            let world = self.w.zygotes.get(&g.id);
            if z.phase.has_process() != world.is_some() {
                return Err(format!(
                    "gen {}: the machine's zygote is {:?}, the world's {world:?}",
                    g.id, z.phase
                ));
            }
            if z.phase == ZygotePhase::Ready && !z.held.is_empty() {
                return Err(format!(
                    "gen {}: zygote ready, spawns held {:?}",
                    g.id, z.held
                ));
            }
            if matches!(z.phase, ZygotePhase::Stopping { .. }) && world.is_some_and(|w| !w.asked) {
                return Err(format!("gen {}: zygote stopping, never told", g.id));
            }
        }
        for (g, z) in &self.w.zygotes {
            let counted = self
                .m
                .generation(*g)
                .and_then(|x| x.zygote.as_ref())
                .is_some_and(|x| x.phase.has_process());
            if !counted && !z.asked {
                return Err(format!("gen {g}: a zygote runs that the machine forgot"));
            }
        }
        for (g, s) in self.w.procs.keys() {
            if self
                .m
                .generation(*g)
                .is_none_or(|x| !x.slots.slots.contains_key(s))
            {
                return Err(format!("gen {g} slot {s} runs, and the machine forgot it"));
            }
        }
        // Serving.
        if cur.leaving {
            return Err(format!("the serving generation {serving} is leaving"));
        }
        // A stop-then-start deploy holds the serving generation stopped until the new one
        // serves (or, rolled back, starts it again).
        let held = self
            .m
            .deploy()
            .is_some_and(|d| d.exclusive.is_some_and(|x| x.old_stopped))
            || self.m.start_deferred();
        if self.up && !held && !matches!(cur.slots.run, RunState::Running | RunState::Failed) {
            return Err(format!(
                "the serving generation {serving} is {:?}, and no client stopped the site",
                cur.slots.run
            ));
        }
        if self.w.steered != serving {
            return Err(format!(
                "connections go to generation {}, the machine serves {serving}",
                self.w.steered
            ));
        }
        let deploy = self.m.deploy();
        for g in self.m.generations() {
            let ours = deploy.is_some_and(|d| d.from == g.id || d.to == g.id);
            if g.id != serving && !g.leaving && !ours {
                return Err(format!(
                    "generation {} neither serves, nor is deployed, nor leaves",
                    g.id
                ));
            }
            if g.leaving && g.slots.run == RunState::Stopped {
                return Err(format!("generation {} left and stopped, not retired", g.id));
            }
        }
        match deploy {
            Some(d) => {
                let slots = |g: GenId| self.m.generation(g).map_or(0, |x| x.slots.slots.len());
                // A canary is steered to only while it is one.
                let canary = d.canary.filter(|c| c.steered).map(|_| d.to);
                if self.w.canary.is_some() && self.w.canary != canary {
                    return Err(format!(
                        "the canary entry names {:?}, the deploy's canary is {canary:?}",
                        self.w.canary
                    ));
                }
                if matches!(
                    d.stage,
                    Stage::Starting | Stage::Probation { .. } | Stage::Canary
                ) {
                    if d.from != serving {
                        return Err(format!("generation {} serves before the flip", serving));
                    }
                    let old = self.m.generation(d.from).map_or(0, |x| x.slots.desired);
                    if old == 0 {
                        return Err(format!(
                            "generation {} has no worker before the flip",
                            d.from
                        ));
                    }
                }
                // The deploy adds no slot beyond its cap. (The old generation may hold more
                // when it begins: slots still stopping after the cap fell.)
                if let Some(cap) = d.cap {
                    // Stop-then-start: the old generation's slots are at rest, their
                    // processes gone, before the new one has any.
                    let old = if d.exclusive.is_some() {
                        self.m.generation(d.from).map_or(0, |x| x.slots.live())
                    } else {
                        slots(d.from)
                    };
                    let used = old + slots(d.to);
                    if slots(d.to) > 0 && used > cap as usize {
                        let phases = |g: GenId| {
                            self.m.generation(g).map(|x| {
                                x.slots
                                    .slots
                                    .values()
                                    .map(|s| s.phase.name())
                                    .collect::<Vec<_>>()
                            })
                        };
                        return Err(format!(
                            "the deploy uses {used} slots for a cap of {cap}: old {:?}, new {:?}",
                            phases(d.from),
                            phases(d.to)
                        ));
                    }
                }
            }
            None => {
                if let Some(g) = self.w.canary {
                    return Err(format!("the canary entry names {g}, and no deploy runs"));
                }
                if let Some(c) = self.m.capacity() {
                    if cur.slots.desired > c.workers {
                        return Err(format!(
                            "the serving generation wants {} workers, the capacity is {}",
                            cur.slots.desired, c.workers
                        ));
                    }
                }
                // Load scaling stays within workers_max (a pin by `scale` is the
                // operator's).
                if let Some(a) = self.cfg.auto.filter(|a| a.by_load()) {
                    if !self.m.pinned() && cur.slots.desired > a.max {
                        return Err(format!(
                            "load scaling wants {} workers, workers_max is {}",
                            cur.slots.desired, a.max
                        ));
                    }
                }
            }
        }
        if self.m.is_stopped() && !self.w.procs.is_empty() {
            return Err("every generation is stopped, and processes run".into());
        }
        Ok(())
    }

    /// Stops the site (unless it was removed), lets time run until nothing is left, and
    /// checks that every client was answered.
    pub(super) fn finish(&mut self) -> Step {
        if !self.dropped && !self.removed {
            self.up = false;
            self.epoch += 1;
            if self.rng.chance(70) {
                let c = self.client("final stop");
                self.feed(Input::Stop {
                    client: Some(c),
                    why: CancelReason::SiteStopped,
                })?;
            } else {
                self.feed(Input::Stop {
                    client: None,
                    why: CancelReason::AgentStopping,
                })?;
            }
            self.check()?;
        }
        for _ in 0..100 {
            if self.dropped || (self.w.procs.is_empty() && self.m.is_stopped()) {
                break;
            }
            self.advance(Duration::from_secs(10), true)?;
            self.check()?;
        }
        // Some more time, for anything that waits for it.
        self.advance(Duration::from_secs(600), false)?;
        self.check()?;
        if !self.w.procs.is_empty() {
            return Err(format!(
                "the stop did not end: {:?} still run",
                self.w.procs.keys().collect::<Vec<_>>()
            ));
        }
        if !self.w.zygotes.is_empty() {
            return Err(format!("zygotes outlived the stop: {:?}", self.w.zygotes));
        }
        if !self.dropped {
            if !self.m.is_stopped() {
                return Err("the stop did not end: a generation is not stopped".into());
            }
            if self.m.deploy().is_some() || self.m.queued_deploys() > 0 {
                return Err("a deploy outlived the stop".into());
            }
        }
        let waiting: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, a)| !a.answered && !a.gone)
            .map(|(c, a)| format!("{c:?} ({}, asked at step {})", a.what, a.step))
            .collect();
        if !waiting.is_empty() {
            return Err(format!("clients never answered: {}", waiting.join(", ")));
        }
        Ok(())
    }

    pub(super) fn run(&mut self, steps: u64) -> Step {
        if self.rng.chance(90) {
            let c = self.client("start");
            self.epoch += 1;
            self.up = true;
            self.feed(Input::Start(Some(c)))?;
            self.check()?;
        }
        for i in 0..steps {
            self.step = usize::try_from(i).expect("few steps") + 1;
            STEP.set(self.step);
            if self.trace {
                eprintln!("step {}", self.step);
            }
            self.one_step()?;
            self.check()?;
        }
        self.step += 1;
        STEP.set(self.step);
        if self.trace {
            eprintln!("step {}: calm", self.step);
        }
        self.calm()?;
        if self.trace {
            eprintln!("step {}: final stop", self.step);
        }
        self.finish()
    }

    /// The world stops misbehaving and time runs: a site that settles then, with no deploy
    /// left, has answered every client (a stop a start superseded included).
    pub(super) fn calm(&mut self) -> Step {
        self.w.calm = true;
        self.w.spawn_fails = 0;
        for p in self.w.procs.values_mut() {
            p.crash_at = None;
        }
        for z in self.w.zygotes.values_mut() {
            if !z.asked {
                z.exit_at = None;
            }
        }
        // A minute, woken once a second (late for most deadlines, which the machine
        // must take in its stride; smooth wake-ups are the rest of the sequence's).
        for _ in 0..60 {
            self.advance(Duration::from_secs(1), false)?;
            self.check()?;
        }
        if self.dropped || self.m.deploy().is_some() || self.m.queued_deploys() > 0 {
            return Ok(());
        }
        let cur = self.m.current();
        if !cur.slots.is_settled() || cur.slots.is_restarting() {
            return Ok(());
        }
        let waiting: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, a)| !a.answered && !a.gone)
            .map(|(c, a)| format!("{c:?} ({}, asked at step {})", a.what, a.step))
            .collect();
        if !waiting.is_empty() {
            return Err(format!(
                "the site settled, and clients still wait: {}",
                waiting.join(", ")
            ));
        }
        Ok(())
    }
}

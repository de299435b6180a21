//! Deploys by generations, as the site machine runs them: asked for, queued (FIFO, one at
//! a time), started beside the serving generation, moved on by the pure plan of
//! [`crate::supervisor::deploy::decide`] after every input, and ended (done, rolled back,
//! steered back, cancelled). See that module for the stages.
//!
//! `rollback`: a deploy still starting or in probation is rolled back; a generation still
//! draining (not yet told to stop) is steered back to and serves again; otherwise the
//! previous release is deployed.
//!
//! A site whose app binds a port itself (`[[listen]] mode = "own"`) deploys by
//! stop-then-start ([`crate::supervisor::deploy::decide_exclusive`]): its generations
//! share the agent's listeners (if any), the ready probe connects to the app's port
//! directly (there is only one generation to reach), and a rollback waits until the new
//! generation is gone before the old one starts again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    Action, CancelReason, Done, Event, Failure, Generation, Observe, Outcome, RollbackReason,
    ShutAnswer, SiteMachine, Steering,
};
use crate::supervisor::deploy::{
    Exclusive, Failure as PlanFailure, GenView, Share, Stage, Step, View, decide,
};
use crate::supervisor::ids::{ClientId, GenId};
use crate::supervisor::slots::{self, RunState};

/// How often a draining generation's accept queues are looked at.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);

/// A deploy under way.
#[derive(Debug, Clone)]
pub struct DeployState {
    /// The generation that served when it began.
    pub from: GenId,
    /// The new generation.
    pub to: GenId,
    /// Where it is.
    pub stage: Stage,
    /// The release deployed.
    pub release: Option<PathBuf>,
    /// When it began.
    pub started: Instant,
    /// When the new generation must be ready by.
    pub ready_deadline: Instant,
    /// Workers the new generation ends up with.
    pub target: u32,
    /// Most workers of both generations together.
    pub cap: Option<u32>,
    /// Clients waiting for the outcome.
    pub clients: Vec<ClientId>,
    /// Whether it returns to the previous release.
    pub rollback: bool,
    /// `CLOCK_MONOTONIC` around the flip.
    pub flip_window: Option<[u64; 2]>,
    /// A canary deploy.
    pub canary: Option<CanaryState>,
    /// The new generation's crashes when it was promoted (the plan counts those after).
    pub crash_base: u32,
    /// The warm-up under way (`deploy.warmup`): when it began, and when it is given up.
    pub warmup: Option<(Instant, Instant)>,
    /// A stop-then-start deploy (the app binds a port itself): where it is.
    pub exclusive: Option<Exclusive>,
    /// Stop-then-start: why the new generation is being stopped (taken when it failed,
    /// while its workers' exits are known).
    pub exclusive_failure: Option<RollbackReason>,
}

/// How often a warm-up under way is looked at.
pub const WARMUP_INTERVAL: Duration = Duration::from_millis(10);

/// What a warm-up did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupReport {
    /// Workers that answered every warm-up request.
    pub warmed: u32,
    /// Workers of the generation.
    pub of: u32,
    /// Warm-up requests answered in all.
    pub answered: u32,
}

/// A canary deploy: the new generation serves its share beside the old one until it is
/// promoted or rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryState {
    /// Its share of new connections.
    pub share: Share,
    /// Workers it grows to when promoted.
    pub full_target: u32,
    /// Whether the steering program sends it its share.
    pub steered: bool,
    /// Whether it was promoted.
    pub promoted: bool,
}

/// A deploy waiting for the one under way.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    client: ClientId,
    release: Option<PathBuf>,
    canary: Option<Share>,
    rollback: bool,
}

/// What a deploy would start with ([`SiteMachine::deploy_plan`]).
pub(super) struct DeployPlan {
    /// The release, resolved.
    resolved: Option<PathBuf>,
    /// The serving generation's workers.
    full: u32,
    /// The new generation's.
    target: u32,
    /// Most workers of both generations together.
    cap: Option<u32>,
    /// Stop-then-start.
    exclusive: bool,
}

/// What a finished deploy did: the site's `last_deploy`, with the time it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployEnd {
    /// How it ended.
    pub result: crate::status::DeployResult,
    /// The generation it started from.
    pub from: GenId,
    /// The generation it started.
    pub to: GenId,
    /// The release it deployed.
    pub release: Option<PathBuf>,
    /// Why it was rolled back.
    pub reason: Option<RollbackReason>,
    /// How long it took, when it went through.
    pub took: Option<Duration>,
    /// When it ended.
    pub finished: Instant,
    /// `CLOCK_MONOTONIC` around the flip (or the flip back).
    pub flip_window: Option<[u64; 2]>,
    /// Whether the old generation had been flipped from and serves again.
    pub steered_back: bool,
}

impl SiteMachine {
    /// When the deploy needs looking at again without any other input.
    pub(super) fn deploy_deadline(&self, now: Instant) -> Option<Instant> {
        let d = self.deploy.as_ref()?;
        // Stop-then-start: while a generation stops, only its exits move the deploy on;
        // the new one's `ready.timeout` counts from its start.
        if let Some(x) = d.exclusive {
            let started = self.gens.get(&d.to).is_some_and(|g| g.slots.desired > 0);
            if x.failed.is_some() || (d.stage == Stage::Starting && !started) {
                return None;
            }
        }
        let warmup = d
            .warmup
            .map(|(_, give_up)| give_up.min(now + WARMUP_INTERVAL));
        let stage = match d.stage {
            Stage::Starting => Some(d.ready_deadline),
            // Past its end, the probation waits for the warm-up alone.
            Stage::Probation { until } => (until > now).then_some(until),
            Stage::Draining {
                until,
                stopping: false,
            } => Some(until.min(now + DRAIN_POLL)),
            Stage::Canary | Stage::Draining { stopping: true, .. } => None,
        };
        [stage, warmup].into_iter().flatten().min()
    }

    /// Looks at the warm-up under way (at every tick), giving it up once its time is up.
    pub(super) fn warmup_tick(&self, now: Instant, out: &mut Vec<Action>) {
        if let Some(d) = self.deploy.as_ref() {
            if let Some((_, give_up)) = d.warmup {
                out.push(Action::WarmUp {
                    generation: d.to,
                    give_up: now >= give_up,
                });
            }
        }
    }

    /// The warm-up of a new generation ended: what it did is said, and the flip may come.
    pub(super) fn warmed_up(
        &mut self,
        g: GenId,
        report: WarmupReport,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(d) = self.deploy.as_mut().filter(|d| d.to == g) else {
            return;
        };
        let Some((started, _)) = d.warmup.take() else {
            return;
        };
        let event = Event::WarmedUp {
            generation: g,
            report,
            requests: self.gens.get(&g).map_or(0, |x| {
                u32::try_from(x.config.warmup.len()).unwrap_or(u32::MAX)
            }),
            took: now.saturating_duration_since(started),
        };
        out.push(Action::Log(event.clone()));
        self.deploy_progress(event, out);
    }

    /// Refused while a deploy runs: operations that would fight it.
    pub(super) fn deploy_busy(&self) -> Option<Failure> {
        let d = self.deploy.as_ref()?;
        Some(Failure::DeployUnderWay {
            to: d.to,
            stage: d.stage.name(),
        })
    }

    fn deploy_clients(&self) -> Vec<ClientId> {
        self.deploy
            .as_ref()
            .map(|d| d.clients.clone())
            .unwrap_or_default()
    }

    /// Tells the deploy's clients.
    pub(super) fn deploy_progress(&self, event: Event, out: &mut Vec<Action>) {
        let clients = self.deploy_clients();
        if !clients.is_empty() {
            out.push(Action::Progress { clients, event });
        }
    }

    /// A step of the deploy: in the site's history (the agent's log, the site's log, the
    /// event history) and to the clients that wait.
    pub(super) fn deploy_step(&self, event: Event, out: &mut Vec<Action>) {
        out.push(Action::Log(event.clone()));
        self.deploy_progress(event, out);
    }

    /// `deploy`: start one now, or queue it behind the one under way.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn request_deploy(
        &mut self,
        client: ClientId,
        release: Option<PathBuf>,
        canary: Option<Share>,
        rollback: bool,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let refuse = |failure| Action::Reply {
            client,
            outcome: Outcome::Failed(failure),
        };
        if let Some(failure) = self.deploy_refusal(canary, obs) {
            return out.push(refuse(failure));
        }
        // A site being stopped is refused too: its new generation would start workers the
        // stop does not reach, and serve once it flipped.
        if self.removing
            || matches!(
                self.current().slots.run,
                RunState::Stopped | RunState::Stopping
            )
        {
            return out.push(refuse(Failure::Stopped));
        }
        if let Some(d) = &self.deploy {
            let event = Event::DeployQueued {
                behind: d.to,
                ahead: self.queued.len() + 1,
            };
            self.queued.push_back(Queued {
                client,
                release,
                canary,
                rollback,
            });
            return out.push(Action::Progress {
                clients: vec![client],
                event,
            });
        }
        self.start_deploy(Some(client), release, canary, rollback, obs, now, out);
    }

    /// Why a deploy (with a `canary` share, if one) cannot be run here, if it cannot: a
    /// canary, a warm-up, and a `tcp` or `http` ready check beside the serving generation
    /// need connections steered to the new generation alone.
    pub(super) fn deploy_refusal(
        &self,
        canary: Option<Share>,
        obs: &dyn Observe,
    ) -> Option<Failure> {
        let alone = || obs.probe_alone().err();
        if canary.is_some() {
            if let Some(why) = alone() {
                return Some(Failure::CanaryNeedsSteering(why));
            }
        }
        if !self.config.warmup.is_empty() {
            if let Some(why) = alone() {
                return Some(Failure::WarmupNeedsSteering(why));
            }
        }
        // Stop-then-start deploys probe the only generation there is: no steering needed.
        if self.config.ready.check.probes() && !self.config.exclusive_deploys() {
            if let Some(why) = alone() {
                return Some(Failure::ProbeNeedsSteering {
                    check: self.config.ready.check,
                    why,
                });
            }
        }
        None
    }

    /// `rollback`: undo the deploy under way, steer back to a draining generation, or
    /// deploy the previous release.
    pub(super) fn request_rollback(
        &mut self,
        client: ClientId,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match self.deploy.as_ref().map(|d| (d.stage, d.from, d.to)) {
            Some((Stage::Starting | Stage::Probation { .. }, from, to))
                if self.deploy.as_ref().is_some_and(|d| d.exclusive.is_some()) =>
            {
                // The old generation starts again once the new one is gone.
                self.stop_new_first(PlanFailure::Asked, RollbackReason::OnRequest(to), out);
                self.feed(to, slots::Input::StopRequested, now, out);
                out.push(Action::Reply {
                    client,
                    outcome: Outcome::Done(Done::RolledBack { from, to }),
                });
            }
            Some((Stage::Starting | Stage::Probation { .. } | Stage::Canary, from, to)) => {
                self.roll_back(RollbackReason::OnRequest(to), now, out);
                out.push(Action::Reply {
                    client,
                    outcome: Outcome::Done(Done::RolledBack { from, to }),
                });
            }
            Some((
                Stage::Draining {
                    stopping: false, ..
                },
                from,
                to,
            )) => {
                self.steer_back(RollbackReason::OnRequest(to), now, out);
                out.push(Action::Reply {
                    client,
                    outcome: Outcome::Done(Done::SteeredBack { from, to }),
                });
            }
            _ => match self.previous_release.clone() {
                Some(p) => self.request_deploy(client, Some(p), None, true, obs, now, out),
                None => out.push(Action::Reply {
                    client,
                    outcome: Outcome::Failed(Failure::NoPreviousRelease),
                }),
            },
        }
    }

    /// A listener of generation `g` no longer accepts connections (a worker shut it down,
    /// which closes the socket for every process holding it: restarts keep it). The
    /// generation is marked; the serving one's release is deployed again, as a new
    /// generation with new listeners ([`SiteMachine::repair_shut`]), now or once it serves
    /// with no deploy under way and is not stopped, unless it was itself deployed for that
    /// (the release shuts its listeners down: an operator's deploy of a fixed one is
    /// needed). Said in every case.
    pub(super) fn listener_shut(
        &mut self,
        g: GenId,
        listener: String,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let serving = self.serving;
        let deploy_to = self.deploy.as_ref().map(|d| d.to);
        let older = self.gens.values().any(|x| x.id != g && x.slots.live() > 0);
        let Some(generation) = self.gens.get_mut(&g) else {
            return;
        };
        generation.shut.get_or_insert_with(|| listener.clone());
        let stopping =
            self.removing || matches!(generation.slots.run, RunState::Stopped | RunState::Stopping);
        let answer = if generation.replaces_shut {
            // Serving, or about to.
            generation.repaired = true;
            ShutAnswer::Again
        } else if g != serving || generation.leaving {
            ShutAnswer::NotServing
        } else if let Some(to) = deploy_to {
            if to == g {
                ShutAnswer::AfterDeploy
            } else {
                ShutAnswer::DeployUnderWay(to)
            }
        } else if stopping {
            ShutAnswer::Stopped
        } else if older {
            ShutAnswer::AfterOlder
        } else {
            // At once: said before the deploy's own steps.
            let before = out.len();
            self.repair_shut(obs, now, out);
            if out.len() > before {
                return;
            }
            // Nothing new said there: refused as before, or deployed again for a shutdown
            // already.
            match self.gens.get(&g).and_then(|x| x.repair_refused.clone()) {
                Some(failure) => ShutAnswer::Refused(failure),
                None => ShutAnswer::Tried,
            }
        };
        out.push(Action::Log(Event::ListenerShut {
            generation: g,
            listener,
            answer,
        }));
    }

    /// The serving generation's listener was shut down, no deploy is under way, no other
    /// generation has a process left (one adopted from an earlier agent may still hold the
    /// address), the site runs, and its release was not deployed again for it yet: it is
    /// (a deploy with no client, refused where an operator's would be), and said.
    pub(super) fn repair_shut(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        let g = self.serving;
        let Some(generation) = self.gens.get(&g) else {
            return;
        };
        if generation.shut.is_none() || generation.repaired || generation.replaces_shut {
            return;
        }
        let stopping =
            self.removing || matches!(generation.slots.run, RunState::Stopped | RunState::Stopping);
        let others = self.gens.values().any(|x| x.id != g && x.slots.live() > 0);
        if self.deploy.is_some() || stopping || others {
            // What was said since is what holds: a refusal found again once this passes
            // is said again.
            if let Some(x) = self.gens.get_mut(&g) {
                x.repair_refused = None;
            }
            return;
        }
        let listener = generation.shut.clone().unwrap_or_default();
        let release = generation.release.clone();
        // Refused for a reason that may pass (no workers, no room, a release that does not
        // resolve, no steering): checked again at every step, said again only when the
        // reason changes.
        let plan = match self.deploy_refusal(None, obs) {
            Some(refused) => Err(refused),
            None => self.deploy_plan(release.as_deref(), None, obs),
        };
        let answer = match plan {
            Err(refused) => {
                let before = generation.repair_refused.as_ref();
                if before.is_some_and(|b| same_reason(b, &refused)) {
                    return;
                }
                if let Some(x) = self.gens.get_mut(&g) {
                    x.repair_refused = Some(refused.clone());
                }
                ShutAnswer::Refused(refused)
            }
            Ok(plan) => {
                if let Some(x) = self.gens.get_mut(&g) {
                    x.repaired = true;
                    x.repair_refused = None;
                }
                self.start_planned(plan, None, None, false, now, out);
                let to = self.last_gen;
                if let Some(new) = self.gens.get_mut(&to) {
                    new.replaces_shut = true;
                }
                ShutAnswer::Redeploy(to)
            }
        };
        // Before the deploy's own steps.
        let event = Event::ListenerShut {
            generation: g,
            listener,
            answer,
        };
        let at = out
            .iter()
            .position(|a| matches!(a, Action::BindListeners(_)))
            .unwrap_or(out.len());
        out.insert(at, Action::Log(event));
    }

    /// What a deploy of `release` (or of what the site's `release` names now) would start
    /// with, or why it cannot start: the site has no workers to deploy, no room for two
    /// generations where it needs it, or the release does not resolve. The release is
    /// looked at last: a repair refused for the others checks again at every step of its
    /// site, with no I/O.
    pub(super) fn deploy_plan(
        &self,
        release: Option<&Path>,
        canary: Option<Share>,
        obs: &dyn Observe,
    ) -> Result<DeployPlan, Failure> {
        let full = self.current().slots.desired;
        if full == 0 {
            return Err(Failure::NoWorkers);
        }
        let cap = self
            .capacity
            .map(|c| c.workers)
            .or(self.config.auto.map(|a| a.max));
        // Stop-then-start needs room for one generation only.
        let exclusive = self.config.exclusive_deploys();
        if let Some(c) = cap.filter(|c| *c < 2 && !exclusive) {
            return Err(Failure::NoRoom(c));
        }
        let resolved = obs
            .resolve_release(&self.config, release)
            .map_err(Failure::CannotDeploy)?;
        Ok(DeployPlan {
            resolved,
            full,
            target: canary.map_or(full, |s| s.workers_of(full)),
            cap,
            exclusive,
        })
    }

    /// Starts a deploy: resolves the release, then has the new generation's listeners
    /// bound ([`Action::BindListeners`]); [`SiteMachine::listeners_bound`] goes on. Returns
    /// why it could not start, if it could not (its client was told).
    #[allow(clippy::too_many_arguments)]
    fn start_deploy(
        &mut self,
        client: Option<ClientId>,
        release: Option<PathBuf>,
        canary: Option<Share>,
        rollback: bool,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<Failure> {
        match self.deploy_plan(release.as_deref(), canary, obs) {
            Ok(plan) => {
                self.start_planned(plan, client, canary, rollback, now, out);
                None
            }
            Err(failure) => {
                if let Some(c) = client {
                    out.push(Action::Reply {
                        client: c,
                        outcome: Outcome::Failed(failure.clone()),
                    });
                }
                self.next_queued(obs, now, out);
                Some(failure)
            }
        }
    }

    /// [`SiteMachine::start_deploy`] once its checks passed (`plan`).
    fn start_planned(
        &mut self,
        plan: DeployPlan,
        client: Option<ClientId>,
        canary: Option<Share>,
        rollback: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let DeployPlan {
            resolved,
            full,
            target,
            cap,
            exclusive,
        } = plan;
        let clients: Vec<ClientId> = client.into_iter().collect();
        let from = self.serving;
        let to = self.last_gen.next();
        let config = match &resolved {
            Some(r) => self.config.for_release(r),
            None => self.config.clone(),
        };
        self.last_gen = to;
        self.gens
            .insert(to, Generation::new(to, resolved.clone(), config.clone(), 0));
        self.deploy = Some(DeployState {
            from,
            to,
            stage: Stage::Starting,
            release: resolved,
            started: now,
            ready_deadline: now + config.ready.timeout,
            target,
            cap,
            clients,
            rollback,
            flip_window: None,
            canary: canary.map(|share| CanaryState {
                share,
                full_target: full,
                steered: false,
                promoted: false,
            }),
            crash_base: 0,
            warmup: None,
            exclusive: exclusive.then(Exclusive::default),
            exclusive_failure: None,
        });
        out.push(Action::BindListeners(to));
    }

    /// The new generation's listeners are bound (it starts), or could not be (the deploy
    /// ends before it began).
    pub(super) fn listeners_bound(
        &mut self,
        g: GenId,
        result: Result<(), String>,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(d) = self.deploy.as_ref().filter(|d| d.to == g) else {
            return;
        };
        match result {
            Ok(()) => {
                let event = if d.exclusive.is_some() {
                    Event::StopThenStart {
                        to: g,
                        from: d.from,
                        release: d.release.clone(),
                        own: self.config.own_ports(),
                    }
                } else {
                    Event::DeployBegins {
                        to: g,
                        from: d.from,
                        release: d.release.clone(),
                        target: d.target,
                        cap: d.cap,
                    }
                };
                out.push(Action::Log(event.clone()));
                self.deploy_progress(event, out);
                self.feed(g, slots::Input::StartRequested, now, out);
            }
            Err(e) => {
                // Never started: its number is not used.
                let d = self.deploy.take().expect("checked above");
                let repair = self.gens.remove(&g).is_some_and(|x| x.replaces_shut);
                self.last_gen = d.from.max(GenId(g.0 - 1));
                // A deploy for a listener shut down has no client to tell.
                let shut = self.gens.get(&d.from).and_then(|x| x.shut.clone());
                if let Some(listener) = shut.filter(|_| repair) {
                    out.push(Action::Log(Event::ListenerShut {
                        generation: d.from,
                        listener,
                        answer: ShutAnswer::NotRedeployed(Failure::CannotDeploy(e.clone())),
                    }));
                }
                for c in d.clients {
                    out.push(Action::Reply {
                        client: c,
                        outcome: Outcome::Failed(Failure::CannotDeploy(e.clone())),
                    });
                }
                self.next_queued(obs, now, out);
            }
        }
    }

    fn view(&self, obs: &dyn Observe, now: Instant) -> Option<View> {
        let d = self.deploy.as_ref()?;
        let gen_view = |g: GenId| {
            self.gens
                .get(&g)
                .map(|x| GenView {
                    desired: x.slots.desired,
                    slots: count(x.slots.slots.len()),
                    ready: count(x.slots.ready()),
                    live: count(x.slots.live()),
                    crashes: if g == d.to {
                        x.crashes.saturating_sub(d.crash_base)
                    } else {
                        x.crashes
                    },
                })
                .unwrap_or_default()
        };
        // Generations still on their way out (a deploy rolled back just before this one)
        // hold processes too: they count against the cap with the old generation's.
        let mut old = gen_view(d.from);
        let mut new = gen_view(d.to);
        // Stop-then-start: what a generation's workers left behind may hold the port until
        // it is gone, so it counts as a process.
        if d.exclusive.is_some() {
            for (g, v) in [(d.from, &mut old), (d.to, &mut new)] {
                if obs.leftovers(g) {
                    v.live = v.live.max(1);
                }
            }
        }
        for g in self
            .gens
            .values()
            .filter(|g| g.id != d.from && g.id != d.to)
        {
            old.slots += count(g.slots.slots.len());
        }
        Some(View {
            stage: d.stage,
            now,
            ready_deadline: d.ready_deadline,
            target: d.target,
            cap: d.cap,
            old,
            new,
            old_queues_empty: obs.queues_empty(d.from, d.to),
            warming: d.warmup.is_some(),
            canary: d
                .canary
                .filter(|c| !c.promoted)
                .map(|_| self.config.deploy.canary_abort_crashes),
            exclusive: d.exclusive,
        })
    }

    /// Asks the plan what to do until it says wait. Every step changes what the plan
    /// sees (a count asked for, a stage), so this ends.
    pub(super) fn advance_deploy(
        &mut self,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        while let Some(view) = self.view(obs, now) {
            let (from, to, canary) = {
                let d = self.deploy.as_ref().expect("viewed above");
                (d.from, d.to, d.canary)
            };
            // Nothing moves before the result the plan waits for is in, whatever else is fed
            // back meanwhile (a spawn asked for in the same breath): the new generation's
            // listeners bound (it is started then: a count asked of it before has no slot to
            // show for it, so the plan would grow it past the cap, and the old generation
            // would stay shrunk if the bind fails); the steering flipped (it serves then: a
            // deploy done before would leave the retired generation serving).
            let waiting = match view.stage {
                // (A stop-then-start deploy whose new generation failed waits for it to
                // stop, which the plan sees.)
                Stage::Starting if view.exclusive.is_some_and(|x| x.failed.is_some()) => false,
                Stage::Starting => self
                    .gens
                    .get(&to)
                    .is_some_and(|g| g.slots.run == RunState::Stopped),
                Stage::Probation { .. } => false,
                // The canary's steering set (`CanarySteered`).
                Stage::Canary => !canary.is_some_and(|c| c.steered),
                Stage::Draining { .. } => self.serving != to,
            };
            if waiting {
                break;
            }
            match decide(&view) {
                Step::Wait => break,
                Step::ScaleNew(n) => {
                    // Stop-then-start: `ready.timeout` counts from the new start.
                    let timeout = self.gens.get(&to).map(|g| g.config.ready.timeout);
                    if let (Some(d), Some(t)) = (self.deploy.as_mut(), timeout) {
                        if d.exclusive.is_some() && view.new.desired == 0 {
                            d.ready_deadline = now + t;
                        }
                    }
                    self.deploy_step(
                        Event::NewGrows {
                            generation: to,
                            workers: n,
                            target: view.target,
                        },
                        out,
                    );
                    self.feed(to, slots::Input::ScaleRequested(n), now, out);
                }
                Step::ScaleOld(n) => {
                    self.deploy_step(
                        Event::OldShrinks {
                            generation: from,
                            workers: n,
                            for_generation: to,
                        },
                        out,
                    );
                    self.feed(from, slots::Input::ScaleRequested(n), now, out);
                }
                Step::BeginProbation => {
                    let period = self.config.deploy.probation;
                    let warmup = self
                        .gens
                        .get(&to)
                        .filter(|g| !g.config.warmup.is_empty())
                        .map(|g| (now, now + g.config.ready.timeout));
                    if let Some(d) = self.deploy.as_mut() {
                        d.stage = Stage::Probation {
                            until: now + period,
                        };
                        d.warmup = warmup;
                    }
                    if warmup.is_some() {
                        out.push(Action::WarmUp {
                            generation: to,
                            give_up: false,
                        });
                    }
                    self.deploy_step(
                        Event::ProbationBegins {
                            generation: to,
                            ready: view.new.ready,
                            period,
                        },
                        out,
                    );
                }
                Step::Flip => {
                    let stop_timeout = self.config.stop.timeout;
                    if let Some(d) = self.deploy.as_mut() {
                        d.stage = Stage::Draining {
                            until: now + stop_timeout,
                            stopping: false,
                        };
                    }
                    // The loop flips the steering at once and answers `Steered`.
                    out.push(Action::Steer(to));
                    return;
                }
                Step::BeginCanary => {
                    let Some(c) = canary else {
                        return;
                    };
                    if let Some(d) = self.deploy.as_mut() {
                        d.stage = Stage::Canary;
                    }
                    // The loop sets the steering at once and answers `CanarySteered`.
                    out.push(Action::Canary {
                        generation: to,
                        share: Some(c.share),
                    });
                    return;
                }
                Step::StopOld if view.exclusive.is_some() => {
                    // Not leaving: it starts again if the new generation fails.
                    if let Some(x) = self.deploy.as_mut().and_then(|d| d.exclusive.as_mut()) {
                        x.old_stopped = true;
                    }
                    // Its rolling restart ends with the stop: a client waiting for it waits
                    // for the site to settle, on whichever generation serves then.
                    for w in &mut self.waiters {
                        if w.until == super::WaitFor::RestartDone {
                            w.until = super::WaitFor::Settled;
                        }
                    }
                    let event = Event::OldStopsFirst {
                        generation: from,
                        for_generation: to,
                    };
                    out.push(Action::Log(event.clone()));
                    self.deploy_progress(event, out);
                    self.feed(from, slots::Input::StopRequested, now, out);
                }
                Step::StopNew(why) => {
                    let reason = self.rollback_reason(to, why, false);
                    self.stop_new_first(why, reason, out);
                    self.feed(to, slots::Input::StopRequested, now, out);
                }
                Step::StopOld => {
                    if let Some(d) = self.deploy.as_mut() {
                        if let Stage::Draining { until, .. } = d.stage {
                            d.stage = Stage::Draining {
                                until,
                                stopping: true,
                            };
                        }
                    }
                    if let Some(old) = self.gens.get_mut(&from) {
                        old.leaving = true;
                    }
                    self.deploy_step(
                        Event::OldStops {
                            generation: from,
                            drained: view.old_queues_empty,
                        },
                        out,
                    );
                    self.feed(from, slots::Input::StopRequested, now, out);
                }
                Step::Done => {
                    self.finish_deploy(true, now, out);
                    self.next_queued(obs, now, out);
                    return;
                }
                Step::RollBack(why) => {
                    let reason = match self
                        .deploy
                        .as_ref()
                        .and_then(|d| d.exclusive_failure.clone())
                    {
                        Some(r) => r,
                        None => self.rollback_reason(to, why, false),
                    };
                    self.roll_back(reason, now, out);
                    self.next_queued(obs, now, out);
                    return;
                }
                Step::SteerBack(why) => {
                    let reason = self.rollback_reason(to, why, true);
                    self.steer_back(reason, now, out);
                    self.next_queued(obs, now, out);
                    return;
                }
            }
        }
    }

    fn rollback_reason(&self, to: GenId, why: PlanFailure, after_flip: bool) -> RollbackReason {
        let g = self.gens.get(&to);
        match why {
            PlanFailure::Crashed if g.is_some_and(|g| g.unhealthy.is_some()) => {
                RollbackReason::Unhealthy {
                    generation: to,
                    worker: g.and_then(|g| g.unhealthy).unwrap_or_default(),
                    after_flip,
                }
            }
            PlanFailure::Crashed => RollbackReason::Crashed {
                generation: to,
                exit: g.and_then(|g| {
                    g.slots
                        .slots
                        .values()
                        .find_map(|s| s.last_exit.clone().map(|r| (s.id, r)))
                }),
                after_flip,
            },
            PlanFailure::Asked => RollbackReason::OnRequest(to),
            PlanFailure::NotReady => RollbackReason::NotReady {
                generation: to,
                timeout: g.map_or(Duration::ZERO, |g| g.config.ready.timeout),
                ready: g.map_or(0, |g| count(g.slots.ready())),
                desired: g.map_or(0, |g| g.slots.desired),
                last_probe: g.and_then(|g| g.last_probe),
            },
        }
    }

    /// The steering was flipped to the new generation: it serves. (Or flipped back to
    /// the old one by a steer-back: the record gets the window.) A flip that failed
    /// (connections still go to the old generation) rolls the deploy back: the old
    /// generation keeps serving, the new one stops.
    pub(super) fn steered(
        &mut self,
        g: GenId,
        result: Result<Steering, String>,
        window: Option<[u64; 2]>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let steering = match result {
            Ok(steering) => steering,
            Err(why) => {
                if let Some(d) = self.deploy.as_mut().filter(|d| d.to == g) {
                    // Back to where the flip was decided (it drains nothing: the old
                    // generation serves), so that a stop-then-start deploy's plan sees
                    // the failure and starts the old generation again.
                    d.stage = Stage::Probation { until: now };
                    let reason = RollbackReason::NotSteered { generation: g, why };
                    self.roll_back(reason, now, out);
                }
                // A steer-back or an adopted site's steering that failed: the loop said
                // so in the log; the machine serves the generation it chose either way.
                return;
            }
        };
        let Some(d) = self.deploy.as_mut().filter(|d| d.to == g) else {
            if let Some(end) = self
                .last_deploy
                .as_mut()
                .filter(|e| e.from == g && e.steered_back && e.flip_window.is_none())
            {
                end.flip_window = window;
            }
            return;
        };
        d.flip_window = window;
        let from = d.from;
        let exclusive = d.exclusive.is_some();
        let steering = if exclusive { Steering::Alone } else { steering };
        self.serving = g;
        if exclusive {
            // Stopped before the new generation started: retired now that it serves.
            if let Some(old) = self.gens.get_mut(&from) {
                old.leaving = true;
            }
        }
        // Not after the release is deployed again for a listener shut down: a rollback
        // goes to the one before it.
        let repair = self.gens.get(&g).is_some_and(|x| x.replaces_shut);
        if let Some(prev) = self
            .gens
            .get(&from)
            .and_then(|x| x.release.clone())
            .filter(|_| !repair)
        {
            self.previous_release = Some(prev.clone());
            out.push(Action::RecordPreviousRelease(prev));
        }
        let event = Event::Flipped {
            from,
            to: g,
            steering,
        };
        out.push(Action::Log(event.clone()));
        self.deploy_progress(event, out);
        self.serving_changed(out);
    }

    /// Back to the old generation while it drains (on `rollback`, or because a new
    /// worker died after the flip): it serves again, with the workers it had, and the new
    /// one stops.
    fn steer_back(&mut self, reason: RollbackReason, now: Instant, out: &mut Vec<Action>) {
        let Some(d) = self.deploy.take() else {
            return;
        };
        out.push(Action::Steer(d.from));
        self.serving = d.from;
        self.serving_changed(out);
        if let Some(g) = self.gens.get_mut(&d.to) {
            g.leaving = true;
        }
        out.push(Action::Log(Event::RolledBack {
            generation: d.to,
            reason: reason.clone(),
            steered_back: true,
        }));
        self.rolled_back(d, reason, true, now, out);
    }

    /// Stops the new generation; the serving one stays as it is (and gets back the
    /// workers it gave up).
    fn roll_back(&mut self, reason: RollbackReason, now: Instant, out: &mut Vec<Action>) {
        let cancelled = matches!(reason, RollbackReason::Cancelled(_));
        // Stop-then-start: never the old generation beside a new one that still runs.
        let new_runs = self
            .deploy
            .as_ref()
            .and_then(|d| self.gens.get(&d.to))
            .is_some_and(|g| !g.slots.slots.is_empty());
        let exclusive = self.deploy.as_ref().and_then(|d| d.exclusive);
        if exclusive.is_some_and(|x| x.failed.is_none() && !cancelled && new_runs) {
            let to = self.deploy.as_ref().map(|d| d.to);
            self.stop_new_first(PlanFailure::Asked, reason, out);
            if let Some(to) = to {
                self.feed(to, slots::Input::StopRequested, now, out);
            }
            return;
        }
        let Some(d) = self.deploy.take() else {
            return;
        };
        out.push(Action::Log(Event::RolledBack {
            generation: d.to,
            reason: reason.clone(),
            steered_back: false,
        }));
        // Stopped like any worker (stop signal, SIGKILL at the stop timeout): where
        // generations share a listener, the rolled-back workers may be in the middle of
        // requests they accepted.
        if let Some(g) = self.gens.get_mut(&d.to) {
            g.leaving = true;
        }
        if self.config.ready.check.probes() {
            out.push(Action::EndProbe(d.to));
        }
        if d.canary.is_some_and(|c| c.steered) {
            out.push(Action::Canary {
                generation: d.to,
                share: None,
            });
        }
        if d.warmup.is_some() {
            out.push(Action::WarmUp {
                generation: d.to,
                give_up: true,
            });
        }
        let (from, old_stopped) = (d.from, d.exclusive.is_some_and(|x| x.old_stopped));
        self.rolled_back(d, reason, false, now, out);
        // Stop-then-start: the new generation is gone; the old one starts again (not when
        // the site is stopping).
        if old_stopped && !cancelled {
            out.push(Action::Log(Event::OldRestarts(from)));
            self.start_serving(now, out);
        }
    }

    /// Stop-then-start: the new generation failed (or an operator asked to roll back):
    /// it is stopped, and the plan starts the old one again once it is gone. The caller
    /// stops it.
    fn stop_new_first(&mut self, why: PlanFailure, reason: RollbackReason, out: &mut Vec<Action>) {
        let Some(d) = self.deploy.as_mut() else {
            return;
        };
        let (from, to) = (d.from, d.to);
        if let Some(x) = d.exclusive.as_mut() {
            x.failed = Some(why);
        }
        d.exclusive_failure = Some(reason.clone());
        if let Some(g) = self.gens.get_mut(&to) {
            g.leaving = true;
        }
        if self.config.ready.check.probes() {
            out.push(Action::EndProbe(to));
        }
        let event = Event::NewStopsFirst {
            generation: to,
            reason,
            then: from,
        };
        out.push(Action::Log(event.clone()));
        self.deploy_progress(event, out);
    }

    /// The end of a deploy undone (rolled back, or steered back from): recorded, its
    /// clients answered, the new generation stopped, the old one given its workers back.
    fn rolled_back(
        &mut self,
        d: DeployState,
        reason: RollbackReason,
        steered_back: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.last_deploy = Some(DeployEnd {
            result: crate::status::DeployResult::RolledBack,
            from: d.from,
            to: d.to,
            release: d.release.clone(),
            reason: Some(reason.clone()),
            took: None,
            finished: now,
            flip_window: None,
            steered_back,
        });
        let restarted = d.exclusive.is_some_and(|x| x.old_stopped)
            && !matches!(reason, RollbackReason::Cancelled(_));
        for c in d.clients {
            let (reason, from) = (reason.clone(), d.from);
            let failure = if steered_back {
                Failure::SteeredBack { reason, from }
            } else if restarted {
                Failure::RestartedPrevious { reason, from }
            } else {
                Failure::RolledBack { reason, from }
            };
            out.push(Action::Reply {
                client: c,
                outcome: Outcome::Failed(failure),
            });
        }
        self.feed(d.to, slots::Input::StopRequested, now, out);
        let target = d.canary.map_or(d.target, |c| c.full_target);
        self.give_back(d.from, target, d.cap, now, out);
    }

    /// After a rollback or a steer-back, the old generation `g` gets back the workers it
    /// gave up, up to `target`, as far as the cap leaves room beside the generations still
    /// leaving (their processes hold memory until they exit); once they are gone, the
    /// capacity check gives back the rest.
    fn give_back(
        &mut self,
        g: GenId,
        target: u32,
        cap: Option<u32>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(desired) = self.gens.get(&g).map(|x| x.slots.desired) else {
            return;
        };
        let others: u32 = self
            .gens
            .values()
            .filter(|x| x.id != g)
            .map(|x| count(x.slots.slots.len()))
            .sum();
        let n = cap.map_or(target, |c| target.min(c.saturating_sub(others)));
        if n > desired {
            self.feed(g, slots::Input::ScaleRequested(n), now, out);
        }
    }

    /// Ends the deploy as done; `grow`: a new generation short of the target gets the rest
    /// (not when the site is being stopped).
    fn finish_deploy(&mut self, grow: bool, now: Instant, out: &mut Vec<Action>) {
        let Some(d) = self.deploy.take() else {
            return;
        };
        let took = now.saturating_duration_since(d.started);
        // A new worker that died once the old generation was told to stop cannot be rolled
        // back from: the deploy is over, but not a success.
        let new = self.gens.get(&d.to);
        let crashed = new.filter(|g| g.crashes > 0).map(|g| {
            g.slots
                .slots
                .values()
                .find_map(|s| s.last_exit.clone().map(|r| (s.id, r)))
        });
        let short = new.is_some_and(|g| g.slots.desired < d.target);
        self.last_deploy = Some(DeployEnd {
            result: if crashed.is_some() {
                crate::status::DeployResult::DoneWithCrashes
            } else {
                crate::status::DeployResult::Done
            },
            from: d.from,
            to: d.to,
            release: d.release.clone(),
            reason: None,
            took: Some(took),
            finished: now,
            flip_window: d.flip_window,
            steered_back: false,
        });
        out.push(Action::Log(Event::Deployed {
            generation: d.to,
            took,
        }));
        let outcome = match crashed {
            Some(exit) => Outcome::Failed(Failure::DoneWithCrashes {
                to: d.to,
                from: d.from,
                exit,
            }),
            None => Outcome::Done(Done::Deployed {
                to: d.to,
                from: d.from,
                release: d.release.clone(),
                took,
            }),
        };
        for c in d.clients {
            out.push(Action::Reply {
                client: c,
                outcome: outcome.clone(),
            });
        }
        if short && grow {
            self.feed(d.to, slots::Input::ScaleRequested(d.target), now, out);
        }
    }

    /// The canary's share is steered to it (it serves beside the old generation, and its
    /// clients hear so), or could not be (rolled back).
    pub(super) fn canary_steered(
        &mut self,
        g: GenId,
        result: Result<(), String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(d) = self
            .deploy
            .as_mut()
            .filter(|d| d.to == g && d.stage == Stage::Canary)
        else {
            return;
        };
        let Some(c) = d.canary.as_mut() else {
            return;
        };
        match result {
            Ok(()) => {
                c.steered = true;
                let (share, from, release) = (c.share, d.from, d.release.clone());
                let clients = std::mem::take(&mut d.clients);
                let workers = self.gens.get(&g).map_or(0, |x| x.slots.desired);
                out.push(Action::Log(Event::CanaryServes {
                    generation: g,
                    from,
                    share,
                    workers,
                }));
                for client in clients {
                    out.push(Action::Reply {
                        client,
                        outcome: Outcome::Done(Done::Canary {
                            from,
                            to: g,
                            share,
                            release: release.clone(),
                        }),
                    });
                }
            }
            Err(why) => self.roll_back(RollbackReason::CanaryNotSteered(why), now, out),
        }
    }

    /// `promote`: the canary grows to full size (moving slots from the old generation as
    /// the cap requires), passes probation again, and is flipped to; the client waits
    /// for the end, as for a deploy.
    pub(super) fn promote(
        &mut self,
        client: ClientId,
        obs: &dyn Observe,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let timeout = self
            .deploy
            .as_ref()
            .and_then(|d| self.gens.get(&d.to))
            .map_or(self.config.ready.timeout, |g| g.config.ready.timeout);
        let crashes = |this: &SiteMachine, g: GenId| this.gens.get(&g).map_or(0, |x| x.crashes);
        let stage = self.deploy.as_ref().map(|d| d.stage);
        let promotable = self.deploy.as_ref().is_some_and(|d| {
            d.stage == Stage::Canary && d.canary.is_some_and(|c| c.steered && !c.promoted)
        });
        if !promotable {
            return out.push(Action::Reply {
                client,
                outcome: Outcome::Failed(Failure::NoCanary {
                    stage: stage.map(Stage::name),
                }),
            });
        }
        let to = self.deploy.as_ref().map(|d| d.to).expect("checked above");
        let base = crashes(self, to);
        let d = self.deploy.as_mut().expect("checked above");
        let c = d.canary.as_mut().expect("checked above");
        c.promoted = true;
        d.target = c.full_target;
        d.crash_base = base;
        d.stage = Stage::Starting;
        d.ready_deadline = now + timeout;
        d.clients.push(client);
        let event = Event::Promoting {
            generation: to,
            target: d.target,
        };
        out.push(Action::Log(event.clone()));
        self.deploy_progress(event, out);
        self.advance_deploy(obs, now, out);
    }

    /// Starts the deploy waiting first, if none runs.
    pub(super) fn next_queued(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        if self.deploy.is_some() {
            return;
        }
        let Some(q) = self.queued.pop_front() else {
            return;
        };
        self.start_deploy(
            Some(q.client),
            q.release,
            q.canary,
            q.rollback,
            obs,
            now,
            out,
        );
    }

    /// Ends the deploy under way and every queued one (the site is stopping or going).
    pub(super) fn cancel_deploys(
        &mut self,
        why: CancelReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for q in std::mem::take(&mut self.queued) {
            out.push(Action::Reply {
                client: q.client,
                outcome: Outcome::Failed(Failure::Cancelled(why)),
            });
        }
        match self.deploy.as_ref().map(|d| (d.stage, d.from)) {
            // Past the flip the new generation serves: there is nothing to roll back to, so
            // the deploy ends as done and the old generation leaves with the stop.
            Some((Stage::Draining { .. }, from)) => {
                if let Some(old) = self.gens.get_mut(&from) {
                    old.leaving = true;
                }
                self.finish_deploy(false, now, out);
            }
            Some(_) => self.roll_back(RollbackReason::Cancelled(why), now, out),
            None => {}
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whether two refusals of a repair give the same reason: no room is no room, whatever
/// the count (a capacity that moves does not make it said again).
pub(super) fn same_reason(a: &Failure, b: &Failure) -> bool {
    match (a, b) {
        (Failure::NoRoom(_), Failure::NoRoom(_)) => true,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests;

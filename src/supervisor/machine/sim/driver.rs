//! The loop: inputs handed to the machine, its actions carried out in the world, first
//! in, first out, results fed back at once.

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use crate::config::ReadyCheck;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::{
    Action, Done, Event, Failure, HealthAnswer, HealthResult, Input, Outcome, RollbackReason,
    ShutAnswer, Steering, WarmupReport, ZygotePhase,
};
use crate::supervisor::slots::{self, ExitReason, Phase};

use super::*;

impl Sim {
    /// Hands one input to the machine and carries out everything it asks.
    pub(super) fn feed(&mut self, input: Input) -> Step {
        if self.dropped {
            return Ok(());
        }
        let out = self.handle(input)?;
        self.carry_out(out)
    }

    pub(super) fn handle(&mut self, input: Input) -> Result<Vec<Action>, String> {
        if self.trace {
            eprintln!("  [{:?}] <- {input:?}", self.elapsed());
        }
        let rolling: BTreeSet<GenId> = self.restarting().collect();
        let out = self.m.handle(input, &self.w, self.now);
        // Starts in a generation whose rolling restart (an operator's) is under way are
        // that restart's, whenever they come.
        let rolling: BTreeSet<GenId> = rolling.into_iter().chain(self.restarting()).collect();
        // A slot the machine removed (scaled down) is gone: one made later with its number
        // is a new slot.
        let m = &self.m;
        self.starts.retain(|(g, slot), _| {
            m.generation(*g)
                .is_some_and(|x| x.slots.slots.contains_key(slot))
        });
        for a in &out {
            if let Action::Spawn { generation, slot } = a {
                if rolling.contains(generation) {
                    self.rolling_starts.insert((*generation, *slot));
                }
            }
        }
        if self.trace {
            for a in &out {
                eprintln!("  [{:?}]    -> {a:?}", self.elapsed());
            }
            for g in self.m.generations() {
                let slots: Vec<String> = g
                    .slots
                    .slots
                    .values()
                    .map(|s| match s.phase {
                        Phase::Backoff { until } => {
                            format!("{}:backoff({:?})", s.id, until.duration_since(self.t0))
                        }
                        p => format!("{}:{}", s.id, p.name()),
                    })
                    .collect();
                eprintln!(
                    "  [{:?}]       gen {} {:?} desired {} [{}]",
                    self.elapsed(),
                    g.id,
                    g.slots.run,
                    g.slots.desired,
                    slots.join(" ")
                );
            }
        }
        self.answers(&out)?;
        Ok(out)
    }

    pub(super) fn restarting(&self) -> impl Iterator<Item = GenId> + '_ {
        self.m
            .generations()
            .filter(|g| g.slots.is_restarting())
            .map(|g| g.id)
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.now.duration_since(self.t0)
    }

    pub(super) fn carry_out(&mut self, out: Vec<Action>) -> Step {
        let mut queue: VecDeque<Action> = out.into();
        while let Some(a) = queue.pop_front() {
            let more = self.act(a)?;
            queue.extend(more);
        }
        Ok(())
    }

    /// Carries out one action; returns the machine's answer to its result, if any.
    pub(super) fn act(&mut self, a: Action) -> Result<Vec<Action>, String> {
        match a {
            Action::Spawn { generation, slot } => self.spawn(generation, slot),
            Action::Signal {
                generation, slot, ..
            } => {
                let stop = self
                    .m
                    .generation(generation)
                    .map_or(self.cfg.stop.timeout, |g| g.slots.policies.stop.timeout);
                let slow = self.rng.chance(20);
                let delay = if slow {
                    self.rng
                        .ms(0, 2 * u64::try_from(stop.as_millis()).unwrap_or(1000))
                } else {
                    self.rng.ms(0, 300)
                };
                let code = self.rng.pick(&[0, 143]);
                let now = self.now;
                let p = self.proc_mut(generation, slot, "signalled")?;
                p.asked = true;
                if !p.ignores_stop && p.exit_at.is_none() {
                    let reason = if code == 0 {
                        ExitReason::Exited { code: 0 }
                    } else {
                        ExitReason::Signaled {
                            signal: libc::SIGTERM,
                        }
                    };
                    p.exit_at = Some((now + delay, reason));
                }
                Ok(Vec::new())
            }
            Action::KillTree { generation, slot } => {
                let at = self.now + self.rng.ms(0, 5);
                let p = self.proc_mut(generation, slot, "killed")?;
                p.asked = true;
                if p.exit_at.as_ref().is_none_or(|(t, _)| *t > at) {
                    p.exit_at = Some((
                        at,
                        ExitReason::Signaled {
                            signal: libc::SIGKILL,
                        },
                    ));
                }
                Ok(Vec::new())
            }
            Action::BindListeners(generation) => {
                let result = if self.rng.chance(self.w.bind_fails) {
                    Err("127.0.0.1:8000: Address already in use".into())
                } else {
                    Ok(())
                };
                self.handle(Input::ListenersBound { generation, result })
            }
            Action::Steer(generation) => {
                self.not_warming(generation)?;
                self.w.canary = None;
                // A flip to a new generation can fail (its listener shut down by one of
                // its workers): the steering stays where it was.
                let flip = self.m.deploy().is_some_and(|d| d.to == generation);
                let result = if flip && self.rng.chance(self.w.steer_fails) {
                    Err("tcp 127.0.0.1:8000: failed to insert the listener in steering slot 1 (it must be a listening SO_REUSEPORT socket of the group): Invalid argument (os error 22)".into())
                } else {
                    self.w.steered = generation;
                    Ok(if self.rng.chance(50) {
                        Steering::Ebpf
                    } else {
                        Steering::Shared
                    })
                };
                self.handle(Input::Steered {
                    generation,
                    result,
                    window: Some([1, 2]),
                })
            }
            Action::Probe(g) => {
                self.w.probing.insert(g);
                let accepting = self.w.procs.iter().any(|((pg, _), p)| *pg == g && p.ready);
                if accepting && self.rng.chance(70) {
                    return self.handle(Input::ProbeAccepted(g));
                }
                Ok(Vec::new())
            }
            Action::Canary {
                generation,
                share: Some(_),
            } => {
                self.not_warming(generation)?;
                if self.m.deploy().is_none_or(|d| d.to != generation) {
                    return Err(format!("a canary of {generation}, which is not deployed"));
                }
                let result = if self.rng.chance(5) {
                    Err("failed to set the steering canary (slot 1): No such file".into())
                } else {
                    self.w.canary = Some(generation);
                    Ok(())
                };
                self.handle(Input::CanarySteered { generation, result })
            }
            Action::Canary { share: None, .. } => {
                self.w.canary = None;
                Ok(Vec::new())
            }
            Action::WarmUp {
                generation,
                give_up,
            } => {
                if !give_up && self.rng.chance(60) {
                    return Ok(Vec::new());
                }
                let n = self
                    .w
                    .procs
                    .keys()
                    .filter(|(g, _)| *g == generation)
                    .count();
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                let warmed = if give_up { n.saturating_sub(1) } else { n };
                let report = WarmupReport {
                    warmed,
                    of: n,
                    answered: warmed,
                };
                self.handle(Input::WarmedUp { generation, report })
            }
            Action::Health {
                generation,
                give_up,
            } => {
                if !give_up && self.rng.chance(50) {
                    return Ok(Vec::new());
                }
                let answer = HealthAnswer::TimedOut;
                let result = match self.rng.range(0, 10) {
                    0..=5 => HealthResult::Healthy,
                    6 => HealthResult::Failed {
                        answer,
                        worker: None,
                    },
                    _ => {
                        let procs: Vec<(Slot, i32)> = self
                            .w
                            .procs
                            .iter()
                            .filter(|((g, _), _)| *g == generation)
                            .map(|((_, s), p)| (*s, p.pid))
                            .collect();
                        let worker = match procs.len() {
                            0 => None,
                            n => {
                                let i = self.rng.range(0, u64::try_from(n - 1).unwrap_or(0));
                                procs.get(usize::try_from(i).unwrap_or(0)).copied()
                            }
                        }
                        .map(|(s, pid)| (generation, s, pid));
                        HealthResult::Failed { answer, worker }
                    }
                };
                self.handle(Input::HealthChecked(result))
            }
            Action::EndProbe(g) => {
                self.w.probing.remove(&g);
                Ok(Vec::new())
            }
            Action::Retire(g) => {
                if g == self.m.serving() {
                    return Err(format!("retired the serving generation {g}"));
                }
                if self.w.procs.keys().any(|(pg, _)| *pg == g) {
                    return Err(format!("retired generation {g} with processes left"));
                }
                if self.w.zygotes.get(&g).is_some_and(|z| !z.asked) {
                    return Err(format!(
                        "retired generation {g} with its zygote not told to stop"
                    ));
                }
                if self.w.steered == g || self.w.canary == Some(g) {
                    return Err(format!("retired generation {g}, still steered to"));
                }
                self.w.probing.remove(&g);
                Ok(Vec::new())
            }
            // Checked as the machine returns them (`answers`): the order the loop carries
            // them out in is the loop's.
            Action::Progress { .. } | Action::Reply { .. } => Ok(Vec::new()),
            Action::Dropped => {
                if !self.removed {
                    return Err("dropped a site that was not removed".into());
                }
                if !self.w.procs.is_empty() {
                    return Err(format!(
                        "dropped with processes left: {:?}",
                        self.w.procs.keys().collect::<Vec<_>>()
                    ));
                }
                self.dropped = true;
                Ok(Vec::new())
            }
            Action::StartZygote(g) => self.start_zygote(g),
            Action::StopZygote(g) => {
                let at = self.now + self.rng.ms(0, 300);
                let Some(z) = self.w.zygotes.get_mut(&g) else {
                    return Err(format!("stopped the zygote of {g}, which has none"));
                };
                z.asked = true;
                if z.exit_at.as_ref().is_none_or(|(t, _)| *t > at) {
                    z.exit_at = Some((at, "exited with status 0".into()));
                }
                Ok(Vec::new())
            }
            Action::Log(Event::ListenerShut {
                generation, answer, ..
            }) => {
                // Only the serving generation's is replaced, by a deploy that starts now.
                let serving = generation == self.m.serving();
                match answer {
                    ShutAnswer::Redeploy(to) => {
                        if !serving || self.m.deploy().is_none_or(|d| d.to != to) {
                            return Err(format!(
                                "a listener of {generation} shut: redeployed as {to}, but the deploy is {:?} (serving {})",
                                self.m.deploy().map(|d| d.to),
                                self.m.serving()
                            ));
                        }
                        REACHED
                            .redeploys
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if self.repair_refused.remove(&generation) {
                            REACHED
                                .redeploys_after_refusal
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        // A deploy as an operator's (once for a listener): a stop-then-start
                        // one's rollback starts the old generation again at once.
                        self.epoch += 1;
                    }
                    ShutAnswer::Refused(_) | ShutAnswer::Tried
                        if !serving || self.m.deploy().is_some() =>
                    {
                        return Err(format!(
                            "a listener of {generation} shut: said {answer:?} while it does not serve or a deploy is under way"
                        ));
                    }
                    ShutAnswer::Refused(_) => {
                        self.repair_refused.insert(generation);
                        REACHED
                            .repairs_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    ShutAnswer::NotServing if serving => {
                        return Err(format!(
                            "a listener of serving {generation} said not serving"
                        ));
                    }
                    ShutAnswer::DeployUnderWay(to)
                        if to == generation || self.m.deploy().is_none_or(|d| d.to != to) =>
                    {
                        return Err(format!(
                            "a listener of {generation} shut: said replaced by the deploy to {to}, which is {:?}",
                            self.m.deploy().map(|d| d.to)
                        ));
                    }
                    ShutAnswer::AfterOlder
                        if !serving
                            || self.m.deploy().is_some()
                            || !self
                                .m
                                .generations()
                                .any(|g| g.id != generation && g.slots.live() > 0) =>
                    {
                        return Err(format!(
                            "a listener of {generation} shut: said deployed again after the older processes, with none left or a deploy under way"
                        ));
                    }
                    ShutAnswer::AfterDeploy
                        if !serving || self.m.deploy().is_none_or(|d| d.to != generation) =>
                    {
                        return Err(format!(
                            "a listener of {generation} shut: said deployed again after the deploy to it, which is {:?}",
                            self.m.deploy().map(|d| d.to)
                        ));
                    }
                    _ => {}
                }
                Ok(Vec::new())
            }
            Action::RecordPreviousRelease(_) | Action::ApplyLimits | Action::Log(_) => {
                Ok(Vec::new())
            }
        }
    }

    /// Nothing is steered to a generation whose warm-up is under way.
    fn not_warming(&self, g: GenId) -> Step {
        match self.m.deploy() {
            Some(d) if d.to == g && d.warmup.is_some() => {
                Err(format!("steered to {g} while it warms up"))
            }
            _ => Ok(()),
        }
    }

    /// Every client is answered once, and told nothing after its answer, in the order the
    /// machine says things.
    pub(super) fn answers(&mut self, out: &[Action]) -> Step {
        for a in out {
            match a {
                Action::Progress { clients, event } => {
                    for c in clients {
                        let asked = self
                            .clients
                            .get(c)
                            .ok_or_else(|| format!("progress to unknown client {c:?}"))?;
                        if asked.answered {
                            return Err(format!(
                                "progress to client {c:?} ({}) after its reply: {event:?}",
                                asked.what
                            ));
                        }
                    }
                }
                Action::Reply { client, outcome } => {
                    let asked = self
                        .clients
                        .get_mut(client)
                        .ok_or_else(|| format!("reply to unknown client {client:?}"))?;
                    if asked.answered {
                        return Err(format!(
                            "second reply to client {client:?} ({}, asked at step {}): {outcome:?}",
                            asked.what, asked.step
                        ));
                    }
                    asked.answered = true;
                    let reached = match (asked.what, outcome) {
                        ("deploy", Outcome::Done(Done::Canary { .. })) => Some(&REACHED.canary),
                        ("promote", Outcome::Done(Done::Deployed { .. })) => {
                            Some(&REACHED.promoted)
                        }
                        ("deploy", Outcome::Done(Done::Deployed { .. })) => Some(&REACHED.deployed),
                        (
                            "deploy",
                            Outcome::Failed(Failure::RolledBack {
                                reason: RollbackReason::NotSteered { .. },
                                ..
                            }),
                        ) => Some(&REACHED.not_steered),
                        (
                            "deploy",
                            Outcome::Failed(Failure::RestartedPrevious {
                                reason: RollbackReason::NotSteered { .. },
                                ..
                            }),
                        ) => Some(&REACHED.not_steered_restarted),
                        _ => None,
                    };
                    if let Some(r) = reached {
                        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn proc_mut(
        &mut self,
        g: GenId,
        slot: Slot,
        what: &str,
    ) -> Result<&mut Proc, String> {
        self.w
            .procs
            .get_mut(&(g, slot))
            .ok_or_else(|| format!("{what} gen {g} slot {slot}, which has no process"))
    }

    /// Starts generation `g`'s zygote in the world.
    fn start_zygote(&mut self, g: GenId) -> Result<Vec<Action>, String> {
        // A generation retired by a result fed back before this was carried out (the
        // actions are carried out in order: its `StopZygote` follows) is started as the
        // loop would start it, with the site's configuration.
        let (command, release, timeout) = match self.m.generation(g) {
            Some(x) => (
                x.config.command.clone(),
                x.release.clone(),
                x.config.ready.timeout,
            ),
            None if g.0 <= self.m.record().last_gen => {
                (self.cfg.command.clone(), None, self.cfg.ready.timeout)
            }
            None => return Err(format!("started the zygote of {g}, which never existed")),
        };
        if self.w.zygotes.contains_key(&g) {
            return Err(format!("two zygotes of gen {g}"));
        }
        if !self.up {
            return Err(format!(
                "started the zygote of gen {g} of a site no client started (or one stopped)"
            ));
        }
        let text = format!(
            "{} {}",
            command.join(" "),
            release
                .as_deref()
                .map(Path::to_string_lossy)
                .unwrap_or_default()
        );
        let q = quality(&text);
        let now = self.now;
        let ready_at = match q {
            Quality::Hangs | Quality::Broken => None,
            _ if self.rng.chance(3) => Some(now + timeout + self.rng.ms(1, 2000)),
            _ => {
                let most = u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .min(3000);
                Some(now + self.rng.ms(0, most))
            }
        };
        let exit_at = match q {
            Quality::Broken => Some((now + self.rng.ms(0, 50), "exited with status 127".into())),
            _ if !self.w.calm && self.rng.chance(5) => {
                Some((now + self.rng.ms(0, 20_000), "was killed by SIGKILL".into()))
            }
            _ => None,
        };
        self.w.zygotes.insert(
            g,
            Zygote {
                ready_at,
                ready: false,
                exit_at,
                asked: false,
            },
        );
        Ok(Vec::new())
    }

    pub(super) fn spawn(&mut self, g: GenId, slot: Slot) -> Result<Vec<Action>, String> {
        let Some(gen_) = self.m.generation(g) else {
            return Err(format!("spawn in generation {g}, which does not exist"));
        };
        if let Some(z) = gen_
            .zygote
            .as_ref()
            .filter(|_| gen_.config.mode == crate::config::SiteMode::Zygote)
        {
            let world = self.w.zygotes.get(&g).is_some_and(|z| z.ready && !z.asked);
            if z.phase != ZygotePhase::Ready || !world {
                return Err(format!(
                    "spawn in gen {g} slot {slot}, whose zygote is {:?} (world: ready {world})",
                    z.phase
                ));
            }
        }
        if self.w.procs.contains_key(&(g, slot)) {
            return Err(format!("two processes in gen {g} slot {slot}"));
        }
        if !self.up {
            return Err(format!(
                "started gen {g} slot {slot} of a site no client started (or one stopped)"
            ));
        }
        // Stop-then-start: the app binds its port itself, so never two generations.
        if self.m.config().exclusive_deploys() {
            if let Some((other, s)) = self.w.procs.keys().find(|(x, _)| *x != g) {
                return Err(format!(
                    "started gen {g} slot {slot} of an own-port site while gen {other} slot {s} runs"
                ));
            }
        }
        let cap = match self.m.deploy() {
            Some(d) => d.cap,
            None => self.m.capacity().map(|c| c.workers),
        };
        if let Some(cap) = cap {
            let live = self.w.procs.len() + 1;
            if live > cap as usize {
                return Err(format!(
                    "started gen {g} slot {slot}: {live} processes for a cap of {cap} \
                     (deploy: {:?})",
                    self.m.deploy().map(|d| (d.from, d.to, d.stage))
                ));
            }
        }
        let floor = gen_.slots.policies.restart.backoff_initial;
        let rolling = self.rolling_starts.remove(&(g, slot));
        if let Some(last) = self.starts.get(&(g, slot)) {
            let since = self.now.duration_since(last.at);
            if last.crashed == Some(self.epoch) && since < floor && !rolling {
                return Err(format!(
                    "gen {g} slot {slot} crashed and started again {since:?} after its last \
                     start (floor {floor:?}), with no operator request in between"
                ));
            }
        }
        self.starts.insert(
            (g, slot),
            Start {
                at: self.now,
                crashed: None,
            },
        );
        let text = format!(
            "{} {}",
            gen_.config.command.join(" "),
            gen_.release
                .as_deref()
                .map(Path::to_string_lossy)
                .unwrap_or_default()
        );
        let q = quality(&text);
        let ready_timeout = gen_.config.ready.timeout;
        if q == Quality::Broken || self.rng.chance(self.w.spawn_fails) {
            let permanent = q == Quality::Broken;
            self.ended_on_its_own(g, slot);
            return self.handle(Input::Worker {
                generation: g,
                input: slots::Input::SpawnFailed {
                    id: slot,
                    error: "no such file or directory".into(),
                    permanent,
                },
            });
        }
        let now = self.now;
        let ready_at = match (self.w.check, q) {
            (ReadyCheck::None, _) | (_, Quality::Hangs) => None,
            _ if self.rng.chance(3) => Some(now + ready_timeout + self.rng.ms(1, 2000)),
            _ => {
                let most = u64::try_from(ready_timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .min(3000);
                Some(now + self.rng.ms(0, most))
            }
        };
        let crash_at = match q {
            Quality::Crashes => Some(now + self.rng.ms(0, 4000)),
            _ if !self.w.calm && self.rng.chance(4) => Some(now + self.rng.ms(0, 30_000)),
            _ => None,
        }
        .map(|t| {
            let reason = if self.rng.chance(50) {
                ExitReason::Exited { code: 1 }
            } else {
                ExitReason::Signaled {
                    signal: libc::SIGSEGV,
                }
            };
            (t, reason)
        });
        let pid = self.w.next_pid;
        self.w.next_pid += 1;
        let mem = self.w.mem_base * self.rng.range(70, 130) / 100;
        let ignores_stop = self.rng.chance(self.w.ignores_stop);
        self.w.procs.insert(
            (g, slot),
            Proc {
                pid,
                ready_at,
                ready: false,
                crash_at,
                exit_at: None,
                ignores_stop,
                asked: false,
                mem,
            },
        );
        self.handle(Input::Worker {
            generation: g,
            input: slots::Input::Spawned { id: slot, pid },
        })
    }

    /// A process ends: the world forgets it and the machine hears of it.
    pub(super) fn exit(&mut self, g: GenId, slot: Slot, reason: ExitReason) -> Step {
        if let Some(p) = self.w.procs.remove(&(g, slot)) {
            if !p.asked {
                self.ended_on_its_own(g, slot);
            }
        }
        self.feed(Input::Worker {
            generation: g,
            input: slots::Input::Exited { id: slot, reason },
        })
    }

    pub(super) fn ended_on_its_own(&mut self, g: GenId, slot: Slot) {
        if let Some(last) = self.starts.get_mut(&(g, slot)) {
            last.crashed = Some(self.epoch);
        }
    }

    /// Delivers what the world did up to now, in order.
    pub(super) fn deliver_due(&mut self) -> Step {
        for _ in 0..MAX_EVENTS {
            if let Some((_, g, ready)) = self.w.next_zygote_event().filter(|e| e.0 <= self.now) {
                if ready {
                    if let Some(z) = self.w.zygotes.get_mut(&g) {
                        z.ready = true;
                    }
                    REACHED.zygotes_ready.fetch_add(1, Ordering::Relaxed);
                    self.feed(Input::ZygoteReady(g))?;
                } else {
                    let z = self.w.zygotes.remove(&g).expect("it was due");
                    let counter = match (z.ready, z.asked) {
                        (true, false) => Some(&REACHED.zygotes_lost),
                        (false, _) => Some(&REACHED.zygotes_not_ready),
                        (true, true) => None,
                    };
                    if let Some(c) = counter {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    let (_, reason) = z.exit_at.expect("it was due");
                    self.feed(Input::ZygoteExited {
                        generation: g,
                        reason,
                    })?;
                }
                continue;
            }
            let Some((_, (g, slot), what)) = self.w.next_event().filter(|e| e.0 <= self.now) else {
                return Ok(());
            };
            match what {
                Happens::Ready => {
                    let p = self.proc_mut(g, slot, "ready")?;
                    p.ready = true;
                    match self.w.check {
                        ReadyCheck::Notify => self.feed(Input::Worker {
                            generation: g,
                            input: slots::Input::ReadyNotified { id: slot },
                        })?,
                        ReadyCheck::Tcp if self.w.probing.contains(&g) => {
                            self.feed(Input::ProbeAccepted(g))?
                        }
                        _ => {}
                    }
                }
                Happens::Crash => {
                    let p = self.proc_mut(g, slot, "crashing")?;
                    let (_, reason) = p.crash_at.take().expect("it was due");
                    self.exit(g, slot, reason)?;
                }
                Happens::Exit => {
                    let p = self.proc_mut(g, slot, "exiting")?;
                    let (_, reason) = p.exit_at.take().expect("it was due");
                    self.exit(g, slot, reason)?;
                }
            }
        }
        Err("the world does not settle at one instant (livelock)".into())
    }

    /// A `Tick`, repeated while the machine asks to be woken at or before now (results
    /// fed back during a tick may be due at once: a ready worker with `settle = 0`), a few
    /// times at most: more would be a loop that spins.
    pub(super) fn tick(&mut self) -> Step {
        for _ in 0..4 {
            self.feed(Input::Tick)?;
            if self.dropped {
                return Ok(());
            }
            match self.m.next_deadline(self.now) {
                Some(d) if d <= self.now => {}
                _ => return Ok(()),
            }
        }
        Err(
            "after four ticks at one instant the machine still asks to be woken now: \
             the loop would spin"
                .into(),
        )
    }

    /// Moves the clock by `dt`: smoothly (waking at every deadline and event on the way,
    /// up to [`MAX_WAKEUPS`]), or in one jump.
    pub(super) fn advance(&mut self, dt: Duration, smooth: bool) -> Step {
        let target = self.now + dt;
        if smooth {
            for _ in 0..MAX_WAKEUPS {
                if self.dropped {
                    break;
                }
                let world = [
                    self.w.next_event().map(|e| e.0),
                    self.w.next_zygote_event().map(|e| e.0),
                ]
                .into_iter()
                .flatten()
                .min();
                let machine = self.m.next_deadline(self.now);
                let next = [world, machine].into_iter().flatten().min();
                match next {
                    Some(t) if t <= target => {
                        self.now = self.now.max(t);
                        self.deliver_due()?;
                        // Woken for the machine (a deadline the world's events made due is
                        // taken at the next turn, at the same instant).
                        if machine.is_some_and(|d| d <= self.now) {
                            self.tick()?;
                        }
                    }
                    _ => break,
                }
            }
        }
        self.now = self.now.max(target);
        self.deliver_due()?;
        self.tick()
    }
}

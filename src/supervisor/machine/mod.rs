//! One site's whole lifecycle as pure data: [`SiteMachine`].
//!
//! It holds every live generation of the site (each a [`SiteCore`] of worker slots), the
//! deploy under way and those queued behind it, the count asked for and the one the memory
//! cap allows, and the clients waiting for an outcome (as opaque [`ClientId`]s). It takes
//! one [`Input`] at a time, with the time as an input and a read-only window onto the
//! world ([`Observe`]: the release a symlink resolves to, the measured memory of workers,
//! whether listeners' accept queues are empty), and returns [`Action`]s for the event loop
//! to carry out. It does no I/O and holds no clock; it says nothing in words: progress and
//! history are typed [`Event`]s, answers typed [`Outcome`]s, which the loop renders.
//!
//! Some actions have a result the machine needs before it can go on (a spawn's pid, a new
//! generation's listeners bound, the steering flipped): the loop carries them out at once
//! and feeds the result back as the next input ([`Input::Worker`] with
//! `Spawned`/`SpawnFailed`, [`Input::ListenersBound`], [`Input::Steered`]).
//!
//! Invariants (checked by the simulation in `sim.rs`): never more workers than the cap;
//! never two live workers in one slot; two starts of one slot are at least the backoff
//! floor apart unless an operator asked; a deploy never leaves the site without a serving
//! generation that runs; every client waiting is answered exactly once.

mod deploy;
mod operators;
pub mod outcome;
mod reconfigure;
#[cfg(test)]
mod sim;
mod time;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use self::deploy::{DeployEnd, DeployState};
pub use self::outcome::{CancelReason, Done, Event, Failure, Outcome, RollbackReason, Steering};
use super::capacity::{self, Capacity};
use super::ids::{ClientId, GenId, Slot};
use super::slots::{self, Note, Phase, Policies, RunState, SiteCore};
use crate::config::{ReadyCheck, SiteConfig, SiteName};

/// Interval of TCP readiness probes while a worker of a `tcp`-checked site is starting.
pub const TCP_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// What the machine may look at in the world (read only; the loop answers from the
/// kernel and the file system, a simulation from its own model).
pub trait Observe {
    /// The release to deploy: `asked` (a directory an operator named), else what the
    /// site's `release` symlink resolves to now; `None` for a site without `release`.
    fn resolve_release(
        &self,
        site: &SiteConfig,
        asked: Option<&Path>,
    ) -> Result<Option<PathBuf>, String>;
    /// The largest measured memory (`memory.peak`, or `memory.current`) of these slots of
    /// generation `generation`, where it is accounted.
    fn measured_memory(&self, generation: GenId, slots: &[Slot]) -> Option<u64>;
    /// Whether the accept queues of `old`'s own listeners are empty (listeners it shares
    /// with `new` count as empty: they are served by `new` already).
    fn queues_empty(&self, old: GenId, new: GenId) -> bool;
    /// Whether a `tcp` ready check can reach a new generation alone (steering attached to
    /// the site's first TCP listener); why not, if not.
    fn probe_alone(&self) -> Result<(), String>;
}

/// One generation of the site.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Its number.
    pub id: GenId,
    /// Its release directory (sites with `release`).
    pub release: Option<PathBuf>,
    /// The site's configuration as this generation runs it (`{release}` filled in).
    pub config: SiteConfig,
    /// Its worker slots.
    pub slots: SiteCore,
    /// Worker exits and failed spawns it was not asked for.
    pub crashes: u32,
    /// Being rolled back or retired: removed once its last worker is gone.
    pub leaving: bool,
}

impl Generation {
    fn new(id: GenId, release: Option<PathBuf>, config: SiteConfig, desired: u32) -> Generation {
        let slots = SiteCore::new(desired, policies(&config));
        Generation {
            id,
            release,
            config,
            slots,
            crashes: 0,
            leaving: false,
        }
    }

    /// Whether a worker of it is starting (a `tcp` check probes it then).
    fn starting(&self) -> bool {
        self.slots
            .slots
            .values()
            .any(|s| matches!(s.phase, Phase::Starting { .. }))
    }
}

/// The policies a generation's slots apply, from its configuration.
pub fn policies(c: &SiteConfig) -> Policies {
    Policies {
        restart: c.restart,
        stop: c.stop,
        ready: c.ready,
    }
}

/// What a client waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    Stopped,
    Settled,
    RestartDone,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    client: ClientId,
    until: WaitFor,
}

/// An input: what happened, or what was asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Something about a worker of a generation (spawned, failed to spawn, exited, ready,
    /// busy), for its slots.
    Worker {
        /// The generation.
        generation: GenId,
        /// What.
        input: slots::Input,
    },
    /// The `tcp` ready probe of a generation was accepted by one of its workers.
    ProbeAccepted(GenId),
    /// The listeners of a new generation were bound (or could not be).
    ListenersBound {
        /// The generation.
        generation: GenId,
        /// Why not, if not.
        result: Result<(), String>,
    },
    /// New connections now go to a generation.
    Steered {
        /// The generation.
        generation: GenId,
        /// How.
        steering: Steering,
        /// `CLOCK_MONOTONIC` just before and after the change (for the record).
        window: Option<[u64; 2]>,
    },
    /// Time passed: deadlines at or before `now` fire.
    Tick,
    /// Run the site (clears `failed`); the client, if any, waits until every worker is
    /// ready.
    Start(Option<ClientId>),
    /// Stop every worker (a client waits, or the agent stops or the site goes).
    Stop {
        /// Who waits, if anyone.
        client: Option<ClientId>,
        /// What it cancels deploys for.
        why: CancelReason,
    },
    /// Restart every worker, one at a time.
    Restart(ClientId),
    /// Run this many workers.
    Scale {
        /// Who asked.
        client: ClientId,
        /// How many.
        workers: u32,
        /// The uid of a site owner who asked (its limit applies), `None` for root.
        owner: Option<u32>,
    },
    /// Deploy a new generation.
    Deploy {
        /// Who asked.
        client: ClientId,
        /// A release directory to deploy instead of what the symlink points to.
        release: Option<PathBuf>,
    },
    /// Roll back the deploy under way, steer back to a draining generation, or deploy the
    /// previous release.
    Rollback(ClientId),
    /// A reload changed the site's configuration (its listeners were rebound already).
    Reconfigure(Box<SiteConfig>),
    /// The site was removed from the configuration: stop it and forget it.
    Remove,
    /// A client went away: it waits for nothing any more.
    ClientGone(ClientId),
}

/// Something for the event loop to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create a worker process in this slot, then report `Spawned` or `SpawnFailed`.
    Spawn {
        /// The generation.
        generation: GenId,
        /// The slot.
        slot: Slot,
    },
    /// Send a signal to a slot's process.
    Signal {
        /// The generation.
        generation: GenId,
        /// The slot.
        slot: Slot,
        /// The signal.
        signal: crate::config::Signal,
    },
    /// Kill a slot's whole process tree.
    KillTree {
        /// The generation.
        generation: GenId,
        /// The slot.
        slot: Slot,
    },
    /// Bind (or share) a new generation's listeners beside the serving one's, then report
    /// [`Input::ListenersBound`].
    BindListeners(GenId),
    /// Send new connections to this generation's listeners, then report
    /// [`Input::Steered`].
    Steer(GenId),
    /// Start or continue the `tcp` ready probe of a generation; report
    /// [`Input::ProbeAccepted`] once a worker accepted it.
    Probe(GenId),
    /// The probe of a generation is over (drop it and its steering entry).
    EndProbe(GenId),
    /// A generation is gone: close its listeners, remove its cgroup.
    Retire(GenId),
    /// Record the release the serving generation replaced (for `rollback` after a restart
    /// of the agent).
    RecordPreviousRelease(PathBuf),
    /// The site's limits changed: write them to its cgroups.
    ApplyLimits,
    /// Tell these clients how it goes.
    Progress {
        /// The clients.
        clients: Vec<ClientId>,
        /// What happened.
        event: Event,
    },
    /// Answer a client (its last word).
    Reply {
        /// The client.
        client: ClientId,
        /// The answer.
        outcome: Outcome,
    },
    /// Something for the agent's log.
    Log(Event),
    /// The site is removed and stopped: forget it.
    Dropped,
}

/// One site.
#[derive(Debug, Clone)]
pub struct SiteMachine {
    config: SiteConfig,
    gens: BTreeMap<GenId, Generation>,
    serving: GenId,
    /// The highest generation number used so far.
    last_gen: GenId,
    deploy: Option<DeployState>,
    queued: VecDeque<deploy::Queued>,
    last_deploy: Option<DeployEnd>,
    previous_release: Option<PathBuf>,
    /// Workers asked for (configuration or `scale`); the cap may hold the site below it.
    requested: u32,
    /// The memory cap, for sites with a budget and a per-worker figure.
    capacity: Option<Capacity>,
    /// When to re-measure and re-derive the cap (sites with a budget only).
    next_capacity_check: Option<Instant>,
    /// The measured peak at the previous check: growth waits until it holds still.
    last_peak: Option<u64>,
    waiters: Vec<Waiter>,
    removing: bool,
}

impl SiteMachine {
    /// A stopped site with its first generation (`release`: what its symlink resolved to),
    /// and the events worth logging about it.
    pub fn new(
        config: SiteConfig,
        release: Option<PathBuf>,
        previous_release: Option<PathBuf>,
        now: Instant,
    ) -> (SiteMachine, Vec<Action>) {
        let requested = config.workers;
        let cap = config.limits.memory.and_then(|budget| {
            capacity::capacity(budget, config.limits.worker_estimate(), None, requested)
        });
        let initial = match (config.auto, cap) {
            (Some(a), Some(c)) => a.min.min(c.workers),
            (None, Some(c)) => requested.min(c.workers),
            (_, None) => requested,
        };
        let mut out = Vec::new();
        if initial < requested && config.auto.is_none() {
            if let Some(capacity) = cap {
                out.push(Action::Log(Event::DoesNotFit {
                    requested,
                    capacity,
                }));
            }
        }
        let gen_config = match &release {
            Some(r) => config.for_release(r),
            None => config.clone(),
        };
        let first = GenId(1);
        let machine = SiteMachine {
            next_capacity_check: config.limits.memory.map(|_| now + capacity::SETTLE),
            gens: BTreeMap::from([(first, Generation::new(first, release, gen_config, initial))]),
            config,
            serving: first,
            last_gen: first,
            deploy: None,
            queued: VecDeque::new(),
            last_deploy: None,
            previous_release,
            requested,
            capacity: cap,
            last_peak: None,
            waiters: Vec::new(),
            removing: false,
        };
        (machine, out)
    }

    /// The site's name.
    pub fn name(&self) -> &SiteName {
        &self.config.name
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The serving generation's number.
    pub fn serving(&self) -> GenId {
        self.serving
    }

    /// The serving generation.
    pub fn current(&self) -> &Generation {
        self.gens
            .get(&self.serving)
            .expect("the serving generation exists while the site does")
    }

    /// A generation.
    pub fn generation(&self, g: GenId) -> Option<&Generation> {
        self.gens.get(&g)
    }

    /// Every live generation, oldest first.
    pub fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.gens.values()
    }

    /// The deploy under way.
    pub fn deploy(&self) -> Option<&DeployState> {
        self.deploy.as_ref()
    }

    /// Deploys waiting for it.
    pub fn queued_deploys(&self) -> usize {
        self.queued.len()
    }

    /// What the last deploy did.
    pub fn last_deploy(&self) -> Option<&DeployEnd> {
        self.last_deploy.as_ref()
    }

    /// The release the serving generation replaced.
    pub fn previous_release(&self) -> Option<&Path> {
        self.previous_release.as_deref()
    }

    /// Workers asked for.
    pub fn requested(&self) -> u32 {
        self.requested
    }

    /// The memory cap.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// A client went away (or was answered by other means): it waits for nothing any
    /// more. The same as [`Input::ClientGone`], which has no actions, for a caller in the
    /// middle of carrying out others.
    pub fn forget_client(&mut self, client: ClientId) {
        self.waiters.retain(|w| w.client != client);
        if let Some(d) = &mut self.deploy {
            d.clients.retain(|c| *c != client);
        }
    }

    /// Whether no generation has a process or anything left to do.
    pub fn is_stopped(&self) -> bool {
        self.gens.values().all(|g| g.slots.run == RunState::Stopped)
    }

    /// A generation's state, as `status` shows it.
    pub fn generation_state(&self, g: &Generation) -> &'static str {
        match &self.deploy {
            Some(d) if d.to == g.id && g.id != self.serving => d.stage.name(),
            Some(d) if d.from == g.id && g.id != self.serving => "draining",
            _ if g.id == self.serving => "serving",
            _ if g.leaving => "retiring",
            _ => "draining",
        }
    }

    /// When the machine must be looked at again (a [`Input::Tick`]) without any other
    /// input: a slot's deadline, a settling worker, a `tcp` probe, a capacity check, the
    /// deploy's next step.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let probe = self.needs_probe().next().map(|_| now + TCP_PROBE_INTERVAL);
        let gens = self
            .gens
            .values()
            .filter_map(|g| g.slots.next_deadline())
            .min();
        [
            gens,
            probe,
            self.next_capacity_check,
            self.deploy_deadline(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Generations whose `tcp` ready probe should run.
    fn needs_probe(&self) -> impl Iterator<Item = GenId> + '_ {
        let tcp = self.config.ready.check == ReadyCheck::Tcp;
        self.gens
            .values()
            .filter(move |g| tcp && !g.leaving && g.starting())
            .map(|g| g.id)
    }

    /// Takes one input at time `now`; returns what to do.
    pub fn handle(&mut self, input: Input, obs: &dyn Observe, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Worker { generation, input } => {
                self.worker_input(generation, input, now, &mut out)
            }
            Input::ProbeAccepted(g) => self.probe_accepted(g, now, &mut out),
            Input::ListenersBound { generation, result } => {
                self.listeners_bound(generation, result, obs, now, &mut out)
            }
            Input::Steered {
                generation,
                steering,
                window,
            } => self.steered(generation, steering, window, &mut out),
            Input::Tick => self.tick(obs, now, &mut out),
            Input::Start(client) => {
                let serving = self.serving;
                if let Some(c) = client {
                    self.hold(c, WaitFor::Settled);
                }
                self.feed(serving, slots::Input::StartRequested, now, &mut out);
                if let Some(c) = client {
                    self.reply_if_settled(c, &mut out);
                }
            }
            Input::Stop { client, why } => self.stop(client, why, now, &mut out),
            Input::Restart(client) => self.restart(client, now, &mut out),
            Input::Scale {
                client,
                workers,
                owner,
            } => self.scale(client, workers, owner, now, &mut out),
            Input::Deploy { client, release } => {
                self.request_deploy(client, release, false, obs, now, &mut out)
            }
            Input::Rollback(client) => self.request_rollback(client, obs, now, &mut out),
            Input::Reconfigure(config) => self.reconfigure(*config, obs, now, &mut out),
            Input::Remove => {
                self.removing = true;
                self.stop(None, CancelReason::SiteRemoved, now, &mut out);
            }
            Input::ClientGone(client) => self.forget_client(client),
        }
        self.after(obs, now, &mut out);
        out
    }

    /// Generations retired, the deploy moved on, the site dropped once removed and stopped.
    fn after(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        self.retire_gone(out);
        if self.deploy.is_some() {
            self.advance_deploy(obs, now, out);
            // It may have stopped a generation with no process left: gone at once.
            self.retire_gone(out);
        }
        if self.removing && self.is_stopped() && !out.contains(&Action::Dropped) {
            for w in std::mem::take(&mut self.waiters) {
                out.push(Action::Reply {
                    client: w.client,
                    outcome: Outcome::Done(Done::Removed),
                });
            }
            out.push(Action::Dropped);
        }
    }

    /// Retires the generations leaving that have stopped.
    fn retire_gone(&mut self, out: &mut Vec<Action>) {
        let gone: Vec<GenId> = self
            .gens
            .values()
            .filter(|g| g.leaving && g.slots.run == RunState::Stopped && g.id != self.serving)
            .map(|g| g.id)
            .collect();
        for g in gone {
            self.gens.remove(&g);
            out.push(Action::Retire(g));
            self.deploy_progress(Event::Retired(g), out);
            out.push(Action::Log(Event::Retired(g)));
        }
    }

    // ------------------------------------------------------------ workers

    fn worker_input(&mut self, g: GenId, input: slots::Input, now: Instant, out: &mut Vec<Action>) {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return;
        };
        match &input {
            // An exit it was not asked for, or a spawn that failed, counts against the
            // generation (a deploy rolls back on it).
            slots::Input::Exited { id, .. } => {
                let asked = matches!(
                    gen_.slots.slots.get(id).map(|s| s.phase),
                    Some(Phase::Stopping { .. })
                );
                let live = gen_
                    .slots
                    .slots
                    .get(id)
                    .is_some_and(|s| s.phase.has_process());
                if live && !asked {
                    gen_.crashes += 1;
                }
            }
            slots::Input::SpawnFailed { .. } => gen_.crashes += 1,
            _ => {}
        }
        self.feed(g, input, now, out);
    }

    fn probe_accepted(&mut self, g: GenId, now: Instant, out: &mut Vec<Action>) {
        let Some(gen_) = self.gens.get(&g) else {
            return;
        };
        if g != self.serving {
            out.push(Action::EndProbe(g));
        }
        let starting: Vec<Slot> = gen_
            .slots
            .slots
            .values()
            .filter(|x| matches!(x.phase, Phase::Starting { .. }) && x.pid.is_some())
            .map(|x| x.id)
            .collect();
        for id in starting {
            self.feed(g, slots::Input::ReadyNotified { id }, now, out);
        }
    }

    /// Feeds generation `g`'s slots; their actions become the machine's.
    fn feed(&mut self, g: GenId, input: slots::Input, now: Instant, out: &mut Vec<Action>) {
        let Some(gen_) = self.gens.get_mut(&g) else {
            return;
        };
        for action in gen_.slots.handle(input, now) {
            match action {
                slots::Action::Spawn(slot) => out.push(Action::Spawn {
                    generation: g,
                    slot,
                }),
                slots::Action::Signal(slot, signal) => out.push(Action::Signal {
                    generation: g,
                    slot,
                    signal,
                }),
                slots::Action::Kill(slot) => out.push(Action::KillTree {
                    generation: g,
                    slot,
                }),
                slots::Action::Note(note) => self.on_note(g, note, out),
            }
        }
    }

    /// A note of generation `g`'s slots: deploy progress for a generation that does not
    /// serve; for the serving one, the answer to the clients waiting for it, or progress.
    fn on_note(&mut self, g: GenId, note: Note, out: &mut Vec<Action>) {
        if g != self.serving {
            if matches!(note, Note::Settled | Note::RestartDone) {
                return;
            }
            self.deploy_progress(
                Event::Worker {
                    generation: g,
                    serving: false,
                    note,
                },
                out,
            );
            return;
        }
        let event = Event::Worker {
            generation: g,
            serving: true,
            note: note.clone(),
        };
        if matches!(note, Note::Failed(_)) {
            out.push(Action::Log(event.clone()));
        }
        let mut keep = Vec::new();
        for w in std::mem::take(&mut self.waiters) {
            let outcome = match (w.until, &note) {
                (WaitFor::Stopped, Note::AllStopped) => Some(Outcome::Done(Done::Stopped)),
                (WaitFor::Settled, Note::Settled) => Some(Outcome::Done(Done::Settled)),
                (WaitFor::RestartDone, Note::RestartDone) => Some(Outcome::Done(Done::Restarted)),
                (WaitFor::Settled | WaitFor::RestartDone, Note::Failed(_)) => {
                    Some(Outcome::Failed(Failure::SiteFailed(note.clone())))
                }
                // A worker that dies right after it started (or became ready) is not a
                // success, whatever the count looked like a moment before.
                (WaitFor::Settled | WaitFor::RestartDone, Note::Crashed(..)) => {
                    Some(Outcome::Failed(Failure::WorkerDied(note.clone())))
                }
                (WaitFor::RestartDone, Note::RestartFailed(_)) => {
                    Some(Outcome::Failed(Failure::RestartStopped(note.clone())))
                }
                _ => None,
            };
            match outcome {
                Some(outcome) => out.push(Action::Reply {
                    client: w.client,
                    outcome,
                }),
                None => keep.push(w),
            }
        }
        self.waiters = keep;
        let watching: Vec<ClientId> = self.waiters.iter().map(|w| w.client).collect();
        if !watching.is_empty() {
            out.push(Action::Progress {
                clients: watching,
                event,
            });
        }
    }

    fn hold(&mut self, client: ClientId, until: WaitFor) {
        self.waiters.push(Waiter { client, until });
    }

    /// The serving generation changed (a flip, a steer back). `Settled` is only noted on
    /// a change, and a generation that settled while it did not serve noted it to no one:
    /// clients waiting for the site to settle are answered now if it has. A client waiting
    /// for a restart to finish waited for the generation that no longer serves: it waits
    /// for the one that does to settle.
    fn serving_changed(&mut self, out: &mut Vec<Action>) {
        for w in &mut self.waiters {
            if w.until == WaitFor::RestartDone {
                w.until = WaitFor::Settled;
            }
        }
        if !self.current().slots.is_settled() {
            return;
        }
        let (settled, keep): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.until == WaitFor::Settled);
        self.waiters = keep;
        for w in settled {
            out.push(Action::Reply {
                client: w.client,
                outcome: Outcome::Done(Done::Settled),
            });
        }
    }

    /// `Settled` is only noted on a change: answer a client whose wish already holds.
    fn reply_if_settled(&mut self, client: ClientId, out: &mut Vec<Action>) {
        let waiting = self.waiters.iter().any(|w| w.client == client);
        if waiting && self.current().slots.is_settled() {
            self.waiters.retain(|w| w.client != client);
            out.push(Action::Reply {
                client,
                outcome: Outcome::Done(Done::Settled),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A world where nothing is measured, every queue is empty, releases resolve to
    /// themselves and probes can reach a generation alone.
    pub(super) struct Quiet;

    impl Observe for Quiet {
        fn resolve_release(
            &self,
            site: &SiteConfig,
            asked: Option<&Path>,
        ) -> Result<Option<PathBuf>, String> {
            Ok(asked
                .map(Path::to_path_buf)
                .or_else(|| site.release.clone()))
        }
        fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
            None
        }
        fn queues_empty(&self, _: GenId, _: GenId) -> bool {
            true
        }
        fn probe_alone(&self) -> Result<(), String> {
            Ok(())
        }
    }

    pub(super) fn site(extra: &str) -> SiteConfig {
        let text = format!("name = \"web\"\ncommand = [\"/bin/true\"]\n{extra}");
        let raw: crate::config::RawSite = toml::from_str(&text).expect("toml");
        crate::config::validate_site(
            Path::new("/etc/hatchery/sites.d/web.toml"),
            &raw,
            crate::config::LogPolicy::default(),
        )
        .expect("valid")
    }

    /// Carries out `actions` as the event loop does, first in first out: spawns succeed
    /// (pid `1000 × generation + slot`), listeners bind, steering flips. Returns every
    /// action seen, the first ones included.
    pub(super) fn drive(
        m: &mut SiteMachine,
        actions: Vec<Action>,
        obs: &dyn Observe,
        t: Instant,
    ) -> Vec<Action> {
        let mut queue: VecDeque<Action> = actions.into();
        let mut seen = Vec::new();
        while let Some(a) = queue.pop_front() {
            let input = match &a {
                Action::Spawn { generation, slot } => Some(Input::Worker {
                    generation: *generation,
                    input: slots::Input::Spawned {
                        id: *slot,
                        pid: i32::try_from(1000 * generation.0 + slot.0).expect("small"),
                    },
                }),
                Action::BindListeners(g) => Some(Input::ListenersBound {
                    generation: *g,
                    result: Ok(()),
                }),
                Action::Steer(g) => Some(Input::Steered {
                    generation: *g,
                    steering: Steering::Ebpf,
                    window: None,
                }),
                _ => None,
            };
            seen.push(a);
            if let Some(input) = input {
                queue.extend(m.handle(input, obs, t));
            }
        }
        seen
    }

    /// Feeds `input` and carries out what follows.
    pub(super) fn send(
        m: &mut SiteMachine,
        input: Input,
        obs: &dyn Observe,
        t: Instant,
    ) -> Vec<Action> {
        let a = m.handle(input, obs, t);
        drive(m, a, obs, t)
    }

    pub(super) fn exited(g: u32, slot: u32) -> Input {
        Input::Worker {
            generation: GenId(g),
            input: slots::Input::Exited {
                id: Slot(slot),
                reason: slots::ExitReason::Exited { code: 0 },
            },
        }
    }

    pub(super) fn replies(actions: &[Action]) -> Vec<(ClientId, Outcome)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Reply { client, outcome } => Some((*client, outcome.clone())),
                _ => None,
            })
            .collect()
    }

    pub(super) fn spawned(actions: &[Action]) -> Vec<(u32, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { generation, slot } => Some((generation.0, slot.0)),
                _ => None,
            })
            .collect()
    }

    /// A budget of 400M with 100M a worker: a cap of 4, which 4 workers fill.
    pub(super) const FULL_BUDGET: &str =
        "workers = 4\nmemory = \"400M\"\nworker_memory = \"100M\"\n";

    #[test]
    fn stopping_answers_the_clients_waiting_for_the_site_to_settle() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(
            site("workers = 2\n[ready]\ncheck = \"notify\"\n"),
            None,
            None,
            t,
        );
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        let a = send(
            &mut m,
            Input::Stop {
                client: Some(ClientId(2)),
                why: CancelReason::SiteStopped,
            },
            &Quiet,
            t,
        );
        assert_eq!(
            replies(&a),
            vec![(
                ClientId(1),
                Outcome::Failed(Failure::Cancelled(CancelReason::SiteStopped))
            )],
            "the start never settles now: {a:?}"
        );
    }

    #[test]
    fn a_stop_during_a_deploy_starts_no_worker() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        // The old generation gives up a slot; the new one takes it.
        let a = send(
            &mut m,
            Input::Deploy {
                client: ClientId(2),
                release: None,
            },
            &Quiet,
            t,
        );
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Signal {
                    generation: GenId(1),
                    ..
                }
            )),
            "{a:?}"
        );
        let a = send(&mut m, exited(1, 3), &Quiet, t);
        assert_eq!(spawned(&a), vec![(2, 0)]);
        // Cancelled, the deploy gives the old generation its workers back, for its next start.
        let a = send(
            &mut m,
            Input::Stop {
                client: Some(ClientId(3)),
                why: CancelReason::SiteStopped,
            },
            &Quiet,
            t,
        );
        assert_eq!(spawned(&a), vec![], "{a:?}");
        for (g, slot) in [(1, 0), (1, 1), (1, 2), (2, 0)] {
            send(&mut m, exited(g, slot), &Quiet, t);
        }
        assert!(m.is_stopped());
        let a = send(&mut m, Input::Tick, &Quiet, t + capacity::SETTLE);
        assert_eq!(spawned(&a), vec![]);
        assert_eq!(m.current().slots.desired, 4, "all of them when it starts");
    }

    #[test]
    fn a_stopping_site_is_stopped_to_deploy_scale_and_restart() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site("workers = 1\n"), None, None, t);
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        let stop = Input::Stop {
            client: Some(ClientId(2)),
            why: CancelReason::SiteStopped,
        };
        send(&mut m, stop, &Quiet, t);
        assert_eq!(m.current().slots.run, RunState::Stopping);
        let a = send(
            &mut m,
            Input::Deploy {
                client: ClientId(3),
                release: None,
            },
            &Quiet,
            t,
        );
        assert_eq!(
            replies(&a),
            vec![(ClientId(3), Outcome::Failed(Failure::Stopped))]
        );
        assert!(m.deploy().is_none());
        let scale = Input::Scale {
            client: ClientId(4),
            workers: 2,
            owner: None,
        };
        let a = send(&mut m, scale, &Quiet, t);
        assert_eq!(
            replies(&a),
            vec![(ClientId(4), Outcome::Done(Done::WhenStarted(2)))]
        );
        // A restart starts it again: the client waits for it to settle (no rolling restart
        // follows a start).
        send(&mut m, Input::Restart(ClientId(5)), &Quiet, t);
        send(&mut m, exited(1, 0), &Quiet, t);
        let later = t + Duration::from_secs(2);
        let a = send(&mut m, Input::Tick, &Quiet, later);
        assert!(
            replies(&a).contains(&(ClientId(5), Outcome::Done(Done::Settled))),
            "{a:?}"
        );
    }

    /// Measured memory of every worker, as given.
    pub(super) struct Measured(pub(super) u64);

    impl Observe for Measured {
        fn resolve_release(
            &self,
            s: &SiteConfig,
            a: Option<&Path>,
        ) -> Result<Option<PathBuf>, String> {
            Quiet.resolve_release(s, a)
        }
        fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
            Some(self.0)
        }
        fn queues_empty(&self, _: GenId, _: GenId) -> bool {
            true
        }
        fn probe_alone(&self) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_fall_of_the_cap_applies_before_restarts_that_are_due() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        // Slot 1 dies at once: it restarts after the backoff floor.
        let a = send(&mut m, exited(1, 1), &Quiet, t + Duration::from_millis(1));
        assert_eq!(spawned(&a), vec![]);
        // Measured at 150M (172.5M with the margin), the budget holds 2: the slot waiting
        // for its restart is the first to go, and nothing starts above the new cap.
        let later = t + capacity::SETTLE;
        let a = send(&mut m, Input::Tick, &Measured(150 << 20), later);
        assert_eq!(m.capacity().map(|c| c.workers), Some(2));
        assert_eq!(spawned(&a), vec![], "{a:?}");
        assert!(!m.current().slots.slots.contains_key(&Slot(1)));
    }

    #[test]
    fn a_flip_to_a_settled_generation_answers_the_clients_waiting_for_the_site_to_settle() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(
            site("workers = 1\n[ready]\ncheck = \"notify\"\n"),
            None,
            None,
            t,
        );
        // The old worker never says it is ready: the start waits.
        send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
        let a = send(
            &mut m,
            Input::Deploy {
                client: ClientId(2),
                release: None,
            },
            &Quiet,
            t,
        );
        assert_eq!(spawned(&a), vec![(2, 0)]);
        let ready = Input::Worker {
            generation: GenId(2),
            input: slots::Input::ReadyNotified { id: Slot(0) },
        };
        send(&mut m, ready, &Quiet, t);
        // Probation and settle both end a second later: it settles, then serves.
        let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(1));
        assert_eq!(m.serving(), GenId(2));
        assert!(
            replies(&a).contains(&(ClientId(1), Outcome::Done(Done::Settled))),
            "{a:?}"
        );
    }

    #[test]
    fn start_waits_for_every_worker_to_settle() {
        let t = Instant::now();
        let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
        let a = m.handle(Input::Start(Some(ClientId(7))), &Quiet, t);
        let spawns: Vec<&Action> = a
            .iter()
            .filter(|x| matches!(x, Action::Spawn { .. }))
            .collect();
        assert_eq!(spawns.len(), 2);
        for slot in [Slot(0), Slot(1)] {
            let a = m.handle(
                Input::Worker {
                    generation: GenId(1),
                    input: slots::Input::Spawned {
                        id: slot,
                        pid: 10 + i32::from(slot.0 == 1),
                    },
                },
                &Quiet,
                t,
            );
            assert!(
                !a.iter().any(|x| matches!(x, Action::Reply { .. })),
                "{a:?}"
            );
        }
        let later = t + Duration::from_secs(1);
        let a = m.handle(Input::Tick, &Quiet, later);
        assert!(
            a.contains(&Action::Reply {
                client: ClientId(7),
                outcome: Outcome::Done(Done::Settled)
            }),
            "{a:?}"
        );
    }
}

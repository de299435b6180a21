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
//! A generation of a `mode = "zygote"` site has a zygote its workers are forked from: the
//! machine starts and stops it ([`Action::StartZygote`], [`Action::StopZygote`]) and holds
//! worker spawns until it is ready ([`Input::ZygoteReady`]); a spawn is still a `Spawn`
//! answered by `Spawned`/`SpawnFailed`. The policy is in `zygote`.
//!
//! What the state file keeps of a machine, and the machine a new agent builds from it
//! to take over the workers an agent that crashed left running, are in `adopt`
//! ([`SiteMachine::record`], [`SiteMachine::adopt`]).
//!
//! Invariants (checked by the simulation in `sim.rs`): never more workers than the cap;
//! never two live workers in one slot; two starts of one slot are at least the backoff
//! floor apart unless an operator asked; a deploy never leaves the site without a serving
//! generation that runs; every client waiting is answered exactly once; a worker of a
//! zygote-mode generation is spawned only from its ready zygote, and a generation has at
//! most one zygote process.

mod adopt;
mod deploy;
mod health;
mod load;
mod operators;
pub mod outcome;
mod reconfigure;
#[cfg(test)]
mod sim;
mod time;
mod zygote;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use self::adopt::{GenRecord, MachineRecord, WorkerState};
pub use self::deploy::{DeployEnd, DeployState, WARMUP_INTERVAL, WarmupReport};
pub use self::health::{HealthAnswer, HealthResult};
pub use self::outcome::{
    CancelReason, Done, Event, Failure, Outcome, ProbeAnswer, RollbackReason, ShutAnswer, Steering,
};
pub use self::zygote::{ZygotePhase, ZygoteState};
use super::capacity::{self, Capacity};
use super::deploy::Share;
use super::ids::{ClientId, GenId, Slot};
use super::load::LoadState;
use super::slots::{self, Note, Phase, Policies, RunState, SiteCore};
use crate::config::{SiteConfig, SiteName};

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
    /// Whether workers' memory can be measured here at all (the memory controller in
    /// their leaves): where it cannot, a site sized by its budget grows on its estimate.
    fn memory_measurable(&self) -> bool {
        true
    }
    /// What generation `generation`'s zygote holds of the site's budget (its leaf's
    /// `memory.current`), where it has one and it is accounted.
    fn zygote_memory(&self, generation: GenId) -> Option<u64> {
        let _ = generation;
        None
    }
    /// What the kernel says of generation `generation`'s load (load scaling): its accept
    /// queues, CPU time, CPU stall and memory events, where available.
    fn load(&self, generation: GenId) -> crate::supervisor::load::Counters {
        let _ = generation;
        crate::supervisor::load::Counters::default()
    }
    /// Whether the accept queues of `old`'s own listeners are empty (listeners it shares
    /// with `new` count as empty: they are served by `new` already).
    fn queues_empty(&self, old: GenId, new: GenId) -> bool;
    /// Whether a `tcp` ready check can reach a new generation alone (steering attached to
    /// the site's first TCP listener); why not, if not.
    fn probe_alone(&self) -> Result<(), String>;
    /// Whether processes that generation `generation`'s workers left behind (killed with
    /// their cgroup leaf, not gone yet) may still hold its sockets. Where this cannot be
    /// known (no cgroups), `false`.
    fn leftovers(&self, generation: GenId) -> bool {
        let _ = generation;
        false
    }
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
    /// How its last `http` ready probe that did not count was answered.
    pub last_probe: Option<ProbeAnswer>,
    /// The last worker restarted for failing its health checks (it counts as a crash).
    pub unhealthy: Option<Slot>,
    /// Its zygote (`mode = "zygote"` only), which its workers are forked from.
    pub zygote: Option<ZygoteState>,
    /// Deployed because the serving generation's listener was shut down
    /// (`SiteMachine::listener_shut`): a shutdown of its own is not answered with another
    /// deploy.
    pub replaces_shut: bool,
    /// The first of its listeners found shut down, if one was: once it serves with no
    /// deploy under way and is not stopped, its release is deployed again (once).
    pub shut: Option<String>,
    /// That deploy was started (it is not again: once in a row).
    pub repaired: bool,
    /// Why that deploy was last refused before it started, if it was (no workers, no
    /// room, a release that does not resolve, no steering): tried again at every step,
    /// said again only when the reason changes; forgotten while a deploy, a stop or another
    /// generation's processes hold the repair back (said again after them).
    pub repair_refused: Option<Failure>,
}

impl Generation {
    fn new(id: GenId, release: Option<PathBuf>, config: SiteConfig, desired: u32) -> Generation {
        let slots = SiteCore::new(desired, policies(&config));
        let zygote = zygote::for_config(&config);
        Generation {
            id,
            release,
            config,
            slots,
            crashes: 0,
            leaving: false,
            last_probe: None,
            unhealthy: None,
            zygote,
            replaces_shut: false,
            shut: None,
            repaired: false,
            repair_refused: None,
        }
    }

    /// Whether its zygote died while it was ready and has not been replaced yet (its
    /// workers run on; new ones wait for the next zygote).
    pub fn zygote_degraded(&self) -> bool {
        self.zygote.as_ref().is_some_and(|z| z.degraded)
    }

    /// Whether a worker of it is starting (a `tcp` check probes it then): spawned, not
    /// held for its zygote.
    fn starting(&self) -> bool {
        self.slots.spawned_starting() > 0
    }
}

/// The memory cap of a site just built and the count it starts with, for `requested`
/// workers: `auto.min` for an automatic site, else `requested`, within the cap (said so
/// when it does not fit).
fn initial_count(
    config: &SiteConfig,
    requested: u32,
    out: &mut Vec<Action>,
) -> (Option<Capacity>, u32) {
    let cap = config.limits.memory.and_then(|budget| {
        capacity::capacity(budget, 0, config.limits.worker_estimate(), None, requested)
    });
    let initial = match (config.auto, cap) {
        (Some(a), Some(c)) => a.min.min(c.workers),
        (None, Some(c)) => requested.min(c.workers),
        (_, None) => requested,
    };
    if initial < requested && config.auto.is_none() {
        if let Some(capacity) = cap {
            out.push(Action::Log(Event::DoesNotFit {
                requested,
                capacity,
            }));
        }
    }
    (cap, initial)
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
    /// The ready probe of a generation was accepted by one of its workers (`tcp`), or
    /// answered with a status that counts (`http`).
    ProbeAccepted(GenId),
    /// The `http` ready probe of a generation was answered, but not as `ready.status`
    /// asks (the loop probes again).
    ProbeRefused {
        /// The generation.
        generation: GenId,
        /// How it was answered.
        answer: ProbeAnswer,
    },
    /// The listeners of a new generation were bound (or could not be).
    ListenersBound {
        /// The generation.
        generation: GenId,
        /// Why not, if not.
        result: Result<(), String>,
    },
    /// New connections now go to a generation (or could not be steered to it: they go
    /// where they went).
    Steered {
        /// The generation.
        generation: GenId,
        /// How, or why not.
        result: Result<Steering, String>,
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
        /// A canary: the new generation takes this share of new connections beside the
        /// serving one until it is promoted or rolled back.
        canary: Option<Share>,
    },
    /// Let an automatic site's count follow its load (or memory budget) again after a
    /// `scale N` pinned it.
    ScaleAuto(ClientId),
    /// The serving generation's CPU pressure trigger fired: its load is sampled now,
    /// not at the next interval.
    Pressure,
    /// Promote the canary: the new generation grows to full size and is flipped to.
    Promote(ClientId),
    /// The canary's share of new connections was steered to a generation (or could not
    /// be).
    CanarySteered {
        /// The generation.
        generation: GenId,
        /// Why not, if not.
        result: Result<(), String>,
    },
    /// Roll back the deploy under way, steer back to a draining generation, or deploy the
    /// previous release.
    Rollback(ClientId),
    /// A listener of a generation no longer accepts connections: a process holding it
    /// shut it down (`shutdown(2)` closes a socket for every process that holds it).
    ListenerShut {
        /// The generation.
        generation: GenId,
        /// Which listener, as the log names it (`http (tcp 127.0.0.1:8000)`).
        listener: String,
    },
    /// A reload changed the site's configuration (its listeners were rebound already).
    Reconfigure(Box<SiteConfig>),
    /// The site was removed from the configuration: stop it and forget it.
    Remove,
    /// A client went away: it waits for nothing any more.
    ClientGone(ClientId),
    /// A health check ended.
    HealthChecked(HealthResult),
    /// The warm-up of a new generation ended.
    WarmedUp {
        /// The generation.
        generation: GenId,
        /// What it did.
        report: WarmupReport,
    },
    /// A generation's zygote (started by [`Action::StartZygote`]) said `READY`: workers
    /// can be forked from it.
    ZygoteReady(GenId),
    /// A generation's zygote ended (or could not be started).
    ZygoteExited {
        /// The generation.
        generation: GenId,
        /// How, in words.
        reason: String,
    },
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
    /// Send this share of new connections to a generation beside the serving one (a
    /// canary), then report [`Input::CanarySteered`]; `None`: end the canary (no report).
    Canary {
        /// The canary's generation.
        generation: GenId,
        /// Its share, or `None` to end it.
        share: Option<Share>,
    },
    /// Start or continue the `tcp` ready probe of a generation; report
    /// [`Input::ProbeAccepted`] once a worker accepted it.
    Probe(GenId),
    /// Start, look at (or with `give_up`, end) the health check of a generation; report
    /// [`Input::HealthChecked`] once it is over.
    Health {
        /// The generation checked (the serving one when it began).
        generation: GenId,
        /// Its time is up: end it, failed unless answered by now.
        give_up: bool,
    },
    /// Start, look at (or with `give_up`, end) the warm-up of a new generation (each of
    /// `deploy.warmup`'s requests answered by every one of its workers, reached through
    /// the steering probe entry); report [`Input::WarmedUp`] once it is over.
    WarmUp {
        /// The new generation.
        generation: GenId,
        /// Its time is up: end it with what was done.
        give_up: bool,
    },
    /// The probe of a generation is over (drop it and its steering entry).
    EndProbe(GenId),
    /// A generation is gone: close its listeners, remove its cgroup.
    Retire(GenId),
    /// Start a generation's zygote (`mode = "zygote"`), then report
    /// [`Input::ZygoteReady`] once it said `READY`, or [`Input::ZygoteExited`] when it
    /// ended.
    StartZygote(GenId),
    /// Send a generation's zygote its stop signal; report [`Input::ZygoteExited`] once it
    /// ended (the loop escalates to SIGKILL after `stop.timeout`).
    StopZygote(GenId),
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
    /// Something for the site's history: the agent's log, the site's log, the event
    /// history (every note of a generation's slots, every deploy step).
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
    /// `scale N` pinned the count of an automatic site (until `scale SITE auto`).
    pinned: bool,
    /// Load scaling (`[scale] by = "load"`): the previous sample, the last decision.
    load: LoadState,
    /// When the load is sampled next (while it is, see `load`).
    next_sample: Option<Instant>,
    waiters: Vec<Waiter>,
    removing: bool,
    health: health::HealthState,
    /// A site whose app binds its own port: the serving generation starts once no other
    /// generation has a process left (one rolled back may still be stopping).
    start_deferred: bool,
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
        let mut out = Vec::new();
        let (cap, initial) = initial_count(&config, requested, &mut out);
        let gen_config = match &release {
            Some(r) => config.for_release(r),
            None => config.clone(),
        };
        let first = GenId(1);
        let gens = BTreeMap::from([(first, Generation::new(first, release, gen_config, initial))]);
        let machine = SiteMachine::assemble(config, gens, first, first, previous_release, now);
        let machine = SiteMachine {
            requested,
            capacity: cap,
            ..machine
        };
        (machine, out)
    }

    /// A machine with these generations, `serving` serving, nothing under way: no deploy,
    /// no client waiting, a fresh health state, the capacity check due once workers had
    /// time to settle. Its `requested` count is the configuration's, with no cap yet.
    fn assemble(
        config: SiteConfig,
        gens: BTreeMap<GenId, Generation>,
        serving: GenId,
        last_gen: GenId,
        previous_release: Option<PathBuf>,
        now: Instant,
    ) -> SiteMachine {
        SiteMachine {
            next_capacity_check: config.limits.memory.map(|_| now + capacity::SETTLE),
            requested: config.workers,
            gens,
            config,
            serving,
            last_gen,
            deploy: None,
            queued: VecDeque::new(),
            last_deploy: None,
            previous_release,
            capacity: None,
            last_peak: None,
            pinned: false,
            load: LoadState::default(),
            next_sample: None,
            waiters: Vec::new(),
            removing: false,
            health: health::HealthState::default(),
            start_deferred: false,
        }
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

    /// Whether `scale N` pinned the count of an automatic site.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Whether its load is sampled now (sites with `[scale] by = "load"`).
    pub fn load_sampling(&self) -> bool {
        self.next_sample.is_some()
    }

    /// Load scaling: the signals at the last sample, the last decision (sites with
    /// `[scale] by = "load"`).
    pub fn load(&self) -> Option<&LoadState> {
        self.config.auto.filter(|a| a.by_load()).map(|_| &self.load)
    }

    /// Whether the serving generation waits to start until another generation's last
    /// process is gone (the app binds its own port: never two generations at once).
    pub fn start_deferred(&self) -> bool {
        self.start_deferred
    }

    /// Starts the serving generation, or, for a site whose app binds its own port while
    /// another generation still has a process, once that one is gone.
    fn start_serving(&mut self, now: Instant, out: &mut Vec<Action>) {
        let others = self
            .gens
            .values()
            .any(|g| g.id != self.serving && g.slots.live() > 0);
        if self.config.exclusive_deploys() && others {
            self.start_deferred = true;
            return;
        }
        self.start_deferred = false;
        let serving = self.serving;
        self.feed(serving, slots::Input::StartRequested, now, out);
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

    /// Whether some generation is stopping: workers were asked to exit and not all have.
    pub fn is_stopping(&self) -> bool {
        self.gens
            .values()
            .any(|g| g.slots.run == RunState::Stopping)
    }

    /// While a canary serves: the share of new connections generation `g` takes.
    pub fn connection_share(&self, g: GenId) -> Option<Share> {
        let d = self.deploy.as_ref()?;
        let c = d.canary.filter(|c| c.steered)?;
        if g == d.to && g != self.serving {
            Some(c.share)
        } else if g == self.serving && d.to != self.serving {
            Share::from_basis_points(10_000 - c.share.basis_points())
        } else {
            None
        }
    }

    /// A generation's state, as `status` shows it.
    pub fn generation_state(&self, g: &Generation) -> &'static str {
        match &self.deploy {
            Some(d) if d.to == g.id && g.id != self.serving => d.stage.name(),
            Some(d) if d.from == g.id && d.exclusive.is_some_and(|x| x.old_stopped) => {
                if g.slots.slots.is_empty() {
                    "stopped"
                } else {
                    "stopping"
                }
            }
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
            .flat_map(|g| {
                [
                    g.slots.next_deadline(),
                    g.zygote.as_ref().and_then(|z| z.deadline()),
                ]
            })
            .flatten()
            .min();
        [
            gens,
            probe,
            self.next_capacity_check,
            self.next_sample,
            self.deploy_deadline(now),
            self.health_deadline(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Generations whose `tcp` or `http` ready probe should run.
    fn needs_probe(&self) -> impl Iterator<Item = GenId> + '_ {
        let probes = self.config.ready.check.probes();
        self.gens
            .values()
            .filter(move |g| probes && !g.leaving && g.starting())
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
            Input::ProbeRefused { generation, answer } => {
                if let Some(g) = self.gens.get_mut(&generation) {
                    g.last_probe = Some(answer);
                }
            }
            Input::ListenersBound { generation, result } => {
                self.listeners_bound(generation, result, obs, now, &mut out)
            }
            Input::Steered {
                generation,
                result,
                window,
            } => self.steered(generation, result, window, now, &mut out),
            Input::Tick => self.tick(obs, now, &mut out),
            // A stop-then-start deploy holds the serving generation stopped: starting it
            // would bind the port beside the new one.
            Input::Start(client) if self.deploy.as_ref().is_some_and(|d| d.exclusive.is_some()) => {
                if let (Some(client), Some(busy)) = (client, self.deploy_busy()) {
                    out.push(Action::Reply {
                        client,
                        outcome: Outcome::Failed(busy),
                    });
                }
            }
            Input::Start(client) => {
                self.stop_superseded(&mut out);
                if let Some(c) = client {
                    self.hold(c, WaitFor::Settled);
                }
                self.start_serving(now, &mut out);
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
            Input::ScaleAuto(client) => self.scale_auto(client, now, &mut out),
            Input::Pressure => {
                if self.next_sample.is_some() {
                    self.sample_load(obs, now, &mut out);
                }
            }
            Input::Deploy {
                client,
                release,
                canary,
            } => self.request_deploy(client, release, canary, false, obs, now, &mut out),
            Input::Promote(client) => self.promote(client, obs, now, &mut out),
            Input::CanarySteered { generation, result } => {
                self.canary_steered(generation, result, now, &mut out)
            }
            Input::Rollback(client) => self.request_rollback(client, obs, now, &mut out),
            Input::ListenerShut {
                generation,
                listener,
            } => self.listener_shut(generation, listener, obs, now, &mut out),
            Input::Reconfigure(config) => self.reconfigure(*config, obs, now, &mut out),
            Input::Remove => {
                self.removing = true;
                self.stop(None, CancelReason::SiteRemoved, now, &mut out);
            }
            Input::ClientGone(client) => self.forget_client(client),
            Input::HealthChecked(result) => self.health_checked(result, now, &mut out),
            Input::WarmedUp { generation, report } => {
                self.warmed_up(generation, report, now, &mut out)
            }
            Input::ZygoteReady(g) => self.zygote_ready(g, now, &mut out),
            Input::ZygoteExited { generation, reason } => {
                self.zygote_exited(generation, reason, now, &mut out)
            }
        }
        self.after(obs, now, &mut out);
        out
    }

    /// Generations retired, the deploy moved on, the site dropped once removed and stopped.
    fn after(&mut self, obs: &dyn Observe, now: Instant, out: &mut Vec<Action>) {
        self.retire_gone(out);
        if self.start_deferred {
            self.start_serving(now, out);
        }
        // A deploy that ended outside the plan's steps (its flip or its canary's steering
        // failed) lets the next one start.
        self.next_queued(obs, now, out);
        if self.deploy.is_some() {
            self.advance_deploy(obs, now, out);
            // It may have stopped a generation with no process left: gone at once.
            self.retire_gone(out);
        }
        // A deploy that ended (a queued one started first) with a generation whose
        // listener was shut down serving; or the site started again with one.
        self.repair_shut(obs, now, out);
        self.start_zygotes(now, out);
        self.health_arm(now);
        self.arm_load(now);
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
            if let Some(z) = self.gens.remove(&g).and_then(|g| g.zygote) {
                // One stopping already was told.
                if matches!(z.phase, ZygotePhase::Starting { .. } | ZygotePhase::Ready) {
                    out.push(Action::StopZygote(g));
                }
            }
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
        // With an `http` check only an answer makes a worker ready: servers such as
        // gunicorn send `READY=1` before their app is loaded, or whether it loads at all.
        if matches!(input, slots::Input::ReadyNotified { .. })
            && gen_.config.ready.check == crate::config::ReadyCheck::Http
        {
            return;
        }
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
        let actions = gen_.slots.handle(input, now);
        self.carry(g, actions, now, out);
    }

    /// Generation `g`'s slots' actions, as the machine's. A spawn of a zygote-mode
    /// generation whose zygote is not ready is held until it is (see `zygote`).
    fn carry(
        &mut self,
        g: GenId,
        actions: Vec<slots::Action>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for action in actions {
            match action {
                slots::Action::Spawn(slot) => {
                    if !self.hold_spawn(g, slot) {
                        out.push(Action::Spawn {
                            generation: g,
                            slot,
                        })
                    }
                }
                slots::Action::Signal(slot, signal) => out.push(Action::Signal {
                    generation: g,
                    slot,
                    signal,
                }),
                slots::Action::Kill(slot) => out.push(Action::KillTree {
                    generation: g,
                    slot,
                }),
                slots::Action::Note(note) => {
                    if note == Note::AllStopped {
                        self.stop_zygote(g, out);
                    }
                    self.on_note(g, note, out)
                }
            }
        }
        self.drop_held(g, now, out);
    }

    /// A note of generation `g`'s slots: deploy progress for a generation that does not
    /// serve; for the serving one, the answer to the clients waiting for it, or progress.
    fn on_note(&mut self, g: GenId, note: Note, out: &mut Vec<Action>) {
        // Every note is history (the agent's log, the site's log, the event history).
        out.push(Action::Log(Event::Worker {
            generation: g,
            serving: g == self.serving,
            note: note.clone(),
        }));
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
mod tests;

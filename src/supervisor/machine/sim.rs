//! A deterministic simulation of one whole site: a [`SiteMachine`] driven through random
//! sequences of operator requests, worker failures and clock jumps, against a model of
//! the world it runs in, with the machine's invariants checked at every action and after
//! every input.
//!
//! The world (one [`World`] per sequence; it is also the machine's [`Observe`]):
//! - processes by (generation, slot), each with a pid, its memory, and what it will do:
//!   become ready at a time or never, crash at a time or never, ignore the stop signal;
//! - what a generation's processes do depends on its release (or command): `good`,
//!   `crash` (dies within seconds), `hang` (never ready), `broken` (cannot be spawned),
//!   `missing` (does not resolve); any spawn may also fail transiently;
//! - a signal makes a process exit after a random delay (sometimes after the stop
//!   timeout, so the machine must escalate), unless it ignores it; a killed tree exits
//!   within a few milliseconds;
//! - binding a new generation's listeners sometimes fails; a `tcp` probe is accepted
//!   once one of the generation's processes accepts; accept queues are empty or not;
//!   the release symlink is repointed or dangles.
//!
//! Every action the machine returns is carried out in the order returned, as the event
//! loop must: a result the machine waits for (a spawn's pid, listeners bound, steering
//! flipped, a probe accepted) is fed back at once, and the actions that input returns are
//! carried out after the rest of the list (first in, first out). A loop that carried them
//! out first (depth first) would reorder effects: it could retire a generation before the
//! steering back from it that was returned earlier.
//!
//! The clock is a base [`Instant`] plus simulated offsets (nothing depends on the base).
//! Time moves only on `Tick` steps, either smoothly (the loop wakes at every deadline and
//! every event of the world, in order) or in a jump (the loop was not scheduled:
//! everything that happened meanwhile arrives at once, late).
//!
//! A sequence is 30 to 120 random steps (crashes, OOM kills, busy reports, memory and
//! queue changes, a repointed release symlink, `Start`, `Stop`, `Restart`, `Scale`
//! (owner-limited, beyond `MAX_WORKERS`), `Reconfigure` (workers, limits, command,
//! timeouts), `Deploy` (good, crashing, hanging, broken, missing releases), `Rollback`,
//! `ClientGone`, `Remove`, clock advances), then a calm (the world stops misbehaving and
//! time runs), then a final stop.
//!
//! The invariants, and where they are checked:
//! 1. Cap: a worker is started only if the site then runs no more processes than its cap
//!    (the deploy's `cap` during a deploy, else the memory capacity); the serving
//!    generation never asks for more workers than the capacity; a deploy adds no slot
//!    beyond its cap. Checked at every `Spawn`, and after every input. (Processes still
//!    stopping count: their memory is still in use. The live count may exceed a cap that
//!    has just fallen; the machine cannot kill faster than the stop policy, so only starts
//!    are checked against it.)
//! 2. One process per slot: `Spawn` only for a slot without a process; the machine's
//!    slots with a process are exactly the world's processes, with the same pids; a
//!    signal or a kill only for a slot with a process; no generation keeps more slots
//!    than it wants, besides those on their way out.
//! 3. Backoff floor: a slot whose process ended on its own (crashed, was OOM-killed, could
//!    not be spawned) starts again at least `restart.backoff_initial` after its previous
//!    start, unless an operator asked for something (start, stop, restart, scale,
//!    reconfigure, deploy, rollback) since, or the start is the operator's rolling restart
//!    reaching the slot (it restarts a slot backing off at once: one start per slot and
//!    request, not a spin). A slot removed (scaled down) is gone: a later one with its
//!    number is a new slot. A process the machine stopped or killed is restarted when the
//!    machine decides (a rolling restart, a slot reused while scaling): the floor is there
//!    so that a worker that dies at once cannot spin.
//! 4. Serving: the serving generation exists, is not leaving, runs (not stopped or
//!    stopping) unless a client stopped the site (or never started it), and is where
//!    connections are steered; a generation that runs leaves no slot at rest; every other
//!    generation belongs to the deploy under way or is leaving, and one leaving is
//!    retired as soon as it has stopped (and only then: no process left, not serving, not
//!    steered to); until the flip the old generation keeps at least one worker.
//! 5. Answers: every client that asked something gets exactly one `Reply`, and no
//!    `Progress` after it (in the order the machine returns them); once the world is
//!    calm, a site that has settled with no deploy left has answered every client but
//!    those waiting for a stop; at the end (the site stopped and time run on) none is
//!    left waiting, except clients that went away.
//! 6. Liveness: a stop always ends (no process left, every generation stopped); a site
//!    stopped by a client starts no worker until a client starts it; after a `Tick` the
//!    machine never asks to be woken at or before now (the loop would spin).
//!
//! `cargo test --lib supervisor::machine::sim` runs [`RUNS`] sequences (seeds `0..RUNS`).
//! A failure names its seed and step; `HATCHERY_SIM_SEED=<n>` replays one seed with a
//! trace of every input, action and generation's slots on stderr (shown when it fails, or
//! with `-- --nocapture`); `HATCHERY_SIM_RUNS=<n>` sets the number of sequences.
#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{Action, CancelReason, Input, Observe, SiteMachine, Steering};
use crate::config::{
    AutoWorkers, MAX_WORKERS, ReadyCheck, ReadyPolicy, RestartPolicy, Signal, SiteConfig,
    StopPolicy,
};
use crate::supervisor::deploy::Stage;
use crate::supervisor::ids::{ClientId, GenId, Slot};
use crate::supervisor::slots::{self, AfterStop, ExitReason, Phase, RunState};

/// Sequences per `cargo test`.
const RUNS: u64 = 10_000;
/// Steps per sequence: at least, and at most.
const STEPS: (u64, u64) = (30, 120);
/// Wake-ups of a smooth clock advance before the rest of it is a jump.
const MAX_WAKEUPS: usize = 300;
/// World events delivered at one instant before the simulation calls it a livelock.
const MAX_EVENTS: usize = 10_000;
const M: u64 = 1 << 20;

/// A small deterministic PRNG (SplitMix64): the simulation must replay from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.next() % len as u64).expect("below a usize")
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.index(xs.len())]
    }

    fn small(&mut self, lo: u32, hi: u32) -> u32 {
        u32::try_from(self.range(u64::from(lo), u64::from(hi))).expect("within u32")
    }
}

/// What a generation's processes do, by its release (or command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quality {
    Good,
    /// Dies within seconds of starting.
    Crashes,
    /// Never becomes ready.
    Hangs,
    /// Cannot be spawned at all (a permanent failure).
    Broken,
}

fn quality(text: &str) -> Quality {
    if text.contains("broken") {
        Quality::Broken
    } else if text.contains("crash") {
        Quality::Crashes
    } else if text.contains("hang") {
        Quality::Hangs
    } else {
        Quality::Good
    }
}

/// A process of the world.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    /// When it becomes ready (`notify`: says so; `tcp`: accepts); `None`: never.
    ready_at: Option<Instant>,
    ready: bool,
    /// When it dies on its own, and how.
    crash_at: Option<(Instant, ExitReason)>,
    /// When it exits because it was told to, and how.
    exit_at: Option<(Instant, ExitReason)>,
    ignores_stop: bool,
    /// The machine signalled or killed it.
    asked: bool,
    mem: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Happens {
    Ready,
    Crash,
    Exit,
}

/// The world a site runs in, and the machine's read-only window onto it.
struct World {
    check: ReadyCheck,
    procs: BTreeMap<(GenId, Slot), Proc>,
    next_pid: i32,
    /// Where new connections go.
    steered: GenId,
    probing: BTreeSet<GenId>,
    queues_empty: bool,
    /// What the release symlink points to.
    link: PathBuf,
    link_dangles: bool,
    probe_alone: Result<(), String>,
    /// Whether workers' memory is accounted (`memory.peak`).
    accounted: bool,
    /// Typical memory of a worker.
    mem_base: u64,
    /// No more random crashes, nor transient spawn failures (the end of a sequence;
    /// releases that crash still do).
    calm: bool,
    /// Percent chances.
    spawn_fails: u64,
    bind_fails: u64,
    ignores_stop: u64,
}

impl Observe for World {
    fn resolve_release(
        &self,
        site: &SiteConfig,
        asked: Option<&Path>,
    ) -> Result<Option<PathBuf>, String> {
        match asked {
            Some(p) if p.to_string_lossy().contains("missing") => {
                Err(format!("{} does not resolve", p.display()))
            }
            Some(p) => Ok(Some(p.to_path_buf())),
            None if site.release.is_none() => Ok(None),
            None if self.link_dangles => Err("/srv/web/current does not resolve".into()),
            None => Ok(Some(self.link.clone())),
        }
    }

    fn measured_memory(&self, generation: GenId, slots: &[Slot]) -> Option<u64> {
        if !self.accounted {
            return None;
        }
        slots
            .iter()
            .filter_map(|s| self.procs.get(&(generation, *s)).map(|p| p.mem))
            .max()
    }

    fn queues_empty(&self, _old: GenId, _new: GenId) -> bool {
        self.queues_empty
    }

    fn probe_alone(&self) -> Result<(), String> {
        self.probe_alone.clone()
    }
}

impl World {
    /// The earliest thing that will happen by itself.
    fn next_event(&self) -> Option<(Instant, (GenId, Slot), Happens)> {
        let mut best: Option<(Instant, (GenId, Slot), Happens)> = None;
        let mut consider = |t: Instant, k: (GenId, Slot), h: Happens| {
            if best.is_none_or(|b| t < b.0) {
                best = Some((t, k, h));
            }
        };
        for (k, p) in &self.procs {
            if let (Some(t), false) = (p.ready_at, p.ready) {
                consider(t, *k, Happens::Ready);
            }
            if let Some((t, _)) = &p.crash_at {
                consider(*t, *k, Happens::Crash);
            }
            if let Some((t, _)) = &p.exit_at {
                consider(*t, *k, Happens::Exit);
            }
        }
        best
    }
}

/// A slot's last start, and how its process ended.
#[derive(Debug, Clone, Copy)]
struct Start {
    at: Instant,
    /// The operator epoch when its process ended on its own (crashed, was OOM-killed,
    /// could not be spawned); `None` while it runs, or when the machine ended it.
    crashed: Option<u64>,
}

/// What a client asked, and whether it was answered or went away.
#[derive(Debug)]
struct Asked {
    what: &'static str,
    step: usize,
    answered: bool,
    gone: bool,
}

/// One sequence.
struct Sim {
    rng: Rng,
    trace: bool,
    t0: Instant,
    now: Instant,
    step: usize,
    m: SiteMachine,
    w: World,
    /// The site's configuration as the agent holds it (what a reload replaces).
    cfg: SiteConfig,
    dropped: bool,
    removed: bool,
    next_client: u64,
    clients: BTreeMap<ClientId, Asked>,
    /// The last start of each slot.
    starts: HashMap<(GenId, Slot), Start>,
    /// Starts asked for while the generation's rolling restart was under way.
    rolling_starts: BTreeSet<(GenId, Slot)>,
    /// Counts operator requests.
    epoch: u64,
    /// A client started the site, and none stopped it since.
    up: bool,
    next_release: u32,
}

fn base_config() -> &'static SiteConfig {
    static BASE: OnceLock<SiteConfig> = OnceLock::new();
    BASE.get_or_init(|| super::tests::site("[[listen]]\ntcp = \"127.0.0.1:8000\"\n"))
}

/// A random site: count or `auto`, with or without a budget, a release or not, every
/// policy drawn from a range an operator could write.
fn random_config(rng: &mut Rng) -> SiteConfig {
    let mut c = base_config().clone();
    let release = rng.chance(70);
    c.release = release.then(|| PathBuf::from("/srv/web/current"));
    c.command = vec![if release {
        "{release}/bin/app".into()
    } else {
        "/usr/bin/app".into()
    }];
    let estimate = rng.range(32, 256) * M;
    let budget = estimate * rng.range(1, 8) + rng.range(0, estimate);
    if rng.chance(25) {
        let min = rng.small(1, 2);
        let max = rng.small(min, 8);
        c.auto = Some(AutoWorkers { min, max });
        c.workers = max;
        c.limits.memory = Some(budget);
        c.limits.worker_memory = Some(estimate);
    } else {
        c.workers = rng.small(1, 5);
        if rng.chance(40) {
            c.limits.memory = Some(budget);
            c.limits.worker_memory = rng.chance(80).then_some(estimate);
        }
    }
    c.ready = ReadyPolicy {
        check: rng.pick(&[
            ReadyCheck::None,
            ReadyCheck::None,
            ReadyCheck::Notify,
            ReadyCheck::Notify,
            ReadyCheck::Notify,
            ReadyCheck::Tcp,
        ]),
        timeout: rng.ms(500, 10_000),
        settle: if rng.chance(10) {
            Duration::ZERO
        } else {
            rng.ms(50, 1500)
        },
    };
    c.stop = StopPolicy {
        signal: Signal(libc::SIGTERM),
        timeout: rng.ms(200, 8000),
    };
    let backoff_initial = rng.ms(20, 1000);
    c.restart = RestartPolicy {
        backoff_initial,
        backoff_max: backoff_initial * rng.small(1, 64),
        healthy_after: rng.ms(500, 60_000),
        flapping_exits: rng.small(2, 6),
        flapping_within: rng.ms(2000, 30_000),
    };
    c.deploy.probation = rng.ms(0, 3000);
    c
}

type Step = Result<(), String>;

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng(seed);
        let cfg = random_config(&mut rng);
        let t0 = Instant::now();
        let first = if rng.chance(90) {
            "/srv/web/releases/r1-good"
        } else {
            rng.pick(&["/srv/web/releases/r1-crash", "/srv/web/releases/r1-hang"])
        };
        let w = World {
            check: cfg.ready.check,
            procs: BTreeMap::new(),
            next_pid: 100,
            steered: GenId(1),
            probing: BTreeSet::new(),
            queues_empty: true,
            link: PathBuf::from(first),
            link_dangles: false,
            probe_alone: if rng.chance(90) {
                Ok(())
            } else {
                Err("no eBPF steering".into())
            },
            accounted: rng.chance(90),
            mem_base: cfg.limits.worker_estimate().unwrap_or(100 * M) * rng.range(50, 150) / 100,
            calm: false,
            spawn_fails: rng.pick(&[0, 0, 2, 10]),
            bind_fails: rng.pick(&[0, 5, 20]),
            ignores_stop: rng.pick(&[0, 5, 30]),
        };
        let release = cfg.release.as_ref().map(|_| w.link.clone());
        let previous = rng
            .chance(50)
            .then(|| PathBuf::from("/srv/web/releases/r0-good"));
        let (m, _) = SiteMachine::new(cfg.clone(), release, previous, t0);
        Sim {
            rng,
            trace,
            t0,
            now: t0,
            step: 0,
            m,
            w,
            cfg,
            dropped: false,
            removed: false,
            next_client: 1,
            clients: BTreeMap::new(),
            starts: HashMap::new(),
            rolling_starts: BTreeSet::new(),
            epoch: 0,
            up: false,
            next_release: 2,
        }
    }

    fn client(&mut self, what: &'static str) -> ClientId {
        let c = ClientId(self.next_client);
        self.next_client += 1;
        self.clients.insert(
            c,
            Asked {
                what,
                step: self.step,
                answered: false,
                gone: false,
            },
        );
        c
    }

    // ------------------------------------------------------------ the loop

    /// Hands one input to the machine and carries out everything it asks.
    fn feed(&mut self, input: Input) -> Step {
        if self.dropped {
            return Ok(());
        }
        let out = self.handle(input)?;
        self.carry_out(out)
    }

    fn handle(&mut self, input: Input) -> Result<Vec<Action>, String> {
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

    fn restarting(&self) -> impl Iterator<Item = GenId> + '_ {
        self.m
            .generations()
            .filter(|g| g.slots.is_restarting())
            .map(|g| g.id)
    }

    fn elapsed(&self) -> Duration {
        self.now.duration_since(self.t0)
    }

    fn carry_out(&mut self, out: Vec<Action>) -> Step {
        let mut queue: VecDeque<Action> = out.into();
        while let Some(a) = queue.pop_front() {
            let more = self.act(a)?;
            queue.extend(more);
        }
        Ok(())
    }

    /// Carries out one action; returns the machine's answer to its result, if any.
    fn act(&mut self, a: Action) -> Result<Vec<Action>, String> {
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
                self.w.steered = generation;
                let steering = if self.rng.chance(50) {
                    Steering::Ebpf
                } else {
                    Steering::Shared
                };
                self.handle(Input::Steered {
                    generation,
                    steering,
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
                if self.w.steered == g {
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
            Action::RecordPreviousRelease(_) | Action::ApplyLimits | Action::Log(_) => {
                Ok(Vec::new())
            }
        }
    }

    /// Every client is answered once, and told nothing after its answer, in the order the
    /// machine says things.
    fn answers(&mut self, out: &[Action]) -> Step {
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
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn proc_mut(&mut self, g: GenId, slot: Slot, what: &str) -> Result<&mut Proc, String> {
        self.w
            .procs
            .get_mut(&(g, slot))
            .ok_or_else(|| format!("{what} gen {g} slot {slot}, which has no process"))
    }

    fn spawn(&mut self, g: GenId, slot: Slot) -> Result<Vec<Action>, String> {
        let Some(gen_) = self.m.generation(g) else {
            return Err(format!("spawn in generation {g}, which does not exist"));
        };
        if self.w.procs.contains_key(&(g, slot)) {
            return Err(format!("two processes in gen {g} slot {slot}"));
        }
        if !self.up {
            return Err(format!(
                "started gen {g} slot {slot} of a site no client started (or one stopped)"
            ));
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
    fn exit(&mut self, g: GenId, slot: Slot, reason: ExitReason) -> Step {
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

    fn ended_on_its_own(&mut self, g: GenId, slot: Slot) {
        if let Some(last) = self.starts.get_mut(&(g, slot)) {
            last.crashed = Some(self.epoch);
        }
    }

    /// Delivers what the world did up to now, in order.
    fn deliver_due(&mut self) -> Step {
        for _ in 0..MAX_EVENTS {
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
    fn tick(&mut self) -> Step {
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
    fn advance(&mut self, dt: Duration, smooth: bool) -> Step {
        let target = self.now + dt;
        if smooth {
            for _ in 0..MAX_WAKEUPS {
                if self.dropped {
                    break;
                }
                let world = self.w.next_event().map(|e| e.0);
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

    // ------------------------------------------------------------ the steps

    fn random_proc(&mut self) -> Option<(GenId, Slot)> {
        if self.w.procs.is_empty() {
            return None;
        }
        let i = self.rng.index(self.w.procs.len());
        self.w.procs.keys().nth(i).copied()
    }

    fn one_step(&mut self) -> Step {
        let roll = self.rng.range(0, 99);
        // After `Remove` the site is no one's to ask: only the world and time move.
        let roll = if self.removed && roll >= 60 { 0 } else { roll };
        match roll {
            0..=19 => {
                let dt = self.rng.ms(1, 300);
                self.advance(dt, true)
            }
            20..=29 => {
                let dt = self.rng.ms(300, 5000);
                self.advance(dt, true)
            }
            30..=32 => {
                let dt = self.rng.ms(5000, 120_000);
                self.advance(dt, false)
            }
            33..=39 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                let reason = match self.rng.range(0, 2) {
                    0 => ExitReason::Exited { code: 1 },
                    1 => ExitReason::Exited { code: 0 },
                    _ => ExitReason::Signaled {
                        signal: libc::SIGSEGV,
                    },
                };
                self.exit(g, slot, reason)
            }
            40..=42 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                self.exit(g, slot, ExitReason::OomKilled)
            }
            43..=45 => {
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                let busy = self.rng.chance(50);
                self.feed(Input::Worker {
                    generation: g,
                    input: slots::Input::BusyReported { id: slot, busy },
                })
            }
            46..=47 => {
                // A worker says READY=1 again (or early, as a buggy one may).
                let Some((g, slot)) = self.random_proc() else {
                    return Ok(());
                };
                if self.w.check != ReadyCheck::Notify {
                    return Ok(());
                }
                self.feed(Input::Worker {
                    generation: g,
                    input: slots::Input::ReadyNotified { id: slot },
                })
            }
            48..=51 => {
                let Some(k) = self.random_proc() else {
                    return Ok(());
                };
                let mem = self.w.mem_base * self.rng.range(40, 250) / 100;
                if let Some(p) = self.w.procs.get_mut(&k) {
                    p.mem = mem;
                }
                Ok(())
            }
            52..=55 => {
                self.w.queues_empty = self.rng.chance(60);
                Ok(())
            }
            56..=57 => {
                self.w.link_dangles = self.rng.chance(15);
                let n = self.next_release;
                self.next_release += 1;
                let kind = self.release_kind();
                self.w.link = PathBuf::from(format!("/srv/web/releases/r{n}-{kind}"));
                Ok(())
            }
            58..=59 => {
                // A client goes away: mostly one that waits.
                let waiting: Vec<ClientId> = self
                    .clients
                    .iter()
                    .filter(|(_, a)| !a.answered && !a.gone)
                    .map(|(c, _)| *c)
                    .collect();
                let c = if !waiting.is_empty() && self.rng.chance(80) {
                    waiting[self.rng.index(waiting.len())]
                } else {
                    ClientId(self.rng.range(1, self.next_client))
                };
                if let Some(a) = self.clients.get_mut(&c) {
                    a.gone = true;
                }
                self.feed(Input::ClientGone(c))
            }
            60..=65 => self.scale(),
            66..=68 => {
                let c = self.client("start");
                self.epoch += 1;
                self.up = true;
                self.feed(Input::Start(Some(c)))
            }
            69..=70 => {
                self.epoch += 1;
                self.up = false;
                if self.rng.chance(80) {
                    let c = self.client("stop");
                    self.feed(Input::Stop {
                        client: Some(c),
                        why: CancelReason::SiteStopped,
                    })
                } else {
                    self.feed(Input::Stop {
                        client: None,
                        why: CancelReason::AgentStopping,
                    })
                }
            }
            71..=73 => {
                let c = self.client("restart");
                self.epoch += 1;
                // A restart starts a stopped site, unless a deploy refuses it.
                if self.m.deploy().is_none() {
                    self.up = true;
                }
                self.feed(Input::Restart(c))
            }
            74..=77 => self.reconfigure(),
            78..=90 => self.deploy(),
            91..=93 => {
                let c = self.client("rollback");
                self.epoch += 1;
                self.feed(Input::Rollback(c))
            }
            94 if self.rng.chance(30) => {
                self.epoch += 1;
                self.up = false;
                self.removed = true;
                self.feed(Input::Remove)
            }
            _ => {
                let dt = self.rng.ms(1, 100);
                self.advance(dt, true)
            }
        }
    }

    fn release_kind(&mut self) -> &'static str {
        match self.rng.range(0, 99) {
            0..=59 => "good",
            60..=71 => "crash",
            72..=83 => "hang",
            84..=91 => "broken",
            _ => "missing",
        }
    }

    fn scale(&mut self) -> Step {
        let allowed = self.cfg.auto.map_or(self.cfg.workers, |a| a.max);
        let (workers, owner) = match self.rng.range(0, 9) {
            0..=5 => (self.rng.small(0, 6), None),
            6 => (self.rng.small(0, allowed + 3), Some(1000)),
            7 => (MAX_WORKERS + self.rng.small(1, 100), None),
            // Everything any site may have: only where the memory cap bounds it.
            8 if self.m.capacity().is_some() => (MAX_WORKERS, None),
            _ => (self.rng.small(0, 3), Some(1000)),
        };
        let c = self.client("scale");
        self.epoch += 1;
        self.feed(Input::Scale {
            client: c,
            workers,
            owner,
        })
    }

    fn reconfigure(&mut self) -> Step {
        let mut new = self.cfg.clone();
        let what = self.rng.range(0, 5);
        match what {
            0 => {
                if let Some(a) = &mut new.auto {
                    a.max = self.rng.small(a.min, 8);
                    new.workers = a.max;
                } else {
                    new.workers = self.rng.small(0, 6);
                }
            }
            1 => {
                // The budget (or the estimate) changes, appears or goes.
                let estimate = self.rng.range(32, 256) * M;
                let budget = estimate * self.rng.range(1, 8);
                if new.auto.is_some() || self.rng.chance(70) {
                    new.limits.memory = Some(budget);
                    new.limits.worker_memory = Some(estimate);
                } else {
                    new.limits.memory = None;
                    new.limits.worker_memory = None;
                }
            }
            2 => {
                let kind = self
                    .rng
                    .pick(&["", " --v2", " --crash", " --hang", " --broken"]);
                let head = if new.release.is_some() {
                    "{release}/bin/app"
                } else {
                    "/usr/bin/app"
                };
                new.command = format!("{head}{kind}")
                    .split(' ')
                    .map(String::from)
                    .collect();
            }
            3 => {
                new.stop.timeout = self.rng.ms(200, 8000);
                new.ready.timeout = self.rng.ms(500, 10_000);
            }
            _ => {
                new.restart.backoff_initial = self.rng.ms(20, 1000);
                new.restart.backoff_max = new.restart.backoff_initial * self.rng.small(1, 64);
                new.deploy.probation = self.rng.ms(0, 3000);
            }
        }
        // The loop refuses a reload the site cannot take now, and changes nothing.
        if self.m.reconfigure_refusal(&new).is_some() {
            return Ok(());
        }
        self.epoch += 1;
        self.cfg = new.clone();
        self.feed(Input::Reconfigure(Box::new(new)))
    }

    fn deploy(&mut self) -> Step {
        let release = if self.rng.chance(60) {
            None
        } else {
            let n = self.next_release;
            self.next_release += 1;
            let kind = self.release_kind();
            Some(PathBuf::from(format!("/srv/web/releases/r{n}-{kind}")))
        };
        let c = self.client("deploy");
        self.epoch += 1;
        self.feed(Input::Deploy { client: c, release })
    }

    // ------------------------------------------------------------ invariants

    fn check(&self) -> Step {
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
                match (s.phase.has_process(), world) {
                    (true, Some(p)) if s.pid == Some(p.pid) => {}
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
        if self.up && !matches!(cur.slots.run, RunState::Running | RunState::Failed) {
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
                if matches!(d.stage, Stage::Starting | Stage::Probation { .. }) {
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
                    let used = slots(d.from) + slots(d.to);
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
                if let Some(c) = self.m.capacity() {
                    if cur.slots.desired > c.workers {
                        return Err(format!(
                            "the serving generation wants {} workers, the capacity is {}",
                            cur.slots.desired, c.workers
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
    fn finish(&mut self) -> Step {
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

    fn run(&mut self, steps: u64) -> Step {
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
    /// left, has answered every client that waited for it to settle, restart or deploy.
    fn calm(&mut self) -> Step {
        self.w.calm = true;
        self.w.spawn_fails = 0;
        for p in self.w.procs.values_mut() {
            p.crash_at = None;
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
            .filter(|(_, a)| !a.answered && !a.gone && a.what != "stop")
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

fn env(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")),
    )
}

thread_local! {
    /// The step of the sequence running on this thread (for a panic's message).
    static STEP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs one sequence; a failure names the seed and the step.
fn run_seed(seed: u64, trace: bool) {
    STEP.set(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, trace);
        let steps = sim.rng.range(STEPS.0, STEPS.1);
        sim.run(steps)
    }));
    let replay = format!(
        "replay: HATCHERY_SIM_SEED={seed} cargo test --lib supervisor::machine::sim -- --nocapture"
    );
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("simulation seed {seed}, step {}: {e}\n{replay}", STEP.get()),
        Err(_) => panic!(
            "simulation seed {seed}, step {}: the machine panicked (above)\n{replay}",
            STEP.get()
        ),
    }
}

/// Thousands of random whole-site sequences against the invariants in the module doc.
#[test]
fn whole_site_invariants_hold_under_random_sequences() {
    if let Some(seed) = env("HATCHERY_SIM_SEED") {
        return run_seed(seed, true);
    }
    let runs = env("HATCHERY_SIM_RUNS").unwrap_or(RUNS);
    let t = Instant::now();
    for seed in 0..runs {
        run_seed(seed, false);
    }
    eprintln!("{runs} sequences in {:?}", t.elapsed());
}

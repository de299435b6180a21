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
//! `ClientGone`, `Remove`, clock advances, the agent crashing), then a calm (the world
//! stops misbehaving and time runs), then a final stop.
//!
//! The agent crashing: the world goes on without it for up to 3 s (processes exit or
//! crash as they were due to, unseen, and one in ten dies besides; a worker that became
//! ready then told the agent that died), then a new agent reads the machine's
//! [`SiteMachine::record`], keeps the workers still alive, and carries out what
//! [`SiteMachine::adopt`] returns. The clients were the dead agent's connections: they
//! count as gone. It is a new agent: an operator epoch begins (crash histories start
//! afresh), and the site runs by request if the record says so.
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
//!    calm, a site that has settled with no deploy left has answered every client (a
//!    stop that a start superseded was told so); at the end (the site stopped and time
//!    run on) none is left waiting, except clients that went away.
//! 6. Liveness: a stop always ends (no process left, every generation stopped); a site
//!    stopped by a client starts no worker until a client starts it; after a `Tick` the
//!    machine never asks to be woken at or before now (the loop would spin).
//! 7. Stop-then-start (a site whose app binds its own port, one in five): a worker is
//!    started only when no process of another generation runs. Checked at every `Spawn`.
//! 8. Zygotes (`mode = "zygote"`, one site in four; a reload may switch the mode): a
//!    worker of a zygote-mode generation is spawned only while its zygote is ready (the
//!    machine's and the world's); a zygote is started only when its generation has no
//!    zygote process (at most one per generation, a stopping one included) and the site
//!    runs by request; the machine's zygote with a process is the world's, and a world's
//!    zygote the machine does not count on was told to stop; held spawns are exactly the
//!    slots `Starting` without a process, and none is held while the zygote is ready;
//!    every zygote ends by the end of the sequence (one that never becomes ready is
//!    stopped). The world's zygotes become ready at a random time (sometimes after the
//!    deadline, never for a `hang` release), exit at once for a `broken` one, sometimes
//!    die (ready or not), exit soon when told to, and die with the agent.
//!
//! `cargo test --lib supervisor::machine::sim` runs [`RUNS`] sequences (seeds `0..RUNS`).
//! A failure names its seed and step; `HATCHERY_SIM_SEED=<n>` replays one seed with a
//! trace of every input, action and generation's slots on stderr (shown when it fails, or
//! with `-- --nocapture`); `HATCHERY_SIM_RUNS=<n>` sets the number of sequences.
#![cfg(test)]

mod driver;
mod invariants;
mod steps;
mod world;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::SiteMachine;
use crate::config::{
    AutoWorkers, ReadyCheck, ReadyPolicy, RestartPolicy, Signal, SiteConfig, StopPolicy,
};
use crate::supervisor::ids::{ClientId, GenId, Slot};
use crate::supervisor::slots::ExitReason;

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

/// A zygote process of the world (zygote-mode generations).
#[derive(Debug, Clone)]
struct Zygote {
    /// When it says `READY`; `None`: never.
    ready_at: Option<Instant>,
    ready: bool,
    /// When it ends (on its own, or told to), and how.
    exit_at: Option<(Instant, String)>,
    /// The machine told it to stop.
    asked: bool,
}

/// The world a site runs in, and the machine's read-only window onto it.
struct World {
    check: ReadyCheck,
    procs: BTreeMap<(GenId, Slot), Proc>,
    zygotes: BTreeMap<GenId, Zygote>,
    next_pid: i32,
    /// Where new connections go.
    steered: GenId,
    probing: BTreeSet<GenId>,
    /// The generation the steering program's canary entry names.
    canary: Option<GenId>,
    queues_empty: bool,
    /// What load scaling reads (cumulative counters only grow).
    load: crate::supervisor::load::Counters,
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
    steer_fails: u64,
    ignores_stop: u64,
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
    /// Generations whose redeploy for a listener shut down was said refused.
    repair_refused: BTreeSet<GenId>,
    /// A client started the site, and none stopped it since.
    up: bool,
    next_release: u32,
    /// The agent crashed and a new one adopted the site at least once.
    adopted: bool,
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
        let by_load = rng.chance(60);
        c.auto = Some(AutoWorkers {
            min,
            max,
            scale: crate::config::ScalePolicy {
                by: if by_load {
                    crate::config::ScaleBy::Load
                } else {
                    crate::config::ScaleBy::Memory
                },
                target_percent: rng.small(30, 100),
                interval: Duration::from_millis(rng.range(50, 1000)),
                grow_cooldown: Duration::from_millis(rng.pick(&[0, 0, 500, 2000])),
                shrink_cooldown: Duration::from_millis(rng.range(1000, 30_000)),
            },
        });
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
    // A third of the sites stop with a sequence (`stop.signals`): more steps before SIGKILL.
    let signals: &[Signal] = if rng.chance(33) {
        &[Signal(libc::SIGHUP), Signal(libc::SIGTERM)]
    } else {
        &[Signal(libc::SIGTERM)]
    };
    c.stop = StopPolicy::sequence(signals, rng.ms(200, 8000)).expect("1 or 2 signals");
    let backoff_initial = rng.ms(20, 1000);
    c.restart = RestartPolicy {
        backoff_initial,
        backoff_max: backoff_initial * rng.small(1, 64),
        healthy_after: rng.ms(500, 60_000),
        flapping_exits: rng.small(2, 6),
        flapping_within: rng.ms(2000, 30_000),
    };
    c.deploy.probation = rng.ms(0, 3000);
    if rng.chance(30) {
        let path = crate::config::HttpCheck {
            path: "/".into(),
            host: None,
            status: (100, 599),
        };
        c.warmup = vec![path; usize::try_from(rng.small(1, 3)).unwrap_or(1)];
    }
    if rng.chance(30) {
        c.health = Some(crate::config::HealthPolicy {
            interval: rng.ms(100, 3000),
            timeout: rng.ms(20, 1000),
            failures: rng.small(1, 4),
            http: crate::config::HttpCheck {
                path: "/".into(),
                host: None,
                status: (200, 299),
            },
        });
    }
    // The app binds its port itself: deploys stop then start.
    if rng.chance(20) {
        c.listen[0].mode = crate::config::ListenMode::Own;
    }
    if rng.chance(25) {
        c.mode = crate::config::SiteMode::Zygote;
    }
    c
}

type Step = Result<(), String>;

impl Sim {
    pub(super) fn new(seed: u64, trace: bool) -> Sim {
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
            zygotes: BTreeMap::new(),
            next_pid: 100,
            steered: GenId(1),
            probing: BTreeSet::new(),
            canary: None,
            queues_empty: true,
            load: crate::supervisor::load::Counters {
                queued: Some(0),
                cpu_usec: Some(0),
                cpu_stall_usec: Some(0),
                memory_events: Some(0),
            },
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
            steer_fails: rng.pick(&[0, 0, 5, 30]),
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
            repair_refused: BTreeSet::new(),
            up: false,
            next_release: 2,
            adopted: false,
        }
    }

    pub(super) fn client(&mut self, what: &'static str) -> ClientId {
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
}

fn env(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")),
    )
}

/// Milestones the sequences reached, over every run of the test.
pub(super) struct Reached {
    pub(super) deployed: AtomicUsize,
    pub(super) canary: AtomicUsize,
    pub(super) promoted: AtomicUsize,
    /// Sequences in which the agent crashed and a new one adopted the site.
    pub(super) adopting: AtomicUsize,
    /// Adoptions.
    pub(super) adoptions: AtomicUsize,
    /// Adoptions of a site with more than one generation (a deploy, or a generation
    /// leaving).
    pub(super) adopted_mid_deploy: AtomicUsize,
    /// Zygotes that said `READY`.
    pub(super) zygotes_ready: AtomicUsize,
    /// Zygotes that died while ready (not told to stop).
    pub(super) zygotes_lost: AtomicUsize,
    /// Zygotes that ended before they were ready, or were stopped at their deadline.
    pub(super) zygotes_not_ready: AtomicUsize,
    /// Deploys rolled back because the flip failed.
    pub(super) not_steered: AtomicUsize,
    /// Stop-then-start deploys whose flip failed, the old generation started again.
    pub(super) not_steered_restarted: AtomicUsize,
    /// Deploys of the serving release because a listener of it was shut down.
    pub(super) redeploys: AtomicUsize,
    /// Such deploys refused for a reason that may pass (said `refused`).
    pub(super) repairs_refused: AtomicUsize,
    /// Such deploys made after they were refused.
    pub(super) redeploys_after_refusal: AtomicUsize,
}

pub(super) static REACHED: Reached = Reached {
    deployed: AtomicUsize::new(0),
    canary: AtomicUsize::new(0),
    promoted: AtomicUsize::new(0),
    adopting: AtomicUsize::new(0),
    adoptions: AtomicUsize::new(0),
    adopted_mid_deploy: AtomicUsize::new(0),
    not_steered: AtomicUsize::new(0),
    not_steered_restarted: AtomicUsize::new(0),
    redeploys: AtomicUsize::new(0),
    repairs_refused: AtomicUsize::new(0),
    redeploys_after_refusal: AtomicUsize::new(0),
    zygotes_ready: AtomicUsize::new(0),
    zygotes_lost: AtomicUsize::new(0),
    zygotes_not_ready: AtomicUsize::new(0),
};

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
    // The sequences reach what they are there to test (not a sequence of refusals).
    let reached = |r: &AtomicUsize| r.load(Ordering::Relaxed);
    let (deployed, canary, promoted) = (
        reached(&REACHED.deployed),
        reached(&REACHED.canary),
        reached(&REACHED.promoted),
    );
    eprintln!("deploys done {deployed}, canaries serving {canary}, canaries promoted {promoted}");
    let (adopting, adoptions, mid_deploy) = (
        reached(&REACHED.adopting),
        reached(&REACHED.adoptions),
        reached(&REACHED.adopted_mid_deploy),
    );
    eprintln!(
        "sequences with an agent crash {adopting}, adoptions {adoptions}, of them with more than one generation {mid_deploy}"
    );
    let (z_ready, z_lost, z_not_ready) = (
        reached(&REACHED.zygotes_ready),
        reached(&REACHED.zygotes_lost),
        reached(&REACHED.zygotes_not_ready),
    );
    eprintln!(
        "zygotes ready {z_ready}, lost while ready {z_lost}, ended or stopped before ready {z_not_ready}"
    );
    let (not_steered, not_steered_restarted) = (
        reached(&REACHED.not_steered),
        reached(&REACHED.not_steered_restarted),
    );
    eprintln!(
        "deploys rolled back at a failed flip {not_steered}, of stop-then-start ones {not_steered_restarted}"
    );
    let redeploys = reached(&REACHED.redeploys);
    let refused = reached(&REACHED.repairs_refused);
    let after_refusal = reached(&REACHED.redeploys_after_refusal);
    eprintln!(
        "redeploys for a listener shut down {redeploys}, refused for a while {refused}, made after a refusal {after_refusal}"
    );
    if runs >= RUNS {
        assert!(
            redeploys > 0 && refused > 0 && after_refusal > 0,
            "the sequences never redeployed for a listener shut down ({redeploys}), never had that refused ({refused}), or never made it after a refusal ({after_refusal})"
        );
        assert!(
            not_steered > 0 && not_steered_restarted > 0,
            "the sequences never had a flip fail ({not_steered}), or never one of a stop-then-start deploy ({not_steered_restarted})"
        );
        assert!(
            z_ready > 0 && z_lost > 0 && z_not_ready > 0,
            "the sequences never had a zygote ready ({z_ready}), lost while ready ({z_lost}) or not ready ({z_not_ready})"
        );
        assert!(
            deployed > 0 && canary > 0 && promoted > 0,
            "the sequences never reached a deploy done ({deployed}), a canary serving ({canary}) or one promoted ({promoted})"
        );
        assert!(
            adopting > 0 && mid_deploy > 0,
            "the sequences never adopted a site ({adopting}), or never one mid-deploy ({mid_deploy})"
        );
    }
}

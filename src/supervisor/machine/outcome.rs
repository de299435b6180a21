//! What a site machine tells: progress and history as [`Event`]s, answers to clients as
//! [`Outcome`]s. Typed, not worded: the event loop and the CLI turn them into text.

use std::path::PathBuf;
use std::time::Duration;

use super::HealthAnswer;
use crate::supervisor::capacity::Capacity;
use crate::supervisor::deploy::Share;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::slots::{ExitReason, Note};

/// How new connections reach a generation after a flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// The eBPF program's map now names the generation's listeners.
    Ebpf,
    /// The generations share their listeners.
    Shared,
    /// A stop-then-start deploy: the new generation is the only one (the old one stopped
    /// before it started).
    Alone,
}

/// What the site machine does about a listener shut down ([`Event::ListenerShut`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ShutAnswer {
    /// The serving generation's: its release is deployed again as this generation, with
    /// new listeners.
    Redeploy(GenId),
    /// The serving generation's, which was itself deployed to replace a generation whose
    /// listener was shut down: not deployed again (the release shuts its listeners down).
    Again,
    /// The serving generation's, while a deploy to this generation is under way: that
    /// deploy replaces it (if it ends without, the release is deployed again then).
    DeployUnderWay(GenId),
    /// The serving generation's, while the deploy that made it serve is under way (its
    /// old generation drains): its release is deployed again once that deploy is over.
    AfterDeploy,
    /// The serving generation's, while the site stops or is stopped: its release is
    /// deployed again when it starts.
    Stopped,
    /// The serving generation's, while processes of another generation are left (adopted
    /// from an earlier agent, or stopping: they may hold the address): its release is
    /// deployed again once they are gone.
    AfterOlder,
    /// The serving generation's, and its release cannot be deployed again now (no workers,
    /// no room for two generations, a release that does not resolve, no steering): it is
    /// tried again at every step and deployed once the reason passes; said again when the
    /// reason changes.
    Refused(Failure),
    /// The serving generation's, and its release could not be deployed again (its new
    /// listeners could not be bound), or was already (that deploy rolled back): left to an
    /// operator's deploy.
    NotRedeployed(Failure),
    /// The serving generation's, whose release was deployed again already for a listener
    /// shut down before (that deploy's listeners could not be bound, it was rolled back, or
    /// the site was steered back to this generation since): not deployed again (once in a
    /// row), left to an operator's deploy.
    Tried,
    /// The generation does not serve (a deploy's new generation, or one that drains): if
    /// it comes to serve, its release is deployed again then.
    NotServing,
}

/// Something that happened to a site.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A listener of a generation no longer accepts connections: a process holding it
    /// shut it down.
    ListenerShut {
        /// The generation.
        generation: GenId,
        /// The listener, as the log names it.
        listener: String,
        /// What is done about it.
        answer: ShutAnswer,
    },
    /// A worker slot of a generation (or the generation as a whole: all stopped, settled,
    /// restart done).
    Worker {
        /// The generation.
        generation: GenId,
        /// Whether it serves (its notes are the site's state; the others', deploy
        /// progress).
        serving: bool,
        /// What happened.
        note: Note,
    },
    /// `scale` asked for more than the memory cap holds.
    Capped(Capacity),
    /// The cap (or `workers = "auto"`) moved the serving generation's count.
    Resized {
        /// Workers before.
        from: u32,
        /// Workers now.
        to: u32,
        /// The cap that decided it.
        capacity: Capacity,
    },
    /// Load scaling changed the serving generation's count.
    LoadScaled {
        /// What, and why.
        decision: crate::supervisor::load::Decision,
        /// The utilisation aimed at, percent.
        target_percent: u32,
    },
    /// The configured count does not fit the budget at start.
    DoesNotFit {
        /// The configured count.
        requested: u32,
        /// The cap.
        capacity: Capacity,
    },
    /// A deploy starts a new generation beside the serving one.
    DeployBegins {
        /// The new generation.
        to: GenId,
        /// The serving one.
        from: GenId,
        /// The release deployed.
        release: Option<PathBuf>,
        /// Workers the new generation ends up with.
        target: u32,
        /// Most workers of both together.
        cap: Option<u32>,
    },
    /// A deploy waits for the one under way.
    DeployQueued {
        /// The generation being deployed now.
        behind: GenId,
        /// Deploys ahead of this one.
        ahead: usize,
    },
    /// The new generation is asked for more workers.
    NewGrows {
        /// It.
        generation: GenId,
        /// Workers now asked for.
        workers: u32,
        /// Workers it ends up with.
        target: u32,
    },
    /// The old generation gives up a worker to make room.
    OldShrinks {
        /// It.
        generation: GenId,
        /// Workers it keeps.
        workers: u32,
        /// The generation the room is for.
        for_generation: GenId,
    },
    /// Every new worker is ready: probation begins.
    ProbationBegins {
        /// The new generation.
        generation: GenId,
        /// Its ready workers.
        ready: u32,
        /// How long.
        period: Duration,
    },
    /// New connections go to the new generation.
    Flipped {
        /// The old generation (it drains).
        from: GenId,
        /// The new one.
        to: GenId,
        /// How.
        steering: Steering,
    },
    /// The old generation is told to stop.
    OldStops {
        /// It.
        generation: GenId,
        /// Whether its queues were empty (else the stop timeout passed).
        drained: bool,
    },
    /// A canary serves its share of new connections beside the serving generation.
    CanaryServes {
        /// The canary's generation.
        generation: GenId,
        /// The serving one.
        from: GenId,
        /// Its share of new connections.
        share: Share,
        /// Its workers.
        workers: u32,
    },
    /// A canary is promoted: it grows to full size, then is flipped to.
    Promoting {
        /// The canary's generation.
        generation: GenId,
        /// Workers it ends up with.
        target: u32,
    },
    /// A new generation's warm-up ended.
    WarmedUp {
        /// The generation.
        generation: GenId,
        /// What it did.
        report: super::WarmupReport,
        /// Requests asked of each worker.
        requests: u32,
        /// How long it took.
        took: Duration,
    },
    /// A health check failed.
    HealthFailed {
        /// The generation checked.
        generation: GenId,
        /// The worker that had accepted it, when one had.
        worker: Option<Slot>,
        /// How it went.
        answer: HealthAnswer,
        /// Checks this worker process failed so far.
        failures: u32,
        /// Failed checks before it is restarted.
        of: u32,
    },
    /// A worker failed its health checks: it is restarted.
    Unhealthy {
        /// Its generation.
        generation: GenId,
        /// The worker.
        worker: Slot,
        /// Its process.
        pid: i32,
        /// Checks it failed.
        failures: u32,
    },
    /// A new agent took over the workers an earlier one left running.
    Adopted {
        /// The generation kept: it serves.
        generation: GenId,
        /// Its workers taken over (still running).
        workers: u32,
        /// Missing workers started (a site whose app binds its own port starts them once
        /// the other generations' processes are gone: not counted here).
        starting: u32,
        /// Workers told to stop: those of the other generations, those beyond the count
        /// wanted, every one of a site stopped by request.
        stopped: u32,
    },
    /// A generation's last worker is gone.
    Retired(GenId),
    /// A generation's zygote is started (`mode = "zygote"`): its workers' spawns wait
    /// until it is ready.
    ZygoteStarting(GenId),
    /// A generation's zygote is ready: workers are forked from it.
    ZygoteReady {
        /// The generation.
        generation: GenId,
        /// Spawns that waited for it, carried out now.
        spawns: u32,
        /// It replaces one that died while ready (the generation is no longer degraded).
        restored: bool,
    },
    /// A generation's zygote did not become ready (it ended first, or not within
    /// `ready.timeout`): the spawns that waited for it failed, as spawns that cannot
    /// start do.
    ZygoteNotReady {
        /// The generation.
        generation: GenId,
        /// Why.
        why: String,
        /// Spawns failed.
        failed: u32,
        /// When it is started again (at the earliest).
        retry_in: Duration,
    },
    /// A generation's ready zygote ended: its workers run on, but the generation is
    /// degraded (new workers wait) until a new zygote is ready.
    ZygoteLost {
        /// The generation.
        generation: GenId,
        /// How it ended.
        reason: String,
        /// When it is started again.
        retry_in: Duration,
    },
    /// A generation's zygote, asked to stop, ended.
    ZygoteStopped {
        /// The generation.
        generation: GenId,
        /// How it ended.
        reason: String,
    },
    /// A deploy went through (for the agent's log).
    Deployed {
        /// The new generation.
        generation: GenId,
        /// How long it took.
        took: Duration,
    },
    /// A stop-then-start deploy begins (the app binds a port itself): the serving
    /// generation stops before the new one starts.
    StopThenStart {
        /// The new generation.
        to: GenId,
        /// The serving one.
        from: GenId,
        /// The release deployed.
        release: Option<PathBuf>,
        /// The ports the app binds itself.
        own: Vec<std::net::SocketAddr>,
    },
    /// Stop-then-start: the serving generation is told to stop; the new one starts once
    /// its last process is gone.
    OldStopsFirst {
        /// It.
        generation: GenId,
        /// The generation that waits for it.
        for_generation: GenId,
    },
    /// Stop-then-start: the new generation failed; it is stopped, and the old one starts
    /// again once it is gone.
    NewStopsFirst {
        /// It.
        generation: GenId,
        /// Why.
        reason: RollbackReason,
        /// The generation that starts again then.
        then: GenId,
    },
    /// Stop-then-start rollback: the previous generation starts again.
    OldRestarts(GenId),
    /// A deploy was rolled back, or steered back (for the agent's log).
    RolledBack {
        /// The generation stopped.
        generation: GenId,
        /// Why.
        reason: RollbackReason,
        /// Whether the old generation had been flipped from and now serves again.
        steered_back: bool,
    },
}

/// The answer to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It went through.
    Done(Done),
    /// It did not.
    Failed(Failure),
}

/// What went through.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The site runs its workers, each ready for `ready.settle`.
    Settled,
    /// Every worker stopped.
    Stopped,
    /// Nothing ran.
    AlreadyStopped,
    /// Every worker was restarted.
    Restarted,
    /// The site is stopped: this many workers when it starts.
    WhenStarted(u32),
    /// `scale SITE auto`: the count follows the load (or the memory budget) again.
    Automatic {
        /// By load (else by memory).
        by_load: bool,
        /// Workers now.
        workers: u32,
    },
    /// A deploy: the new generation serves, the old one retired.
    Deployed {
        /// The new generation.
        to: GenId,
        /// The retired one.
        from: GenId,
        /// Its release.
        release: Option<PathBuf>,
        /// How long it took.
        took: Duration,
    },
    /// `deploy --canary`: the new generation serves its share beside the old one.
    Canary {
        /// The serving generation.
        from: GenId,
        /// The canary.
        to: GenId,
        /// Its share of new connections.
        share: Share,
        /// Its release.
        release: Option<PathBuf>,
    },
    /// `rollback` of a deploy that had not flipped.
    RolledBack {
        /// The generation that serves (it always did).
        from: GenId,
        /// The one stopped.
        to: GenId,
    },
    /// `rollback` while the old generation drained: it serves again.
    SteeredBack {
        /// The generation that serves again.
        from: GenId,
        /// The one stopped.
        to: GenId,
    },
    /// The site was removed from the configuration.
    Removed,
}

/// Why not.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// A worker flapped or could not start: the site is failed.
    SiteFailed(Note),
    /// A worker died right after it started (or became ready).
    WorkerDied(Note),
    /// A rolling restart stopped at a worker that did not stay up.
    RestartStopped(Note),
    /// A deploy is under way.
    DeployUnderWay {
        /// Its new generation.
        to: GenId,
        /// Its stage's name.
        stage: &'static str,
    },
    /// More workers than any site may have.
    TooManyWorkers(u32),
    /// `scale SITE auto` of a site with a fixed count.
    NotAutomatic,
    /// More workers than the site's owner may ask for.
    BeyondOwnersLimit {
        /// Who asked.
        uid: u32,
        /// What the configuration allows.
        allowed: u32,
        /// Whether that is `workers_max` (else the configured count).
        auto: bool,
    },
    /// `ready.check = "tcp"` cannot reach a new generation alone here.
    ProbeNeedsSteering {
        /// `tcp` or `http`.
        check: crate::config::ReadyCheck,
        /// Why steering cannot do it.
        why: String,
    },
    /// `deploy --canary` needs eBPF steering, which this site does not have.
    CanaryNeedsSteering(String),
    /// `deploy.warmup` needs eBPF steering, which this site does not have.
    WarmupNeedsSteering(String),
    /// `promote` with no canary to promote.
    NoCanary {
        /// The stage of the deploy under way, if one is.
        stage: Option<&'static str>,
    },
    /// The site is stopped.
    Stopped,
    /// The site runs no workers.
    NoWorkers,
    /// The cap leaves no room for a second generation.
    NoRoom(u32),
    /// The release (or the new listeners) could not be had.
    CannotDeploy(String),
    /// The deploy was rolled back; the old generation serves.
    RolledBack {
        /// Why.
        reason: RollbackReason,
        /// The generation that serves.
        from: GenId,
    },
    /// A stop-then-start deploy was rolled back: the new generation is gone and the old
    /// one was started again.
    RestartedPrevious {
        /// Why.
        reason: RollbackReason,
        /// The generation started again.
        from: GenId,
    },
    /// After the flip, the deploy was steered back; the old generation serves again.
    SteeredBack {
        /// Why.
        reason: RollbackReason,
        /// The generation that serves again.
        from: GenId,
    },
    /// The new generation serves, but one of its workers died once the old one was told
    /// to stop.
    DoneWithCrashes {
        /// The new generation.
        to: GenId,
        /// The retired one.
        from: GenId,
        /// Which worker and how it ended.
        exit: Option<(Slot, ExitReason)>,
    },
    /// The deploy (or the wait for a start, scale or restart to settle) was cancelled.
    Cancelled(CancelReason),
    /// `rollback` with nothing recorded to return to.
    NoPreviousRelease,
    /// The site was started again (`start`, `restart`) before the stop waited for ended.
    StartedAgain,
}

/// Why a deploy was rolled back.
#[derive(Debug, Clone, PartialEq)]
pub enum RollbackReason {
    /// A new worker exited (or could not start).
    Crashed {
        /// The new generation.
        generation: GenId,
        /// Which worker and how, when known.
        exit: Option<(Slot, ExitReason)>,
        /// Whether it was after the flip.
        after_flip: bool,
    },
    /// A new worker was restarted for failing its health checks.
    Unhealthy {
        /// The new generation.
        generation: GenId,
        /// The worker.
        worker: Slot,
        /// Whether it was after the flip.
        after_flip: bool,
    },
    /// Not every new worker was ready in time.
    NotReady {
        /// The new generation.
        generation: GenId,
        /// `ready.timeout`.
        timeout: Duration,
        /// Ready workers.
        ready: u32,
        /// Workers asked for.
        desired: u32,
        /// What the last `http` probe that failed was answered.
        last_probe: Option<ProbeAnswer>,
    },
    /// An operator asked (`rollback`).
    OnRequest(GenId),
    /// The canary's share could not be steered to it.
    CanaryNotSteered(String),
    /// New connections could not be steered to the new generation (at the flip).
    NotSteered {
        /// The new generation.
        generation: GenId,
        /// Which address, and the kernel's answer.
        why: String,
    },
    /// The site stopped, was removed, or the agent is stopping.
    Cancelled(CancelReason),
}

/// Why deploys were cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The site was stopped.
    SiteStopped,
    /// The site was removed from the configuration.
    SiteRemoved,
    /// The agent is shutting down.
    AgentStopping,
}

/// How an `http` ready probe was answered when it did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// With a status outside `ready.status`.
    Status(u16),
    /// Not with HTTP (or the connection closed first).
    NotHttp,
}

//! One site's worker slots as an explicit state machine.
//!
//! A *slot* is a numbered place for one worker (`w-<id>`); its process comes and goes.
//! SlotState phases:
//!
//! | phase      | process | leaves on                                               |
//! |------------|---------|---------------------------------------------------------|
//! | `Starting` | yes     | ready (→ `Ready`), exit (crash), ready deadline (stop)   |
//! | `Ready`    | yes     | exit (crash), stop request (→ `Stopping`)               |
//! | `Stopping` | yes     | exit (→ what was asked), stop deadline (→ SIGKILL)       |
//! | `Backoff`  | no      | deadline (→ spawn)                                      |
//! | `Failed`   | no      | site start                                              |
//! | `Stopped`  | no      | site start                                              |
//!
//! Invariants (checked by the simulation test below):
//! - a slot never has two processes: `Spawn` is only issued for a slot without one;
//! - slots that are not being removed never outnumber the desired count;
//! - two starts of one slot are at least `backoff_initial` apart unless an operator
//!   asked for the restart;
//! - a stopped site has no process left, and a stop always ends (SIGKILL at the deadline).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::policy::{AfterCrash, CrashHistory};
use crate::config::{ReadyCheck, ReadyPolicy, RestartPolicy, Signal, StopPolicy};

pub use super::ids::Slot;

/// Why a worker's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// Exited with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// Killed by this signal.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// Could not be started.
    SpawnFailed {
        /// Why.
        error: String,
    },
    /// Did not become ready in time and was stopped.
    ReadyTimeout,
    /// Killed by the kernel's OOM killer (its cgroup's `memory.events` counted it).
    OomKilled,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited { code } => write!(f, "exited with code {code}"),
            ExitReason::Signaled { signal } => write!(f, "killed by {}", Signal(*signal).name()),
            ExitReason::SpawnFailed { error } => write!(f, "failed to start: {error}"),
            ExitReason::ReadyTimeout => f.write_str("not ready before ready.timeout"),
            ExitReason::OomKilled => f.write_str("oom-killed"),
        }
    }
}

/// What happens once a stopping worker has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// The slot goes away (scaled down).
    Remove,
    /// Start it again at once (operator restart).
    Respawn,
    /// Stay stopped (site stop).
    Rest,
    /// Count it as a crash (it failed its readiness deadline).
    Crash,
}

/// A slot's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running, not yet ready; the deadline is `ready.timeout` when a check is used.
    Starting {
        /// When it must be ready by.
        deadline: Option<Instant>,
    },
    /// Running and ready.
    Ready,
    /// Asked to stop.
    Stopping {
        /// When SIGKILL follows (None once sent).
        deadline: Option<Instant>,
        /// What to do after the exit.
        then: AfterStop,
    },
    /// Waiting to be restarted.
    Backoff {
        /// When.
        until: Instant,
    },
    /// Flapping or unstartable; left down until the site is started again.
    Failed,
    /// Not running, by request.
    Stopped,
}

impl Phase {
    /// Whether a process exists in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Starting { .. } | Phase::Ready | Phase::Stopping { .. }
        )
    }

    /// The name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting { .. } => "starting",
            Phase::Ready => "ready",
            Phase::Stopping { .. } => "stopping",
            Phase::Backoff { .. } => "backoff",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }
}

/// One worker slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Its number.
    pub id: Slot,
    /// Its phase.
    pub phase: Phase,
    /// The pid of its current process, once spawned.
    pub pid: Option<i32>,
    /// When its current (or last) process was started.
    pub started: Option<Instant>,
    /// How many times it was restarted after a crash.
    pub restarts: u32,
    /// Why its last process ended.
    pub last_exit: Option<ExitReason>,
    /// Its crash history.
    pub history: CrashHistory,
    /// Its process said it is handling requests (`BUSY=1`, until `BUSY=0`).
    pub busy: bool,
    /// When its process, ready, will have stayed up for `ready.settle`; `None` once it has
    /// (or while it is not ready).
    pub settles_at: Option<Instant>,
}

impl SlotState {
    fn new(id: Slot) -> SlotState {
        SlotState {
            id,
            phase: Phase::Stopped,
            pid: None,
            started: None,
            restarts: 0,
            last_exit: None,
            history: CrashHistory::default(),
            busy: false,
            settles_at: None,
        }
    }
}

/// The site's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Workers are kept running.
    Running,
    /// A slot flapped or could not start; healthy workers keep running.
    Failed,
    /// Stopping all workers.
    Stopping,
    /// No workers, by request.
    Stopped,
}

impl RunState {
    /// As `status` shows it.
    pub fn state(self) -> crate::status::SiteState {
        use crate::status::SiteState;
        match self {
            RunState::Running => SiteState::Running,
            RunState::Failed => SiteState::Failed,
            RunState::Stopping => SiteState::Stopping,
            RunState::Stopped => SiteState::Stopped,
        }
    }

    /// The name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Failed => "failed",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
        }
    }
}

/// An input to the site machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The slot's process was created.
    Spawned {
        /// The slot.
        id: Slot,
        /// Its pid.
        pid: i32,
    },
    /// The slot's process could not be created; `permanent` when retrying cannot help.
    SpawnFailed {
        /// The slot.
        id: Slot,
        /// Why.
        error: String,
        /// Whether retrying is pointless (e.g. the command does not exist).
        permanent: bool,
    },
    /// The slot's process ended.
    Exited {
        /// The slot.
        id: Slot,
        /// How.
        reason: ExitReason,
    },
    /// The slot's process reported readiness.
    ReadyNotified {
        /// The slot.
        id: Slot,
    },
    /// The slot's process reported that it is busy (`BUSY=1`) or idle (`BUSY=0`).
    BusyReported {
        /// The slot.
        id: Slot,
        /// Busy or idle.
        busy: bool,
    },
    /// Time passed; deadlines at or before `now` fire.
    DeadlineReached,
    /// Operator: run the site (clears `failed`).
    StartRequested,
    /// Operator: stop every worker.
    StopRequested,
    /// Operator: run this many workers.
    ScaleRequested(u32),
    /// Operator: restart every worker, one at a time.
    RestartRequested,
}

/// Something for the event loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the slot's process, then report `Spawned` or `SpawnFailed`.
    Spawn(Slot),
    /// Send this signal to the slot's process.
    Signal(Slot, Signal),
    /// Kill the slot's whole process tree.
    Kill(Slot),
    /// Something worth telling the operator (logs, waiting clients).
    Note(Note),
}

/// Events for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A slot's process started.
    Started(Slot, i32),
    /// A slot became ready.
    Ready(Slot),
    /// A slot's process ended when asked to (stop, restart, scale down).
    Exited(Slot, ExitReason),
    /// A slot's process ended on its own (or could not start), this long after it
    /// started.
    Crashed(Slot, ExitReason, std::time::Duration),
    /// A rolling restart stopped at this slot: its new process did not stay up (the
    /// slots not yet restarted keep their processes).
    RestartFailed(Slot),
    /// A slot will be restarted after a delay (ms).
    BackingOff(Slot, u128),
    /// A slot was escalated to SIGKILL.
    Killed(Slot),
    /// A slot flapped or could not start, and the site is marked failed.
    Failed(Slot),
    /// Every worker has stopped.
    AllStopped,
    /// A rolling restart finished.
    RestartDone,
    /// The desired count is running and ready.
    Settled,
}

/// The policies the machine applies.
#[derive(Debug, Clone, Copy)]
pub struct Policies {
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Stop policy.
    pub stop: StopPolicy,
    /// Readiness policy.
    pub ready: ReadyPolicy,
}

/// One site's workers.
#[derive(Debug, Clone)]
pub struct SiteCore {
    /// How many workers are wanted.
    pub desired: u32,
    /// Overall state.
    pub run: RunState,
    /// Slots by id.
    pub slots: BTreeMap<Slot, SlotState>,
    /// Policies.
    pub policies: Policies,
    /// The rolling restart under way.
    rolling: Option<Rolling>,
    settled: bool,
}

/// A rolling restart: one slot at a time; the first restarted slot must settle before
/// the next one is stopped (a release that dies right after it is ready takes one worker,
/// not the site), and the restart is done once every restarted slot has settled.
#[derive(Debug, Clone)]
struct Rolling {
    /// Slots still to restart (the next is last).
    queue: Vec<Slot>,
    /// The slot being restarted.
    current: Option<Slot>,
    /// Slots restarted so far.
    done: Vec<Slot>,
}

impl SiteCore {
    /// A stopped site that wants `desired` workers.
    pub fn new(desired: u32, policies: Policies) -> SiteCore {
        SiteCore {
            desired,
            run: RunState::Stopped,
            slots: BTreeMap::new(),
            policies,
            rolling: None,
            settled: false,
        }
    }

    /// Whether a rolling restart is under way.
    pub fn is_restarting(&self) -> bool {
        self.rolling.is_some()
    }

    /// The earliest deadline of any slot (settling ones included).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| match s.phase {
                Phase::Starting { deadline } => deadline,
                Phase::Stopping { deadline, .. } => deadline,
                Phase::Backoff { until } => Some(until),
                Phase::Ready => s.settles_at,
                _ => None,
            })
            .min()
    }

    /// Whether the desired count runs, ready, each for at least `ready.settle`.
    pub fn is_settled(&self) -> bool {
        self.run == RunState::Running
            && self.slots.len() == self.desired as usize
            && self
                .slots
                .values()
                .all(|s| s.phase == Phase::Ready && s.settles_at.is_none())
    }

    /// Marks the ready slots whose settle time has come.
    fn settle(&mut self, now: Instant) {
        for slot in self.slots.values_mut() {
            if slot.settles_at.is_some_and(|t| t <= now) {
                slot.settles_at = None;
            }
        }
    }

    /// Processes in any phase.
    pub fn live(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.phase.has_process())
            .count()
    }

    /// Ready workers.
    pub fn ready(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.phase == Phase::Ready)
            .count()
    }

    fn spawn(&mut self, id: Slot, now: Instant, out: &mut Vec<Action>) {
        // Never more processes than the desired count: a slot on its way out (scaled down)
        // still holds its process, and its memory, until it exits. A slot due to start
        // waits, stopped, until one has (`start_waiting`).
        if self.live() >= self.desired as usize {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.phase = Phase::Stopped;
            }
            return;
        }
        let deadline = match self.policies.ready.check {
            ReadyCheck::None => None,
            _ => Some(now + self.policies.ready.timeout),
        };
        if let Some(slot) = self.slots.get_mut(&id) {
            debug_assert!(!slot.phase.has_process(), "slot {id} already has a process");
            slot.phase = Phase::Starting { deadline };
            slot.pid = None;
            slot.started = Some(now);
            slot.settles_at = None;
            out.push(Action::Spawn(id));
        }
    }

    fn stop_slot(&mut self, id: Slot, then: AfterStop, now: Instant, out: &mut Vec<Action>) {
        let stop = self.policies.stop;
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        match slot.phase {
            Phase::Starting { .. } | Phase::Ready => {
                slot.phase = Phase::Stopping {
                    deadline: Some(now + stop.timeout),
                    then,
                };
                // A spawn not yet reported has no process to signal yet: it is signalled
                // once it is reported (`Spawned`), or ends there (`SpawnFailed`).
                if slot.pid.is_some() {
                    out.push(Action::Signal(id, stop.signal));
                }
            }
            Phase::Stopping {
                deadline,
                then: old,
            } => {
                // Removal wins over anything else; otherwise keep the first request.
                let then = if then == AfterStop::Remove || old == AfterStop::Remove {
                    AfterStop::Remove
                } else if then == AfterStop::Rest {
                    AfterStop::Rest
                } else {
                    old
                };
                slot.phase = Phase::Stopping { deadline, then };
            }
            Phase::Backoff { .. } | Phase::Failed | Phase::Stopped => match then {
                AfterStop::Remove => {
                    self.slots.remove(&id);
                }
                AfterStop::Respawn => {
                    if self.run != RunState::Stopping && self.run != RunState::Stopped {
                        self.spawn(id, now, out);
                    }
                }
                AfterStop::Rest | AfterStop::Crash => slot.phase = Phase::Stopped,
            },
        }
    }

    fn fill_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Keep (desired) slots that are not being removed; new ids take the lowest free
        // numbers so `w-0 .. w-(n-1)` stay stable across scaling.
        let keeping = self
            .slots
            .values()
            .filter(|s| {
                !matches!(
                    s.phase,
                    Phase::Stopping {
                        then: AfterStop::Remove,
                        ..
                    }
                )
            })
            .count();
        let mut missing = (self.desired as usize).saturating_sub(keeping);
        // A slot on its way out is cheaper to keep than a new one: restart it instead.
        for slot in self.slots.values_mut() {
            if missing == 0 {
                break;
            }
            if let Phase::Stopping {
                deadline,
                then: AfterStop::Remove,
            } = slot.phase
            {
                slot.phase = Phase::Stopping {
                    deadline,
                    then: AfterStop::Respawn,
                };
                missing -= 1;
            }
        }
        let mut id = 0;
        while missing > 0 {
            if let std::collections::btree_map::Entry::Vacant(e) = self.slots.entry(Slot(id)) {
                e.insert(SlotState::new(Slot(id)));
                self.spawn(Slot(id), now, out);
                missing -= 1;
            }
            id += 1;
        }
        // Restart slots that are merely stopped (site started again).
        let stopped: Vec<Slot> = self
            .slots
            .values()
            .filter(|s| s.phase == Phase::Stopped)
            .map(|s| s.id)
            .collect();
        for id in stopped {
            self.spawn(id, now, out);
        }
    }

    fn trim_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        let keeping: Vec<Slot> = self
            .slots
            .values()
            .filter(|s| {
                !matches!(
                    s.phase,
                    Phase::Stopping {
                        then: AfterStop::Remove,
                        ..
                    }
                )
            })
            .map(|s| s.id)
            .collect();
        let excess = keeping.len().saturating_sub(self.desired as usize);
        // Remove slots without a process first, then idle ones (by their `BUSY=`
        // reports; a worker that never reports counts as idle), highest ids first.
        let mut victims: Vec<Slot> = keeping.clone();
        victims.sort_by_key(|id| {
            let slot = self.slots.get(id);
            let has = slot.is_some_and(|s| s.phase.has_process());
            let busy = slot.is_some_and(|s| s.busy);
            (has, busy, std::cmp::Reverse(*id))
        });
        for id in victims.into_iter().take(excess) {
            self.stop_slot(id, AfterStop::Remove, now, out);
            if let Some(r) = &mut self.rolling {
                r.queue.retain(|q| *q != id);
                r.done.retain(|q| *q != id);
                if r.current == Some(id) {
                    r.current = None;
                }
            }
        }
    }

    /// Feeds one input at time `now`; returns what to do.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.settle(now);
        match input {
            Input::StartRequested => {
                self.run = RunState::Running;
                for slot in self.slots.values_mut() {
                    slot.history.reset();
                    match slot.phase {
                        Phase::Failed | Phase::Backoff { .. } => slot.phase = Phase::Stopped,
                        // Started again before a stop ended: runs again once it has exited.
                        Phase::Stopping {
                            deadline,
                            then: AfterStop::Rest,
                        } => {
                            slot.phase = Phase::Stopping {
                                deadline,
                                then: AfterStop::Respawn,
                            }
                        }
                        _ => {}
                    }
                }
                self.settled = false;
                self.trim_slots(now, &mut out);
                self.fill_slots(now, &mut out);
            }
            Input::StopRequested => {
                self.run = RunState::Stopping;
                self.rolling = None;
                let ids: Vec<Slot> = self.slots.keys().copied().collect();
                for id in ids {
                    self.stop_slot(id, AfterStop::Rest, now, &mut out);
                }
            }
            Input::ScaleRequested(n) => {
                self.desired = n;
                self.settled = false;
                self.trim_slots(now, &mut out);
                if matches!(self.run, RunState::Running | RunState::Failed) {
                    self.fill_slots(now, &mut out);
                }
            }
            Input::RestartRequested => {
                if matches!(self.run, RunState::Stopped | RunState::Stopping) {
                    return self.handle(Input::StartRequested, now);
                }
                let queue: Vec<Slot> = self.slots.keys().rev().copied().collect();
                self.rolling = Some(Rolling {
                    queue,
                    current: None,
                    done: Vec::new(),
                });
            }
            Input::Spawned { id, pid } => {
                let ready_now = self.policies.ready.check == ReadyCheck::None;
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.pid = Some(pid);
                    slot.busy = false;
                    out.push(Action::Note(Note::Started(id, pid)));
                    if ready_now && matches!(slot.phase, Phase::Starting { .. }) {
                        slot.phase = Phase::Ready;
                        slot.settles_at = Some(now + self.policies.ready.settle);
                        out.push(Action::Note(Note::Ready(id)));
                    }
                    // Asked to stop before its spawn was reported: now it can be.
                    if let Phase::Stopping { deadline, .. } = slot.phase {
                        out.push(match deadline {
                            Some(_) => Action::Signal(id, self.policies.stop.signal),
                            None => Action::Kill(id),
                        });
                    }
                }
            }
            Input::BusyReported { id, busy } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.busy = busy && slot.phase.has_process();
                }
            }
            Input::ReadyNotified { id } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    if matches!(slot.phase, Phase::Starting { .. }) {
                        slot.phase = Phase::Ready;
                        slot.settles_at = Some(now + self.policies.ready.settle);
                        out.push(Action::Note(Note::Ready(id)));
                    }
                }
            }
            Input::SpawnFailed {
                id,
                error,
                permanent,
            } => {
                let reason = ExitReason::SpawnFailed { error };
                if matches!(
                    self.slots.get(&id).map(|s| s.phase),
                    Some(Phase::Stopping { .. })
                ) {
                    // Asked to stop before its spawn was reported: it ended as asked.
                    return self.handle(Input::Exited { id, reason }, now);
                }
                if permanent {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.phase = Phase::Failed;
                        slot.pid = None;
                        slot.last_exit = Some(reason.clone());
                        out.push(Action::Note(Note::Crashed(
                            id,
                            reason,
                            std::time::Duration::ZERO,
                        )));
                        out.push(Action::Note(Note::Failed(id)));
                        self.run = RunState::Failed;
                    }
                } else {
                    self.crashed(id, reason, now, &mut out);
                }
            }
            Input::Exited { id, reason } => {
                let Some(slot) = self.slots.get_mut(&id) else {
                    return out;
                };
                if !slot.phase.has_process() {
                    return out;
                }
                slot.pid = None;
                slot.busy = false;
                slot.settles_at = None;
                slot.last_exit = Some(reason.clone());
                match slot.phase {
                    Phase::Stopping { then, .. } => {
                        out.push(Action::Note(Note::Exited(id, reason.clone())));
                        match then {
                            AfterStop::Remove => {
                                self.slots.remove(&id);
                            }
                            AfterStop::Rest => slot.phase = Phase::Stopped,
                            AfterStop::Respawn => {
                                slot.phase = Phase::Stopped;
                                if matches!(self.run, RunState::Running | RunState::Failed) {
                                    self.spawn(id, now, &mut out);
                                }
                            }
                            AfterStop::Crash => {
                                slot.phase = Phase::Stopped;
                                self.crashed(id, ExitReason::ReadyTimeout, now, &mut out);
                            }
                        }
                    }
                    _ => self.crashed(id, reason, now, &mut out),
                }
            }
            Input::DeadlineReached => {
                let ids: Vec<Slot> = self.slots.keys().copied().collect();
                for id in ids {
                    let Some(slot) = self.slots.get_mut(&id) else {
                        continue;
                    };
                    match slot.phase {
                        Phase::Backoff { until } if until <= now => {
                            slot.phase = Phase::Stopped;
                            if matches!(self.run, RunState::Running | RunState::Failed) {
                                slot.restarts += 1;
                                self.spawn(id, now, &mut out);
                            }
                        }
                        Phase::Starting { deadline: Some(d) } if d <= now => {
                            self.stop_slot(id, AfterStop::Crash, now, &mut out);
                        }
                        Phase::Stopping {
                            deadline: Some(d),
                            then,
                        } if d <= now => {
                            slot.phase = Phase::Stopping {
                                deadline: None,
                                then,
                            };
                            out.push(Action::Kill(id));
                            out.push(Action::Note(Note::Killed(id)));
                        }
                        _ => {}
                    }
                }
            }
        }
        self.start_waiting(now, &mut out);
        self.advance_rolling(now, &mut out);
        self.check_stopped(&mut out);
        self.check_settled(&mut out);
        out
    }

    fn crashed(&mut self, id: Slot, reason: ExitReason, now: Instant, out: &mut Vec<Action>) {
        let policy = self.policies.restart;
        let keep_running = matches!(self.run, RunState::Running | RunState::Failed);
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        slot.pid = None;
        slot.settles_at = None;
        slot.last_exit = Some(reason.clone());
        let ran = slot.started.map_or(std::time::Duration::ZERO, |t| {
            now.saturating_duration_since(t)
        });
        out.push(Action::Note(Note::Crashed(id, reason, ran)));
        // A restarted worker that does not stay up ends the rolling restart there: the
        // slots not yet restarted keep their processes.
        if self
            .rolling
            .as_ref()
            .is_some_and(|r| r.current == Some(id) || r.done.contains(&id))
        {
            self.rolling = None;
            out.push(Action::Note(Note::RestartFailed(id)));
        }
        if !keep_running {
            slot.phase = Phase::Stopped;
            return;
        }
        self.settled = false;
        let started = slot.started.unwrap_or(now);
        match slot.history.record(&policy, started, now) {
            AfterCrash::Flapping => {
                slot.phase = Phase::Failed;
                self.run = RunState::Failed;
                out.push(Action::Note(Note::Failed(id)));
            }
            AfterCrash::RestartAt(at) if at <= now => {
                slot.phase = Phase::Stopped;
                slot.restarts += 1;
                self.spawn(id, now, out);
            }
            AfterCrash::RestartAt(at) => {
                slot.phase = Phase::Backoff { until: at };
                out.push(Action::Note(Note::BackingOff(id, (at - now).as_millis())));
            }
        }
    }

    /// Starts the slots of a running site that waited for a process on its way out to
    /// end (see `spawn`).
    fn start_waiting(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.run, RunState::Running | RunState::Failed) {
            return;
        }
        let waiting: Vec<Slot> = self
            .slots
            .values()
            .filter(|s| s.phase == Phase::Stopped)
            .map(|s| s.id)
            .collect();
        for id in waiting {
            if self.live() >= self.desired as usize {
                break;
            }
            self.spawn(id, now, out);
        }
    }

    fn advance_rolling(&mut self, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(r) = &mut self.rolling else {
                return;
            };
            if let Some(cur) = r.current {
                let slot = self.slots.get(&cur);
                match slot.map(|s| s.phase) {
                    // Still on its way down or up (or waiting for a slot on its way out to
                    // make room): wait.
                    Some(Phase::Stopping { .. } | Phase::Starting { .. } | Phase::Stopped) => {
                        return;
                    }
                    // Up again: the first one must also stay up before the next goes.
                    Some(Phase::Ready) => {
                        let first = r.done.is_empty();
                        if first && slot.is_some_and(|s| s.settles_at.is_some()) {
                            return;
                        }
                        r.done.push(cur);
                        r.current = None;
                    }
                    // Scaled away meanwhile: move on.
                    None => r.current = None,
                    // Its new process died or could not start: stop here, so the slots
                    // not yet restarted keep serving.
                    Some(Phase::Backoff { .. } | Phase::Failed) => {
                        self.rolling = None;
                        out.push(Action::Note(Note::RestartFailed(cur)));
                        return;
                    }
                }
            }
            if let Some(next) = r.queue.pop() {
                r.current = Some(next);
                self.stop_slot(next, AfterStop::Respawn, now, out);
                continue;
            }
            // Every slot restarted: done once each has stayed up, or failed if one did not.
            let done = r.done.clone();
            for id in &done {
                match self.slots.get(id).map(|s| (s.phase, s.settles_at)) {
                    Some((Phase::Ready, Some(_))) => return,
                    Some((Phase::Ready, None)) | None => {}
                    Some(_) => {
                        self.rolling = None;
                        out.push(Action::Note(Note::RestartFailed(*id)));
                        return;
                    }
                }
            }
            self.rolling = None;
            out.push(Action::Note(Note::RestartDone));
            return;
        }
    }

    fn check_stopped(&mut self, out: &mut Vec<Action>) {
        if self.run == RunState::Stopping && self.live() == 0 {
            self.run = RunState::Stopped;
            out.push(Action::Note(Note::AllStopped));
        }
    }

    fn check_settled(&mut self, out: &mut Vec<Action>) {
        let settled = self.is_settled();
        if settled && !self.settled {
            out.push(Action::Note(Note::Settled));
        }
        self.settled = settled;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn policies(check: ReadyCheck) -> Policies {
        Policies {
            restart: RestartPolicy {
                backoff_initial: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                healthy_after: Duration::from_secs(2),
                flapping_exits: 5,
                flapping_within: Duration::from_secs(10),
            },
            stop: StopPolicy {
                signal: Signal(libc::SIGTERM),
                timeout: Duration::from_secs(3),
            },
            ready: ReadyPolicy {
                check,
                timeout: Duration::from_secs(4),
                settle: Duration::from_millis(500),
            },
        }
    }

    fn spawns(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn(id) => Some(id.0),
                _ => None,
            })
            .collect()
    }

    /// A started site of `n` workers whose processes all exist (pids 100 + id), and are
    /// ready when `check` says they are ready at once.
    fn running(n: u32, check: ReadyCheck, t: Instant) -> SiteCore {
        let mut s = SiteCore::new(n, policies(check));
        s.handle(Input::StartRequested, t);
        for id in 0..n {
            let pid = 100 + i32::try_from(id).unwrap();
            s.handle(Input::Spawned { id: Slot(id), pid }, t);
        }
        s
    }

    #[test]
    fn start_spawns_the_desired_count() {
        let t = Instant::now();
        let mut s = SiteCore::new(3, policies(ReadyCheck::None));
        let a = s.handle(Input::StartRequested, t);
        assert_eq!(spawns(&a), vec![0, 1, 2]);
        for id in 0..3 {
            s.handle(
                Input::Spawned {
                    id: Slot(id),
                    pid: 100 + i32::try_from(id).unwrap(),
                },
                t,
            );
        }
        assert_eq!(s.ready(), 3);
    }

    #[test]
    fn a_crash_restarts_and_a_crash_loop_ends_in_failed() {
        let t0 = Instant::now();
        let mut s = SiteCore::new(1, policies(ReadyCheck::None));
        s.handle(Input::StartRequested, t0);
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 1,
            },
            t0,
        );
        let mut t = t0 + Duration::from_secs(3);
        // A worker that ran longer than healthy_after restarts at once.
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Exited { code: 1 },
            },
            t,
        );
        assert_eq!(spawns(&a), vec![0]);
        // Then it crashes instantly, again and again: backoff, then failed.
        let mut failed = false;
        for _ in 0..10 {
            s.handle(
                Input::Spawned {
                    id: Slot(0),
                    pid: 2,
                },
                t,
            );
            t += Duration::from_millis(1);
            let a = s.handle(
                Input::Exited {
                    id: Slot(0),
                    reason: ExitReason::Signaled { signal: 11 },
                },
                t,
            );
            if a.contains(&Action::Note(Note::Failed(Slot(0)))) {
                failed = true;
                break;
            }
            let until = match s.slots[&Slot(0)].phase {
                Phase::Backoff { until } => until,
                Phase::Starting { .. } => t,
                p => panic!("unexpected phase {p:?}"),
            };
            t = until;
            let a = s.handle(Input::DeadlineReached, t);
            assert!(spawns(&a).len() <= 1);
        }
        assert!(failed, "a crash loop must end in failed");
        assert_eq!(s.run, RunState::Failed);
        assert_eq!(s.slots[&Slot(0)].phase, Phase::Failed);
        // Starting the site again clears it.
        let a = s.handle(Input::StartRequested, t);
        assert_eq!(spawns(&a), vec![0]);
        assert_eq!(s.run, RunState::Running);
    }

    #[test]
    fn stop_escalates_to_kill_at_the_deadline() {
        let t0 = Instant::now();
        let mut s = SiteCore::new(2, policies(ReadyCheck::None));
        s.handle(Input::StartRequested, t0);
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 1,
            },
            t0,
        );
        s.handle(
            Input::Spawned {
                id: Slot(1),
                pid: 2,
            },
            t0,
        );
        let a = s.handle(Input::StopRequested, t0);
        assert!(a.contains(&Action::Signal(Slot(0), Signal(libc::SIGTERM))));
        s.handle(
            Input::Exited {
                id: Slot(1),
                reason: ExitReason::Exited { code: 0 },
            },
            t0,
        );
        let a = s.handle(Input::DeadlineReached, t0 + Duration::from_secs(3));
        assert_eq!(a.first(), Some(&Action::Kill(Slot(0))));
        assert_eq!(
            s.next_deadline(),
            None,
            "after SIGKILL nothing more is scheduled"
        );
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Signaled { signal: 9 },
            },
            t0,
        );
        assert!(a.contains(&Action::Note(Note::AllStopped)));
        assert_eq!(s.run, RunState::Stopped);
    }

    #[test]
    fn rolling_restart_keeps_all_but_one_ready() {
        let t = Instant::now();
        let mut s = running(3, ReadyCheck::Notify, t);
        for id in 0..3 {
            s.handle(Input::ReadyNotified { id: Slot(id) }, t);
        }
        let a = s.handle(Input::RestartRequested, t);
        assert_eq!(a, vec![Action::Signal(Slot(0), Signal(libc::SIGTERM))]);
        let settle = s.policies.ready.settle;
        let mut now = t;
        for (id, pid) in (0..3).zip(200..) {
            assert!(s.ready() >= 2);
            let a = s.handle(
                Input::Exited {
                    id: Slot(id),
                    reason: ExitReason::Exited { code: 0 },
                },
                now,
            );
            assert_eq!(spawns(&a), vec![id], "the stopped slot is respawned");
            s.handle(Input::Spawned { id: Slot(id), pid }, now);
            let a = s.handle(Input::ReadyNotified { id: Slot(id) }, now);
            match id {
                0 => {
                    // The first restarted worker must stay up before the next one goes.
                    assert!(!a.iter().any(|x| matches!(x, Action::Signal(..))), "{a:?}");
                    assert_eq!(s.next_deadline(), Some(now + settle));
                    now += settle;
                    let a = s.handle(Input::DeadlineReached, now);
                    assert_eq!(
                        a.last(),
                        Some(&Action::Signal(Slot(1), Signal(libc::SIGTERM)))
                    );
                }
                1 => assert_eq!(
                    a.last(),
                    Some(&Action::Signal(Slot(2), Signal(libc::SIGTERM)))
                ),
                _ => {
                    // Done once the last ones have stayed up too.
                    assert!(!a.contains(&Action::Note(Note::RestartDone)));
                    now += settle;
                    let a = s.handle(Input::DeadlineReached, now);
                    assert!(a.contains(&Action::Note(Note::RestartDone)), "{a:?}");
                }
            }
        }
        assert_eq!(
            s.slots[&Slot(0)].restarts,
            0,
            "operator restarts are not crash restarts"
        );
    }

    #[test]
    fn a_rolling_restart_stops_at_a_worker_that_does_not_stay_up() {
        let t = Instant::now();
        let mut s = running(3, ReadyCheck::Notify, t);
        for id in 0..3 {
            s.handle(Input::ReadyNotified { id: Slot(id) }, t);
        }
        let old: Vec<Option<i32>> = (0..3).map(|id| s.slots[&Slot(id)].pid).collect();
        s.handle(Input::RestartRequested, t);
        s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Exited { code: 0 },
            },
            t,
        );
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 300,
            },
            t,
        );
        s.handle(Input::ReadyNotified { id: Slot(0) }, t);
        // The new release dies right after it said it was ready.
        let later = t + Duration::from_millis(100);
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Exited { code: 3 },
            },
            later,
        );
        assert!(
            a.contains(&Action::Note(Note::Crashed(
                Slot(0),
                ExitReason::Exited { code: 3 },
                Duration::from_millis(100)
            ))),
            "{a:?}"
        );
        assert!(
            a.contains(&Action::Note(Note::RestartFailed(Slot(0)))),
            "{a:?}"
        );
        assert!(!s.is_restarting());
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::Signal(Slot(1) | Slot(2), _))),
            "no other worker is stopped: {a:?}"
        );
        assert_eq!(s.slots[&Slot(1)].pid, old[1]);
        assert_eq!(s.slots[&Slot(2)].pid, old[2]);
        assert_eq!(s.slots[&Slot(1)].phase, Phase::Ready);
    }

    #[test]
    fn settled_means_ready_for_the_settle_time() {
        let t = Instant::now();
        let mut s = SiteCore::new(2, policies(ReadyCheck::None));
        s.handle(Input::StartRequested, t);
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 10,
            },
            t,
        );
        let a = s.handle(
            Input::Spawned {
                id: Slot(1),
                pid: 11,
            },
            t,
        );
        assert_eq!(s.ready(), 2);
        assert!(!a.contains(&Action::Note(Note::Settled)), "not yet: {a:?}");
        assert!(!s.is_settled());
        let settle = s.policies.ready.settle;
        assert_eq!(s.next_deadline(), Some(t + settle));
        let a = s.handle(Input::DeadlineReached, t + settle);
        assert!(a.contains(&Action::Note(Note::Settled)), "{a:?}");
        assert!(s.is_settled());
        assert_eq!(s.next_deadline(), None, "nothing more to wake for");
    }

    #[test]
    fn ready_timeout_stops_and_counts_as_a_crash() {
        let t = Instant::now();
        let mut s = SiteCore::new(1, policies(ReadyCheck::Notify));
        s.handle(Input::StartRequested, t);
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 5,
            },
            t,
        );
        let a = s.handle(Input::DeadlineReached, t + Duration::from_secs(4));
        assert_eq!(a, vec![Action::Signal(Slot(0), Signal(libc::SIGTERM))]);
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t + Duration::from_secs(4),
        );
        assert!(a.contains(&Action::Note(Note::Crashed(
            Slot(0),
            ExitReason::ReadyTimeout,
            Duration::from_secs(4)
        ))));
        assert_eq!(s.slots[&Slot(0)].last_exit, Some(ExitReason::ReadyTimeout));
    }

    #[test]
    fn scale_down_removes_the_highest_slots_and_scale_up_reuses_ids() {
        let t = Instant::now();
        let mut s = running(4, ReadyCheck::None, t);
        let a = s.handle(Input::ScaleRequested(2), t);
        assert!(a.contains(&Action::Signal(Slot(3), Signal(libc::SIGTERM))));
        assert!(a.contains(&Action::Signal(Slot(2), Signal(libc::SIGTERM))));
        s.handle(
            Input::Exited {
                id: Slot(3),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t,
        );
        assert!(!s.slots.contains_key(&Slot(3)));
        let a = s.handle(Input::ScaleRequested(4), t);
        assert_eq!(
            spawns(&a),
            vec![3],
            "slot 2, still stopping, is kept and respawned; 3 is new"
        );
        let a = s.handle(
            Input::Exited {
                id: Slot(2),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t,
        );
        assert_eq!(spawns(&a), vec![2]);
    }

    #[test]
    fn scale_down_stops_idle_workers_before_busy_ones() {
        let t = Instant::now();
        let mut s = running(4, ReadyCheck::None, t);
        s.handle(
            Input::BusyReported {
                id: Slot(3),
                busy: true,
            },
            t,
        );
        s.handle(
            Input::BusyReported {
                id: Slot(1),
                busy: true,
            },
            t,
        );
        s.handle(
            Input::BusyReported {
                id: Slot(1),
                busy: false,
            },
            t,
        );
        let a = s.handle(Input::ScaleRequested(2), t);
        let stopped: Vec<Slot> = a
            .iter()
            .filter_map(|x| match x {
                Action::Signal(id, _) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(
            stopped,
            vec![Slot(2), Slot(1)],
            "idle first, highest first; busy 3 stays"
        );
        // A new process of a slot starts idle.
        s.handle(
            Input::Exited {
                id: Slot(3),
                reason: ExitReason::Exited { code: 1 },
            },
            t,
        );
        assert!(!s.slots[&Slot(3)].busy);
    }

    #[test]
    fn a_slot_stopped_before_its_spawn_is_reported_is_signalled_once_it_is() {
        let t = Instant::now();
        let mut s = SiteCore::new(2, policies(ReadyCheck::Notify));
        assert_eq!(spawns(&s.handle(Input::StartRequested, t)), vec![0, 1]);
        // Stopped before the loop reported either spawn: there is no process to signal.
        let a = s.handle(Input::StopRequested, t);
        assert_eq!(a, vec![]);
        let a = s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 10,
            },
            t,
        );
        assert!(
            a.contains(&Action::Signal(Slot(0), Signal(libc::SIGTERM))),
            "{a:?}"
        );
        // A spawn that failed has nothing left to stop: it ended as asked, not as a crash.
        let a = s.handle(
            Input::SpawnFailed {
                id: Slot(1),
                error: "ENOENT".into(),
                permanent: true,
            },
            t,
        );
        assert!(!a.contains(&Action::Note(Note::Failed(Slot(1)))), "{a:?}");
        assert_eq!(s.slots[&Slot(1)].phase, Phase::Stopped);
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t,
        );
        assert!(a.contains(&Action::Note(Note::AllStopped)), "{a:?}");
        assert_eq!(s.run, RunState::Stopped);
    }

    #[test]
    fn starting_again_before_a_stop_ended_runs_the_stopping_slots_again() {
        let t = Instant::now();
        let mut s = running(2, ReadyCheck::None, t);
        s.handle(Input::StopRequested, t);
        assert_eq!(
            spawns(&s.handle(Input::StartRequested, t)),
            Vec::<u32>::new()
        );
        for id in 0..2 {
            let a = s.handle(
                Input::Exited {
                    id: Slot(id),
                    reason: ExitReason::Signaled { signal: 15 },
                },
                t,
            );
            assert_eq!(spawns(&a), vec![id], "slot {id} runs again");
        }
        assert_eq!(s.run, RunState::Running);
    }

    #[test]
    fn no_restart_while_a_slot_on_its_way_out_holds_its_room() {
        let t = Instant::now();
        let mut s = running(3, ReadyCheck::None, t);
        s.handle(Input::ScaleRequested(2), t);
        assert!(matches!(s.slots[&Slot(2)].phase, Phase::Stopping { .. }));
        // Slot 0 dies while slot 2 still runs, on its way out: two processes for two.
        let later = t + Duration::from_secs(3);
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Exited { code: 1 },
            },
            later,
        );
        assert_eq!(spawns(&a), Vec::<u32>::new());
        assert_eq!(s.live(), 2);
        let a = s.handle(
            Input::Exited {
                id: Slot(2),
                reason: ExitReason::Signaled { signal: 15 },
            },
            later,
        );
        assert_eq!(spawns(&a), vec![0], "room again");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Exit(u8),
        Ready(u8),
        Busy(u8, bool),
        Advance(u16),
        Scale(u8),
        Start,
        Stop,
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<u8>().prop_map(Step::Exit),
            3 => any::<u8>().prop_map(Step::Ready),
            2 => (any::<u8>(), any::<bool>()).prop_map(|(k, b)| Step::Busy(k, b)),
            4 => (0u16..5000).prop_map(Step::Advance),
            1 => (0u8..12).prop_map(Step::Scale),
            1 => Just(Step::Start),
            1 => Just(Step::Stop),
            1 => Just(Step::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Random crashes, readiness, clock jumps and operator requests never break the
        /// invariants in the module doc.
        #[test]
        fn invariants_hold_under_random_events(
            check in prop_oneof![Just(ReadyCheck::None), Just(ReadyCheck::Notify)],
            steps in proptest::collection::vec(step(), 1..300),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = SiteCore::new(3, policies(check));
            let mut live: BTreeSet<Slot> = BTreeSet::new();
            let mut last_start: HashMap<Slot, (Instant, u32)> = HashMap::new();
            let mut next_pid = 1;
            let mut pending = s.handle(Input::StartRequested, now);
            for st in steps {
                // Carry out actions like the event loop would.
                while !pending.is_empty() {
                    let mut more = Vec::new();
                    for a in pending.drain(..) {
                        match a {
                            Action::Spawn(id) => {
                                prop_assert!(!live.contains(&id), "two processes in slot {}", id);
                                let restarts = s.slots[&id].restarts;
                                if let Some((prev, prev_restarts)) = last_start.get(&id) {
                                    // Crash restarts (not operator ones) respect the floor.
                                    if restarts > *prev_restarts {
                                        prop_assert!(now.duration_since(*prev) >= Duration::from_millis(100),
                                            "slot {} restarted within the floor", id);
                                    }
                                }
                                last_start.insert(id, (now, restarts));
                                live.insert(id);
                                next_pid += 1;
                                more.extend(s.handle(Input::Spawned { id, pid: next_pid }, now));
                            }
                            Action::Kill(id) => {
                                prop_assert!(live.remove(&id));
                                more.extend(s.handle(Input::Exited { id, reason: ExitReason::Signaled { signal: 9 } }, now));
                            }
                            Action::Signal(..) | Action::Note(_) => {}
                        }
                    }
                    pending = more;
                }
                let keeping = s.slots.values().filter(|x| !matches!(x.phase, Phase::Stopping { then: AfterStop::Remove, .. })).count();
                prop_assert!(keeping <= s.desired as usize, "{} slots kept for {} desired", keeping, s.desired);
                prop_assert_eq!(live.len(), s.live());
                if s.run == RunState::Stopped {
                    prop_assert!(live.is_empty());
                }
                if let Some(d) = s.next_deadline() {
                    prop_assert!(d >= t0);
                }
                // Next input.
                let ids: Vec<Slot> = live.iter().copied().collect();
                pending = match st {
                    Step::Exit(k) if !ids.is_empty() => {
                        let id = ids[k as usize % ids.len()];
                        live.remove(&id);
                        s.handle(Input::Exited { id, reason: ExitReason::Exited { code: 1 } }, now)
                    }
                    Step::Ready(k) if !ids.is_empty() => {
                        s.handle(Input::ReadyNotified { id: ids[k as usize % ids.len()] }, now)
                    }
                    Step::Busy(k, busy) if !ids.is_empty() => {
                        s.handle(Input::BusyReported { id: ids[k as usize % ids.len()], busy }, now)
                    }
                    Step::Advance(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        s.handle(Input::DeadlineReached, now)
                    }
                    Step::Scale(n) => s.handle(Input::ScaleRequested(u32::from(n)), now),
                    Step::Start => s.handle(Input::StartRequested, now),
                    Step::Stop => s.handle(Input::StopRequested, now),
                    Step::Restart => s.handle(Input::RestartRequested, now),
                    _ => Vec::new(),
                };
            }
            // A stop always ends: stop, then let every deadline pass.
            pending.extend(s.handle(Input::StopRequested, now));
            for _ in 0..5 {
                for a in std::mem::take(&mut pending) {
                    match a {
                        Action::Spawn(id) => {
                            live.insert(id);
                            next_pid += 1;
                            pending.extend(s.handle(Input::Spawned { id, pid: next_pid }, now));
                        }
                        Action::Kill(id) => {
                            live.remove(&id);
                            pending.extend(s.handle(Input::Exited { id, reason: ExitReason::Signaled { signal: 9 } }, now));
                        }
                        Action::Signal(..) | Action::Note(_) => {}
                    }
                }
                now += Duration::from_secs(10);
                pending.extend(s.handle(Input::DeadlineReached, now));
            }
            prop_assert!(live.is_empty());
            prop_assert_eq!(s.run, RunState::Stopped);
        }
    }
}

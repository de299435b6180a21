//! One site's worker slots as an explicit state machine.
//!
//! A *slot* is a numbered place for one worker (`w-<id>`); its process comes and goes.
//! Slot phases:
//!
//! | phase      | process | leaves on                                               |
//! |------------|---------|---------------------------------------------------------|
//! | `Starting` | yes     | ready (→ `Ready`), exit (crash), ready deadline (stop)   |
//! | `Ready`    | yes     | exit (crash), stop request (→ `Stopping`)               |
//! | `Stopping` | yes     | exit (→ what was asked), stop deadline (→ next signal of `stop.signals`, SIGKILL after the last) |
//! | `Backoff`  | no      | deadline (→ spawn)                                      |
//! | `Failed`   | no      | site start                                              |
//! | `Stopped`  | no      | site start                                              |
//!
//! Invariants (checked by the property tests in `tests.rs`, and for whole sites by the
//! simulation in `supervisor::machine::sim`):
//! - a slot never has two processes: `Spawn` is only issued for a slot without one;
//! - slots that are not being removed never outnumber the desired count;
//! - two starts of one slot are at least `backoff_initial` apart unless an operator
//!   asked for the restart;
//! - a stopped site has no process left, and a stop always ends (SIGKILL at the deadline).
//!
//! Cost: an input that changes k slots costs O(k log N) with N slots, so a site of
//! thousands of workers starts at the kernel's speed: the counts and deadlines its queries
//! need are kept up to date beside the slots (`index`). Only what is about every slot
//! (start, stop, a rolling restart's queue, a scale's choice of victims) passes over all.

use std::time::Instant;

use super::policy::AfterCrash;
use crate::config::ReadyCheck;

pub use self::map::SlotMap;
pub use self::types::{
    Action, AfterStop, ExitReason, Input, Note, Phase, Policies, RunState, SlotState,
};
pub use super::ids::Slot;

mod index;
mod map;
mod types;

use self::index::Index;

/// A worker an earlier agent started, found alive by the agent that takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// Its slot.
    pub id: Slot,
    /// Its process.
    pub pid: i32,
    /// How many times its slot was restarted after a crash.
    pub restarts: u32,
    /// Where the earlier agent had it.
    pub phase: AdoptedPhase,
}

/// Where the earlier agent had an adopted worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptedPhase {
    /// Started, not yet ready.
    Starting,
    /// Ready.
    Ready,
    /// Asked to stop.
    Stopping,
}

/// One site's workers.
#[derive(Debug, Clone)]
pub struct SiteCore {
    /// How many workers are wanted.
    pub desired: u32,
    /// Overall state.
    pub run: RunState,
    /// Slots by id.
    pub slots: SlotMap,
    /// Policies.
    pub policies: Policies,
    /// The rolling restart under way.
    rolling: Option<Rolling>,
    settled: bool,
    /// Busy time of processes that are no longer busy (see [`SiteCore::busy_time`]).
    busy_time: std::time::Duration,
    /// Whether any of its processes sent a `BUSY` report.
    busy_reported: bool,
    /// Counts and deadlines over `slots`, kept up to date by `sync` (see `index`).
    index: Index,
    /// Inputs since the index was last checked (debug builds, see `index`).
    #[cfg(debug_assertions)]
    unchecked: usize,
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
            slots: SlotMap::default(),
            policies,
            rolling: None,
            settled: false,
            busy_time: std::time::Duration::ZERO,
            busy_reported: false,
            index: Index::default(),
            #[cfg(debug_assertions)]
            unchecked: 0,
        }
    }

    /// The time its processes said they were busy, all added up, until `now`; `None` while
    /// none has sent a `BUSY` report (the app does not send them). Load scaling takes the
    /// busy workers on average over a period from two of these.
    pub fn busy_time(&self, now: Instant) -> Option<std::time::Duration> {
        self.busy_reported.then(|| {
            self.slots
                .values()
                .filter_map(|s| s.busy_since)
                .fold(self.busy_time, |t, since| {
                    t + now.saturating_duration_since(since)
                })
        })
    }

    /// Whether any of its processes sent a `BUSY` report (`busy_time` is `Some`), without
    /// adding up their busy time.
    pub fn busy_reported(&self) -> bool {
        self.busy_reported
    }

    /// Marks a slot's process busy or not, counting the time it was.
    fn set_busy(&mut self, id: Slot, busy: bool, now: Instant) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        match (slot.busy_since, busy) {
            (None, true) => slot.busy_since = Some(now),
            (Some(since), false) => {
                slot.busy_since = None;
                self.busy_time += now.saturating_duration_since(since);
            }
            _ => {}
        }
        self.sync(id);
    }

    /// The slots of a generation whose workers an earlier agent started and left running
    /// (the caller verified each is alive), taken over as they are: a ready worker is
    /// `Ready` and settled; one not yet ready is `Starting` with a fresh `ready.timeout`
    /// (without a ready check, a process that runs is ready: `Ready`, settling); one asked
    /// to stop is `Stopping` (then removed) and signalled again, as the earlier agent may
    /// have died between deciding and signalling. Each keeps its pid and restart count;
    /// its crash history starts afresh, from `now`. A second worker for a slot already
    /// taken is left out: a slot never has two processes.
    ///
    /// `run`: the workers not stopping keep running (`Running`), but never more than
    /// `desired`: the excess is stopped at once, highest slots first, and removed. Missing
    /// slots are not started here (`StartRequested` does that). Otherwise every worker is
    /// stopped (`Stopping`, then `Stopped`), as a site stop does.
    ///
    /// The slots' numbers are below [`crate::config::MAX_WORKERS`] (the caller checks: a
    /// slot's number is its place in [`SlotMap`]).
    pub fn adopted(
        desired: u32,
        policies: Policies,
        workers: &[Adopted],
        run: bool,
        now: Instant,
    ) -> (SiteCore, Vec<Action>) {
        let mut core = SiteCore::new(desired, policies);
        let mut out = Vec::new();
        if let Some(last) = workers.iter().map(|w| w.id).max() {
            core.slots.reserve_up_to(last);
        }
        for w in workers {
            debug_assert!(w.id.0 < crate::config::MAX_WORKERS, "checked by the caller");
            if core.slots.contains_key(&w.id) {
                continue;
            }
            let mut slot = SlotState::new(w.id);
            slot.pid = Some(w.pid);
            slot.restarts = w.restarts;
            slot.started = Some(now);
            match (w.phase, policies.ready.check) {
                (AdoptedPhase::Ready, _) => slot.phase = Phase::Ready,
                (AdoptedPhase::Starting, ReadyCheck::None) => {
                    slot.phase = Phase::Ready;
                    slot.settles_at = Some(now + policies.ready.settle);
                }
                (AdoptedPhase::Starting, _) => {
                    slot.phase = Phase::Starting {
                        deadline: Some(now + policies.ready.timeout),
                    }
                }
                (AdoptedPhase::Stopping, _) => {
                    slot.phase = Phase::Stopping {
                        deadline: Some(now + policies.stop.timeout),
                        then: AfterStop::Remove,
                        step: 0,
                    };
                    out.push(Action::Signal(w.id, policies.stop.signal));
                }
            }
            core.slots.insert(slot);
            core.sync(w.id);
        }
        if core.live() > 0 {
            core.run = if run {
                RunState::Running
            } else {
                RunState::Stopping
            };
        }
        if run {
            core.trim_slots(now, &mut out);
        } else {
            let ids: Vec<Slot> = core.slots.keys().copied().collect();
            for id in ids {
                core.stop_slot(id, AfterStop::Rest, now, &mut out);
            }
        }
        core.check_stopped(&mut out);
        core.check_settled(&mut out);
        #[cfg(debug_assertions)]
        core.check_index();
        (core, out)
    }

    /// Holds back the spawn of slot `id` just asked for (`Action::Spawn`, not yet carried
    /// out): it stays `Starting` without a ready deadline until [`SiteCore::release_spawn`]
    /// (the caller waits for something the spawn needs, with its own deadline, and ends
    /// the wait with `Spawned` or `SpawnFailed` as for any spawn). Whether it did.
    pub fn hold_spawn(&mut self, id: Slot) -> bool {
        let held = match self.slots.get_mut(&id) {
            Some(slot) if matches!(slot.phase, Phase::Starting { .. }) && slot.pid.is_none() => {
                slot.phase = Phase::Starting { deadline: None };
                true
            }
            // Asked to stop in the same input that asked for it (a rolling restart moving
            // on): held too, so that the caller ends it as never started.
            Some(slot) if matches!(slot.phase, Phase::Stopping { .. }) && slot.pid.is_none() => {
                true
            }
            _ => false,
        };
        self.sync(id);
        #[cfg(debug_assertions)]
        self.check_index_often();
        held
    }

    /// A spawn held back (`hold_spawn`) is carried out now: its ready deadline, and its
    /// start time for the crash history, count from `now`. Whether the slot still waits for
    /// it (`Starting`, no process reported) and may start: if the count fell meanwhile and
    /// slots on their way out still hold more processes than it allows, the slot waits,
    /// stopped, for one of them to exit (as `spawn` would have made it), and this is false.
    pub fn release_spawn(&mut self, id: Slot, now: Instant) -> bool {
        let deadline = match self.policies.ready.check {
            ReadyCheck::None => None,
            _ => Some(now + self.policies.ready.timeout),
        };
        // `live` counts the held slot itself.
        let over = self.live() > self.desired as usize;
        let released = match self.slots.get_mut(&id) {
            Some(slot)
                if over && matches!(slot.phase, Phase::Starting { .. }) && slot.pid.is_none() =>
            {
                slot.phase = Phase::Stopped;
                false
            }
            Some(slot) if matches!(slot.phase, Phase::Starting { .. }) && slot.pid.is_none() => {
                slot.phase = Phase::Starting { deadline };
                slot.started = Some(now);
                true
            }
            _ => false,
        };
        self.sync(id);
        #[cfg(debug_assertions)]
        self.check_index_often();
        released
    }

    /// Whether a rolling restart is under way.
    pub fn is_restarting(&self) -> bool {
        self.rolling.is_some()
    }

    /// The earliest deadline of any slot (settling ones included).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.index.deadlines.first().map(|(t, _)| *t)
    }

    /// Whether the desired count runs, ready, each for at least `ready.settle`.
    pub fn is_settled(&self) -> bool {
        self.run == RunState::Running
            && self.slots.len() == self.desired as usize
            && self.index.ready == self.slots.len()
            && self.index.settling == 0
    }

    /// Marks the slots whose settle time has come.
    fn settle(&mut self, now: Instant) {
        while self.index.settles.first().is_some_and(|(t, _)| *t <= now) {
            let Some((_, id)) = self.index.settles.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.settles_at = None;
            }
            self.sync(id);
        }
    }

    /// The lowest slot not in use: the one the next worker added (a start, a `scale` up)
    /// gets (`fill_slots` fills the first gap).
    pub fn lowest_unused_slot(&self) -> Slot {
        // Without a gap (the usual case), one past the last, found without a walk.
        match self.slots.last_key_value() {
            None => return Slot(0),
            Some((last, _)) if last.0 as usize + 1 == self.slots.len() => {
                return Slot(last.0 + 1);
            }
            Some(_) => {}
        }
        // The keys are in order: the first gap.
        let mut next = 0u32;
        for id in self.slots.keys() {
            if id.0 != next {
                break;
            }
            next += 1;
        }
        Slot(next)
    }

    /// Processes in any phase.
    pub fn live(&self) -> usize {
        self.index.live
    }

    /// Ready workers.
    pub fn ready(&self) -> usize {
        self.index.ready
    }

    /// Workers whose process was started (its spawn reported) and is not ready yet.
    pub fn spawned_starting(&self) -> usize {
        self.index.spawned
    }

    /// Whether every ready worker says it is busy (and there is one): a pool that is full.
    pub fn saturated(&self) -> bool {
        self.index.ready > 0 && self.index.ready_busy == self.index.ready
    }

    fn spawn(&mut self, id: Slot, now: Instant, out: &mut Vec<Action>) {
        // Never more processes than the desired count: a slot on its way out (scaled down)
        // still holds its process, and its memory, until it exits. A slot due to start
        // waits, stopped, until one has (`start_waiting`).
        if self.live() >= self.desired as usize {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.phase = Phase::Stopped;
            }
            self.sync(id);
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
        self.sync(id);
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
                    step: 0,
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
                step,
            } => {
                // Removal wins over anything else; otherwise keep the first request.
                let then = if then == AfterStop::Remove || old == AfterStop::Remove {
                    AfterStop::Remove
                } else if then == AfterStop::Rest {
                    AfterStop::Rest
                } else {
                    old
                };
                slot.phase = Phase::Stopping {
                    deadline,
                    then,
                    step,
                };
            }
            Phase::Backoff { .. } | Phase::Failed | Phase::Stopped => match then {
                AfterStop::Remove => self.remove_slot(id),
                AfterStop::Respawn => {
                    if self.run != RunState::Stopping && self.run != RunState::Stopped {
                        self.spawn(id, now, out);
                    }
                }
                AfterStop::Rest | AfterStop::Crash => slot.phase = Phase::Stopped,
            },
        }
        self.sync(id);
    }

    fn fill_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Keep (desired) slots that are not being removed; new ids take the lowest free
        // numbers so `w-0 .. w-(n-1)` stay stable across scaling.
        let keeping = self.slots.len() - self.index.removing;
        let mut missing = (self.desired as usize).saturating_sub(keeping);
        // A slot on its way out is cheaper to keep than a new one: restart it instead.
        if missing > 0 && self.index.removing > 0 {
            let mut kept = Vec::new();
            for slot in self.slots.values_mut() {
                if missing == 0 {
                    break;
                }
                if let Phase::Stopping {
                    deadline,
                    then: AfterStop::Remove,
                    step,
                } = slot.phase
                {
                    slot.phase = Phase::Stopping {
                        deadline,
                        then: AfterStop::Respawn,
                        step,
                    };
                    kept.push(slot.id);
                    missing -= 1;
                }
            }
            for id in kept {
                self.sync(id);
            }
        }
        if missing > 0 {
            // The new slots fill the gaps, then go at the end.
            let last = self.slots.len() + missing - 1;
            self.slots
                .reserve_up_to(Slot(u32::try_from(last).unwrap_or(u32::MAX)));
        }
        let mut id = 0;
        while missing > 0 {
            if !self.slots.contains_key(&Slot(id)) {
                self.slots.insert(SlotState::new(Slot(id)));
                self.sync(Slot(id));
                self.spawn(Slot(id), now, out);
                missing -= 1;
            }
            id += 1;
        }
        // Restart slots that are merely stopped (site started again).
        let stopped: Vec<Slot> = self.index.stopped.iter().copied().collect();
        for id in stopped {
            self.spawn(id, now, out);
        }
    }

    fn trim_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.slots.len() - self.index.removing <= self.desired as usize {
            return;
        }
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
            let busy = slot.is_some_and(SlotState::busy);
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
        let out = self.apply(input, now);
        #[cfg(debug_assertions)]
        self.check_index_often();
        out
    }

    fn apply(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.settle(now);
        match input {
            Input::StartRequested => {
                self.run = RunState::Running;
                let ids: Vec<Slot> = self.slots.keys().copied().collect();
                for id in ids {
                    let Some(slot) = self.slots.get_mut(&id) else {
                        continue;
                    };
                    slot.history.reset();
                    match slot.phase {
                        Phase::Failed | Phase::Backoff { .. } => slot.phase = Phase::Stopped,
                        // Started again before a stop ended: runs again once it has exited.
                        Phase::Stopping {
                            deadline,
                            then: AfterStop::Rest,
                            step,
                        } => {
                            slot.phase = Phase::Stopping {
                                deadline,
                                then: AfterStop::Respawn,
                                step,
                            }
                        }
                        _ => {}
                    }
                    self.sync(id);
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
            Input::RestartSlot(id) => {
                if self.run == RunState::Running
                    && self.slots.get(&id).is_some_and(|s| s.phase == Phase::Ready)
                {
                    self.stop_slot(id, AfterStop::Respawn, now, &mut out);
                }
            }
            Input::RestartRequested => {
                if matches!(self.run, RunState::Stopped | RunState::Stopping) {
                    return self.apply(Input::StartRequested, now);
                }
                // Workers held down after flapping serve nothing: started again at once,
                // their crashes forgotten (as a start would); the others one at a time.
                let held: Vec<Slot> = self
                    .slots
                    .values()
                    .filter(|s| s.phase == Phase::Failed)
                    .map(|s| s.id)
                    .collect();
                for id in &held {
                    if let Some(slot) = self.slots.get_mut(id) {
                        slot.history.reset();
                        slot.phase = Phase::Stopped;
                    }
                    self.sync(*id);
                    self.spawn(*id, now, &mut out);
                }
                let queue: Vec<Slot> = self
                    .slots
                    .keys()
                    .rev()
                    .filter(|id| !held.contains(id))
                    .copied()
                    .collect();
                // The ones started here are restarted: the restart ends once they, too,
                // are up and settled, and fails if one of them dies first.
                self.rolling = Some(Rolling {
                    queue,
                    current: None,
                    done: held,
                });
            }
            Input::Spawned { id, pid } => {
                let ready_now = self.policies.ready.check == ReadyCheck::None;
                self.set_busy(id, false, now);
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.pid = Some(pid);
                    out.push(Action::Note(Note::Started(id, pid)));
                    if ready_now && matches!(slot.phase, Phase::Starting { .. }) {
                        slot.phase = Phase::Ready;
                        slot.settles_at = Some(now + self.policies.ready.settle);
                        out.push(Action::Note(Note::Ready(id)));
                    }
                    // Asked to stop before its spawn was reported: now it can be.
                    if let Phase::Stopping { deadline, step, .. } = slot.phase {
                        let stop = self.policies.stop;
                        out.push(match deadline {
                            Some(_) => Action::Signal(
                                id,
                                stop.step(usize::from(step)).unwrap_or(stop.signal),
                            ),
                            None => Action::Kill(id),
                        });
                    }
                }
                self.sync(id);
            }
            Input::BusyReported { id, busy } => {
                let live = self.slots.get(&id).is_some_and(|s| s.phase.has_process());
                if live {
                    self.busy_reported = true;
                }
                self.set_busy(id, busy && live, now);
            }
            Input::ReadyNotified { id } => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    if matches!(slot.phase, Phase::Starting { .. }) {
                        slot.phase = Phase::Ready;
                        slot.settles_at = Some(now + self.policies.ready.settle);
                        out.push(Action::Note(Note::Ready(id)));
                    }
                }
                self.sync(id);
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
                    return self.apply(Input::Exited { id, reason }, now);
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
                    self.sync(id);
                } else {
                    self.crashed(id, reason, now, &mut out);
                }
            }
            Input::Exited { id, reason } => {
                self.set_busy(id, false, now);
                let Some(slot) = self.slots.get_mut(&id) else {
                    return out;
                };
                if !slot.phase.has_process() {
                    return out;
                }
                slot.pid = None;
                slot.settles_at = None;
                slot.last_exit = Some(reason.clone());
                let phase = slot.phase;
                self.sync(id);
                match phase {
                    Phase::Stopping { then, .. } => {
                        out.push(Action::Note(Note::Exited(id, reason.clone())));
                        if then == AfterStop::Remove {
                            self.remove_slot(id);
                        } else if let Some(slot) = self.slots.get_mut(&id) {
                            slot.phase = Phase::Stopped;
                            self.sync(id);
                        }
                        match then {
                            AfterStop::Remove | AfterStop::Rest => {}
                            AfterStop::Respawn => {
                                if matches!(self.run, RunState::Running | RunState::Failed) {
                                    self.spawn(id, now, &mut out);
                                }
                            }
                            AfterStop::Crash => {
                                self.crashed(id, ExitReason::ReadyTimeout, now, &mut out);
                            }
                        }
                    }
                    _ => self.crashed(id, reason, now, &mut out),
                }
            }
            Input::DeadlineReached => {
                // Only the slots whose deadline has come, in slot order as a pass over all
                // would take them (`settle` has taken the settle times that came).
                let mut due: Vec<Slot> = self
                    .index
                    .deadlines
                    .range(..=(now, Slot(u32::MAX)))
                    .map(|(_, id)| *id)
                    .collect();
                due.sort_unstable();
                for id in due {
                    let Some(slot) = self.slots.get_mut(&id) else {
                        continue;
                    };
                    match slot.phase {
                        Phase::Backoff { until } if until <= now => {
                            slot.phase = Phase::Stopped;
                            let respawn = matches!(self.run, RunState::Running | RunState::Failed);
                            if respawn {
                                slot.restarts += 1;
                            }
                            self.sync(id);
                            if respawn {
                                self.spawn(id, now, &mut out);
                            }
                        }
                        Phase::Starting { deadline: Some(d) } if d <= now => {
                            self.stop_slot(id, AfterStop::Crash, now, &mut out);
                        }
                        Phase::Stopping {
                            deadline: Some(d),
                            then,
                            step,
                        } if d <= now => {
                            // The next signal of the stop sequence, with its own wait; after
                            // the last, SIGKILL to the worker's tree.
                            let next = step.saturating_add(1);
                            let stop = self.policies.stop;
                            match stop.step(usize::from(next)) {
                                Some(signal) => {
                                    slot.phase = Phase::Stopping {
                                        deadline: Some(now + stop.timeout),
                                        then,
                                        step: next,
                                    };
                                    self.sync(id);
                                    out.push(Action::Signal(id, signal));
                                }
                                None => {
                                    slot.phase = Phase::Stopping {
                                        deadline: None,
                                        then,
                                        step,
                                    };
                                    self.sync(id);
                                    out.push(Action::Kill(id));
                                    out.push(Action::Note(Note::Killed(id)));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.start_waiting(now, &mut out);
        self.advance_rolling(now, &mut out);
        self.check_failed();
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
        self.sync(id);
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
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
            self.sync(id);
            return;
        }
        self.settled = false;
        let started = slot.started.unwrap_or(now);
        match slot.history.record(&policy, started, now) {
            AfterCrash::Flapping => {
                slot.phase = Phase::Failed;
                self.run = RunState::Failed;
                out.push(Action::Note(Note::Failed(id)));
                self.sync(id);
            }
            AfterCrash::RestartAt(at) if at <= now => {
                slot.phase = Phase::Stopped;
                slot.restarts += 1;
                self.sync(id);
                self.spawn(id, now, out);
            }
            AfterCrash::RestartAt(at) => {
                slot.phase = Phase::Backoff { until: at };
                out.push(Action::Note(Note::BackingOff(id, (at - now).as_millis())));
                self.sync(id);
            }
        }
    }

    /// Starts the slots of a running site that waited for a process on its way out to
    /// end (see `spawn`).
    fn start_waiting(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.run, RunState::Running | RunState::Failed) {
            return;
        }
        // Each spawn of a stopped slot below the desired count starts it: the first
        // `room` stopped slots start.
        let room = (self.desired as usize).saturating_sub(self.live());
        let waiting: Vec<Slot> = self.index.stopped.iter().take(room).copied().collect();
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
                    // Still settling, or (one held down, started with the restart) on its
                    // way up.
                    Some((Phase::Ready, Some(_)) | (Phase::Starting { .. }, _)) => return,
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

    /// Failed while a worker is held down after flapping: no longer once none is (a
    /// rolling restart, as a reload that changed the site makes, started it again, or a
    /// scale removed it). Looked at only in that state.
    fn check_failed(&mut self) {
        if self.run == RunState::Failed && !self.slots.values().any(|s| s.phase == Phase::Failed) {
            self.run = RunState::Running;
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
mod tests;

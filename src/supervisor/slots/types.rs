//! The slots' vocabulary: a slot's phase and state, how a process ended, the inputs the
//! machine takes, the actions and notes it gives, the policies it applies.

use std::time::Instant;

use serde::Serialize;

use super::Slot;
use crate::config::{ReadyPolicy, RestartPolicy, Signal, StopPolicy};
use crate::supervisor::policy::CrashHistory;

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
    /// Ended, but how is not known: it was adopted after an agent restart, so it is not
    /// the agent's child, and this kernel (before 6.15) tells only its parent.
    Unknown,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited { code } => write!(f, "exited with code {code}"),
            ExitReason::Signaled { signal } => write!(f, "killed by {}", Signal(*signal).name()),
            ExitReason::SpawnFailed { error } => write!(f, "failed to start: {error}"),
            ExitReason::ReadyTimeout => f.write_str("not ready before ready.timeout"),
            ExitReason::OomKilled => f.write_str("oom-killed"),
            ExitReason::Unknown => f.write_str(
                "exited (how is unknown: adopted after an agent restart, it is not the agent's child)",
            ),
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
        /// When the next signal of the stop sequence, or SIGKILL after the last, follows
        /// (None once SIGKILL is sent).
        deadline: Option<Instant>,
        /// What to do after the exit.
        then: AfterStop,
        /// The step of the stop sequence sent last (0: `stop.signal`, the first).
        step: u8,
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
    /// Since when its process says it is handling requests (`BUSY=1`, until `BUSY=0`).
    pub busy_since: Option<Instant>,
    /// When its process, ready, will have stayed up for `ready.settle`; `None` once it has
    /// (or while it is not ready).
    pub settles_at: Option<Instant>,
    /// What it added to its site's index (kept by `SiteCore::sync`).
    pub(super) indexed: super::index::Indexed,
}

impl SlotState {
    /// Whether its process said it is handling requests.
    pub fn busy(&self) -> bool {
        self.busy_since.is_some()
    }

    pub(super) fn new(id: Slot) -> SlotState {
        SlotState {
            id,
            phase: Phase::Stopped,
            pid: None,
            started: None,
            restarts: 0,
            last_exit: None,
            history: CrashHistory::default(),
            busy_since: None,
            settles_at: None,
            indexed: super::index::Indexed::default(),
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
    /// Restart one worker (stop it, then start it again at once): it failed its health
    /// checks.
    RestartSlot(Slot),
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

//! Load scaling (`[scale] by = "load"`): how many workers a site's load needs.
//!
//! Pure: the machine feeds [`LoadState::sample`] the time, counters the loop read from the
//! kernel ([`Counters`]: accept-queue length, the generation's CPU time, CPU stall time,
//! memory events) and the busy time its workers reported; the state keeps the previous
//! sample, so each signal is an average over the period between two samples.
//!
//! What each signal says is needed:
//! - **busy**: the workers busy on average (`BUSY=1` until `BUSY=0`), over the target
//!   utilisation;
//! - **cpu**, for an app that sends no `BUSY`: the CPUs its processes used on average over
//!   the target (a single-threaded worker computing all the time is a busy worker);
//! - **queue**: connections waiting in the accept queues of its listeners, which need no
//!   cooperation from the app. A connection seen waiting in two samples in a row (a
//!   standing queue, not one caught on its way to a worker), or as many waiting as there
//!   are ready workers in one sample (far behind), asks for a worker per waiting
//!   connection beside the ready ones.
//!
//! The count wanted is the largest of these, between `workers_min` and the ceiling
//! (`workers_max` and the memory cap). Then:
//! - **growth** is at once, to the count wanted (several workers at a time when far
//!   behind), at most once per `grow_cooldown`. Each signal counts what runs (busy or
//!   ready workers), not what was asked for, so a sample taken while new workers start
//!   does not ask for them again. Growth waits while the CPU is what the site is short of:
//!   when all its tasks waited for a CPU for at least [`CPU_BOUND`] of the period (PSI
//!   `full`), more workers would wait too;
//! - **shrink** is slow: to the most any sample of the last `shrink_cooldown` wanted,
//!   once the count has not grown for that long (a sliding window, as Kubernetes'
//!   scale-down stabilisation). An idle site is back at `workers_min` `shrink_cooldown`
//!   after its load stopped; a load that comes and goes faster than that keeps the site at
//!   its peak: no flapping between sizes. Which workers go is the slots' choice: idle ones
//!   first, highest slot first;
//! - **memory** comes first: in a period where the site's cgroups hit `memory.high` or
//!   `memory.max`, one worker less (never below `workers_min`), and no growth.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ScalePolicy;

/// The share of a period all of a site's tasks may wait for a CPU before growth waits.
pub const CPU_BOUND: f64 = 0.5;

/// What the loop read from the kernel for one generation; cumulative counters are turned
/// into rates between two samples. `None`: not available (said so in `status`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// Connections waiting now in the accept queues of the generation's TCP listeners
    /// (`TCP_INFO` on the agent's copy of each); `None` without one.
    pub queued: Option<u32>,
    /// CPU time the generation's processes used, µs (`cpu.stat` `usage_usec`).
    pub cpu_usec: Option<u64>,
    /// Time all of the generation's tasks waited for a CPU, µs (`cpu.pressure` `full`
    /// total; kernels before 5.13 have none for the CPU).
    pub cpu_stall_usec: Option<u64>,
    /// Times the generation's cgroups hit `memory.high` or `memory.max`
    /// (`memory.events`, which counts the leaves' too).
    pub memory_events: Option<u64>,
}

/// What the signals said at the last sample, as `status` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Workers busy on average (`None`: the app sends no `BUSY` reports).
    pub busy: Option<f64>,
    /// CPUs used on average.
    pub cpu: Option<f64>,
    /// Connections waiting in the accept queues.
    pub queued: Option<u32>,
    /// Share of the period all tasks waited for a CPU.
    pub cpu_stall: Option<f64>,
    /// `memory.high`/`memory.max` hits in the period.
    pub memory_events: Option<u64>,
    /// Workers ready at the sample.
    pub ready: u32,
    /// The count the signals asked for, within the bounds.
    pub wanted: u32,
}

/// Why the count changed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Reason {
    /// Connections waited for a worker.
    Queue {
        /// How many waited.
        waiting: u32,
        /// Workers ready to take them.
        ready: u32,
    },
    /// Workers were busy.
    Busy {
        /// Busy on average.
        busy: f64,
    },
    /// Workers used the CPU.
    Cpu {
        /// CPUs used on average.
        cpus: f64,
    },
    /// Fewer workers did for a whole cool-down.
    Idle {
        /// The most any sample wanted.
        needed: u32,
        /// For how long.
        over: Duration,
    },
    /// The site's cgroups hit their memory limits.
    Memory {
        /// How many times in the period.
        events: u64,
    },
    /// `workers_min`.
    Min {
        /// It.
        min: u32,
    },
}

impl Reason {
    /// In words, for the log and `status`.
    pub fn describe(&self, target_percent: u32) -> String {
        match self {
            Reason::Queue { waiting, ready } => {
                format!("{waiting} connections waiting for {ready} ready workers")
            }
            Reason::Busy { busy } => {
                format!("{busy:.1} workers busy on average, target {target_percent}%")
            }
            Reason::Cpu { cpus } => {
                format!("{cpus:.1} CPUs used on average, target {target_percent}%")
            }
            Reason::Idle { needed, over } => format!(
                "at most {needed} needed for {}",
                crate::config::format_duration(*over)
            ),
            Reason::Memory { events } => {
                format!("memory.high or memory.max hit {events} times")
            }
            Reason::Min { min } => format!("workers_min is {min}"),
        }
    }
}

/// A change of the count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The count before.
    pub from: u32,
    /// The count after.
    pub to: u32,
    /// Why.
    pub reason: Reason,
}

/// Why the count did not grow although more workers were wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// The site's tasks waited for a CPU (more workers would wait too).
    CpuBound,
    /// The last growth was less than `grow_cooldown` ago.
    Cooldown,
    /// The memory limits were hit.
    Memory,
}

impl Held {
    /// In words.
    pub fn describe(self) -> &'static str {
        match self {
            Held::CpuBound => {
                "growth waits: the site's tasks wait for a CPU, more workers would too"
            }
            Held::Cooldown => "growth waits for scale.grow_cooldown",
            Held::Memory => "growth waits: the site hits its memory limits",
        }
    }
}

/// The bounds of the count: `workers_min` and the ceiling (`workers_max`, the memory cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The fewest.
    pub min: u32,
    /// The most.
    pub ceiling: u32,
}

/// What the workers are doing at a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// The count now (desired, starting ones included).
    pub desired: u32,
    /// Ready ones.
    pub ready: u32,
    /// Busy time they reported so far (`None`: no `BUSY` report yet).
    pub busy: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Previous {
    at: Instant,
    counters: Counters,
    busy: Option<Duration>,
    /// Some worker was starting (fewer ready than desired).
    starting: bool,
}

/// A site's load scaling: the previous sample, what the recent ones wanted, the last
/// decision.
#[derive(Debug, Clone, Default)]
pub struct LoadState {
    /// The last full sample (rates are taken between two of these).
    previous: Option<Previous>,
    /// The last sample of any kind, and the accept queues then.
    last: Option<(Instant, Option<u32>)>,
    /// What each sample of the last `shrink_cooldown` wanted, oldest first.
    wants: VecDeque<(Instant, u32)>,
    /// Since when the count has not grown (the start of the period, or the last growth).
    steady_since: Option<Instant>,
    last_grow: Option<Instant>,
    /// The signals at the last sample.
    pub signals: Option<Signals>,
    /// The last change of the count, and when.
    pub decision: Option<(Instant, Decision)>,
    /// Why the last sample that wanted more workers did not grow the site.
    pub held: Option<Held>,
}

/// The change of a cumulative counter per µs of `dt` (`None` when either is missing or
/// it went backwards: a cgroup replaced).
fn rate(now: Option<u64>, before: Option<u64>, dt: Duration) -> Option<f64> {
    let d = now?.checked_sub(before?)?;
    let us = dt.as_micros();
    (us > 0).then(|| d as f64 / us as f64)
}

/// Connections waiting for a worker: all of them when as many wait as there are ready
/// workers (far behind), else those that waited since the last sample too (a standing
/// queue, not connections caught on their way to a worker).
fn waiting(queued: u32, last_queued: Option<u32>, ready: u32) -> u32 {
    if queued >= ready.max(1) {
        queued
    } else {
        last_queued.unwrap_or(0).min(queued)
    }
}

/// Workers for `load` at `target_percent` utilisation.
fn needed(load: f64, target_percent: u32) -> u32 {
    let n = (load * 100.0 / f64::from(target_percent.max(1)) - 1e-9).ceil();
    u32::try_from((n.min(f64::from(u32::MAX)) as i64).max(0)).unwrap_or(u32::MAX)
}

impl LoadState {
    /// Forgets the counters (another generation serves, or the site was stopped): the
    /// next sample starts a new period. The last decision stays for `status`.
    pub fn restart_period(&mut self) {
        self.previous = None;
        self.last = None;
        self.wants.clear();
        self.steady_since = None;
        self.signals = None;
        self.held = None;
    }

    /// When the last sample was taken (in this period).
    pub fn last_sample(&self) -> Option<Instant> {
        self.last.map(|(t, _)| t)
    }

    /// Takes one sample at `now`; returns the change of the count, if any.
    ///
    /// A sample less than three quarters of an interval after the last full one (the
    /// machine samples a full pool sooner) is a quick one: averages over so short a time
    /// are noise (one request of a one-worker site looks like a full worker), so it looks
    /// at the accept queue only, and may grow the site but never shrinks it.
    pub fn sample(
        &mut self,
        policy: &ScalePolicy,
        now: Instant,
        counters: Counters,
        workers: Workers,
        bounds: Bounds,
    ) -> Option<Decision> {
        let last_queued = self
            .last
            .replace((now, counters.queued))
            .and_then(|(_, q)| q);
        let quick = self
            .previous
            .is_some_and(|p| now.saturating_duration_since(p.at) < policy.interval * 3 / 4);
        if quick {
            return self.quick(policy, now, counters.queued, last_queued, workers, bounds);
        }
        let starting_now = workers.ready < workers.desired;
        let previous = self.previous.replace(Previous {
            at: now,
            counters,
            busy: workers.busy,
            starting: starting_now,
        });
        // A worker starting at either end of the period: the CPU it spends starting (an
        // interpreter importing an app) is no load.
        let starting = starting_now || previous.is_some_and(|p| p.starting);
        let dt = previous.map(|p| now.saturating_duration_since(p.at));
        let before = previous.map(|p| p.counters).unwrap_or_default();
        let per = |n: Option<u64>, b: Option<u64>| dt.and_then(|dt| rate(n, b, dt));
        let busy = match (workers.busy, previous.and_then(|p| p.busy), dt) {
            (Some(n), Some(b), Some(dt)) if !dt.is_zero() => {
                Some(n.saturating_sub(b).as_secs_f64() / dt.as_secs_f64())
            }
            // The first reports of a period: from no busy time at all.
            (Some(n), None, Some(dt)) if !dt.is_zero() => {
                Some((n.as_secs_f64() / dt.as_secs_f64()).min(f64::from(workers.desired)))
            }
            _ => None,
        };
        let cpu = per(counters.cpu_usec, before.cpu_usec);
        let cpu_stall = per(counters.cpu_stall_usec, before.cpu_stall_usec).map(|s| s.min(1.0));
        let memory_events = match (counters.memory_events, previous) {
            (Some(n), Some(_)) => before.memory_events.map(|b| n.saturating_sub(b)),
            _ => None,
        };
        let target = policy.target_percent;

        // What each signal asks for.
        let ready = workers.ready;
        let queued = counters.queued.unwrap_or(0);
        let waiting = waiting(queued, last_queued, ready);
        let mut asks: Vec<(u32, Reason)> = Vec::new();
        if waiting > 0 {
            asks.push((
                ready.saturating_add(waiting),
                Reason::Queue { waiting, ready },
            ));
        }
        match (busy, cpu) {
            (Some(b), _) => asks.push((needed(b, target), Reason::Busy { busy: b })),
            // Neither growth nor shrinking on it: the count stays, as far as the CPU says.
            (None, Some(c)) if starting => asks.push((workers.desired, Reason::Cpu { cpus: c })),
            (None, Some(c)) => asks.push((needed(c, target), Reason::Cpu { cpus: c })),
            (None, None) => {}
        }
        let (need, why) = asks
            .iter()
            .copied()
            .max_by_key(|(n, _)| *n)
            .map_or((0, None), |(n, r)| (n, Some(r)));
        let ceiling = bounds.ceiling;
        let wanted = need.max(bounds.min).min(ceiling);
        self.signals = Some(Signals {
            busy,
            cpu,
            queued: counters.queued,
            cpu_stall,
            memory_events,
            ready,
            wanted,
        });
        self.held = None;
        let from = workers.desired;
        self.wants.push_back((now, wanted));
        while self
            .wants
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= policy.shrink_cooldown)
        {
            self.wants.pop_front();
        }
        if previous.is_none() {
            self.steady_since = Some(now);
        }

        if let Some(events) = memory_events.filter(|e| *e > 0) {
            self.held = (wanted > from).then_some(Held::Memory);
            if from > bounds.min {
                return self.decide(now, from, from - 1, Reason::Memory { events });
            }
            return None;
        }
        if wanted > from {
            if !self.may_grow(policy, now, cpu_stall) {
                return None;
            }
            let reason = why
                .filter(|_| need >= wanted)
                .unwrap_or(Reason::Min { min: bounds.min });
            return self.decide(now, from, wanted, reason);
        }
        // Shrink to the most any sample of the last `shrink_cooldown` wanted, once that
        // long has passed without growth (a whole window of samples).
        let steady = self
            .steady_since
            .is_some_and(|t| now.saturating_duration_since(t) >= policy.shrink_cooldown);
        let most = self.wants.iter().map(|(_, w)| *w).max().unwrap_or(from);
        if wanted >= from || !steady || most >= from {
            return None;
        }
        self.decide(
            now,
            from,
            most,
            Reason::Idle {
                needed: most,
                over: policy.shrink_cooldown,
            },
        )
    }

    /// Whether the site may grow now: not while its tasks wait for a CPU (`cpu_stall`, the
    /// share of the period), nor within `grow_cooldown` of the last growth; says why not
    /// in `held`, and when it may, counts this as the last growth.
    fn may_grow(&mut self, policy: &ScalePolicy, now: Instant, cpu_stall: Option<f64>) -> bool {
        if cpu_stall.is_some_and(|s| s >= CPU_BOUND) {
            self.held = Some(Held::CpuBound);
            return false;
        }
        if self
            .last_grow
            .is_some_and(|t| now.saturating_duration_since(t) < policy.grow_cooldown)
        {
            self.held = Some(Held::Cooldown);
            return false;
        }
        self.last_grow = Some(now);
        self.steady_since = Some(now);
        true
    }

    /// A quick sample: the accept queue only.
    fn quick(
        &mut self,
        policy: &ScalePolicy,
        now: Instant,
        queued: Option<u32>,
        last_queued: Option<u32>,
        workers: Workers,
        bounds: Bounds,
    ) -> Option<Decision> {
        let ready = workers.ready;
        let waiting = waiting(queued.unwrap_or(0), last_queued, ready);
        let wanted = ready
            .saturating_add(waiting)
            .max(bounds.min)
            .min(bounds.ceiling);
        if let Some(sig) = &mut self.signals {
            sig.queued = queued;
            sig.ready = ready;
        }
        let from = workers.desired;
        if waiting == 0 || wanted <= from {
            return None;
        }
        self.held = None;
        if !self.may_grow(policy, now, self.signals.and_then(|s| s.cpu_stall)) {
            return None;
        }
        if let Some(sig) = &mut self.signals {
            sig.wanted = wanted;
        }
        self.decide(now, from, wanted, Reason::Queue { waiting, ready })
    }

    fn decide(&mut self, now: Instant, from: u32, to: u32, reason: Reason) -> Option<Decision> {
        let d = Decision { from, to, reason };
        self.decision = Some((now, d));
        Some(d)
    }
}

#[cfg(test)]
mod tests;

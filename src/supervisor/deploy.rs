//! The deploy plan: how a site moves from its serving generation N to a new one, N+1.
//!
//! Pure: the event loop describes both generations in a [`View`] after every change and
//! carries out the [`Step`] that [`decide`] returns. The stages:
//!
//! 1. `Starting`: N serves everything; N+1's workers start. While the budget cannot hold
//!    both generations at full size, slots move one at a time: N+1 grows into free room;
//!    once its workers are all ready, N gives up one worker (never its last) to make
//!    room for the next. Any exit of an N+1 worker, or `ready.timeout` passing, rolls back.
//! 2. `Probation`: every N+1 worker is ready; they must stay up for the probation period
//!    (a release that becomes ready and then crashes is caught here, while N still serves).
//! 3. The flip: new connections go to N+1 only (eBPF steering, or one shared listener).
//! 4. `Draining`: N keeps accepting until its listeners' accept queues are empty (or the
//!    stop timeout passes), then gets its stop signal; when its last worker is gone, N
//!    is retired and the deploy is done. A worker of N+1 that dies before N was told to
//!    stop steers new connections back to N, which still runs, and N+1 is stopped.
//!
//! Invariants (checked by the simulation below): the workers of both generations never
//! exceed the cap; N keeps at least one worker until the flip; nothing is flipped to a
//! generation that has no ready worker; a deploy always ends (done or rolled back).

use std::time::Instant;

/// Where a deploy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The new generation's workers are starting.
    Starting,
    /// Every new worker is ready; they must stay up until `until`.
    Probation {
        /// End of the probation period.
        until: Instant,
    },
    /// The new generation serves; the old one drains.
    Draining {
        /// After this, the old generation is stopped even if its queues still hold
        /// connections.
        until: Instant,
        /// Whether the old generation was told to stop.
        stopping: bool,
    },
}

impl Stage {
    /// The name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Starting => "starting",
            Stage::Probation { .. } => "probation",
            Stage::Draining { .. } => "draining",
        }
    }
}

/// What the plan needs to know about one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenView {
    /// Workers it is asked to run.
    pub desired: u32,
    /// Slots it has, including those on their way out (their processes still count).
    pub slots: u32,
    /// Ready workers.
    pub ready: u32,
    /// Processes alive.
    pub live: u32,
    /// Worker exits since the generation started (not counting stops it was asked for).
    pub crashes: u32,
}

/// Both generations and the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Where the deploy is.
    pub stage: Stage,
    /// Now.
    pub now: Instant,
    /// When the new generation must be ready by.
    pub ready_deadline: Instant,
    /// Workers the new generation should end up with.
    pub target: u32,
    /// Most workers of both generations together, if capped.
    pub cap: Option<u32>,
    /// The serving (old) generation.
    pub old: GenView,
    /// The new generation.
    pub new: GenView,
    /// Whether the old generation's listeners hold no queued connection.
    pub old_queues_empty: bool,
}

/// Why a deploy was rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A new worker exited.
    Crashed,
    /// Not every new worker was ready before `ready.timeout`.
    NotReady,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing until something changes.
    Wait,
    /// Ask the new generation for this many workers.
    ScaleNew(u32),
    /// Ask the old generation for this many workers (to make room).
    ScaleOld(u32),
    /// Every new worker is ready: begin the probation period.
    BeginProbation,
    /// Steer new connections to the new generation; the old one starts draining.
    Flip,
    /// The old generation's queues are empty (or its time is up): stop it.
    StopOld,
    /// The old generation is gone: the deploy is done.
    Done,
    /// Kill the new generation; the old one keeps serving.
    RollBack(Failure),
    /// After the flip, before the old generation was told to stop: a new worker died.
    /// Steer back to the old generation (it still runs, and serves again) and stop the new.
    SteerBack(Failure),
}

/// The next step of a deploy.
pub fn decide(v: &View) -> Step {
    match v.stage {
        Stage::Starting => {
            if v.new.crashes > 0 {
                return Step::RollBack(Failure::Crashed);
            }
            if v.now >= v.ready_deadline {
                return Step::RollBack(Failure::NotReady);
            }
            let used = v.old.slots + v.new.slots;
            let room = v.cap.map_or(u32::MAX, |c| c.saturating_sub(used));
            if v.new.desired < v.target {
                if room > 0 {
                    return Step::ScaleNew(v.new.desired + room.min(v.target - v.new.desired));
                }
                // Full: move a slot, but only once the new workers so far proved ready,
                // and never the old generation's last worker.
                let new_all_ready = v.new.ready == v.new.desired;
                if new_all_ready && v.old.desired > 1 && v.old.slots <= v.old.desired {
                    return Step::ScaleOld(v.old.desired - 1);
                }
                if !(new_all_ready && v.old.desired <= 1 && v.new.ready > 0) {
                    return Step::Wait;
                }
                // The old generation is down to one worker: go with what is ready.
            }
            if v.new.ready > 0 && v.new.ready == v.new.desired && v.new.slots == v.new.desired {
                Step::BeginProbation
            } else {
                Step::Wait
            }
        }
        Stage::Probation { until } => {
            if v.new.crashes > 0 {
                Step::RollBack(Failure::Crashed)
            } else if v.now >= until {
                Step::Flip
            } else {
                Step::Wait
            }
        }
        Stage::Draining { until, stopping } => {
            if !stopping {
                if v.new.crashes > 0 {
                    Step::SteerBack(Failure::Crashed)
                } else if v.old_queues_empty || v.now >= until {
                    Step::StopOld
                } else {
                    Step::Wait
                }
            } else if v.old.live == 0 {
                Step::Done
            } else {
                Step::Wait
            }
        }
    }
}

/// The earliest time [`decide`] may answer differently without any other change.
pub fn next_deadline(v: &View) -> Option<Instant> {
    match v.stage {
        Stage::Starting => Some(v.ready_deadline),
        Stage::Probation { until } => Some(until),
        Stage::Draining {
            until,
            stopping: false,
        } => Some(until),
        Stage::Draining { stopping: true, .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn view(t0: Instant) -> View {
        View {
            stage: Stage::Starting,
            now: t0,
            ready_deadline: t0 + Duration::from_secs(30),
            target: 4,
            cap: None,
            old: GenView {
                desired: 4,
                slots: 4,
                ready: 4,
                live: 4,
                crashes: 0,
            },
            new: GenView::default(),
            old_queues_empty: false,
        }
    }

    #[test]
    fn without_a_cap_the_new_generation_starts_at_full_size() {
        let v = view(Instant::now());
        assert_eq!(decide(&v), Step::ScaleNew(4));
    }

    #[test]
    fn a_crash_or_the_deadline_rolls_back_before_the_flip() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.new = GenView {
            desired: 4,
            slots: 4,
            ready: 3,
            live: 4,
            crashes: 1,
        };
        assert_eq!(decide(&v), Step::RollBack(Failure::Crashed));
        v.stage = Stage::Probation {
            until: t0 + Duration::from_secs(1),
        };
        assert_eq!(decide(&v), Step::RollBack(Failure::Crashed));
        v.new.crashes = 0;
        v.stage = Stage::Starting;
        v.now = v.ready_deadline;
        assert_eq!(decide(&v), Step::RollBack(Failure::NotReady));
    }

    #[test]
    fn probation_then_flip_then_drain_until_the_queues_are_empty() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.new = GenView {
            desired: 4,
            slots: 4,
            ready: 4,
            live: 4,
            crashes: 0,
        };
        assert_eq!(decide(&v), Step::BeginProbation);
        let until = t0 + Duration::from_secs(1);
        v.stage = Stage::Probation { until };
        assert_eq!(decide(&v), Step::Wait);
        v.now = until;
        assert_eq!(decide(&v), Step::Flip);
        v.stage = Stage::Draining {
            until: until + Duration::from_secs(10),
            stopping: false,
        };
        assert_eq!(
            decide(&v),
            Step::Wait,
            "queued connections are still served"
        );
        v.old_queues_empty = true;
        assert_eq!(decide(&v), Step::StopOld);
        v.stage = Stage::Draining {
            until: until + Duration::from_secs(10),
            stopping: true,
        };
        assert_eq!(decide(&v), Step::Wait);
        v.old.live = 0;
        assert_eq!(decide(&v), Step::Done);
    }

    #[test]
    fn a_full_budget_moves_slots_one_at_a_time() {
        let mut v = view(Instant::now());
        v.cap = Some(5);
        assert_eq!(decide(&v), Step::ScaleNew(1));
        v.new = GenView {
            desired: 1,
            slots: 1,
            ready: 0,
            live: 1,
            crashes: 0,
        };
        assert_eq!(decide(&v), Step::Wait, "the first new worker must be ready");
        v.new.ready = 1;
        assert_eq!(decide(&v), Step::ScaleOld(3));
    }

    #[test]
    fn a_crash_after_the_flip_steers_back_until_the_old_generation_stops() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.stage = Stage::Draining {
            until: t0 + Duration::from_secs(5),
            stopping: false,
        };
        v.new = GenView {
            desired: 2,
            slots: 2,
            ready: 1,
            live: 2,
            crashes: 1,
        };
        assert_eq!(decide(&v), Step::SteerBack(Failure::Crashed));
        v.stage = Stage::Draining {
            until: t0,
            stopping: true,
        };
        v.old.live = 1;
        assert_eq!(
            decide(&v),
            Step::Wait,
            "too late: the old generation is stopping"
        );
    }

    /// A toy world: scaling takes effect at once, new workers become ready one step
    /// later, removed old workers exit one step later.
    #[derive(Debug)]
    struct World {
        v: View,
        old_leaving: u32,
        flipped: bool,
    }

    fn op() -> impl Strategy<Value = u8> {
        // 0..=3 move time and workers; 4 (one in ten) kills a new worker.
        prop_oneof![9 => 0u8..4, 1 => Just(4u8)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn deploys_respect_the_cap_keep_a_server_and_end(
            target in 1u32..8,
            old in 1u32..8,
            cap_extra in 0u32..8,
            capped in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t0 = Instant::now();
            let cap = capped.then_some(old.max(target) + 1 + cap_extra);
            let mut w = World {
                v: View {
                    stage: Stage::Starting,
                    now: t0,
                    ready_deadline: t0 + Duration::from_secs(1000),
                    target,
                    cap,
                    old: GenView { desired: old, slots: old, ready: old, live: old, crashes: 0 },
                    new: GenView::default(),
                    old_queues_empty: false,
                },
                old_leaving: 0,
                flipped: false,
            };
            let mut done = false;
            for (i, o) in ops.iter().chain(std::iter::repeat_n(&0, 400)).enumerate() {
                // The world moves.
                match o {
                    1 if w.v.new.ready < w.v.new.live => w.v.new.ready += 1,
                    2 if w.old_leaving > 0 => {
                        w.old_leaving -= 1;
                        w.v.old.slots -= 1;
                        w.v.old.live -= 1;
                    }
                    3 => w.v.now += Duration::from_millis(300),
                    4 if w.v.new.live > 0 => w.v.new.crashes += 1,
                    _ => {
                        if w.v.new.ready < w.v.new.live { w.v.new.ready += 1; }
                        if w.old_leaving > 0 {
                            w.old_leaving -= 1;
                            w.v.old.slots -= 1;
                            w.v.old.live -= 1;
                        }
                        w.v.old_queues_empty = i % 3 == 0;
                        w.v.now += Duration::from_millis(100);
                    }
                }
                // The plan acts.
                match decide(&w.v) {
                    Step::Wait => {}
                    Step::ScaleNew(n) => {
                        prop_assert!(n > w.v.new.desired && n <= target);
                        w.v.new.desired = n;
                        w.v.new.slots = n;
                        w.v.new.live = n;
                    }
                    Step::ScaleOld(n) => {
                        prop_assert!(!w.flipped && n >= 1 && n < w.v.old.desired);
                        w.old_leaving += w.v.old.desired - n;
                        w.v.old.desired = n;
                        w.v.old.ready = w.v.old.ready.min(n);
                    }
                    Step::BeginProbation => {
                        prop_assert!(w.v.new.ready > 0);
                        w.v.stage = Stage::Probation { until: w.v.now + Duration::from_secs(1) };
                    }
                    Step::Flip => {
                        prop_assert!(w.v.new.ready > 0);
                        w.flipped = true;
                        w.v.stage = Stage::Draining { until: w.v.now + Duration::from_secs(5), stopping: false };
                    }
                    Step::StopOld => {
                        w.old_leaving = w.v.old.live;
                        w.v.old.desired = 0;
                        w.v.stage = Stage::Draining { until: w.v.now, stopping: true };
                    }
                    Step::Done => { done = true; break; }
                    Step::RollBack(f) => {
                        prop_assert!(!w.flipped, "{f:?} after the flip");
                        done = true;
                        break;
                    }
                    Step::SteerBack(f) => {
                        // Only to an old generation that still runs and was not stopped.
                        prop_assert!(w.flipped, "{f:?} before the flip");
                        prop_assert!(
                            matches!(w.v.stage, Stage::Draining { stopping: false, .. }),
                            "steered back to a stopping generation"
                        );
                        prop_assert!(w.v.old.desired >= 1 && w.v.old.live >= 1);
                        done = true;
                        break;
                    }
                }
                if let Some(c) = cap {
                    prop_assert!(w.v.old.slots + w.v.new.slots <= c,
                        "cap {c} exceeded: {:?}", w.v);
                }
                if !w.flipped {
                    prop_assert!(w.v.old.desired >= 1, "no server before the flip");
                }
            }
            prop_assert!(done, "the deploy did not end: {:?}", w.v);
        }
    }
}

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
//!    A canary deploy stops short of it: N+1 starts with its share of the workers and
//!    takes that share of new connections beside N (`Canary`) until it is promoted (it
//!    grows to full size, passes probation again and is flipped to) or rolled back; a
//!    canary whose workers crash `deploy.canary_abort.crashes` times is rolled back.
//! 4. `Draining`: N keeps accepting until its listeners' accept queues are empty (or the
//!    stop timeout passes), then gets its stop signal; when its last worker is gone, N
//!    is retired and the deploy is done. A worker of N+1 that dies before N was told to
//!    stop steers new connections back to N, which still runs, and N+1 is stopped.
//!
//! Invariants (checked by the simulation below): the workers of both generations never
//! exceed the cap; N keeps at least one worker until the flip; nothing is flipped to a
//! generation that has no ready worker; a deploy always ends (done or rolled back).
//!
//! **Stop-then-start** ([`View::exclusive`], [`decide_exclusive`]): a site whose app binds
//! a port itself (`[[listen]] mode = "own"`) cannot have two generations bound at once,
//! so its deploys go in order instead: N is told to stop (`StopOld` while `Starting`);
//! once its last process is gone (the port is free), N+1 is asked for its workers
//! (`ScaleNew`; its `ready.timeout` counts from then); every N+1 worker ready, probation;
//! then N+1 serves (`Flip`) and the deploy is done. A crash of N+1 or the timeout stops
//! N+1 (`StopNew`), and once its last process is gone N is started again (`RollBack`).
//! There is downtime between N's stop and N+1's readiness: the price of an app that binds
//! its own port. Invariant: never a process of both generations at once.

use std::time::Instant;

/// A canary's share of new connections, in hundredths of a percent: more than 0, less
/// than 100 % (100 % is a promotion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Share(u16);

impl Share {
    /// The share in hundredths of a percent, if it is one a canary can have.
    pub fn from_basis_points(bp: u16) -> Option<Share> {
        (1..10_000).contains(&bp).then_some(Share(bp))
    }

    /// Hundredths of a percent.
    pub fn basis_points(self) -> u16 {
        self.0
    }

    /// The steering program's threshold: the share of the 65,536 low-16-bit hash values.
    pub fn threshold(self) -> u16 {
        u16::try_from(u32::from(self.0) * 65_536 / 10_000).unwrap_or(u16::MAX)
    }

    /// The workers a canary of a generation of `full` workers starts with: its share,
    /// rounded up, at least one.
    pub fn workers_of(self, full: u32) -> u32 {
        let n = (u64::from(full) * u64::from(self.0)).div_ceil(10_000);
        u32::try_from(n).unwrap_or(full).clamp(1, full.max(1))
    }
}

impl std::str::FromStr for Share {
    type Err = String;

    /// `10%`, `10`, `2.5%`: a percentage above 0 and below 100, at most two decimals.
    fn from_str(s: &str) -> Result<Share, String> {
        let bad = || {
            format!(
                "a canary share is a percentage above 0 and below 100, like \"10%\" (got \"{s}\")"
            )
        };
        let t = s.trim();
        let t = t.strip_suffix('%').unwrap_or(t).trim();
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if int.is_empty()
            || frac.len() > 2
            || !(int.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let int: u32 = int.parse().map_err(|_| bad())?;
        let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
        let bp = int
            .checked_mul(100)
            .and_then(|x| x.checked_add(frac))
            .ok_or_else(bad)?;
        u16::try_from(bp)
            .ok()
            .and_then(Share::from_basis_points)
            .ok_or_else(bad)
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (int, frac) = (self.0 / 100, self.0 % 100);
        match frac {
            0 => write!(f, "{int}%"),
            x if x % 10 == 0 => write!(f, "{int}.{}%", x / 10),
            x => write!(f, "{int}.{x:02}%"),
        }
    }
}

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
    /// A canary: both generations serve, the new one its share of new connections,
    /// until it is promoted or rolled back.
    Canary,
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
            Stage::Canary => "canary",
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
    /// A canary not promoted yet: after probation it serves its share beside the old
    /// generation instead of being flipped to; it is rolled back after this many crashes
    /// (0: never).
    pub canary: Option<u32>,
    /// The new generation's warm-up is under way: nothing is steered to it before it ends.
    pub warming: bool,
    /// A stop-then-start deploy (the app binds a port of its own): where it is.
    pub exclusive: Option<Exclusive>,
}

/// Where a stop-then-start deploy is, beyond its [`Stage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exclusive {
    /// The old generation was told to stop.
    pub old_stopped: bool,
    /// The new generation failed and is being stopped; the old one starts again once it
    /// is gone.
    pub failed: Option<Failure>,
}

/// Why a deploy was rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A new worker exited.
    Crashed,
    /// Not every new worker was ready before `ready.timeout`.
    NotReady,
    /// An operator asked for the rollback (stop-then-start: the old generation starts
    /// again once the new one is gone).
    Asked,
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
    /// Steer the canary's share of new connections to the new generation; both serve.
    BeginCanary,
    /// The old generation's queues are empty (or its time is up): stop it.
    StopOld,
    /// The old generation is gone: the deploy is done.
    Done,
    /// Kill the new generation; the old one keeps serving.
    RollBack(Failure),
    /// After the flip, before the old generation was told to stop: a new worker died.
    /// Steer back to the old generation (it still runs, and serves again) and stop the new.
    SteerBack(Failure),
    /// Stop-then-start: the new generation failed; stop it (the old one starts again once
    /// it is gone, with [`Step::RollBack`]).
    StopNew(Failure),
}

/// The next step of a deploy.
pub fn decide(v: &View) -> Step {
    if let Some(x) = v.exclusive {
        return decide_exclusive(v, x);
    }
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
            } else if v.now < until || v.warming {
                Step::Wait
            } else if v.canary.is_some() {
                Step::BeginCanary
            } else {
                Step::Flip
            }
        }
        Stage::Canary => match v.canary {
            Some(limit) if limit > 0 && v.new.crashes >= limit => Step::RollBack(Failure::Crashed),
            _ => Step::Wait,
        },
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

/// The next step of a stop-then-start deploy: the old generation has no process left
/// (`live` 0: a stopped generation keeps its slots, not their processes) before the new
/// one is asked for a worker, and the new one has none before the old one starts again.
/// `ready_deadline` counts from the new generation's start: the caller sets it when it asks
/// for the new workers.
pub fn decide_exclusive(v: &View, x: Exclusive) -> Step {
    let new_gone = v.new.live == 0;
    if let Some(f) = x.failed {
        return if new_gone {
            Step::RollBack(f)
        } else {
            Step::Wait
        };
    }
    match v.stage {
        Stage::Starting => {
            if !x.old_stopped {
                return Step::StopOld;
            }
            if v.old.live > 0 {
                return Step::Wait;
            }
            if v.new.crashes > 0 {
                return Step::StopNew(Failure::Crashed);
            }
            if v.new.desired == 0 {
                let room = v.cap.map_or(v.target, |c| c.saturating_sub(v.new.slots));
                return if room > 0 {
                    Step::ScaleNew(v.target.min(room))
                } else {
                    Step::Wait
                };
            }
            if v.now >= v.ready_deadline {
                return Step::StopNew(Failure::NotReady);
            }
            if v.new.ready > 0 && v.new.ready == v.new.desired && v.new.slots == v.new.desired {
                Step::BeginProbation
            } else {
                Step::Wait
            }
        }
        Stage::Probation { until } => {
            if v.new.crashes > 0 {
                Step::StopNew(Failure::Crashed)
            } else if v.now >= until && !v.warming {
                Step::Flip
            } else {
                Step::Wait
            }
        }
        // Refused for these sites (no steering to share connections with).
        Stage::Canary => Step::Wait,
        // The old generation stopped before the new one started: once the new one
        // serves, nothing is left to drain.
        Stage::Draining { .. } => {
            if v.old.live == 0 {
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
        Stage::Canary | Stage::Draining { stopping: true, .. } => None,
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
            canary: None,
            warming: false,
            exclusive: None,
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
        v.warming = true;
        assert_eq!(decide(&v), Step::Wait, "not before the warm-up ends");
        v.new.crashes = 1;
        assert_eq!(
            decide(&v),
            Step::RollBack(Failure::Crashed),
            "a crash while warming"
        );
        v.new.crashes = 0;
        v.warming = false;
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

    #[test]
    fn canary_shares_parse_show_and_size() {
        let ten: Share = "10%".parse().expect("10%");
        assert_eq!(ten.basis_points(), 1000);
        assert_eq!(ten.to_string(), "10%");
        assert_eq!("10".parse::<Share>(), Ok(ten));
        assert_eq!(ten.threshold(), 6553);
        let small: Share = "2.5%".parse().expect("2.5%");
        assert_eq!(
            (small.basis_points(), small.to_string()),
            (250, "2.5%".to_string())
        );
        assert_eq!(
            "0.05%".parse::<Share>().map(|s| s.to_string()),
            Ok("0.05%".into())
        );
        for bad in [
            "0", "0%", "100%", "150", "-5%", "ten", "", "1.234%", "%", ".5",
        ] {
            let e = bad.parse::<Share>().expect_err(bad);
            assert!(e.contains("above 0 and below 100"), "{bad}: {e}");
        }
        assert_eq!(ten.workers_of(4), 1, "at least one");
        assert_eq!(ten.workers_of(20), 2);
        assert_eq!(ten.workers_of(25), 3, "rounded up");
        assert_eq!("99%".parse::<Share>().map(|s| s.workers_of(4)), Ok(4));
    }

    #[test]
    fn a_canary_serves_beside_the_old_generation_until_its_crashes_abort_it() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.target = 1;
        v.canary = Some(2);
        v.new = GenView {
            desired: 1,
            slots: 1,
            ready: 1,
            live: 1,
            crashes: 0,
        };
        let until = t0 + Duration::from_secs(1);
        v.stage = Stage::Probation { until };
        v.now = until;
        assert_eq!(decide(&v), Step::BeginCanary, "no flip for a canary");
        v.stage = Stage::Canary;
        v.now = t0 + Duration::from_secs(3600);
        assert_eq!(
            decide(&v),
            Step::Wait,
            "a canary waits for promote or rollback"
        );
        assert_eq!(next_deadline(&v), None);
        v.new.crashes = 1;
        assert_eq!(decide(&v), Step::Wait, "one crash of two allowed");
        v.new.crashes = 2;
        assert_eq!(decide(&v), Step::RollBack(Failure::Crashed));
        v.canary = Some(0);
        assert_eq!(decide(&v), Step::Wait, "0: crashes never abort it");
    }

    #[test]
    fn stop_then_start_stops_the_old_generation_before_the_new_one_starts() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.exclusive = Some(Exclusive::default());
        assert_eq!(decide(&v), Step::StopOld, "the old generation stops first");
        v.exclusive = Some(Exclusive {
            old_stopped: true,
            failed: None,
        });
        v.old.live = 1;
        v.old.slots = 1;
        assert_eq!(decide(&v), Step::Wait, "a process of the old one is left");
        v.old.live = 0;
        v.old.ready = 0;
        // Past the deadline set at the deploy's start: it counts from the new start.
        v.now = v.ready_deadline;
        assert_eq!(
            decide(&v),
            Step::ScaleNew(4),
            "all at once: nothing else runs"
        );
        v.ready_deadline = v.now + Duration::from_secs(30);
        v.new = GenView {
            desired: 4,
            slots: 4,
            ready: 3,
            live: 4,
            crashes: 0,
        };
        assert_eq!(decide(&v), Step::Wait);
        v.new.ready = 4;
        assert_eq!(decide(&v), Step::BeginProbation);
        let until = v.now + Duration::from_secs(1);
        v.stage = Stage::Probation { until };
        assert_eq!(decide(&v), Step::Wait);
        v.now = until;
        assert_eq!(decide(&v), Step::Flip);
        v.stage = Stage::Draining {
            until,
            stopping: false,
        };
        assert_eq!(decide(&v), Step::Done, "nothing to drain");
    }

    #[test]
    fn stop_then_start_restarts_the_old_generation_once_the_new_one_is_gone() {
        let t0 = Instant::now();
        let mut v = view(t0);
        v.old = GenView {
            desired: 4,
            ..GenView::default()
        };
        v.exclusive = Some(Exclusive {
            old_stopped: true,
            failed: None,
        });
        v.new = GenView {
            desired: 4,
            slots: 4,
            ready: 1,
            live: 4,
            crashes: 1,
        };
        assert_eq!(decide(&v), Step::StopNew(Failure::Crashed));
        v.new.crashes = 0;
        v.now = v.ready_deadline;
        assert_eq!(decide(&v), Step::StopNew(Failure::NotReady));
        v.exclusive = Some(Exclusive {
            old_stopped: true,
            failed: Some(Failure::NotReady),
        });
        assert_eq!(decide(&v), Step::Wait, "the new generation still runs");
        v.new.live = 0;
        assert_eq!(decide(&v), Step::RollBack(Failure::NotReady));
        // In probation too.
        v.exclusive = Some(Exclusive {
            old_stopped: true,
            failed: None,
        });
        v.new = GenView {
            desired: 4,
            slots: 4,
            ready: 4,
            live: 4,
            crashes: 1,
        };
        v.stage = Stage::Probation { until: v.now };
        assert_eq!(decide(&v), Step::StopNew(Failure::Crashed));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Stop-then-start: a toy world where stopped workers exit one step at a time,
        /// new workers become ready or crash at random, and time jumps.
        #[test]
        fn never_two_generations_live_at_once_when_exclusive(
            target in 1u32..6,
            old in 1u32..6,
            capped in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![8 => 0u8..4, 1 => Just(4u8)], 1..150),
        ) {
            let t0 = Instant::now();
            let mut v = View {
                stage: Stage::Starting,
                now: t0,
                ready_deadline: t0 + Duration::from_secs(1000),
                target,
                cap: capped.then_some(old.max(target)),
                old: GenView { desired: old, slots: old, ready: old, live: old, crashes: 0 },
                new: GenView::default(),
                old_queues_empty: false,
                canary: None,
                warming: false,
                exclusive: Some(Exclusive::default()),
            };
            let (mut old_stopping, mut new_stopping) = (false, false);
            let mut ended = None;
            for o in ops.iter().chain(std::iter::repeat_n(&0, 300)) {
                // The world moves: a stopped generation loses a process per step.
                if old_stopping && v.old.live > 0 {
                    v.old.live -= 1;
                    v.old.ready = v.old.ready.min(v.old.live);
                }
                if new_stopping && v.new.live > 0 {
                    v.new.live -= 1;
                    v.new.ready = v.new.ready.min(v.new.live);
                }
                match o {
                    3 => v.now += Duration::from_secs(400),
                    4 if v.new.live > 0 && !new_stopping => v.new.crashes += 1,
                    // 1 and 2: a step without time; 0: 100 ms.
                    _ => {
                        if !new_stopping && v.new.ready < v.new.live {
                            v.new.ready += 1;
                        }
                        if *o == 0 {
                            v.now += Duration::from_millis(100);
                        }
                    }
                }
                prop_assert!(v.old.live == 0 || v.new.live == 0, "two generations live: {v:?}");
                let x = v.exclusive.expect("exclusive");
                match decide(&v) {
                    Step::Wait => {}
                    Step::StopOld => {
                        prop_assert!(!x.old_stopped && v.stage == Stage::Starting);
                        old_stopping = true;
                        v.exclusive = Some(Exclusive { old_stopped: true, ..x });
                    }
                    Step::ScaleNew(n) => {
                        prop_assert!(v.old.live == 0, "started beside the old: {v:?}");
                        prop_assert!(n >= 1 && n <= target && v.cap.is_none_or(|c| n <= c));
                        v.new = GenView { desired: n, slots: n, ready: 0, live: n, crashes: 0 };
                        v.ready_deadline = v.now + Duration::from_secs(1000);
                    }
                    Step::BeginProbation => {
                        prop_assert!(v.new.ready == v.new.desired);
                        v.stage = Stage::Probation { until: v.now + Duration::from_secs(1) };
                    }
                    Step::Flip => {
                        prop_assert!(v.new.ready > 0 && v.old.live == 0);
                        v.stage = Stage::Draining { until: v.now, stopping: false };
                    }
                    Step::Done => { ended = Some(true); break; }
                    Step::StopNew(f) => {
                        prop_assert!(x.failed.is_none() && !new_stopping);
                        new_stopping = true;
                        v.exclusive = Some(Exclusive { failed: Some(f), ..x });
                    }
                    Step::RollBack(_) => {
                        prop_assert!(v.new.live == 0, "old restarted beside the new: {v:?}");
                        ended = Some(false);
                        break;
                    }
                    s @ (Step::ScaleOld(_) | Step::SteerBack(_) | Step::BeginCanary) => {
                        prop_assert!(false, "{s:?} in a stop-then-start deploy");
                    }
                }
            }
            prop_assert!(ended.is_some(), "the deploy did not end: {v:?}");
        }
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
                    canary: None,
                    warming: false,
                    exclusive: None,
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
                    Step::BeginCanary => prop_assert!(false, "a canary without asking for one"),
                    Step::Done => { done = true; break; }
                    Step::RollBack(f) => {
                        prop_assert!(!w.flipped, "{f:?} after the flip");
                        done = true;
                        break;
                    }
                    Step::StopNew(f) => {
                        prop_assert!(false, "{f:?}: StopNew outside a stop-then-start deploy");
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

use std::time::{Duration, Instant};

use super::*;
use crate::config::{ScaleBy, ScalePolicy};

fn policy() -> ScalePolicy {
    ScalePolicy {
        by: ScaleBy::Load,
        ..ScalePolicy::DEFAULT
    }
}

const BOUNDS: Bounds = Bounds {
    min: 1,
    ceiling: 24,
};

/// A site seen by samples every 250 ms: the loop's side of [`LoadState::sample`].
struct Site {
    state: LoadState,
    policy: ScalePolicy,
    bounds: Bounds,
    now: Instant,
    desired: u32,
    ready: u32,
    busy: Option<Duration>,
    cpu_usec: Option<u64>,
    stall_usec: Option<u64>,
    memory_events: Option<u64>,
    queued: Option<u32>,
}

impl Site {
    fn new(desired: u32) -> Site {
        Site {
            state: LoadState::default(),
            policy: policy(),
            bounds: BOUNDS,
            now: Instant::now(),
            desired,
            ready: desired,
            busy: None,
            cpu_usec: None,
            stall_usec: None,
            memory_events: None,
            queued: Some(0),
        }
    }

    /// One period: `busy` workers busy throughout it (a `BUSY` app), then a sample; the
    /// decision is applied (new workers ready at once).
    fn period(&mut self, busy: Option<f64>, queued: u32) -> Option<Decision> {
        let dt = self.policy.interval;
        self.now += dt;
        if let Some(b) = busy {
            self.busy = Some(self.busy.unwrap_or_default() + dt.mul_f64(b));
        }
        self.queued = Some(queued);
        let d = self.sample();
        if let Some(d) = d {
            assert_eq!(d.from, self.desired);
            self.desired = d.to;
            self.ready = d.to;
        }
        d
    }

    fn sample(&mut self) -> Option<Decision> {
        self.state.sample(
            &self.policy,
            self.now,
            Counters {
                queued: self.queued,
                cpu_usec: self.cpu_usec,
                cpu_stall_usec: self.stall_usec,
                memory_events: self.memory_events,
            },
            Workers {
                desired: self.desired,
                ready: self.ready,
                busy: self.busy,
            },
            self.bounds,
        )
    }
}

#[test]
fn a_queue_far_behind_adds_a_worker_per_waiting_connection_at_once() {
    let mut s = Site::new(2);
    assert_eq!(
        s.period(None, 0),
        None,
        "the first sample starts the period"
    );
    let d = s.period(None, 5).expect("grows");
    assert_eq!((d.from, d.to), (2, 7), "2 ready + 5 waiting");
    assert_eq!(
        d.reason,
        Reason::Queue {
            waiting: 5,
            ready: 2
        }
    );
    assert!(d.reason.describe(70).contains("5 connections waiting"));
}

#[test]
fn a_connection_caught_once_is_not_a_queue_but_a_standing_one_is() {
    let mut s = Site::new(4);
    s.period(None, 0);
    assert_eq!(
        s.period(None, 1),
        None,
        "one connection on its way to a worker"
    );
    assert_eq!(s.period(None, 0), None);
    assert_eq!(s.period(None, 2), None);
    let d = s.period(None, 1).expect("waiting in two samples in a row");
    assert_eq!((d.from, d.to), (4, 5), "min(2, 1) waited throughout");
}

#[test]
fn starting_workers_are_not_asked_for_twice() {
    let mut s = Site::new(2);
    s.period(None, 0);
    let d = s.period(None, 6).expect("grows");
    assert_eq!(d.to, 8);
    // The six new ones are starting: the queue is still there, as long.
    s.ready = 2;
    assert_eq!(
        s.period(None, 6),
        None,
        "2 ready + 6 waiting = the 8 there are"
    );
    let d = s.period(None, 9).expect("the queue grew meanwhile");
    assert_eq!(d.to, 11);
}

#[test]
fn busy_workers_over_the_target_size_the_site() {
    let mut s = Site::new(4);
    s.period(Some(0.0), 0);
    assert_eq!(s.period(Some(2.0), 0), None, "2 busy of 4: 50% under 70%");
    let d = s.period(Some(3.5), 0).expect("grows");
    assert_eq!(d.to, 5, "3.5 busy / 0.7 = 5");
    assert!(matches!(d.reason, Reason::Busy { busy } if (busy - 3.5).abs() < 1e-6));
    let d = s.period(Some(5.0), 0).expect("all busy: grows again");
    assert_eq!(d.to, 8, "5 / 0.7 = 7.1");
}

#[test]
fn cpu_time_stands_in_for_busy_reports() {
    let mut s = Site::new(2);
    s.cpu_usec = Some(0);
    s.period(None, 0);
    s.cpu_usec = Some(500_000); // 2 CPUs over 250 ms
    let d = s.period(None, 0).expect("grows");
    assert_eq!(d.to, 3, "2 CPUs / 0.7");
    assert!(matches!(d.reason, Reason::Cpu { .. }));
    // With busy reports, the CPU does not count.
    let mut s = Site::new(2);
    s.cpu_usec = Some(0);
    s.period(Some(0.0), 0);
    s.cpu_usec = Some(500_000);
    assert_eq!(s.period(Some(1.0), 0), None, "1 busy of 2: 50%");
}

#[test]
fn the_cpu_of_a_period_in_which_a_worker_starts_is_no_load() {
    // The first worker of a site importing its app: a CPU's worth, before it is ready.
    let mut s = Site::new(1);
    s.ready = 0;
    s.cpu_usec = Some(0);
    s.period(None, 0);
    s.cpu_usec = Some(225_000); // 0.9 CPUs over 250 ms
    assert_eq!(s.period(None, 0), None, "not ready at either end");
    s.ready = 1;
    s.cpu_usec = Some(450_000);
    assert_eq!(s.period(None, 0), None, "ready only at the end");
    s.cpu_usec = Some(675_000);
    let d = s
        .period(None, 0)
        .expect("ready throughout: its CPU is load");
    assert_eq!(d.to, 2, "0.9 CPUs / 0.7");
    assert!(matches!(d.reason, Reason::Cpu { .. }));
    // Nor does an idle CPU shrink a site while one of its workers starts.
    let mut s = Site::new(4);
    s.ready = 3;
    s.cpu_usec = Some(0);
    for _ in 0..100 {
        assert_eq!(s.period(None, 0), None, "25 s of a worker starting");
    }
    s.ready = 4;
    let shrinks = (0..200).filter_map(|_| s.period(None, 0)).count();
    assert!(shrinks > 0, "idle once every worker is ready");
}

#[test]
fn shrink_waits_a_whole_cooldown_then_follows_the_most_wanted_in_it() {
    let mut s = Site::new(10);
    s.period(Some(0.0), 0);
    let mut shrinks = Vec::new();
    for i in 1..=300 {
        // Two busy for the first 15 s, none after.
        let busy = if i <= 60 { 2.0 } else { 0.0 };
        if let Some(d) = s.period(Some(busy), 0) {
            shrinks.push((i, d.to, d.reason));
        }
    }
    assert_eq!(shrinks.len(), 2, "{shrinks:?}");
    let (i, to, reason) = shrinks[0];
    assert_eq!(i, 120, "30 s after the period began");
    assert_eq!(to, 3, "2 busy / 0.7: the most the window wanted");
    assert!(matches!(reason, Reason::Idle { needed: 3, .. }));
    let (i, to, _) = shrinks[1];
    assert_eq!(i, 180, "once the last busy sample left the window");
    assert_eq!(to, 1, "workers_min");
}

#[test]
fn an_idle_site_is_back_at_min_within_a_minute() {
    let mut s = Site::new(24);
    s.period(Some(0.0), 0);
    let mut t = Duration::ZERO;
    while s.desired > 1 {
        s.period(Some(0.0), 0);
        t += s.policy.interval;
        assert!(
            t <= Duration::from_secs(60),
            "still {} after {t:?}",
            s.desired
        );
    }
}

#[test]
fn load_coming_and_going_faster_than_the_cooldown_keeps_the_peak() {
    let mut s = Site::new(1);
    s.period(Some(0.0), 0);
    let mut sizes = Vec::new();
    // 5 s bursts of 7 busy every 20 s, for 5 minutes.
    for i in 0..1200u32 {
        let busy = if (i / 20) % 4 == 0 {
            7.0f64.min(f64::from(s.desired))
        } else {
            0.0
        };
        if let Some(d) = s.period(Some(busy), 0) {
            sizes.push((i, d.to));
        }
    }
    let last = sizes.last().map(|x| x.1);
    assert_eq!(last, Some(10), "7 / 0.7: {sizes:?}");
    assert!(
        sizes.iter().all(|(_, n)| *n >= sizes[0].1),
        "grows only, never back down between bursts: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|(i, _)| *i < 20),
        "steps up in the first burst, then no change: {sizes:?}"
    );
}

#[test]
fn memory_limits_hit_take_a_worker_away_and_hold_growth() {
    let mut s = Site::new(5);
    s.memory_events = Some(10);
    s.period(Some(0.0), 0);
    s.memory_events = Some(13);
    let d = s.period(Some(5.0), 9).expect("shrinks");
    assert_eq!((d.from, d.to), (5, 4));
    assert_eq!(d.reason, Reason::Memory { events: 3 });
    assert_eq!(s.state.held, Some(Held::Memory));
    // Never below workers_min.
    let mut s = Site::new(1);
    s.memory_events = Some(0);
    s.period(None, 0);
    s.memory_events = Some(1);
    assert_eq!(s.period(None, 0), None);
    // Quiet again: the queue grows it.
    assert_eq!(s.period(None, 4).map(|d| d.to), Some(5));
}

#[test]
fn a_site_waiting_for_the_cpu_does_not_grow() {
    let mut s = Site::new(2);
    s.stall_usec = Some(0);
    s.period(None, 0);
    s.stall_usec = Some(200_000); // 80% of 250 ms
    assert_eq!(s.period(None, 9), None);
    assert_eq!(s.state.held, Some(Held::CpuBound));
    s.stall_usec = Some(210_000); // 4%
    assert_eq!(s.period(None, 9).map(|d| d.to), Some(11));
}

#[test]
fn grow_cooldown_spaces_growths() {
    let mut s = Site::new(2);
    s.policy.grow_cooldown = Duration::from_secs(1);
    s.period(None, 0);
    assert_eq!(s.period(None, 4).map(|d| d.to), Some(6));
    assert_eq!(s.period(None, 12), None);
    assert_eq!(s.state.held, Some(Held::Cooldown));
    s.period(None, 12);
    s.period(None, 12);
    assert_eq!(s.period(None, 12).map(|d| d.to), Some(18), "1 s after");
}

#[test]
fn the_bounds_hold_whatever_the_signals() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for run in 0..200 {
        let min = (next() % 4) as u32;
        let ceiling = min + (next() % 30) as u32;
        let mut s = Site::new(min.max(1).min(ceiling));
        s.bounds = Bounds { min, ceiling };
        s.cpu_usec = Some(0);
        s.stall_usec = Some(0);
        s.memory_events = Some(0);
        for _ in 0..400 {
            s.cpu_usec = s.cpu_usec.map(|c| c + next() % 1_000_000);
            s.stall_usec = s.stall_usec.map(|c| c + next() % 100_000);
            if next() % 50 == 0 {
                s.memory_events = s.memory_events.map(|m| m + 1);
            }
            let busy = (next() % 3 == 0).then(|| (next() % 40) as f64 / 2.0);
            let d = s.period(busy, (next() % 60) as u32);
            if let Some(d) = d {
                assert!(d.to <= ceiling, "run {run}: {d:?} over {ceiling}");
                assert!(
                    d.to >= min || d.to >= d.from,
                    "run {run}: {d:?} under {min}"
                );
                assert_ne!(d.to, d.from, "run {run}: a decision changes the count");
            }
        }
    }
}

#[test]
fn a_quick_sample_looks_at_the_queue_only() {
    let mut s = Site::new(1);
    s.period(Some(0.0), 0);
    // 50 ms later (the pool was full), its one worker busy all that time: too short to
    // say anything of the busy average.
    s.now += Duration::from_millis(50);
    s.busy = s.busy.map(|b| b + Duration::from_millis(50));
    assert_eq!(s.sample(), None);
    // A queue as long as the ready workers grows the site at once.
    s.now += Duration::from_millis(50);
    s.busy = s.busy.map(|b| b + Duration::from_millis(50));
    s.queued = Some(3);
    let d = s.sample().expect("grows");
    assert_eq!((d.from, d.to), (1, 4));
    // Idle again: a quick sample never shrinks.
    s.desired = 4;
    s.ready = 4;
    s.queued = Some(0);
    s.now += Duration::from_millis(50);
    assert_eq!(s.sample(), None);
    // The next full sample averages over the whole interval.
    s.now += Duration::from_millis(100);
    assert_eq!(s.sample(), None);
    let busy = s.state.signals.and_then(|x| x.busy).expect("busy");
    assert!((busy - 0.4).abs() < 1e-6, "100 ms busy of 250: {busy}");
}

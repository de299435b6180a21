//! Restart policy: when a crashed worker slot may run again, and when it is flapping.
//!
//! Pure functions over the slot's history; time is an input.
//!
//! - A worker that ran at least `healthy_after` has a clean record (streak 0).
//! - The first crash after a clean record restarts at once; every further crash in the
//!   streak waits `backoff_initial × 2^(streak-1)`, capped at `backoff_max`.
//! - Whatever the streak, two starts of one slot are at least `backoff_initial` apart
//!   (the floor), so a worker that dies instantly cannot spin.
//! - `flapping_exits` exits of one slot within `flapping_within` mark it failed: it is
//!   not restarted until the site is started again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::RestartPolicy;

/// The decision after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start again at this instant (possibly now).
    RestartAt(Instant),
    /// Flapping: do not restart.
    Flapping,
}

/// A slot's crash history.
#[derive(Debug, Clone, Default)]
pub struct CrashHistory {
    /// Crashes in a row without a healthy run.
    pub streak: u32,
    /// Recent exit instants, within the flapping window.
    pub exits: VecDeque<Instant>,
}

impl CrashHistory {
    /// Records a crash at `now` of a worker started at `started`, and decides.
    pub fn record(&mut self, policy: &RestartPolicy, started: Instant, now: Instant) -> AfterCrash {
        let ran = now.saturating_duration_since(started);
        if ran >= policy.healthy_after {
            self.streak = 0;
        }
        self.exits.push_back(now);
        while let Some(&first) = self.exits.front() {
            if now.saturating_duration_since(first) > policy.flapping_within {
                self.exits.pop_front();
            } else {
                break;
            }
        }
        if self.exits.len() >= policy.flapping_exits as usize {
            return AfterCrash::Flapping;
        }
        let delay = backoff(policy, self.streak);
        self.streak = self.streak.saturating_add(1);
        let floor = started + policy.backoff_initial;
        AfterCrash::RestartAt((now + delay).max(floor))
    }

    /// Forgets everything (the operator started the site again).
    pub fn reset(&mut self) {
        self.streak = 0;
        self.exits.clear();
    }
}

/// The delay for a crash with `streak` earlier crashes in a row.
pub fn backoff(policy: &RestartPolicy, streak: u32) -> Duration {
    if streak == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(streak - 1).unwrap_or(u32::MAX);
    policy
        .backoff_initial
        .checked_mul(factor)
        .unwrap_or(policy.backoff_max)
        .min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            flapping_exits: 5,
            flapping_within: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_doubles_from_the_floor_and_caps() {
        let p = policy();
        assert_eq!(backoff(&p, 0), Duration::ZERO);
        assert_eq!(backoff(&p, 1), Duration::from_millis(100));
        assert_eq!(backoff(&p, 2), Duration::from_millis(200));
        assert_eq!(backoff(&p, 5), Duration::from_millis(1600));
        assert_eq!(backoff(&p, 20), Duration::from_secs(30));
        assert_eq!(backoff(&p, u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_long_running_worker_restarts_at_once() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = CrashHistory {
            streak: 7,
            ..Default::default()
        };
        let now = t0 + Duration::from_secs(61);
        assert_eq!(h.record(&p, t0, now), AfterCrash::RestartAt(now));
        assert_eq!(h.streak, 1);
    }

    #[test]
    fn an_instant_crash_waits_for_the_floor_then_backs_off() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = CrashHistory::default();
        // Dies 1 ms after start: streak 0 gives no delay, but the floor holds it back.
        let now = t0 + Duration::from_millis(1);
        assert_eq!(
            h.record(&p, t0, now),
            AfterCrash::RestartAt(t0 + Duration::from_millis(100))
        );
        let t1 = t0 + Duration::from_millis(100);
        let now = t1 + Duration::from_millis(1);
        assert_eq!(
            h.record(&p, t1, now),
            AfterCrash::RestartAt(now + Duration::from_millis(100))
        );
    }

    #[test]
    fn flapping_is_exits_within_the_window() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = CrashHistory::default();
        for i in 0..4u32 {
            let now = t0 + Duration::from_secs(u64::from(i) * 3);
            assert!(
                matches!(h.record(&p, now, now), AfterCrash::RestartAt(_)),
                "exit {i}"
            );
        }
        // The fifth exit comes 12 s after the first: the first left the 10 s window.
        let now = t0 + Duration::from_secs(12);
        assert!(matches!(h.record(&p, now, now), AfterCrash::RestartAt(_)));
        let now = t0 + Duration::from_secs(13);
        assert_eq!(h.record(&p, now, now), AfterCrash::Flapping);
    }
}

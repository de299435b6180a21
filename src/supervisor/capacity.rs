//! How many workers a site's memory budget holds.
//!
//! Pure functions; the event loop feeds them the budget, the configured per-worker
//! estimate and the measured peak of the site's workers (`memory.peak` of their leaves,
//! or `memory.current` before 5.19).
//!
//! - Per worker: the measured peak plus [`MARGIN_PERCENT`] once a worker has run for
//!   [`SETTLE`], else the configured estimate (`worker_memory`, else `memory_max`, else
//!   `memory_high`).
//! - The cap is `(budget - zygote) / per worker`, at most the configured maximum, where
//!   `zygote` is what a zygote-mode generation's zygote holds (its leaf's
//!   `memory.current`: the loaded app its workers share, charged to it, not to them).
//!   Nothing (scale, restarts, reload) ever runs more workers than the cap.
//! - `workers = "auto"` grows one worker at a time, only when every worker is ready and
//!   the newest has run for [`SETTLE`], so an estimate that is too low is corrected by
//!   measurement before the budget is at risk; it shrinks at once when the cap falls.

use std::time::Duration;

use serde::Serialize;

/// Extra room over the measured peak.
pub const MARGIN_PERCENT: u64 = 15;
/// How long a worker runs before its memory counts as measured.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Where the per-worker figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The configuration's estimate.
    Estimate,
    /// The workers' measured peak plus the margin.
    Measured,
}

/// The cap and how it was derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// Most workers.
    pub workers: u32,
    /// Bytes assumed per worker.
    pub per_worker: u64,
    /// Where `per_worker` came from.
    pub basis: Basis,
    /// The site budget, bytes.
    pub budget: u64,
    /// Bytes of the budget the zygote holds (zygote mode; 0 otherwise).
    pub zygote: u64,
}

impl Capacity {
    /// `512M budget / 115M per worker (measured peak + 15%) = 4`, or with a zygote
    /// `(512M budget - 200M zygote) / 23M per worker (measured peak + 15%) = 13`.
    pub fn describe(&self) -> String {
        let basis = match self.basis {
            Basis::Estimate => "configured estimate".to_string(),
            Basis::Measured => format!("measured peak + {MARGIN_PERCENT}%"),
        };
        let budget = if self.zygote > 0 {
            format!(
                "({} budget - {} zygote)",
                crate::config::format_size(self.budget),
                crate::config::format_size(self.zygote)
            )
        } else {
            format!("{} budget", crate::config::format_size(self.budget))
        };
        format!(
            "{budget} / {} per worker ({basis}) = {}",
            crate::config::format_size(self.per_worker),
            self.workers
        )
    }
}

/// The cap for `budget` of which a zygote holds `zygote` bytes, or `None` when there is
/// no per-worker figure yet.
pub fn capacity(
    budget: u64,
    zygote: u64,
    estimate: Option<u64>,
    measured_peak: Option<u64>,
    max: u32,
) -> Option<Capacity> {
    let (per_worker, basis) = match measured_peak.filter(|&p| p > 0) {
        Some(p) => (p.saturating_add(p * MARGIN_PERCENT / 100), Basis::Measured),
        None => (estimate?, Basis::Estimate),
    };
    let per_worker = per_worker.max(1 << 20);
    let fits = u32::try_from(budget.saturating_sub(zygote) / per_worker).unwrap_or(u32::MAX);
    Some(Capacity {
        workers: fits.min(max),
        per_worker,
        basis,
        budget,
        zygote,
    })
}

/// The next desired count of an automatic site, if it should change.
///
/// `current` is the desired count now; `settled` says every worker is ready and the
/// newest has run for [`SETTLE`].
pub fn auto_step(current: u32, cap: u32, min: u32, settled: bool) -> Option<u32> {
    if current > cap {
        return Some(cap);
    }
    let floor = min.min(cap);
    if current < floor {
        return Some(floor);
    }
    (settled && current < cap).then_some(current + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn measured_peak_replaces_the_estimate() {
        let c = capacity(512 * M, 0, Some(64 * M), None, 64).expect("cap");
        assert_eq!((c.workers, c.basis), (8, Basis::Estimate));
        let c = capacity(512 * M, 0, Some(64 * M), Some(100 * M), 64).expect("cap");
        assert_eq!(
            (c.workers, c.basis),
            (4, Basis::Measured),
            "100M + 15% = 115M: 4 fit in 512M"
        );
        assert!(c.describe().contains("= 4"), "{}", c.describe());
        assert_eq!(capacity(512 * M, 0, None, None, 64), None);
        assert_eq!(
            capacity(512 * M, 0, Some(M), None, 10).map(|c| c.workers),
            Some(10),
            "max bounds it"
        );
    }

    #[test]
    fn a_zygote_holds_its_share_of_the_budget() {
        let c = capacity(512 * M, 212 * M, None, Some(20 * M), 64).expect("cap");
        assert_eq!(c.workers, 13, "(512M - 212M) / 23M");
        assert!(
            c.describe()
                .starts_with("(512M budget - 212M zygote) / 23M"),
            "{}",
            c.describe()
        );
        let c = capacity(512 * M, 600 * M, None, Some(20 * M), 64).expect("cap");
        assert_eq!(c.workers, 0, "a zygote past the budget leaves no room");
    }

    #[test]
    fn auto_grows_one_at_a_time_and_shrinks_at_once() {
        assert_eq!(auto_step(0, 8, 1, false), Some(1), "min starts at once");
        assert_eq!(auto_step(1, 8, 1, false), None, "not settled: wait");
        assert_eq!(auto_step(1, 8, 1, true), Some(2));
        assert_eq!(auto_step(8, 8, 1, true), None);
        assert_eq!(auto_step(8, 4, 1, false), Some(4), "the cap fell");
        assert_eq!(auto_step(0, 0, 2, true), None, "nothing fits: nothing runs");
    }

    #[test]
    fn the_cap_times_the_per_worker_figure_never_exceeds_the_budget() {
        for budget in [64 * M, 100 * M, 512 * M, 3000 * M] {
            for peak in [M / 2, 7 * M, 33 * M, 100 * M, 600 * M] {
                let c = capacity(budget, 0, None, Some(peak), 4096).expect("cap");
                assert!(u64::from(c.workers) * c.per_worker <= budget);
                assert!(u64::from(c.workers) * peak <= budget);
            }
        }
    }
}

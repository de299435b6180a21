//! Folding mass events: a few lines per worker, then one summary.
//!
//! When a thousand workers of a site die at once (a `kill -9` of them all, an OOM
//! sweep) or are stopped together (`hatchery stop`), the agent's log and a waiting
//! client would get one line per worker. [`Fold`] decides, for lines of one *kind*
//! (a site and what happened, such as "killed by SIGKILL"), which are shown as they are
//! and which are only counted, and when the count is said in one [`Summary`]:
//!
//! 1. the first [`Limits::shown`] lines of a burst are shown;
//! 2. the rest are counted (how many, the first and last worker, when);
//! 3. a burst ends when no line of its kind came for [`Limits::quiet`], or at the latest
//!    [`Limits::longest`] after it began; its summary is then due;
//! 4. a burst still going when it reaches `longest` goes on as a continuation: its
//!    lines stay folded (no new free lines) and its next summary counts from the start
//!    of the first one, so a storm of ten seconds is ten summaries, not fifty lines.
//!
//! It is pure: time comes in, verdicts and summaries go out. [`LogFold`] applies it to
//! the agent's own log (a `tracing` layer; the event loop flushes it from its deadlines,
//! `mod.rs`), the CLI to the progress lines it prints (`src/cli/render.rs`).
//!
//! What it does not fold: errors (a site marked failed, a flapping worker, a failed
//! spawn), lines that name no worker, and anything printed for machines (`--json`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How much of a burst is shown, and how long one lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lines of a burst shown as they are.
    pub shown: usize,
    /// A burst ends when no line of its kind came for this long.
    pub quiet: Duration,
    /// A burst's summary is due at the latest this long after it began.
    pub longest: Duration,
}

/// The limits of the agent's log and of the CLI's progress.
pub const LIMITS: Limits = Limits {
    shown: 5,
    quiet: Duration::from_millis(250),
    longest: Duration::from_secs(1),
};

/// Whether a line is shown or folded into the summary of its burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Show the line as it is.
    Shown,
    /// Counted; said in the burst's summary.
    Folded,
}

/// What [`Fold::offer`] decided, and the summary of an earlier burst of the same kind
/// that ended before this line came (to be said before the line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered<K> {
    /// What to do with the line.
    pub verdict: Verdict,
    /// The summary of the burst this line came after.
    pub ended: Option<Summary<K>>,
}

/// The lines of a burst that were not shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    /// Their kind.
    pub kind: K,
    /// Lines folded into this summary.
    pub folded: u64,
    /// Lines of the burst in all (shown, folded, and those of earlier summaries of a
    /// continued burst).
    pub total: u64,
    /// From the burst's first line to its last.
    pub span: Duration,
    /// The lowest worker number of the folded lines.
    pub lowest: u32,
    /// The highest.
    pub highest: u32,
}

impl<K> Summary<K> {
    /// The summary's words after its kind's prefix: `995 more workers killed by SIGKILL
    /// (1000 in 0.21 s; w-3 … w-998)`, with `what` the kind's words after "worker".
    pub fn describe(&self, what: &str) -> String {
        let workers = if self.folded == 1 {
            "worker"
        } else {
            "workers"
        };
        let range = if self.lowest == self.highest {
            format!("w-{}", self.lowest)
        } else {
            format!("w-{} … w-{}", self.lowest, self.highest)
        };
        format!(
            "{} more {workers} {what} ({} in {:.2} s; {range})",
            self.folded,
            self.total,
            self.span.as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
struct Burst {
    /// When its first line came (of the first summary, for a continuation).
    began: Instant,
    /// When this part of it began (its summary is due `longest` after).
    part_began: Instant,
    last: Instant,
    /// Lines it may still show.
    free: usize,
    folded: u64,
    total: u64,
    lowest: u32,
    highest: u32,
}

impl Burst {
    fn new(now: Instant, free: usize) -> Burst {
        Burst {
            began: now,
            part_began: now,
            last: now,
            free,
            folded: 0,
            total: 0,
            lowest: u32::MAX,
            highest: 0,
        }
    }

    fn ends(&self, limits: &Limits) -> Instant {
        (self.last + limits.quiet).min(self.part_began + limits.longest)
    }

    fn summary<K>(&self, kind: K) -> Option<Summary<K>> {
        (self.folded > 0).then(|| Summary {
            kind,
            folded: self.folded,
            total: self.total,
            span: self.last.saturating_duration_since(self.began),
            lowest: self.lowest,
            highest: self.highest,
        })
    }

    /// What follows a burst that ended at `end`: a continuation when a line of its kind
    /// came within `quiet` of `at` (it was cut by `longest`, not by a pause).
    fn after(&self, end: Instant, at: Instant, limits: &Limits) -> Option<Burst> {
        (at < self.last + limits.quiet).then(|| Burst {
            part_began: end,
            free: 0,
            folded: 0,
            lowest: u32::MAX,
            highest: 0,
            ..self.clone()
        })
    }
}

/// The bursts under way, by kind.
#[derive(Debug, Clone)]
pub struct Fold<K> {
    limits: Limits,
    bursts: BTreeMap<K, Burst>,
}

impl<K: Ord + Clone> Fold<K> {
    /// No burst under way.
    pub fn new(limits: Limits) -> Fold<K> {
        Fold {
            limits,
            bursts: BTreeMap::new(),
        }
    }

    /// A line of `kind` about `worker` came at `now`.
    pub fn offer(&mut self, now: Instant, kind: &K, worker: u32) -> Offered<K> {
        let limits = self.limits;
        let mut ended = None;
        // The key is cloned only for a new burst: a burst under way takes a thousand lines
        // in a stop of a thousand workers.
        if !self.bursts.contains_key(kind) {
            self.bursts
                .insert(kind.clone(), Burst::new(now, limits.shown));
        }
        let burst = self.bursts.get_mut(kind).expect("inserted above");
        if now >= burst.ends(&limits) {
            ended = burst.summary(kind.clone());
            *burst = burst
                .after(now, now, &limits)
                .unwrap_or_else(|| Burst::new(now, limits.shown));
        }
        burst.last = now;
        burst.total += 1;
        let verdict = if burst.free > 0 {
            burst.free -= 1;
            Verdict::Shown
        } else {
            burst.folded += 1;
            burst.lowest = burst.lowest.min(worker);
            burst.highest = burst.highest.max(worker);
            Verdict::Folded
        };
        Offered { verdict, ended }
    }

    /// The summaries due at `now`, in the order their bursts began; bursts that ended
    /// with nothing folded are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Summary<K>> {
        let limits = self.limits;
        let mut out = Vec::new();
        self.bursts.retain(|kind, b| {
            let end = b.ends(&limits);
            if now < end {
                return true;
            }
            out.extend(b.summary(kind.clone()).map(|s| (b.began, s)));
            match b.after(end, now, &limits) {
                Some(next) => {
                    *b = next;
                    true
                }
                None => false,
            }
        });
        out.sort_by_key(|(began, _)| *began);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// Every summary still owed (the stream ends), whether due or not.
    pub fn drain(&mut self) -> Vec<Summary<K>> {
        let mut owed: Vec<(Instant, Summary<K>)> = std::mem::take(&mut self.bursts)
            .into_iter()
            .filter_map(|(kind, b)| b.summary(kind).map(|s| (b.began, s)))
            .collect();
        owed.sort_by_key(|(began, _)| *began);
        owed.into_iter().map(|(_, s)| s).collect()
    }

    /// When the next summary is due; `None` when nothing is folded (an idle fold needs
    /// no wake-up).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.bursts
            .values()
            .filter(|b| b.folded > 0)
            .map(|b| b.ends(&self.limits))
            .min()
    }
}

// ------------------------------------------------------------ the agent's own log

/// The kind of a line of the agent's log: its level, its site and its message (without
/// its fields, so lines that differ only in `worker` and `pid` are one kind).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogKind {
    warn: bool,
    site: String,
    message: String,
}

/// The fold of the agent's own log, shared by the `tracing` layer that consults it for
/// every line and the event loop that flushes its summaries.
#[derive(Debug, Clone)]
pub struct LogFold(Arc<Mutex<Fold<LogKind>>>);

static AGENT_LOG: OnceLock<LogFold> = OnceLock::new();

impl LogFold {
    /// A fold of its own (tests).
    pub fn new(limits: Limits) -> LogFold {
        LogFold(Arc::new(Mutex::new(Fold::new(limits))))
    }

    /// The fold of this process's log, which [`LogFold::layer`] of it folds into (the
    /// agent installs it once, in `main.rs`).
    pub fn agent() -> &'static LogFold {
        AGENT_LOG.get_or_init(|| LogFold::new(LIMITS))
    }

    /// The `tracing` layer that folds the lines of this fold's kinds.
    pub fn layer(&self) -> LogFoldLayer {
        LogFoldLayer(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fold<LogKind>> {
        // A panic while holding it left a fold that is still consistent enough to count.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the event loop must wake to say a summary.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().next_deadline()
    }

    /// Logs the summaries due at `now`.
    pub fn flush(&self, now: Instant) {
        let due = self.lock().due(now);
        for s in due {
            say(&s);
        }
    }

    /// Logs every summary still owed (the agent stops).
    pub fn flush_all(&self) {
        let owed = self.lock().drain();
        for s in owed {
            say(&s);
        }
    }
}

/// A summary in the agent's log, at the level of the lines it stands for.
fn say(s: &Summary<LogKind>) {
    let what = s
        .kind
        .message
        .strip_prefix("worker ")
        .map_or_else(|| format!("logged \"{}\"", s.kind.message), str::to_string);
    let line = s.describe(&what);
    if s.kind.warn {
        tracing::warn!(site = %s.kind.site, "{line}");
    } else {
        tracing::info!(site = %s.kind.site, "{line}");
    }
}

/// Folds the agent's `INFO` and `WARN` lines that carry a `site` and a `worker`
/// (errors are never folded).
#[derive(Debug, Clone)]
pub struct LogFoldLayer(LogFold);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogFoldLayer {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let level = *event.metadata().level();
        if level != tracing::Level::WARN && level != tracing::Level::INFO {
            return true;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let (Some(site), Some(worker)) = (fields.site, fields.worker) else {
            return true;
        };
        let Ok(worker) = worker.parse::<u32>() else {
            return true;
        };
        let kind = LogKind {
            warn: level == tracing::Level::WARN,
            site,
            message: fields.message,
        };
        let offered = self.0.lock().offer(Instant::now(), &kind, worker);
        // Said before the line that came after its burst (the lock is released).
        if let Some(s) = &offered.ended {
            say(s);
        }
        offered.verdict == Verdict::Shown
    }
}

/// The fields of a log line that make its kind.
#[derive(Default)]
struct Fields {
    message: String,
    site: Option<String>,
    worker: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "site" => self.site = Some(format!("{value:?}")),
            "worker" => self.worker = Some(format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "site" => self.site = Some(value.to_string()),
            "worker" => self.worker = Some(value.to_string()),
            _ => {}
        }
    }
}

// ------------------------------------------------------------ progress lines

/// The kind of a per-worker progress line (`render::note` of one worker, perhaps after
/// `gen-N: `): the words before its worker and after it, without a pid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProgressKind {
    /// `gen-N: ` of a generation that does not serve, or nothing.
    pub prefix: String,
    /// What happened to the worker: `killed by SIGTERM`, `started`, `ready`.
    pub what: String,
}

/// A progress line's kind and worker, when it is about one worker and may be folded: a
/// worker that failed (and so the site) is never folded.
pub fn progress_kind(line: &str) -> Option<(ProgressKind, u32)> {
    let (prefix, rest) = match line.strip_prefix("gen-") {
        Some(after) => {
            let (generation, rest) = after.split_once(": ")?;
            if !generation.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (format!("gen-{generation}: "), rest)
        }
        None => (String::new(), line),
    };
    let (worker, what) = rest.strip_prefix("w-")?.split_once(' ')?;
    let worker = worker.parse::<u32>().ok()?;
    if what.starts_with("failed") {
        return None;
    }
    // `started (pid 123)`: the pid is the worker's own, not part of the kind.
    let what = match what.strip_suffix(')').and_then(|w| w.rsplit_once(" (pid ")) {
        Some((what, pid)) if pid.bytes().all(|b| b.is_ascii_digit()) => what,
        _ => what,
    };
    Some((
        ProgressKind {
            prefix,
            what: what.to_string(),
        },
        worker,
    ))
}

/// A summary of progress lines, as the CLI prints it.
pub fn progress_summary(s: &Summary<ProgressKind>) -> String {
    format!("{}{}", s.kind.prefix, s.describe(&s.kind.what))
}

#[cfg(test)]
mod tests;

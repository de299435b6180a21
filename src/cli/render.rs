//! The CLI's text for people: `status` as a table, and any text from the agent with its
//! control characters escaped.

use std::fmt::Write as _;
use std::time::Duration;

use hatchery::cgroup::UsageSource;
use hatchery::event::fold::{self, Fold, ProgressKind, Verdict};
use hatchery::status::{SiteStatus, Status};

/// The progress lines of one request, for people: per-worker lines by the thousand (a
/// `stop` of 4000 workers) folded into summaries by [`fold`] (the first few shown, then
/// one line per burst), every other line as it comes. `--json` does not use it: it
/// prints every line.
pub struct Progress {
    fold: Fold<ProgressKind>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            fold: Fold::new(fold::LIMITS),
        }
    }
}

impl Progress {
    /// The lines to print for a progress line that came at `now`: summaries now due (a
    /// burst that ended before it), then the line unless it was folded.
    pub fn line(&mut self, now: std::time::Instant, line: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .fold
            .due(now)
            .iter()
            .map(fold::progress_summary)
            .collect();
        match fold::progress_kind(line) {
            Some((kind, worker)) => {
                let offered = self.fold.offer(now, &kind, worker);
                out.extend(offered.ended.as_ref().map(fold::progress_summary));
                if offered.verdict == Verdict::Shown {
                    out.push(line.to_string());
                }
            }
            None => out.push(line.to_string()),
        }
        out
    }

    /// The summaries still owed when the final reply came (printed before it).
    pub fn finish(&mut self) -> Vec<String> {
        self.fold
            .drain()
            .iter()
            .map(fold::progress_summary)
            .collect()
    }
}

/// Text for a terminal: control characters other than newline and tab (escape sequences a
/// worker wrote, a release path with a bell in it) are shown escaped (`\x1b`), never sent
/// to the operator's terminal as they are.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() && u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn fmt_uptime(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    let s = d.as_secs();
    match s {
        0..60 => format!("{}.{}s", s, d.subsec_millis() / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn fmt_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b}B"),
        1024..1_048_576 => format!("{:.1}K", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", b as f64 / 1_048_576.0),
        _ => format!("{:.2}G", b as f64 / 1_073_741_824.0),
    }
}

/// What a site's memory is measured against: its cgroup's `memory.max` (`enforced`),
/// else the budget its file gives (`configured`), which only caps the worker count where
/// the memory controller is missing.
fn budget(enforced: Option<u64>, configured: Option<u64>) -> String {
    match (enforced, configured) {
        (Some(max), _) => fmt_bytes(max),
        (None, Some(b)) => format!("its {} budget (not enforced here)", fmt_bytes(b)),
        (None, None) => "no budget".into(),
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

/// `status` for people: a line per site, and with one site its workers and details.
pub fn status(v: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<9} {:>7}  {:<4} LISTEN",
        "SITE", "STATE", "READY", "GEN"
    );
    for s in &v.sites {
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:>7}  {:<4} {}",
            s.name,
            s.state.name(),
            format!("{}/{}", s.ready, s.desired),
            or_dash(s.generation),
            s.listen.join(", ")
        );
        if let Some(e) = &s.error {
            let _ = writeln!(out, "  {e}");
        }
    }
    if let [s] = v.sites.as_slice() {
        site_details(&mut out, s);
    }
    if let Some(up) = &v.agent.upgraded_from {
        let _ = writeln!(
            out,
            "\nagent {} (pid {}), upgraded from {} at {}",
            v.agent.version, v.agent.pid, up.version, up.at
        );
    }
    let off: Vec<String> = v
        .agent
        .features
        .iter()
        .filter(|f| !f.in_use)
        .map(|f| format!("  {}: {}", f.name, f.detail))
        .collect();
    if !off.is_empty() {
        let _ = writeln!(out, "\nnot enforced on this host:\n{}", off.join("\n"));
    }
    out
}

fn site_details(out: &mut String, s: &SiteStatus) {
    let _ = writeln!(
        out,
        "\n{:<7} {:>8} {:<9} {:>8} {:>8} {:>9} {:>9} {:>5}  LAST EXIT",
        "WORKER", "PID", "STATE", "RESTARTS", "UPTIME", "MEM", "PEAK", "PIDS"
    );
    let bytes = |v: Option<u64>| v.map_or_else(|| "-".into(), fmt_bytes);
    let several = s.generations.len() > 1;
    for w in &s.workers {
        let u = w.usage.unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<7} {:>8} {:<9} {:>8} {:>8} {:>9} {:>9} {:>5}  {}",
            if several {
                format!("g{}/w-{}", w.generation, w.id)
            } else {
                format!("w-{}", w.id)
            },
            or_dash(w.pid),
            w.state,
            w.restarts,
            w.uptime_ms.map_or_else(|| "-".into(), fmt_uptime),
            bytes(u.memory_current),
            bytes(u.memory_peak),
            or_dash(u.pids),
            w.last_exit.as_deref().unwrap_or("-"),
        );
    }
    if let Some(su) = &s.usage {
        let _ = writeln!(
            out,
            "\nsite: memory {} of {}, {} processes, cpu {:.1} s",
            bytes(su.memory_current),
            budget(su.memory_max, s.capacity.as_ref().map(|c| c.budget)),
            or_dash(su.pids),
            su.cpu_usec.unwrap_or(0) as f64 / 1e6,
        );
    }
    let from_proc = s
        .workers
        .iter()
        .filter_map(|w| w.usage)
        .chain(s.usage)
        .any(|u| u.source == UsageSource::Proc);
    if from_proc {
        let _ = writeln!(
            out,
            "memory: resident (RSS) of each worker's processes from /proc, a shared page counted \
             in each (no cgroup memory accounting here)"
        );
    }
    if let Some(r) = &s.release {
        let _ = writeln!(
            out,
            "release: {} (gen-{})",
            r.display(),
            or_dash(s.generation)
        );
    }
    // A zygote-mode site's zygotes, one line per generation.
    for g in &s.generations {
        let Some(z) = &g.zygote else {
            continue;
        };
        let _ = writeln!(
            out,
            "zygote{}: {}{}{}{}{}{}",
            if several {
                format!(" of gen-{}", g.id)
            } else {
                String::new()
            },
            z.state,
            z.pid.map(|p| format!(", pid {p}")).unwrap_or_default(),
            z.usage
                .and_then(|u| u.memory_current)
                .map(|m| format!(", memory {}", fmt_bytes(m)))
                .unwrap_or_default(),
            if z.restarts > 0 {
                format!(", {} restarts", z.restarts)
            } else {
                String::new()
            },
            // Workers forked ahead, already in the leaf of the worker each will be.
            z.spares
                .iter()
                .map(|x| format!(", spare for w-{} (pid {})", x.slot, x.pid))
                .collect::<String>(),
            if z.degraded {
                "; DEGRADED: it died, workers run on, new ones wait for the next zygote"
            } else {
                ""
            },
        );
    }
    // While a canary runs, every generation is shown with its share and crashes.
    let canary = s.deploy.as_ref().and_then(|d| d.canary.as_ref());
    for g in s
        .generations
        .iter()
        .filter(|g| canary.is_some() || Some(g.id) != s.generation)
    {
        let _ = writeln!(
            out,
            "gen-{}: {}, {}/{} ready{}{}{}",
            g.id,
            g.state,
            g.ready,
            g.desired,
            g.share
                .as_ref()
                .map(|p| format!(", {p} of new connections"))
                .unwrap_or_default(),
            if canary.is_some() || g.crashes > 0 {
                format!(", {} crashes", g.crashes)
            } else {
                String::new()
            },
            g.release
                .as_ref()
                .map(|r| format!(", {}", r.display()))
                .unwrap_or_default()
        );
    }
    if let (Some(d), Some(share)) = (&s.deploy, canary) {
        let _ = writeln!(
            out,
            "canary: gen-{} takes {share} of new connections beside gen-{}{}",
            d.to,
            d.from,
            if d.promoted {
                "; promoted, growing to full size before the flip".to_string()
            } else {
                format!(
                    "; `hatchery promote {0}` or `hatchery rollback {0}`",
                    s.name
                )
            }
        );
    }
    if let Some(d) = &s.deploys {
        let _ = writeln!(out, "deploys: {d}");
    }
    if let Some(d) = &s.last_deploy {
        let result = serde_json::to_value(d.result)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "last deploy: gen-{} {result}{}",
            d.to,
            d.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    if let Some(c) = &s.capacity {
        let _ = writeln!(out, "cap: {} (requested {})", c.derivation, s.requested);
    }
    if let Some(l) = &s.scale {
        scale(out, l);
    }
    if let Some(l) = s.limits.as_ref().filter(|l| !l.not_enforced.is_empty()) {
        let _ = writeln!(
            out,
            "limits not enforced here: {}",
            l.not_enforced.join(", ")
        );
    }
    if let Some(sb) = s.sandbox.as_ref().filter(|sb| !sb.not_enforced.is_empty()) {
        let _ = writeln!(
            out,
            "sandbox not enforced here: {}",
            sb.not_enforced.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "log: {}",
        s.log
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
}

/// The load-scaling lines of a site's `status`.
fn scale(out: &mut String, l: &hatchery::status::ScaleStatus) {
    let _ = writeln!(
        out,
        "load scaling: target {}%, sampled every {} ms{}{}",
        l.target_percent,
        l.interval_ms,
        if l.pressure_trigger {
            " and when the site goes without a CPU"
        } else {
            ""
        },
        l.idle_reason
            .as_ref()
            .map(|r| format!(" (not sampled now: {r})"))
            .unwrap_or_default()
    );
    if let Some(sig) = &l.signals {
        let mut parts = Vec::new();
        if let Some(b) = sig.busy {
            parts.push(format!("busy {b:.1}"));
        }
        if let Some(q) = sig.queued {
            parts.push(format!("queued {q}"));
        }
        if let Some(c) = sig.cpu {
            parts.push(format!("cpu {c:.2} CPUs"));
        }
        if let Some(st) = sig.cpu_stall {
            parts.push(format!("cpu stall {:.0}%", st * 100.0));
        }
        if let Some(m) = sig.memory_events {
            parts.push(format!("memory limit hits {m}"));
        }
        let _ = writeln!(
            out,
            "  signals: {} ready, {}; wants {}",
            sig.ready,
            if parts.is_empty() {
                "none yet".to_string()
            } else {
                parts.join(", ")
            },
            sig.wanted
        );
    }
    for u in &l.unavailable {
        let _ = writeln!(out, "  not available: {u}");
    }
    if let Some(h) = &l.held {
        let _ = writeln!(out, "  {h}");
    }
    if let Some(d) = &l.last_decision {
        let _ = writeln!(
            out,
            "  last: {} -> {} at {} ({})",
            d.from, d.to, d.at, d.reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_budget_not_enforced_here_is_said_so() {
        assert_eq!(budget(Some(512 << 20), Some(512 << 20)), "512.0M");
        assert_eq!(
            budget(None, Some(512 << 20)),
            "its 512.0M budget (not enforced here)"
        );
        assert_eq!(budget(None, None), "no budget");
    }

    #[test]
    fn a_stop_of_many_workers_prints_five_lines_and_one_summary() {
        let mut p = Progress::default();
        let t = Instant::now();
        let mut printed = Vec::new();
        for w in 0..4000u32 {
            let at = t + Duration::from_micros(100) * w;
            printed.extend(p.line(at, &format!("w-{w} killed by SIGTERM")));
        }
        printed.extend(p.finish());
        assert_eq!(
            printed,
            vec![
                "w-0 killed by SIGTERM",
                "w-1 killed by SIGTERM",
                "w-2 killed by SIGTERM",
                "w-3 killed by SIGTERM",
                "w-4 killed by SIGTERM",
                "3995 more workers killed by SIGTERM (4000 in 0.40 s; w-5 … w-3999)",
            ]
        );
    }

    #[test]
    fn lines_about_no_single_worker_and_failures_are_printed_as_they_come() {
        let mut p = Progress::default();
        let t = Instant::now();
        let mut printed = Vec::new();
        for w in 0..8u32 {
            printed.extend(p.line(
                t,
                &format!("w-{w} failed: not restarted until `hatchery start web`"),
            ));
        }
        printed.extend(p.line(t, "all workers stopped"));
        printed.extend(p.finish());
        assert_eq!(printed.len(), 9, "{printed:?}");
    }

    #[test]
    fn a_summary_due_before_the_next_line_comes_first() {
        let mut p = Progress::default();
        let t = Instant::now();
        for w in 0..7u32 {
            p.line(t, &format!("w-{w} started (pid {})", 100 + w));
        }
        let later = t + Duration::from_secs(3);
        assert_eq!(
            p.line(later, "all workers ready"),
            vec![
                "2 more workers started (7 in 0.00 s; w-5 … w-6)".to_string(),
                "all workers ready".to_string(),
            ]
        );
        assert_eq!(p.finish(), Vec::<String>::new());
    }
}

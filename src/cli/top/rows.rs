//! What `top` shows, as rows of text: the overview's sites and a site's workers, computed
//! from snapshots (CPU % from two of them), sorted, filtered, and laid out as plain text
//! when there is no terminal. Pure: the tests below need no agent.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use hatchery::control::{SiteSummary, Snapshot};
use hatchery::status::{SiteStatus, WorkerStatus};

/// A column of the overview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The site's name.
    Site,
    /// Its state.
    State,
    /// The serving generation.
    Gen,
    /// The deploy under way.
    Deploy,
    /// Ready and desired workers.
    Ready,
    /// Memory against the budget and the cap.
    Memory,
    /// OOM kills.
    Oom,
    /// Restarts after crashes.
    Restarts,
    /// CPU %, between the last two snapshots.
    Cpu,
    /// Processes in its cgroup.
    Pids,
    /// Workers that said `BUSY=1`.
    Busy,
    /// Connections waiting in the accept queue.
    Queue,
    /// What happened last.
    Last,
}

impl Column {
    /// Every column, left to right.
    pub const ALL: [Column; 13] = [
        Column::Site,
        Column::State,
        Column::Gen,
        Column::Deploy,
        Column::Ready,
        Column::Memory,
        Column::Oom,
        Column::Restarts,
        Column::Cpu,
        Column::Pids,
        Column::Busy,
        Column::Queue,
        Column::Last,
    ];

    /// The columns `s` cycles through, in order.
    pub const SORTABLE: [Column; 10] = [
        Column::Site,
        Column::Ready,
        Column::Memory,
        Column::Cpu,
        Column::Restarts,
        Column::Oom,
        Column::Pids,
        Column::Busy,
        Column::Queue,
        Column::State,
    ];

    /// Its heading.
    pub fn title(self) -> &'static str {
        match self {
            Column::Site => "SITE",
            Column::State => "STATE",
            Column::Gen => "GEN",
            Column::Deploy => "DEPLOY",
            Column::Ready => "READY",
            Column::Memory => "MEMORY",
            Column::Oom => "OOM",
            Column::Restarts => "RESTARTS",
            Column::Cpu => "CPU%",
            Column::Pids => "PIDS",
            Column::Busy => "BUSY",
            Column::Queue => "QUEUE",
            Column::Last => "LAST EVENT",
        }
    }

    /// Whether its values are numbers (right-aligned, sorted largest first).
    pub fn numeric(self) -> bool {
        !matches!(
            self,
            Column::Site | Column::State | Column::Deploy | Column::Last
        )
    }

    /// The next column `s` sorts by.
    pub fn next_sort(self) -> Column {
        let i = Column::SORTABLE
            .iter()
            .position(|c| *c == self)
            .unwrap_or(0);
        Column::SORTABLE[(i + 1) % Column::SORTABLE.len()]
    }
}

/// CPU use between snapshots: the last `cpu_usec` seen of each cgroup, by key (`blog`,
/// `blog/g3/w-1`), and when.
#[derive(Debug, Default)]
pub struct Rates {
    last: HashMap<String, (u64, u64)>,
    /// CPU % by key, from the last two snapshots.
    percent: HashMap<String, f64>,
}

impl Rates {
    /// Takes in a snapshot: the CPU % of each site and worker since the previous one.
    pub fn update(&mut self, snap: &Snapshot) {
        let at = snap.monotonic_ms;
        let mut seen: Vec<(String, u64)> = Vec::new();
        for s in &snap.status.sites {
            if let Some(usec) = s.usage.and_then(|u| u.cpu_usec) {
                seen.push((s.name.clone(), usec));
            }
            for w in &s.workers {
                if let Some(usec) = w.usage.and_then(|u| u.cpu_usec) {
                    seen.push((worker_key(&s.name, w), usec));
                }
            }
        }
        for (key, usec) in seen {
            if let Some((then, before)) = self.last.insert(key.clone(), (at, usec)) {
                if at > then && usec >= before {
                    // usec over ms: 100 % of one CPU is 1000 µs per ms.
                    let pct = (usec - before) as f64 / (at - then) as f64 / 10.0;
                    self.percent.insert(key, pct);
                }
            }
        }
    }

    /// The CPU % of `key`, once two snapshots had it.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.percent.get(key).copied()
    }
}

/// The key of a worker in [`Rates`].
pub fn worker_key(site: &str, w: &WorkerStatus) -> String {
    format!("{site}/g{}/w-{}", w.generation, w.id)
}

/// One site of the overview.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRow {
    /// The site.
    pub name: String,
    /// Its state.
    pub state: String,
    /// The serving generation.
    pub generation: Option<u32>,
    /// The deploy under way: `→4 probation`.
    pub deploy: Option<String>,
    /// Ready workers of the serving generation.
    pub ready: u32,
    /// Workers it runs.
    pub desired: u32,
    /// `memory.current` of its cgroup.
    pub memory: Option<u64>,
    /// Its budget (`memory`).
    pub budget: Option<u64>,
    /// The memory its workers may take at the cap (cap × per worker, plus the zygote).
    pub cap: Option<u64>,
    /// OOM kills.
    pub oom: Option<u64>,
    /// Restarts after crashes.
    pub restarts: Option<u32>,
    /// CPU %.
    pub cpu: Option<f64>,
    /// Processes.
    pub pids: Option<u64>,
    /// Busy workers.
    pub busy: Option<u32>,
    /// Connections waiting.
    pub queue: Option<u32>,
    /// What happened last.
    pub last: String,
}

impl SiteRow {
    /// The row of site `s`.
    pub fn new(s: &SiteStatus, summary: Option<&SiteSummary>, rates: &Rates) -> SiteRow {
        let usage = s.usage.unwrap_or_default();
        let deploy = s.deploy.as_ref().map(|d| {
            let queued = if s.queued_deploys > 0 {
                format!(" +{}", s.queued_deploys)
            } else {
                String::new()
            };
            format!("→{} {}{queued}", d.to, d.stage)
        });
        let last = if let Some(e) = &s.error {
            e.clone()
        } else if let Some(d) = &s.deploy {
            format!("deploying gen-{} ({})", d.to, d.stage)
        } else if let Some(x) = summary.and_then(|x| x.last_exit.as_ref()) {
            x.clone()
        } else if let Some(d) = &s.last_deploy {
            let what = match d.result {
                hatchery::status::DeployResult::Done => "deployed",
                hatchery::status::DeployResult::DoneWithCrashes => "deployed (with crashes)",
                hatchery::status::DeployResult::RolledBack => "rolled back",
            };
            format!("{what} gen-{}", d.to)
        } else {
            String::new()
        };
        SiteRow {
            name: s.name.clone(),
            state: if s.restarting {
                "restarting".to_string()
            } else {
                s.state.name().to_string()
            },
            generation: s.generation,
            deploy,
            ready: s.ready,
            desired: s.desired,
            memory: usage.memory_current,
            budget: s
                .limits
                .as_ref()
                .and_then(|l| l.memory)
                .or(s.capacity.as_ref().map(|c| c.budget)),
            cap: s.capacity.as_ref().map(|c| {
                u64::from(c.workers)
                    .saturating_mul(c.per_worker)
                    .saturating_add(c.zygote)
            }),
            oom: usage.oom_kills,
            restarts: summary.map(|x| x.restarts),
            cpu: rates.get(&s.name),
            pids: usage.pids,
            busy: summary.map(|x| x.busy),
            queue: s
                .scale
                .as_ref()
                .and_then(|l| l.signals.as_ref())
                .and_then(|g| g.queued),
            last,
        }
    }

    /// The text of `col` (`ascii`: the memory bar in ASCII, for plain output).
    pub fn cell(&self, col: Column, ascii: bool) -> String {
        match col {
            Column::Site => self.name.clone(),
            Column::State => self.state.clone(),
            Column::Gen => dash(self.generation),
            Column::Deploy => self.deploy.clone().unwrap_or_else(|| "-".into()),
            Column::Ready => format!("{}/{}", self.ready, self.desired),
            Column::Memory => memory_cell(self.memory, self.budget, self.cap, ascii),
            Column::Oom => dash(self.oom),
            Column::Restarts => dash(self.restarts),
            Column::Cpu => percent(self.cpu),
            Column::Pids => dash(self.pids),
            Column::Busy => dash(self.busy),
            Column::Queue => dash(self.queue),
            Column::Last => self.last.clone(),
        }
    }

    /// The value `col` sorts by: a number (`None` last), or text.
    fn sort_number(&self, col: Column) -> Option<f64> {
        match col {
            Column::Ready => Some(f64::from(self.ready) + f64::from(self.desired) / 1e6),
            Column::Memory => self.memory.map(|m| m as f64),
            Column::Oom => self.oom.map(|m| m as f64),
            Column::Restarts => self.restarts.map(f64::from),
            Column::Cpu => self.cpu,
            Column::Pids => self.pids.map(|m| m as f64),
            Column::Busy => self.busy.map(f64::from),
            Column::Queue => self.queue.map(f64::from),
            Column::Gen => self.generation.map(f64::from),
            Column::Site | Column::State | Column::Deploy | Column::Last => None,
        }
    }
}

/// The overview's rows: every site of the snapshot whose name contains `filter`, sorted
/// by `by` (numbers largest first, text A to Z; `reverse` turns it round; ties by name).
pub fn site_rows(
    snap: &Snapshot,
    rates: &Rates,
    by: Column,
    reverse: bool,
    filter: &str,
) -> Vec<SiteRow> {
    let mut rows: Vec<SiteRow> = snap
        .status
        .sites
        .iter()
        .filter(|s| s.name.contains(filter))
        .map(|s| {
            let summary = snap.summaries.iter().find(|x| x.site == s.name);
            SiteRow::new(s, summary, rates)
        })
        .collect();
    rows.sort_by(|a, b| order(a, b, by, reverse));
    rows
}

/// How two rows sort by `by`: numbers largest first (unknown ones last), text A to Z;
/// `reverse` turns it round; ties by name.
fn order(a: &SiteRow, b: &SiteRow, by: Column, reverse: bool) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let order = if by.numeric() {
        match (a.sort_number(by), b.sort_number(by)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    } else {
        a.cell(by, true).cmp(&b.cell(by, true))
    };
    let order = if reverse { order.reverse() } else { order };
    order.then_with(|| a.name.cmp(&b.name))
}

/// The columns of a site's workers.
pub const WORKER_COLUMNS: [&str; 9] = [
    "WORKER",
    "PID",
    "STATE",
    "RESTARTS",
    "UPTIME",
    "MEMORY",
    "CPU%",
    "PIDS",
    "LAST EXIT",
];

/// The cells of a site's workers (`ascii`: bars in ASCII): the memory bar is against
/// each worker's `memory_max`, else the memory the cap counts per worker.
pub fn worker_cells(s: &SiteStatus, rates: &Rates, ascii: bool) -> Vec<[String; 9]> {
    let several = s.generations.len() > 1;
    let per_worker = s
        .limits
        .as_ref()
        .and_then(|l| l.memory_max)
        .or(s.capacity.as_ref().map(|c| c.per_worker));
    s.workers
        .iter()
        .map(|w| {
            let u = w.usage.unwrap_or_default();
            [
                if several {
                    format!("g{}/w-{}", w.generation, w.id)
                } else {
                    format!("w-{}", w.id)
                },
                dash(w.pid),
                if w.busy {
                    format!("{} busy", w.state)
                } else {
                    w.state.clone()
                },
                w.restarts.to_string(),
                w.uptime_ms.map_or_else(|| "-".into(), uptime),
                memory_cell(u.memory_current, u.memory_max.or(per_worker), None, ascii),
                percent(rates.get(&worker_key(&s.name, w))),
                dash(u.pids),
                w.last_exit.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// `-` for what is unknown.
fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

/// A CPU percentage, or `-`.
fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |p| format!("{p:.1}"))
}

/// Bytes, short: `512M`, `1.5G`.
pub fn bytes(b: u64) -> String {
    const K: u64 = 1024;
    match b {
        0..K => format!("{b}B"),
        K..0x10_0000 => format!("{}K", b / K),
        0x10_0000..0x4000_0000 => format!("{}M", b / 0x10_0000),
        _ => format!("{:.1}G", b as f64 / 0x4000_0000 as f64),
    }
}

/// An uptime, short: `42s`, `3m05s`, `2h10m`, `4d03h`.
pub fn uptime(ms: u64) -> String {
    let s = Duration::from_millis(ms).as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Cells of a memory bar.
pub const BAR: usize = 10;

/// Memory as a bar against `limit` (its cells filled in proportion, `|` where `cap`
/// falls), then the figure: `[###...|..] 120M/512M`; `-` when unknown.
pub fn memory_cell(
    current: Option<u64>,
    limit: Option<u64>,
    cap: Option<u64>,
    ascii: bool,
) -> String {
    let Some(current) = current else {
        return "-".into();
    };
    let Some(limit) = limit.filter(|l| *l > 0) else {
        return bytes(current);
    };
    let (full, empty, mark) = if ascii {
        ('#', '.', '|')
    } else {
        ('█', '·', '│')
    };
    // Rounded to the nearest cell, in integers.
    let cells = |v: u64| {
        let (v, limit) = (u128::from(v.min(limit)), u128::from(limit));
        usize::try_from((v * BAR as u128 + limit / 2) / limit).unwrap_or(BAR)
    };
    let filled = cells(current);
    // The cap in the cell its position falls in.
    let cap_at = cap.filter(|c| *c < limit).map(|c| {
        let (c, limit) = (u128::from(c), u128::from(limit));
        usize::try_from(c * BAR as u128 / limit).unwrap_or(BAR)
    });
    let mut bar = String::new();
    for i in 0..BAR {
        bar.push(if cap_at == Some(i) && i >= filled {
            mark
        } else if i < filled {
            full
        } else {
            empty
        });
    }
    format!("[{bar}] {}/{}", bytes(current), bytes(limit))
}

/// One snapshot as plain text (`top` without a terminal): the overview's columns, and
/// with one site named, its workers.
pub fn plain(snap: &Snapshot, rates: &Rates, one_site: bool) -> String {
    let mut out = String::new();
    let a = &snap.status.agent;
    let _ = writeln!(
        out,
        "hatchery {} (agent pid {}): {} sites",
        a.version,
        a.pid,
        snap.status.sites.len()
    );
    let rows = site_rows(snap, rates, Column::Site, false, "");
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| Column::ALL.iter().map(|c| r.cell(*c, true)).collect())
        .collect();
    let numeric: Vec<bool> = Column::ALL.iter().map(|c| c.numeric()).collect();
    let heads: Vec<&str> = Column::ALL.iter().map(|c| c.title()).collect();
    layout(&mut out, &heads, &numeric, &table);
    if one_site {
        if let Some(s) = snap.status.sites.first() {
            let _ = writeln!(out);
            let cells: Vec<Vec<String>> = worker_cells(s, rates, true)
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            let numeric = [false, true, false, true, true, false, true, true, false];
            layout(&mut out, &WORKER_COLUMNS, &numeric, &cells);
        }
    }
    out
}

/// Columns padded to their widest cell (numbers to the right); the last one unpadded.
fn layout(out: &mut String, heads: &[&str], numeric: &[bool], rows: &[Vec<String>]) {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([heads[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..heads.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i + 1 == cells.len() {
                l.push_str(c);
            } else if numeric[i] {
                let _ = write!(l, "{}{c}  ", " ".repeat(pad));
            } else {
                let _ = write!(l, "{c}{}  ", " ".repeat(pad));
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(heads.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_bar_fills_in_proportion_and_marks_the_cap() {
        let m = 1 << 20;
        assert_eq!(
            memory_cell(Some(256 * m), Some(512 * m), Some(400 * m), true),
            "[#####..|..] 256M/512M"
        );
        assert_eq!(memory_cell(None, Some(512 * m), None, true), "-");
        assert_eq!(memory_cell(Some(3 * m), None, None, true), "3M");
        // Over the limit: full, never more.
        assert_eq!(
            memory_cell(Some(900 * m), Some(512 * m), None, true),
            "[##########] 900M/512M"
        );
    }

    #[test]
    fn sorts_cycle_and_put_unknown_values_last() {
        assert_eq!(Column::Site.next_sort(), Column::Ready);
        assert_eq!(Column::State.next_sort(), Column::Site);
        let row = |name: &str, ready, cpu| SiteRow {
            name: name.into(),
            state: "running".into(),
            generation: Some(1),
            deploy: None,
            ready,
            desired: ready,
            memory: None,
            budget: None,
            cap: None,
            oom: None,
            restarts: Some(0),
            cpu,
            pids: None,
            busy: Some(0),
            queue: None,
            last: String::new(),
        };
        let mut rows = [
            row("a", 1, None),
            row("b", 3, Some(1.0)),
            row("c", 2, Some(5.0)),
        ];
        let names = |rows: &[SiteRow]| rows.iter().map(|r| r.name.clone()).collect::<String>();
        rows.sort_by(|x, y| order(x, y, Column::Cpu, false));
        assert_eq!(names(&rows), "cba");
        rows.sort_by(|x, y| order(x, y, Column::Ready, false));
        assert_eq!(names(&rows), "bca");
        rows.sort_by(|x, y| order(x, y, Column::Ready, true));
        assert_eq!(names(&rows), "acb");
        rows.sort_by(|x, y| order(x, y, Column::Site, false));
        assert_eq!(names(&rows), "abc");
    }

    #[test]
    fn cpu_percent_is_the_difference_of_two_snapshots() {
        let snap = |ms, usec| {
            let text = format!(
                r#"{{"monotonic_ms":{ms},"interval_ms":1000,"summaries":[],
                "status":{{"agent":{{"pid":1,"version":"x","started_at":"t","log_bytes_dropped":0,"config":"/c","features":[]}},
                "sites":[{{"name":"a","state":"running","generation":1,"desired":1,"ready":1,
                "usage":{{"memory_current":null,"memory_peak":null,"memory_max":null,"oom_kills":null,"pids":null,"cpu_usec":{usec}}}}}]}}}}"#
            );
            serde_json::from_str::<Snapshot>(&text).expect("snapshot")
        };
        let mut r = Rates::default();
        r.update(&snap(1000, 0));
        assert_eq!(r.get("a"), None);
        r.update(&snap(2000, 250_000));
        assert_eq!(r.get("a"), Some(25.0));
        let text = plain(&snap(3000, 250_000), &r, false);
        assert!(text.contains("SITE  STATE"), "{text}");
        assert!(
            text.lines().nth(2).is_some_and(|l| l.starts_with("a ")),
            "{text}"
        );
    }
}

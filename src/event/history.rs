//! The event history: every state change that matters, said once, in three places.
//!
//! [`Agent::emit`] is the one function every emitter calls with an [`Entry`] (a worker
//! started, became ready, exited and why, a restart scheduled, a site failed, a deploy's
//! steps, a reload, a scale, an operator's request with the uid that asked). The entry goes:
//!
//! 1. to the agent's own log, with the fields `site`, `gen`, `worker`, `pid` and `kind`,
//!    for the kinds no older line of the loop already says (those keep their words, which
//!    operators and tests grep for);
//! 2. to the site's log as a marked agent line, `<time> hatchery: gen-2 w-3[1234] killed
//!    by SIGKILL`, which no worker line can look like (theirs are `w-<K>[<pid>]`,
//!    `zygote[<pid>]` or `process[<pid>]`); lines about single workers are folded like the
//!    agent's log ([`super::fold`]: the first few of a burst, then one summary), so ten
//!    thousand crashes are a few lines there;
//! 3. to `<state_dir>/events.jsonl`, one JSON object per line, every entry (the history
//!    is the record: nothing is folded), rotated by size like the site logs
//!    (`events.jsonl.1` … `.3`), and to the `events -f` clients that may see it.
//!
//! Cost: an entry is formatted (its JSON line, and its text line when it goes to a site's
//! log) and appended to a buffer; the buffers are written once per turn of the loop
//! ([`Agent::flush_history`]), one write for the history and one per site, so a mass crash
//! costs a few large writes, not one per worker. Writes are synchronous appends to
//! regular files from the loop, as the site logs' are.
//!
//! `hatchery events` ([`Agent::start_events`]) reads the history files oldest first, a
//! chunk per turn of the loop (as `logs` reads its backlog), keeps the last `lines` entries
//! the caller may see (and, with `since`, only those at or after it), sends them, then
//! follows (`-f`) or ends. Entries emitted while the files are read are held and sent
//! after them, so a follower misses none and sees none twice.
//!
//! What it does not do: it keeps no index (a query reads the files), and it does not
//! survive the loss of the state directory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::fold::{Fold, LIMITS, Verdict};
use super::{Agent, MAX_FOLLOW_BUFFER, MAX_LOG_LINES};
use crate::config::{LogPolicy, SiteName};
use crate::control::{ErrorKind, Reply};
use crate::logs;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::{Event, ShutAnswer};
use crate::supervisor::slots::{ExitReason, Note};

/// The history's file in the state directory.
pub const HISTORY_FILE: &str = "events.jsonl";

/// The history rotates at this size, keeping [`HISTORY_KEEP`] older files.
const HISTORY_MAX_SIZE: u64 = 10 << 20;
/// Rotated history files kept.
const HISTORY_KEEP: u32 = 3;
/// Most bytes a query reads at once.
const QUERY_CHUNK: usize = 64 * 1024;

/// What happened (the `kind` of an [`Entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A worker's process started (`pid`).
    Started,
    /// A worker became ready.
    Ready,
    /// A worker's process ended (`exit`, `code` or `signal`, `crash`), or could not start.
    Exited,
    /// A worker is started again after `delay_ms`.
    RestartScheduled,
    /// A worker did not stop within `stop.timeout`: its tree was killed.
    StopTimeout,
    /// A worker flapped or could not start: the site is marked failed.
    SiteFailed,
    /// A rolling restart stopped: a new process did not stay up.
    RestartFailed,
    /// Every worker of a generation stopped.
    Stopped,
    /// A rolling restart finished.
    RestartDone,
    /// The desired count of workers runs and is ready.
    Settled,
    /// A deploy started a new generation (`from`, `to`, `release`).
    DeployStarted,
    /// A deploy waits for the one under way.
    DeployQueued,
    /// A step of a deploy (its words in `message`).
    DeployStep,
    /// New connections go to generation `to`; `from` drains.
    Flipped,
    /// A deploy finished (`to`, `duration_ms`).
    Deployed,
    /// A deploy was rolled back (`reason`).
    RolledBack,
    /// A generation's last worker is gone.
    Retired,
    /// The count of workers changed (`from`, `to`, `reason`: `memory` or `load`).
    Scaled,
    /// The count asked for does not fit the memory budget.
    Capped,
    /// A health check failed.
    HealthFailed,
    /// A worker failed its health checks and is restarted.
    Unhealthy,
    /// A generation's zygote started, became ready, or was lost.
    Zygote,
    /// Workers an earlier agent left running were adopted.
    Adopted,
    /// A listener of a generation was shut down by a process holding it (`reason`: what
    /// is done about it).
    ListenerShut,
    /// The configuration was reloaded (agent-wide).
    Reload,
    /// An operator asked for something (`action`, `uid`).
    Operator,
    /// A kind this binary does not know (written by a newer one).
    #[serde(other)]
    Other,
}

/// One entry of the history, as written to `events.jsonl` and sent by `hatchery events`.
/// Fields that do not apply are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When, in UTC (`2026-11-22T14:41:08.123Z`).
    pub time: String,
    /// The site; absent for agent-wide entries (a reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The generation (`gen` on the wire).
    #[serde(rename = "gen", default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// The worker's slot (`w-<K>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
    /// The worker's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// What happened.
    pub kind: Kind,
    /// What happened, in words.
    pub message: String,
    /// How a worker ended (`exited`): `code`, `signal`, `oom`, `spawn_failed`,
    /// `ready_timeout` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// Its exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it (`SIGKILL`), or that an operator sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Whether it ended on its own (`true`) or was asked to stop (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<bool>,
    /// How long before a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// What an operator asked for: `start`, `stop`, `restart`, `scale`, `signal`,
    /// `deploy`, `rollback`, `promote`, `upgrade`, `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The count, or generation, before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// The count, or generation, after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
    /// The release deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Why (a rollback, a scale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl Entry {
    /// An entry of `kind` now, with only its words.
    pub fn new(kind: Kind, message: impl Into<String>) -> Entry {
        Entry {
            time: logs::utc_timestamp(SystemTime::now()),
            site: None,
            generation: None,
            worker: None,
            pid: None,
            kind,
            message: message.into(),
            exit: None,
            code: None,
            signal: None,
            crash: None,
            delay_ms: None,
            action: None,
            uid: None,
            from: None,
            to: None,
            release: None,
            reason: None,
            duration_ms: None,
        }
    }

    /// An entry about site `site`.
    pub fn site(site: &SiteName, kind: Kind, message: impl Into<String>) -> Entry {
        Entry {
            site: Some(site.to_string()),
            ..Entry::new(kind, message)
        }
    }

    /// An entry about worker `slot` of generation `g` of `site`.
    pub fn worker(
        site: &SiteName,
        g: GenId,
        slot: Slot,
        pid: Option<i32>,
        kind: Kind,
        message: impl Into<String>,
    ) -> Entry {
        Entry {
            generation: Some(g.0),
            worker: Some(slot.0),
            pid,
            ..Entry::site(site, kind, message)
        }
    }

    /// The exit of a worker: `exit` and its `code` or `signal`, and whether it was a
    /// crash (not asked for).
    pub fn exited(mut self, reason: &ExitReason, crash: bool) -> Entry {
        let (exit, code, signal) = match reason {
            ExitReason::Exited { code } => ("code", Some(*code), None),
            ExitReason::Signaled { signal } => {
                ("signal", None, Some(crate::config::Signal(*signal).name()))
            }
            ExitReason::OomKilled => ("oom", None, Some("SIGKILL".to_string())),
            ExitReason::SpawnFailed { .. } => ("spawn_failed", None, None),
            ExitReason::ReadyTimeout => ("ready_timeout", None, None),
            ExitReason::Unknown => ("unknown", None, None),
        };
        self.exit = Some(exit.to_string());
        self.code = code;
        self.signal = signal;
        self.crash = Some(crash);
        self
    }

    /// `gen-2 w-3[1234] `: the worker the entry is about, as the site's log and `events`
    /// say it (empty for an entry about a site or a generation: their words name it).
    pub fn who(&self) -> String {
        let mut out = Vec::new();
        self.write_who(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`Entry::who`], written at the end of `out`.
    fn write_who(&self, out: &mut Vec<u8>) {
        // Its words name the worker, as they always have in the site's log.
        let Some(w) = self.worker.filter(|_| self.kind != Kind::Unhealthy) else {
            return;
        };
        // Writing into a `Vec` cannot fail.
        if let Some(g) = self.generation {
            let _ = write!(out, "gen-{g} ");
        }
        let _ = match self.pid {
            Some(p) => write!(out, "w-{w}[{p}] "),
            None => write!(out, "w-{w} "),
        };
    }

    /// The entry as `hatchery events` prints it: time, site (`-` for the agent), who,
    /// what.
    pub fn text(&self) -> String {
        format!(
            "{} {} {}{}",
            self.time,
            self.site.as_deref().unwrap_or("-"),
            self.who(),
            self.message
        )
    }

    /// The entry as a marked agent line of its site's log.
    fn site_record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.time.len() + self.message.len() + 48);
        // Writing into a `Vec` cannot fail.
        let _ = write!(out, "{} hatchery: ", self.time);
        self.write_who(&mut out);
        out.extend_from_slice(self.message.as_bytes());
        out.push(b'\n');
        out
    }
}

/// The entry for an event of a site's machine (`Action::Log`); `pid` finds the pid of a
/// live worker. `None` for what is said elsewhere: the exit of a process (the loop emits it
/// where it reaps, with the pid and the OOM kill told apart).
pub fn entry_of(
    site: &SiteName,
    e: &Event,
    pid: impl Fn(GenId, Slot) -> Option<i32>,
) -> Option<Entry> {
    let words = || super::render::event(site, e);
    let entry = match e {
        Event::Worker {
            generation: g,
            note,
            ..
        } => {
            let g = *g;
            let w = |slot: Slot, pid: Option<i32>, kind, message: String| {
                Entry::worker(site, g, slot, pid, kind, message)
            };
            match note {
                Note::Started(slot, p) => w(*slot, Some(*p), Kind::Started, "started".into()),
                Note::Ready(slot) => w(*slot, pid(g, *slot), Kind::Ready, "ready".into()),
                Note::Exited(slot, reason @ ExitReason::SpawnFailed { .. })
                | Note::Crashed(slot, reason @ ExitReason::SpawnFailed { .. }, _) => {
                    w(*slot, None, Kind::Exited, reason.to_string()).exited(reason, true)
                }
                Note::Exited(..) | Note::Crashed(..) => return None,
                Note::RestartFailed(slot) => w(
                    *slot,
                    None,
                    Kind::RestartFailed,
                    "restart stopped here: its new process did not stay up".into(),
                ),
                Note::BackingOff(slot, ms) => {
                    let mut x = w(
                        *slot,
                        None,
                        Kind::RestartScheduled,
                        format!("restarting in {ms} ms"),
                    );
                    x.delay_ms = Some(u64::try_from(*ms).unwrap_or(u64::MAX));
                    x
                }
                Note::Killed(slot) => w(
                    *slot,
                    pid(g, *slot),
                    Kind::StopTimeout,
                    "did not stop in time: killed".into(),
                ),
                Note::Failed(slot) => w(
                    *slot,
                    None,
                    Kind::SiteFailed,
                    format!(
                        "failed (flapping or unstartable): the site is not restarted until `hatchery start {site}`"
                    ),
                ),
                Note::AllStopped => Entry {
                    generation: Some(g.0),
                    ..Entry::site(site, Kind::Stopped, "all workers stopped")
                },
                Note::RestartDone => Entry {
                    generation: Some(g.0),
                    ..Entry::site(site, Kind::RestartDone, "restart done")
                },
                Note::Settled => Entry {
                    generation: Some(g.0),
                    ..Entry::site(site, Kind::Settled, "all workers ready")
                },
            }
        }
        Event::DeployBegins {
            to, from, release, ..
        }
        | Event::StopThenStart {
            to, from, release, ..
        } => Entry {
            generation: Some(to.0),
            from: Some(from.0),
            to: Some(to.0),
            release: release.as_ref().map(|r| r.display().to_string()),
            ..Entry::site(site, Kind::DeployStarted, words())
        },
        Event::DeployQueued { behind, .. } => Entry {
            generation: Some(behind.0),
            ..Entry::site(site, Kind::DeployQueued, words())
        },
        Event::Flipped { from, to, .. } => Entry {
            generation: Some(to.0),
            from: Some(from.0),
            to: Some(to.0),
            ..Entry::site(site, Kind::Flipped, words())
        },
        Event::Deployed { generation, took } => Entry {
            generation: Some(generation.0),
            to: Some(generation.0),
            duration_ms: Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
            ..Entry::site(site, Kind::Deployed, words())
        },
        Event::RolledBack {
            generation, reason, ..
        } => Entry {
            generation: Some(generation.0),
            reason: Some(super::render::rollback_reason(reason, false)),
            ..Entry::site(site, Kind::RolledBack, words())
        },
        Event::Retired(g) => Entry {
            generation: Some(g.0),
            ..Entry::site(site, Kind::Retired, words())
        },
        Event::Resized { from, to, .. } => Entry {
            from: Some(*from),
            to: Some(*to),
            reason: Some("memory".into()),
            ..Entry::site(site, Kind::Scaled, words())
        },
        Event::LoadScaled { decision, .. } => Entry {
            from: Some(decision.from),
            to: Some(decision.to),
            reason: Some("load".into()),
            ..Entry::site(site, Kind::Scaled, words())
        },
        Event::Capped(_) | Event::DoesNotFit { .. } => Entry::site(site, Kind::Capped, words()),
        Event::HealthFailed { generation, .. } => Entry {
            generation: Some(generation.0),
            ..Entry::site(site, Kind::HealthFailed, words())
        },
        Event::Unhealthy {
            generation,
            worker,
            pid,
            ..
        } => Entry::worker(
            site,
            *generation,
            *worker,
            Some(*pid),
            Kind::Unhealthy,
            words(),
        ),
        Event::Adopted { generation, .. } => Entry {
            generation: Some(generation.0),
            ..Entry::site(site, Kind::Adopted, words())
        },
        Event::ListenerShut {
            generation, answer, ..
        } => Entry {
            generation: Some(generation.0),
            to: match answer {
                ShutAnswer::Redeploy(to) | ShutAnswer::DeployUnderWay(to) => Some(to.0),
                _ => None,
            },
            reason: Some(
                match answer {
                    ShutAnswer::Redeploy(_) => "redeploy",
                    ShutAnswer::Again => "shut_again",
                    ShutAnswer::DeployUnderWay(_) => "deploy_under_way",
                    ShutAnswer::AfterDeploy => "after_deploy",
                    ShutAnswer::AfterOlder => "after_older",
                    ShutAnswer::Stopped => "stopped",
                    ShutAnswer::Refused(_) => "refused",
                    ShutAnswer::NotRedeployed(_) => "not_redeployed",
                    ShutAnswer::Tried => "tried",
                    ShutAnswer::NotServing => "not_serving",
                }
                .into(),
            ),
            ..Entry::site(site, Kind::ListenerShut, words())
        },
        Event::ZygoteStarting(g) => Entry {
            generation: Some(g.0),
            ..Entry::site(site, Kind::Zygote, words())
        },
        Event::ZygoteReady { generation, .. }
        | Event::ZygoteNotReady { generation, .. }
        | Event::ZygoteLost { generation, .. }
        | Event::ZygoteStopped { generation, .. } => Entry {
            generation: Some(generation.0),
            ..Entry::site(site, Kind::Zygote, words())
        },
        Event::NewGrows { generation, .. }
        | Event::ProbationBegins { generation, .. }
        | Event::WarmedUp { generation, .. }
        | Event::NewStopsFirst { generation, .. }
        | Event::CanaryServes { generation, .. }
        | Event::Promoting { generation, .. }
        | Event::OldShrinks { generation, .. }
        | Event::OldStopsFirst { generation, .. }
        | Event::OldStops { generation, .. } => Entry {
            generation: Some(generation.0),
            ..Entry::site(site, Kind::DeployStep, words())
        },
        Event::OldRestarts(g) => Entry {
            generation: Some(g.0),
            ..Entry::site(site, Kind::DeployStep, words())
        },
    };
    Some(entry)
}

/// Whether the loop already says entries of this kind in the agent's log, in words of its
/// own (`render::log`, the exit of a worker, `configuration reloaded`).
fn said_elsewhere(kind: Kind) -> bool {
    !matches!(
        kind,
        Kind::Started
            | Kind::Ready
            | Kind::RestartScheduled
            | Kind::RestartFailed
            | Kind::Stopped
            | Kind::RestartDone
            | Kind::Settled
            | Kind::StopTimeout
            | Kind::Operator
    )
}

/// The kind of a site-log line that may be folded: its site and its words.
type LineKind = (String, String);

/// What the agent keeps for the history (see the module doc).
#[derive(Debug)]
pub(super) struct History {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    policy: LogPolicy,
    /// JSON lines not yet written.
    pending: Vec<u8>,
    /// Site-log records not yet written, by site.
    site_pending: BTreeMap<SiteName, Vec<Vec<u8>>>,
    /// The fold of the site-log lines about single workers.
    fold: Fold<LineKind>,
    /// `events -f` connections.
    followers: Vec<Follower>,
    /// `events` connections whose backlog is being read, by connection.
    queries: HashMap<u64, Query>,
    /// Whether a failure to write was reported (once until a write succeeds again).
    failing: bool,
}

/// An `events -f` client.
#[derive(Debug, Clone)]
struct Follower {
    conn: u64,
    filter: Filter,
}

/// Which entries a client gets.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    /// Only this site's.
    site: Option<String>,
    /// The caller, when it may not see everything: it sees the entries of the sites it
    /// owns, and no agent-wide entry.
    owner: Option<u32>,
    /// Only entries at or after this time (a timestamp as [`logs::utc_timestamp`]
    /// writes them, which sort as text in time order).
    since: Option<String>,
}

/// The backlog of an `events` request, read a chunk at a time.
#[derive(Debug)]
struct Query {
    /// The files still to read, oldest first, each with where to stop.
    files: VecDeque<(File, u64)>,
    pos: u64,
    /// An unfinished line at the end of the last chunk.
    partial: Vec<u8>,
    filter: Filter,
    /// The last `lines` matching entries found so far.
    found: VecDeque<String>,
    lines: usize,
    follow: bool,
    /// Entries emitted while the files are read, for a follower.
    held: Vec<String>,
}

impl History {
    /// The history in `state_dir` (opened at the first write).
    pub(super) fn new(state_dir: &Path) -> History {
        History {
            path: state_dir.join(HISTORY_FILE),
            file: None,
            size: 0,
            policy: LogPolicy {
                max_size: HISTORY_MAX_SIZE,
                keep: HISTORY_KEEP,
            },
            pending: Vec::new(),
            site_pending: BTreeMap::new(),
            fold: Fold::new(LIMITS),
            followers: Vec::new(),
            queries: HashMap::new(),
            failing: false,
        }
    }

    /// When a folded summary of a site's log is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.fold.next_deadline()
    }

    /// Forgets connection `conn` (closed).
    pub(super) fn forget(&mut self, conn: u64) {
        self.followers.retain(|f| f.conn != conn);
        self.queries.remove(&conn);
    }

    /// Whether connection `conn` has a backlog of entries to read.
    pub(super) fn querying(&self, conn: u64) -> bool {
        self.queries.contains_key(&conn)
    }

    /// Writes the pending JSON lines, rotating first when they would take the file past
    /// its size.
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        if self.file.is_none() {
            let f = open_append(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if self.size > 0 && self.size + data.len() as u64 > self.policy.max_size {
            self.rotate()?;
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(&data)?;
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        rotate_files(&self.path, self.policy.keep)?;
        self.file = Some(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

/// Opens `path` for appending, readable by root only (the history names every site).
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `<path>.<i>`.
fn rotated(path: &Path, i: u32) -> PathBuf {
    PathBuf::from(format!("{}.{i}", path.display()))
}

/// Shifts `path` to `path.1` (and older ones up, the oldest beyond `keep` dropped).
fn rotate_files(path: &Path, keep: u32) -> io::Result<()> {
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(rotated(path, keep));
    for i in (1..keep).rev() {
        let _ = std::fs::rename(rotated(path, i), rotated(path, i + 1));
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Parses `2026-11-22T14:41:08Z` or `2026-11-22T14:41:08.123Z` (UTC).
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let h: u64 = t.next()?.parse().ok()?;
    let m: u64 = t.next()?.parse().ok()?;
    let sec: u64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let millis: u64 = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let padded = format!("{frac:0<3}");
        padded[..3].parse().ok()?
    };
    // Howard Hinnant's days-from-civil algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + std::time::Duration::from_millis(secs * 1000 + millis))
}

/// `--since`: a duration back from `now` (`10m`, `2h`, `90s`) or a UTC timestamp, as the
/// timestamp the history's entries are compared with.
pub fn since_timestamp(arg: &str, now: SystemTime) -> Result<String, String> {
    if let Some(t) = parse_timestamp(arg) {
        return Ok(logs::utc_timestamp(t));
    }
    match crate::config::parse_duration(arg) {
        Ok(d) => Ok(logs::utc_timestamp(
            now.checked_sub(d).unwrap_or(UNIX_EPOCH),
        )),
        Err(_) => Err(format!(
            "invalid --since {arg:?}: use a duration back from now (30s, 10m, 2h) or a UTC time (2026-11-22T14:41:08Z)"
        )),
    }
}

impl Filter {
    /// Whether `e` passes, `owner_of` telling who owns a site now.
    fn passes(&self, e: &Entry, owner_of: &dyn Fn(&str) -> Option<u32>) -> bool {
        if self.site.is_some() && e.site != self.site {
            return false;
        }
        if let Some(uid) = self.owner {
            match &e.site {
                Some(s) if owner_of(s) == Some(uid) => {}
                _ => return false,
            }
        }
        match &self.since {
            Some(since) => e.time.as_str() >= since.as_str(),
            None => true,
        }
    }
}

impl Query {
    /// Reads the next chunk: whether anything is left to read.
    fn step(&mut self, owner_of: &dyn Fn(&str) -> Option<u32>) -> io::Result<bool> {
        let Some((file, end)) = self.files.front_mut() else {
            return Ok(false);
        };
        let left = end.saturating_sub(self.pos);
        let want = usize::try_from(left).map_or(QUERY_CHUNK, |n| n.min(QUERY_CHUNK));
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        self.pos += got as u64;
        let done = got == 0 || self.pos >= *end;
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(&buf);
        let upto = match memchr::memrchr(b'\n', &data) {
            Some(i) => i + 1,
            None => 0,
        };
        for line in data[..upto].split(|&b| b == b'\n') {
            self.offer(line, owner_of);
        }
        if done {
            // A line cut off at the end of a file is dropped (written half by a crash).
            self.files.pop_front();
            self.pos = 0;
        } else {
            self.partial = data[upto..].to_vec();
        }
        Ok(!self.files.is_empty())
    }

    fn offer(&mut self, line: &[u8], owner_of: &dyn Fn(&str) -> Option<u32>) {
        if line.is_empty() {
            return;
        }
        let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
            return;
        };
        if !self.filter.passes(&entry, owner_of) {
            return;
        }
        if self.found.len() == self.lines {
            self.found.pop_front();
        }
        if self.lines > 0 {
            self.found
                .push_back(String::from_utf8_lossy(line).into_owned());
        }
    }
}

/// The end of `events` (without `follow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsEnded {
    /// How many entries were sent.
    pub events: usize,
    /// The history's file.
    pub history: PathBuf,
}

impl Agent {
    /// Says `entry` in the agent's log (for the kinds nothing else says), its site's log
    /// and the history, and sends it to the `events -f` clients that may see it. Written
    /// at the end of the turn of the loop (`flush_history`).
    pub(super) fn emit(&mut self, entry: Entry) {
        // Exits handled before it are told before it (`Agent::tell_exits`).
        if !self.exits_to_tell.is_empty() {
            self.tell_exits();
        }
        if !said_elsewhere(entry.kind) {
            trace(&entry);
        }
        // Written into the pending bytes at once: no text of its own unless someone follows.
        let pending = &mut self.history.pending;
        let start = pending.len();
        if serde_json::to_writer(&mut *pending, &entry).is_err() {
            pending.truncate(start);
            return;
        }
        pending.push(b'\n');
        if !self.history.followers.is_empty() {
            let json = String::from_utf8_lossy(&pending[start..pending.len() - 1]).into_owned();
            self.send_to_followers(&entry, &json);
        }
        let Some(site) = entry.site.as_deref().and_then(|s| SiteName::new(s).ok()) else {
            return;
        };
        if !self.sites.contains_key(&site) {
            return;
        }
        // Lines about single workers fold (errors never do).
        let verdict = match entry.worker {
            Some(w) if entry.kind != Kind::SiteFailed => {
                let kind = (site.to_string(), entry.message.clone());
                let offered = self.history.fold.offer(Instant::now(), &kind, w);
                if let Some(s) = offered.ended {
                    self.fold_summary(&s);
                }
                offered.verdict
            }
            _ => Verdict::Shown,
        };
        if verdict == Verdict::Shown {
            self.history
                .site_pending
                .entry(site)
                .or_default()
                .push(entry.site_record());
        }
    }

    /// The entry for an event of site `name`'s machine, emitted (see [`entry_of`]).
    pub(super) fn emit_event(&mut self, name: &SiteName, e: &Event) {
        let entry = {
            let pid = |g: GenId, slot: Slot| self.worker_pid(name, g, slot);
            entry_of(name, e, pid)
        };
        if let Some(entry) = entry {
            self.emit(entry);
        }
    }

    /// The pid of a live worker.
    fn worker_pid(&self, name: &SiteName, g: GenId, slot: Slot) -> Option<i32> {
        Some(
            self.sites
                .get(name)?
                .io
                .gens
                .get(&g)?
                .workers
                .get(&slot)?
                .pidref
                .pid(),
        )
    }

    /// An operator's request: `action` on `site` (none: agent-wide), by `uid`, with
    /// its words (`detail`) and, for a scale, the count asked for.
    pub(super) fn emit_operator(
        &mut self,
        site: Option<&SiteName>,
        uid: u32,
        action: &str,
        detail: Option<String>,
        to: Option<u32>,
    ) {
        let message = match &detail {
            Some(d) => format!("{action} {d}, asked by uid {uid}"),
            None => format!("{action}, asked by uid {uid}"),
        };
        let mut entry = match site {
            Some(s) => Entry::site(s, Kind::Operator, message),
            None => Entry::new(Kind::Operator, message),
        };
        entry.action = Some(action.to_string());
        entry.uid = Some(uid);
        entry.to = to;
        self.emit(entry);
    }

    /// A reload went through: one agent-wide entry, and one for each site added or
    /// changed (their owners see those).
    pub(super) fn emit_reload(&mut self, added: &[String], changed: &[String], removed: &[String]) {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        self.emit(Entry::new(
            Kind::Reload,
            format!(
                "configuration reloaded: added {}; changed {}; removed {}",
                list(added),
                list(changed),
                list(removed)
            ),
        ));
        for (names, words) in [
            (added, "added by a reload"),
            (changed, "changed by a reload"),
        ] {
            for n in names {
                if let Ok(site) = SiteName::new(n) {
                    self.emit(Entry::site(&site, Kind::Reload, words));
                }
            }
        }
    }

    /// A folded summary of site-log lines, as a site-log line of its own.
    fn fold_summary(&mut self, s: &super::fold::Summary<LineKind>) {
        let Ok(site) = SiteName::new(&s.kind.0) else {
            return;
        };
        let record = format!(
            "{} hatchery: {}\n",
            logs::utc_timestamp(SystemTime::now()),
            s.describe(&s.kind.1)
        );
        self.history
            .site_pending
            .entry(site)
            .or_default()
            .push(record.into_bytes());
    }

    /// Site-log summaries due at `now` (from the loop's deadlines).
    pub(super) fn history_deadlines(&mut self, now: Instant) {
        for s in self.history.fold.due(now) {
            self.fold_summary(&s);
        }
    }

    /// Writes what was emitted since the last call: the history in one write, each
    /// site's lines in one write (then to its `logs -f` clients). Once per turn of the
    /// loop, and at shutdown (with every summary still owed).
    pub(super) fn flush_history(&mut self, all: bool) {
        self.tell_exits();
        if all {
            for s in self.history.fold.drain() {
                self.fold_summary(&s);
            }
        }
        match self.history.write_pending() {
            Ok(()) => self.history.failing = false,
            Err(e) => {
                if !self.history.failing {
                    warn!(
                        "failed to write the event history {}: {e}",
                        self.history.path.display()
                    );
                }
                self.history.failing = true;
            }
        }
        if self.history.site_pending.is_empty() {
            return;
        }
        for (site, records) in std::mem::take(&mut self.history.site_pending) {
            self.write_records(&site, &records);
        }
    }

    /// Sends an entry to the followers that may see it (held while their backlog is read).
    fn send_to_followers(&mut self, entry: &Entry, json: &str) {
        let followers = self.history.followers.clone();
        for f in followers {
            if !f.filter.passes(entry, &|s| self.site_owner(s)) {
                continue;
            }
            if let Some(q) = self.history.queries.get_mut(&f.conn) {
                q.held.push(json.to_string());
                continue;
            }
            let behind = self
                .conns
                .get(&f.conn)
                .is_some_and(|c| c.outbuf.len() > MAX_FOLLOW_BUFFER);
            if behind {
                warn!("an events -f client fell behind: dropped");
                self.finish(
                    f.conn,
                    &Reply::error(
                        ErrorKind::Failed,
                        format!(
                            "events -f dropped: more than {} KiB behind; the entries are in {}",
                            MAX_FOLLOW_BUFFER >> 10,
                            self.history.path.display()
                        ),
                    ),
                );
                continue;
            }
            self.send(f.conn, &Reply::Line(json.to_string()));
        }
    }

    /// The uid of a site's user, if it is a site.
    fn site_owner(&self, site: &str) -> Option<u32> {
        let name = SiteName::new(site).ok()?;
        self.sites.get(&name).map(|s| s.config().uid)
    }

    /// `events`: reads the history for connection `conn` (see the module doc).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_events(
        &mut self,
        conn: u64,
        admin: bool,
        uid: u32,
        site: Option<String>,
        lines: usize,
        follow: bool,
        since: Option<String>,
    ) {
        let since = match since.as_deref().map(parse_timestamp) {
            None => None,
            Some(Some(t)) => Some(logs::utc_timestamp(t)),
            Some(None) => {
                return self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::BadRequest,
                        format!(
                            "invalid since {:?}: a UTC time such as 2026-11-22T14:41:08Z",
                            since.unwrap_or_default()
                        ),
                    ),
                );
            }
        };
        let filter = Filter {
            site,
            owner: (!admin).then_some(uid),
            since,
        };
        // What was emitted so far is in the files before they are read.
        self.flush_history(false);
        let since_time = filter.since.as_deref().and_then(parse_timestamp);
        let path = self.history.path.clone();
        let mut files = VecDeque::new();
        for i in (0..=self.history.policy.keep).rev() {
            let p = if i == 0 {
                path.clone()
            } else {
                rotated(&path, i)
            };
            let Ok(f) = File::open(&p) else {
                continue;
            };
            let Ok(meta) = f.metadata() else {
                continue;
            };
            // A file last written before `since` holds nothing after it.
            let older = since_time
                .zip(meta.modified().ok())
                .is_some_and(|(since, modified)| modified < since);
            if !older {
                files.push_back((f, meta.len()));
            }
        }
        let query = Query {
            files,
            pos: 0,
            partial: Vec::new(),
            filter: filter.clone(),
            found: VecDeque::new(),
            lines: lines.min(MAX_LOG_LINES),
            follow,
            held: Vec::new(),
        };
        self.history.queries.insert(conn, query);
        if follow {
            self.history.followers.push(Follower { conn, filter });
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.held = true;
        }
        // Reads now only notice a hang-up.
        self.arm_conn_read(conn);
        self.flush(conn);
    }

    /// Reads the next chunk of an `events` client's history; once all is read, sends
    /// what was found and follows or ends. Whether anything was buffered.
    pub(super) fn pump_events(&mut self, conn: u64) -> bool {
        let Some(mut query) = self.history.queries.remove(&conn) else {
            return false;
        };
        let owners: HashMap<String, u32> = match query.filter.owner {
            Some(_) => self
                .sites
                .iter()
                .map(|(n, s)| (n.to_string(), s.config().uid))
                .collect(),
            None => HashMap::new(),
        };
        let owner_of = |s: &str| owners.get(s).copied();
        match query.step(&owner_of) {
            Ok(true) => {
                self.history.queries.insert(conn, query);
                // Nothing buffered yet: the loop comes back when the socket is writable.
                true
            }
            Ok(false) => {
                let sent = query.found.len();
                for line in query.found.drain(..).chain(query.held.drain(..)) {
                    self.send(conn, &Reply::Line(line));
                }
                if !query.follow {
                    let history = self.history.path.clone();
                    self.finish(
                        conn,
                        &Reply::ok(&EventsEnded {
                            events: sent,
                            history,
                        }),
                    );
                }
                true
            }
            Err(e) => {
                self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Failed,
                        format!("failed to read {}: {e}", self.history.path.display()),
                    ),
                );
                true
            }
        }
    }
}

/// An entry in the agent's log, with its fields (folded like other lines of workers).
fn trace(e: &Entry) {
    let site = e.site.as_deref().unwrap_or("");
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let what = format!("worker {}", e.message);
    match (e.kind, e.worker) {
        (Kind::Started | Kind::Ready, Some(w)) => {
            debug!(site, gen = e.generation, worker = w, pid = e.pid, kind, "{what}");
        }
        (_, Some(w)) => info!(site, gen = e.generation, worker = w, pid = e.pid, kind, "{what}"),
        (Kind::Settled | Kind::Stopped | Kind::RestartDone, None) => {
            debug!(site, gen = e.generation, kind, "{}", e.message);
        }
        (_, None) => info!(site, gen = e.generation, uid = e.uid, kind, "{}", e.message),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_parse_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_358_468_123);
        let text = logs::utc_timestamp(t);
        assert_eq!(parse_timestamp(&text), Some(t));
        assert_eq!(
            parse_timestamp("2026-11-22T14:41:08Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_358_468))
        );
        assert_eq!(
            parse_timestamp("2000-02-29T00:00:00.5Z"),
            Some(UNIX_EPOCH + Duration::from_millis(951_782_400_500))
        );
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T14:41:08",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_795_358_468);
        assert_eq!(
            since_timestamp("10m", now).expect("duration"),
            "2026-11-22T14:31:08.000Z"
        );
        assert!(since_timestamp("yesterday", now).is_err());
    }

    #[test]
    fn entries_serialize_without_empty_fields_and_read_unknown_kinds() {
        let site = SiteName::new("blog").expect("name");
        let e = Entry::worker(
            &site,
            GenId(2),
            Slot(3),
            Some(1234),
            Kind::Exited,
            "killed by SIGKILL",
        )
        .exited(&ExitReason::Signaled { signal: 9 }, true);
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["kind"], "exited");
        assert_eq!(json["signal"], "SIGKILL");
        assert_eq!(json["exit"], "signal");
        assert_eq!(json["pid"], 1234);
        assert!(json.get("uid").is_none(), "{json}");
        assert!(
            e.text()
                .ends_with(" blog gen-2 w-3[1234] killed by SIGKILL")
        );
        let record = String::from_utf8(e.site_record()).expect("utf-8");
        assert!(record.ends_with(" hatchery: gen-2 w-3[1234] killed by SIGKILL\n"));
        let newer: Entry = serde_json::from_str(
            r#"{"time":"2026-01-01T00:00:00.000Z","kind":"teleported","message":"x","extra":1}"#,
        )
        .expect("a newer agent's entry reads");
        assert_eq!(newer.kind, Kind::Other);
    }

    fn query(files: Vec<(File, u64)>, filter: Filter, lines: usize) -> Vec<Entry> {
        let mut q = Query {
            files: files.into(),
            pos: 0,
            partial: Vec::new(),
            filter,
            found: VecDeque::new(),
            lines,
            follow: false,
            held: Vec::new(),
        };
        let owner_of = |s: &str| (s == "mine").then_some(1000);
        while q.step(&owner_of).expect("read") {}
        q.found
            .iter()
            .map(|l| serde_json::from_str(l).expect("entry"))
            .collect()
    }

    #[test]
    fn the_history_rotates_and_a_query_reads_across_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = History::new(dir.path());
        h.policy = LogPolicy {
            max_size: 4096,
            keep: 2,
        };
        let mine = SiteName::new("mine").expect("name");
        let theirs = SiteName::new("theirs").expect("name");
        for i in 0..100u32 {
            let site = if i % 2 == 0 { &mine } else { &theirs };
            let mut e = Entry::site(site, Kind::Settled, format!("entry {i}"));
            e.time = logs::utc_timestamp(UNIX_EPOCH + Duration::from_secs(u64::from(i)));
            h.pending
                .extend_from_slice(serde_json::to_string(&e).expect("json").as_bytes());
            h.pending.push(b'\n');
            // A few entries per write, as a turn of the loop would.
            if i % 4 == 3 {
                h.write_pending().expect("write");
            }
        }
        h.write_pending().expect("write");
        assert!(rotated(&h.path, 2).exists() && !rotated(&h.path, 3).exists());
        let open = || {
            (0..=2)
                .rev()
                .filter_map(|i| {
                    let p = if i == 0 {
                        h.path.clone()
                    } else {
                        rotated(&h.path, i)
                    };
                    let f = File::open(p).ok()?;
                    let len = f.metadata().ok()?.len();
                    Some((f, len))
                })
                .collect::<Vec<_>>()
        };
        let all = Filter {
            site: None,
            owner: None,
            since: None,
        };
        let last = query(open(), all.clone(), 5);
        let words: Vec<&str> = last.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            words,
            ["entry 95", "entry 96", "entry 97", "entry 98", "entry 99"]
        );
        let many = query(open(), all.clone(), 1000);
        assert!(
            many.len() > 40,
            "more than the current file: {}",
            many.len()
        );
        assert_eq!(many.last().map(|e| e.message.as_str()), Some("entry 99"));
        // An owner sees its own site only; `since` cuts by time.
        let owner = Filter {
            site: None,
            owner: Some(1000),
            since: Some(logs::utc_timestamp(UNIX_EPOCH + Duration::from_secs(90))),
        };
        let seen = query(open(), owner, 1000);
        let words: Vec<&str> = seen.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            words,
            ["entry 90", "entry 92", "entry 94", "entry 96", "entry 98"]
        );
        let theirs_only = Filter {
            site: Some("theirs".into()),
            owner: None,
            since: None,
        };
        assert!(
            query(open(), theirs_only, 3)
                .iter()
                .all(|e| e.site.as_deref() == Some("theirs"))
        );
    }
}

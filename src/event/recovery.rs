//! The record of live workers (`<state_dir>/workers.json`), and what a starting agent does
//! with the workers an earlier agent left running.
//!
//! The file lists every live worker process: site, generation, slot, pid, its start time
//! (field 22 of `/proc/<pid>/stat`, clock ticks since boot) and its cgroup leaf, under a
//! format version and the boot id (start times mean nothing across a reboot). It is
//! rewritten atomically (a temporary file in the same directory, then `rename`) at most
//! once per iteration of the event loop: spawns and exits only mark it dirty, so a thousand
//! workers crashing at once cost one write.
//!
//! At startup, before any site binds or starts, a new agent reads it (a missing file is
//! normal; an unreadable or corrupt one is logged and ignored) and, for each recorded
//! worker that is still the same process ([`PidRef::open_verified`]: pidfd first, then the
//! start time, then the null signal), stops it:
//!
//! 1. Its process group's other members are pinned by pidfd (without cgroups they hold the
//!    listeners too, and the group id may be freed once the leader is reaped by init).
//! 2. The stop signal of its site (`SIGTERM` if the site is gone) through its pidfd.
//! 3. Wait for its pidfd to poll readable (it is not our child: `waitid` gives `ECHILD`),
//!    up to the site's `stop.timeout`, at most [`MAX_STOP_WAIT`].
//! 4. Kill its tree: `cgroup.kill` of its leaf when it had one and cgroups are in use,
//!    else `SIGKILL` to its group while the leader is unreaped (so the group id is its),
//!    and to each pinned member through its pidfd. The leaf is never used again (a leaf
//!    that received `cgroup.kill` kills later children on 6.18); the cgroup sweep that
//!    follows buries it.
//! 5. Wait (at most [`KILL_GRACE`]) for every pinned process to exit, so that no listener
//!    of the old set is open when the sites bind.
//!
//! Adoption (resuming supervision of these workers instead of stopping them) is not done
//! here yet: issue 11. A member forked into the group after step 1 whose leader was
//! already reaped is missed without cgroups; with cgroups the sweep kills whatever is
//! left in the tree.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::Agent;
use crate::cgroup::CgroupTree;
use crate::config::SiteConfig;
use crate::process::PidRef;

/// The file's name in the state directory.
const WORKERS_FILE: &str = "workers.json";
/// The version of the format written; other versions are ignored.
const FORMAT_VERSION: u32 = 1;
/// Where the kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// The longest wait for a previous agent's worker to honour its stop signal.
pub(super) const MAX_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a killed previous worker has to disappear.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The record of live workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersFile {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The boot the start times count from.
    pub boot_id: String,
    /// Every live worker.
    pub workers: Vec<WorkerRecord>,
}

/// One live worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub site: String,
    pub generation: u32,
    pub slot: u32,
    pub pid: i32,
    /// Clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// Its cgroup leaf, with cgroups.
    pub cgroup: Option<PathBuf>,
}

/// Why the file was not read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0} is not a record of workers")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    #[error("{path} has format version {found}, this agent reads {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Where the record is kept.
pub fn workers_file(state_dir: &Path) -> PathBuf {
    state_dir.join(WORKERS_FILE)
}

/// This boot's id ("" if the kernel does not say).
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Reads the record; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<WorkersFile>, LoadError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Read(path.to_path_buf(), e)),
    };
    let file: WorkersFile =
        serde_json::from_slice(&text).map_err(|e| LoadError::Corrupt(path.to_path_buf(), e))?;
    if file.version != FORMAT_VERSION {
        return Err(LoadError::Version {
            path: path.to_path_buf(),
            found: file.version,
        });
    }
    Ok(Some(file))
}

/// Replaces the record atomically: a reader sees the old file or the new one, never a
/// part, even if the agent dies mid-write.
pub fn save(path: &Path, file: &WorkersFile) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(file).map_err(io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    // No fsync: it blocked the loop 3-7 ms per write with 1000 workers, for nothing. An
    // agent that dies leaves the page cache to the next one; after a crash of the host the
    // boot id differs (and a torn file is corrupt), so the record is ignored either way.
    drop(f);
    std::fs::rename(&tmp, path)
}

/// A recorded worker found alive, and what must die with it.
struct Previous {
    record: WorkerRecord,
    pidref: PidRef,
    /// Other members of its process group, pinned before anything was signalled.
    members: Vec<PidRef>,
    signal: i32,
    timeout: Duration,
    /// It exited, or was killed and given up on.
    settled: bool,
    killed: bool,
}

/// Stops the workers a previous agent left running (module doc, steps 1–5), before any
/// site binds. Never fails: what cannot be read or stopped is logged.
pub(super) fn stop_previous_workers(
    state_dir: &Path,
    sites: &[SiteConfig],
    cgroups: Option<&CgroupTree>,
) {
    let path = workers_file(state_dir);
    stop_recorded(&path, sites, cgroups);
    // The loop writes the record of this agent's own workers once they start.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!("failed to remove {}: {e}", path.display());
        }
        _ => {}
    }
}

fn stop_recorded(path: &Path, sites: &[SiteConfig], cgroups: Option<&CgroupTree>) {
    let file = match load(path) {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            error!(
                "ignoring the record of a previous agent's workers: {e}: {}",
                super::error_chain(&e)
            );
            return;
        }
    };
    if file.boot_id != boot_id() {
        info!(
            "the record of a previous agent's workers ({}) is from another boot: ignored",
            path.display()
        );
        return;
    }
    let mut found: Vec<Previous> = Vec::new();
    for record in file.workers {
        let Some(pidref) = PidRef::open_verified(record.pid, record.start_time) else {
            debug!(
                site = record.site,
                gen = record.generation,
                worker = record.slot,
                pid = record.pid,
                "a previous agent's worker is gone (or its pid is another process's now): left alone"
            );
            continue;
        };
        let stop = sites
            .iter()
            .find(|s| s.name.as_str() == record.site)
            .map(|s| s.stop);
        let members = if record.cgroup.is_some() && cgroups.is_some() {
            Vec::new()
        } else {
            crate::process::group_members(record.pid, record.pid)
        };
        found.push(Previous {
            signal: stop.map_or(libc::SIGTERM, |s| s.signal.0),
            timeout: stop.map_or(MAX_STOP_WAIT, |s| s.timeout.min(MAX_STOP_WAIT)),
            record,
            pidref,
            members,
            settled: false,
            killed: false,
        });
    }
    if found.is_empty() {
        return;
    }
    let pids: Vec<String> = found.iter().map(|p| p.record.pid.to_string()).collect();
    warn!(
        "found {} workers of a previous agent (pids {}): stopping them before starting the sites (adoption is not implemented yet)",
        found.len(),
        pids.join(" ")
    );
    let start = Instant::now();
    for p in &found {
        if let Err(e) = p.pidref.signal(p.signal) {
            error!(
                site = p.record.site,
                pid = p.record.pid,
                "failed to signal a previous agent's worker: {e}"
            );
        }
    }
    // Wait for each to exit; kill the tree of each whose timeout passes, and stop waiting
    // for it after KILL_GRACE more (the last wait below reports it).
    loop {
        let now = Instant::now();
        for p in found.iter_mut().filter(|p| !p.settled) {
            if p.pidref.has_exited() || (p.killed && now >= start + p.timeout + KILL_GRACE) {
                p.settled = true;
            } else if !p.killed && now >= start + p.timeout {
                warn!(
                    site = p.record.site,
                    pid = p.record.pid,
                    "a previous agent's worker did not stop within {:?}: killing its process tree",
                    p.timeout
                );
                kill_tree(p, cgroups);
                p.killed = true;
            }
        }
        let waiting: Vec<&Previous> = found.iter().filter(|p| !p.settled).collect();
        let Some(next) = waiting
            .iter()
            .map(|p| start + p.timeout + if p.killed { KILL_GRACE } else { Duration::ZERO })
            .min()
        else {
            break;
        };
        wait_any(&waiting, next.saturating_duration_since(now));
    }
    // What the workers leave behind in their trees goes with them.
    for p in found.iter_mut().filter(|p| !p.killed) {
        kill_tree(p, cgroups);
    }
    let left: Vec<&PidRef> = found
        .iter()
        .flat_map(|p| std::iter::once(&p.pidref).chain(&p.members))
        .collect();
    let deadline = Instant::now() + KILL_GRACE;
    while left.iter().any(|p| !p.has_exited()) && Instant::now() < deadline {
        let waiting: Vec<&PidRef> = left.iter().copied().filter(|p| !p.has_exited()).collect();
        poll_exits(&waiting, deadline.saturating_duration_since(Instant::now()));
    }
    let alive: Vec<String> = left
        .iter()
        .filter(|p| !p.has_exited())
        .map(|p| p.pid().to_string())
        .collect();
    if alive.is_empty() {
        info!(
            "stopped {} workers of a previous agent (pids {}) in {} ms",
            found.len(),
            pids.join(" "),
            start.elapsed().as_millis()
        );
    } else {
        error!(
            "processes of a previous agent's workers survived SIGKILL for {KILL_GRACE:?} (uninterruptible?): pids {}",
            alive.join(" ")
        );
    }
}

/// Step 4 of the module doc for one previous worker.
fn kill_tree(p: &Previous, cgroups: Option<&CgroupTree>) {
    if let (Some(tree), Some(leaf)) = (cgroups, &p.record.cgroup) {
        if leaf.is_dir() {
            match tree.kill(leaf) {
                Ok(()) => return,
                Err(e) => warn!(
                    site = p.record.site,
                    pid = p.record.pid,
                    "failed to kill the leaf of a previous agent's worker: {e}"
                ),
            }
        }
    }
    // The group id is the leader's pid: only while the leader is unreaped is it certain
    // not to name another group.
    if p.pidref.is_unreaped() {
        let _ = p.pidref.signal_group(libc::SIGKILL);
    }
    let _ = p.pidref.signal(libc::SIGKILL);
    for m in &p.members {
        let _ = m.signal(libc::SIGKILL);
    }
}

fn wait_any(waiting: &[&Previous], timeout: Duration) {
    let fds: Vec<&PidRef> = waiting.iter().map(|p| &p.pidref).collect();
    poll_exits(&fds, timeout);
}

/// Blocks until one of `procs` has exited or `timeout` passes.
fn poll_exits(procs: &[&PidRef], timeout: Duration) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds: Vec<PollFd<'_>> = procs
        .iter()
        .map(|p| PollFd::new(*p, PollFlags::IN))
        .collect();
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // EINTR: the caller loops with its own deadline.
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}

impl Agent {
    /// Rewrites the record of live workers if a worker started or exited since the last
    /// write (once per loop iteration).
    pub(super) fn save_workers(&mut self) {
        if !self.workers_dirty {
            return;
        }
        self.workers_dirty = false;
        let mut workers = Vec::new();
        for (name, site) in &self.sites {
            for (g, gen_io) in &site.io.gens {
                for (slot, w) in &gen_io.workers {
                    let Some(start_time) = w.start_time else {
                        continue;
                    };
                    workers.push(WorkerRecord {
                        site: name.to_string(),
                        generation: g.0,
                        slot: slot.0,
                        pid: w.pidref.pid(),
                        start_time,
                        cgroup: w.cgroup.clone(),
                    });
                }
            }
        }
        let file = WorkersFile {
            version: FORMAT_VERSION,
            boot_id: self.boot_id.clone(),
            workers,
        };
        let path = workers_file(&self.config.state_dir);
        if let Err(e) = save(&path, &file) {
            error!("failed to write {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: i32, start_time: u64) -> WorkerRecord {
        WorkerRecord {
            site: "web".into(),
            generation: 3,
            slot: 1,
            pid,
            start_time,
            cgroup: Some("/sys/fs/cgroup/hatchery/sites/web/gen-3/w-1".into()),
        }
    }

    #[test]
    fn the_record_survives_a_round_trip_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = workers_file(dir.path());
        assert!(load(&path).expect("no file is fine").is_none());
        let mut file = WorkersFile {
            version: FORMAT_VERSION,
            boot_id: boot_id(),
            workers: vec![record(10, 20), record(11, 21)],
        };
        file.workers[1].cgroup = None;
        save(&path, &file).expect("save");
        assert_eq!(load(&path).expect("load"), Some(file.clone()));
        file.workers.pop();
        save(&path, &file).expect("save again");
        assert_eq!(load(&path).expect("load"), Some(file));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [WORKERS_FILE], "no temporary file is left");
    }

    #[test]
    fn a_corrupt_or_foreign_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = workers_file(dir.path());
        for text in ["", "{", "[]", "{\"version\":1}", "\u{0}\u{1}garbage"] {
            std::fs::write(&path, text).expect("write");
            assert!(
                matches!(load(&path), Err(LoadError::Corrupt(..))),
                "{text:?}"
            );
        }
        std::fs::write(
            &path,
            format!(
                "{{\"version\":99,\"boot_id\":\"{}\",\"workers\":[]}}",
                boot_id()
            ),
        )
        .expect("write");
        assert!(matches!(
            load(&path),
            Err(LoadError::Version { found: 99, .. })
        ));
    }

    /// A recorded pid that now names a process with another start time is left alone:
    /// here this test process itself, which must not receive the stop signal (SIGTERM
    /// would end the test run).
    #[test]
    fn a_recorded_pid_with_another_start_time_is_not_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = i32::try_from(std::process::id()).expect("a pid fits");
        let real = crate::process::read_stat(me).expect("stat").start_time;
        let path = workers_file(dir.path());
        let file = WorkersFile {
            version: FORMAT_VERSION,
            boot_id: boot_id(),
            workers: vec![record(me, real + 1), record(me, real.saturating_sub(1))],
        };
        save(&path, &file).expect("save");
        let started = Instant::now();
        stop_previous_workers(dir.path(), &[], None);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "nothing was waited for"
        );
        assert!(!path.exists(), "the record is consumed");
        // Still here, and a record of a corrupt file does not stop the agent either.
        std::fs::write(&path, "{").expect("write");
        stop_previous_workers(dir.path(), &[], None);
    }
}

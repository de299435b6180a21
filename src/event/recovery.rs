//! The record of a running agent (`<state_dir>/workers.json`), and what a starting agent
//! does with the workers an earlier one left running: it adopts them.
//!
//! The file holds, under a format version and the boot id (start times mean nothing across
//! a reboot), for each site: its machine's record (generations, which one serves, the
//! workers asked for, whether it runs, each worker's slot, pid, readiness and restarts:
//! [`MachineRecord`]), the text of its file as the workers were started from it, and the
//! kernel's side of each generation: its listeners' socket inodes, and each worker's start
//! time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) and cgroup leaf. It is
//! rewritten atomically (a temporary file in the same directory, then `rename`; the file
//! replaced is removed by a thread of its own, so that the release of its blocks never
//! holds the loop) at most once per iteration of the event loop, and only when it changed,
//! so a thousand workers crashing at once cost one write. Writing it takes time in
//! proportion to the workers (about 2 ms for 10,000 on an idle CPU, 10 ms on one shared
//! with a stop's exits), so after each write the next waits [`SAVE_SPACING`] times as long
//! as that one took (at most [`MAX_SAVE_DELAY`]): the agent spends at most 1/20 of its time
//! on it while a write takes under 5 ms, and the record is at most that late. Only workers
//! coming and going are spaced out so, and their change waits at least
//! [`WORKERS_SAVE_DELAY`] (2 ms), so that the workers just started finish their `execve`
//! before the write takes the CPU; workers that left when told to (a stop, a drain, a scale
//! down, a restart) are not written for that alone, only with the next change of another
//! kind (the last exit of a stop or a drain is one: the site stopped, the generation gone)
//! ([`Unsaved::Departures`]: a record that still lists them is safe). A change of a site's
//! generations (a deploy's flip, a generation told to stop), of its workers asked for or
//! of whether it runs is written at the end of the iteration it happened in, and whatever
//! is pending is written before an authorized control request is handled (what a client
//! is then told of the workers that came and went before it is recorded; a reply that
//! comes later, such as the end of a rolling restart, may precede the record of its last
//! workers by that window). A worker started in that window before an agent crash is
//! missing from the record: with cgroups the next agent's sweep kills it (its leaf is no
//! adopted worker's); without, it runs on unsupervised.
//!
//! At startup, before any site binds or starts, a new agent reads it (a missing file is
//! normal; an unreadable, corrupt or foreign one is logged and ignored) and opens each
//! recorded worker that is still the same process ([`PidRef::open_verified`]: pidfd
//! first, then the start time, then the null signal). A recycled pid is never adopted.
//! For each site still configured it then:
//!
//! 1. builds the site's machine from the record of the workers found alive
//!    ([`SiteMachine::adopt`]: which generation is kept, what is started and stopped; a
//!    deploy in flight is rolled back if it had not flipped, finished if it had);
//! 2. takes the kept generation's listeners back from one of its workers (or any worker
//!    holding the same socket) with `pidfd_getfd`, by the recorded inode;
//! 3. recovers each steered listener's maps by their recorded ids (the program stays
//!    attached to the reuseport group, and a socket can be in one sockarray only) and
//!    steers to the kept generation, ending a canary; where they cannot be recovered the
//!    site's generations share their listener (deploys still work, canaries and
//!    warm-ups are refused);
//! 4. watches each adopted worker's pidfd: they are not its children, so an exit is seen
//!    when the pidfd polls readable, and told by the kernel from 6.15 (`PIDFD_INFO_EXIT`),
//!    else reported as unknown; an OOM kill is still told by the worker's leaf;
//! 5. if the file of the site changed while no agent ran, builds the machine from the
//!    recorded text and applies the new one as a reload would, once the agent runs.
//!
//! A site whose file is still there but no longer loads (invalid, or put aside for an
//! address or a budget another file holds) is adopted the same way with the recorded text
//! alone, and shown with its file's error: as a reload of that file would have been refused
//! while the agent ran, its agent's restart does not stop it either (`reload` applies the
//! file once it is mended).
//!
//! A site that is no longer configured (its file removed), whose listeners cannot be taken
//! back, or whose record numbers a worker beyond [`crate::config::MAX_WORKERS`] (a damaged
//! record: the number is the worker's place in the site's slots) has its workers stopped
//! instead, before anything binds (never two sets on one port):
//!
//! 1. Its process group's other members are pinned by pidfd (without cgroups they hold the
//!    listeners too, and the group id may be freed once the leader is reaped by its new
//!    parent: init, or the keeper).
//! 2. The first signal of its site's stop sequence through its pidfd: of the site as
//!    configured now, or, for a site gone from the configuration, as recorded when its
//!    workers started (`SIGTERM` and [`MAX_STOP_WAIT`] if that no longer reads).
//! 3. Wait for its pidfd to poll readable (it is not our child: `waitid` gives `ECHILD`),
//!    up to the site's `stop.timeout`, then send the sequence's next signal and wait again,
//!    to its end; all the waits together at most [`MAX_STOP_WAIT`] (each step its share).
//! 4. Kill its tree: `cgroup.kill` of its leaf when it had one and cgroups are in use,
//!    else `SIGKILL` to its group while the leader is unreaped (so the group id is its),
//!    and to each pinned member through its pidfd. The leaf is never used again (a leaf
//!    that received `cgroup.kill` kills later children on 6.18); the cgroup sweep that
//!    follows buries it.
//! 5. Wait (at most [`KILL_GRACE`]) for every pinned process to exit, so that no listener
//!    of the old set is open when the sites bind.
//!
//! A member forked into the group after step 1 whose leader was already reaped is missed
//! without cgroups; with cgroups the sweep kills whatever is left in the tree, except the
//! leaves of adopted workers.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::Agent;
use crate::cgroup::CgroupTree;
use crate::config::{Signal, SiteConfig, StopPolicy};
use crate::net::Listener;
use crate::process::PidRef;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::{Action, MachineRecord, SiteMachine};

/// The file's name in the state directory.
const WORKERS_FILE: &str = "workers.json";
/// The version of the format written; other versions are ignored (an upgrade to a binary
/// that reads another is refused).
pub const FORMAT_VERSION: u32 = 2;
/// Where the kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// The longest wait for a previous agent's worker to honour its stop signal.
pub(super) const MAX_STOP_WAIT: Duration = Duration::from_secs(10);
/// After a write of the record, the next waits this many times as long as it took.
const SAVE_SPACING: u32 = 20;
/// The longest the record waits to be written again.
const MAX_SAVE_DELAY: Duration = Duration::from_millis(100);
/// How long a record changed by workers coming or going alone waits to be written: the
/// workers started in the same turn are then past their `execve` (a restarted worker's
/// `execve` finished after the write, 0.2-0.4 ms later with 100 workers, when both were on
/// one CPU).
const WORKERS_SAVE_DELAY: Duration = Duration::from_millis(2);
/// How long a killed previous worker has to disappear.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The record of a running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersFile {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The boot the start times count from.
    pub boot_id: String,
    /// Every site that has a worker (or a machine worth resuming).
    pub sites: Vec<SiteRecord>,
}

/// One site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    /// The text of the site's file its machine was configured from.
    pub config_text: Option<String>,
    pub machine: MachineRecord,
    /// The kernel's side of each generation with a process.
    pub gens: Vec<GenIoRecord>,
    /// Per listener of the serving generation: the ids of its steering maps (`cfg`,
    /// `socks`), where it is steered.
    #[serde(default)]
    pub steering: Vec<Option<[u32; 2]>>,
}

/// The kernel's side of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenIoRecord {
    pub id: u32,
    /// The socket inode of each of its listeners, in the order of the site's `listen`.
    pub listeners: Vec<u64>,
    pub workers: Vec<WorkerRecord>,
}

/// One live worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
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
    // The version first: a file of another format is told as such, not as corrupt.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    if let Ok(v) = serde_json::from_slice::<Versioned>(&text) {
        if v.version != FORMAT_VERSION {
            return Err(LoadError::Version {
                path: path.to_path_buf(),
                found: v.version,
            });
        }
    }
    let file: WorkersFile =
        serde_json::from_slice(&text).map_err(|e| LoadError::Corrupt(path.to_path_buf(), e))?;
    Ok(Some(file))
}

/// Replaces the record atomically (`write` writes it into a temporary file, renamed over
/// `path` if `write` says to keep it, removed if not): a reader sees the old file or the
/// new one, never a part, even if the agent dies mid-write.
fn save_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> io::Result<bool>,
) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    if !write(&mut f)? {
        drop(f);
        return std::fs::remove_file(&tmp);
    }
    // No fsync: it blocked the loop 3-7 ms per write with 1000 workers, for nothing. An
    // agent that dies leaves the page cache to the next one; after a crash of the host the
    // boot id differs (and a torn file is corrupt), so the record is ignored either way.
    drop(f);
    // The record replaced keeps a second name across the `rename`, which a thread of its
    // own then removes: the last name gone frees its blocks, and on a file system mounted
    // with `discard` (ext4 here) that waits for the device to discard them, 1 to 3 ms for
    // the record of 10,000 workers, during which the loop would handle nothing. (No fd is
    // held instead: a child started meanwhile would copy it, and could close it last.) A
    // second name still there (its removal not done yet, or left by an agent that died) is
    // removed in the same way, and this record released here.
    let spare = path.with_extension("json.replaced");
    let kept = std::fs::hard_link(path, &spare);
    std::fs::rename(&tmp, path)?;
    if kept.is_ok() || spare.exists() {
        remove_elsewhere(spare);
    }
    Ok(())
}

/// Removes `path` on a thread of its own (started at the first call), so that whatever the
/// removal waits for does not hold the caller; removed here if there is no such thread.
fn remove_elsewhere(path: PathBuf) {
    use std::sync::{OnceLock, mpsc};
    static REMOVER: OnceLock<Option<mpsc::Sender<PathBuf>>> = OnceLock::new();
    let remover = REMOVER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        std::thread::Builder::new()
            .name("hatchery-rm".into())
            .spawn(move || {
                for path in rx {
                    let _ = std::fs::remove_file(path);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let unsent = match remover {
        Some(tx) => tx.send(path).err().map(|e| e.0),
        None => Some(path),
    };
    if let Some(path) = unsent {
        let _ = std::fs::remove_file(path);
    }
}

/// A `Write` that hashes what it passes on to `out`.
struct HashWriter<W> {
    hasher: std::collections::hash_map::DefaultHasher,
    out: W,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        std::hash::Hasher::write(&mut self.hasher, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A recorded worker found alive, and what must die with it.
struct Previous {
    site: String,
    record: WorkerRecord,
    pidref: PidRef,
    /// Other members of its process group, pinned before anything was signalled.
    members: Vec<PidRef>,
    /// Its stop sequence, each wait cut to its share of [`MAX_STOP_WAIT`].
    stop: StopPolicy,
    /// The step of the sequence sent last (0: the first signal), and when.
    step: usize,
    step_at: Instant,
    /// It exited, or was killed and given up on.
    settled: bool,
    killed: bool,
}

/// A worker of an earlier agent, found alive: adopted, or stopped.
pub(super) struct Alive {
    pub slot: Slot,
    pub pidref: PidRef,
    pub record: WorkerRecord,
    /// Its parent when it was found (this agent itself after `hatchery upgrade`).
    pub parent: i32,
}

/// A site whose workers are adopted (module doc, steps 1–3): its machine and the actions
/// it starts with, its listeners taken back, its live workers by generation.
pub(super) struct Adoption {
    pub machine: SiteMachine,
    pub actions: Vec<Action>,
    pub listeners: Vec<Listener>,
    pub workers: BTreeMap<GenId, Vec<Alive>>,
    /// The configuration to apply once the agent runs: the site's file changed while no
    /// agent ran (the machine was built from the recorded text).
    pub changed: Option<SiteConfig>,
    /// The text of the file the machine's configuration came from.
    pub config_text: Option<String>,
    /// The recorded ids of each listener's steering maps.
    pub steering: Vec<Option<[u32; 2]>>,
}

/// Stops the adopted workers of a site that could not be set up after all (steps 2–5).
pub(super) fn stop_adopted(
    config: &SiteConfig,
    workers: BTreeMap<GenId, Vec<Alive>>,
    cgroups: Option<&CgroupTree>,
) {
    stop_all(
        to_stop(config.name.as_str(), workers, Some(config), cgroups),
        cgroups,
    );
}

/// The configuration each site of the record with a worker still alive runs with (its
/// recorded text, read with the agent file as it is now), by name: what the site files are
/// loaded beside (`config::load_each_running`). Empty without a record of this boot; what
/// cannot be read is logged by [`recover`].
pub(super) fn running_configs(
    state_dir: &Path,
    agent_file: &Path,
    sites_dir: &Path,
) -> BTreeMap<String, SiteConfig> {
    let Ok(Some(file)) = load(&workers_file(state_dir)) else {
        return BTreeMap::new();
    };
    if file.boot_id != boot_id() {
        return BTreeMap::new();
    }
    file.sites
        .iter()
        // One live worker is enough (the first looked at, as a rule): not each opened.
        .filter(|site| {
            site.gens
                .iter()
                .flat_map(|g| &g.workers)
                .any(|w| PidRef::open_verified_stat(w.pid, w.start_time).is_some())
        })
        .filter_map(|site| {
            let text = site.config_text.as_deref()?;
            let path = sites_dir.join(format!("{}.toml", site.name));
            let config = crate::config::site_from_text(agent_file, &path, text).ok()?;
            Some((site.name.clone(), config))
        })
        .collect()
}

/// Reads the record an earlier agent left and sorts out its live workers: those of sites
/// still configured are adopted where their listeners can be taken back; the others are
/// stopped here (module doc, steps 1–5), before any site binds. Never fails: what cannot
/// be read, adopted or stopped is logged.
pub(super) fn recover(
    state_dir: &Path,
    agent_file: &Path,
    sites: &[SiteConfig],
    invalid: &BTreeMap<String, PathBuf>,
    cgroups: Option<&CgroupTree>,
) -> BTreeMap<String, Adoption> {
    let path = workers_file(state_dir);
    let file = match load(&path) {
        Ok(Some(f)) => f,
        Ok(None) => return BTreeMap::new(),
        Err(e) => {
            error!(
                "ignoring the record of a previous agent's workers: {e}: {}",
                super::error_chain(&e)
            );
            return BTreeMap::new();
        }
    };
    if file.boot_id != boot_id() {
        info!(
            "the record of a previous agent's workers ({}) is from another boot: ignored",
            path.display()
        );
        return BTreeMap::new();
    }
    let mut adopted = BTreeMap::new();
    let mut strays: Vec<Previous> = Vec::new();
    for site in file.sites {
        let alive = open_alive(&site);
        let recorded;
        let config = match sites.iter().find(|c| c.name.as_str() == site.name) {
            Some(config) => config,
            None => {
                // What the workers run with, if that still reads.
                let file = invalid.get(&site.name).cloned();
                recorded = site.config_text.as_deref().and_then(|text| {
                    let path = file
                        .clone()
                        .unwrap_or_else(|| Path::new(&site.name).with_extension("toml"));
                    crate::config::site_from_text(agent_file, &path, text).ok()
                });
                match (&file, &recorded) {
                    // Its file is there but does not load: run on as recorded.
                    (Some(_), Some(config)) => config,
                    // Gone from the configuration: stopped as the text it ran with says (its
                    // stop sequence and timeout).
                    _ => {
                        if file.is_some() && !alive.is_empty() {
                            warn!(
                                site = site.name,
                                "its file does not load and the configuration its workers run with is not recorded (or no longer reads): stopping them"
                            );
                        }
                        strays.extend(to_stop(&site.name, alive, recorded.as_ref(), cgroups));
                        continue;
                    }
                }
            }
        };
        let count: usize = alive.values().map(Vec::len).sum();
        let as_recorded = invalid.contains_key(config.name.as_str());
        match adopt_site(site, alive, config, state_dir, agent_file, as_recorded) {
            Ok(a) => {
                info!(
                    site = %config.name,
                    "adopting {count} workers of a previous agent (gen-{} serving){}",
                    a.machine.serving(),
                    if as_recorded {
                        " with the configuration they run with: its file does not load"
                    } else {
                        ""
                    }
                );
                adopted.insert(config.name.to_string(), a);
            }
            Err((why, alive)) => {
                warn!(site = %config.name, "cannot adopt the workers of a previous agent ({why}): stopping them");
                strays.extend(to_stop(config.name.as_str(), alive, Some(config), cgroups));
            }
        }
    }
    stop_all(strays, cgroups);
    adopted
}

/// The recorded workers of a site that are still the processes recorded, by generation.
fn open_alive(site: &SiteRecord) -> BTreeMap<GenId, Vec<Alive>> {
    let mut out: BTreeMap<GenId, Vec<Alive>> = BTreeMap::new();
    for g in &site.gens {
        for w in &g.workers {
            match PidRef::open_verified_stat(w.pid, w.start_time) {
                Some((pidref, stat)) => out.entry(GenId(g.id)).or_default().push(Alive {
                    slot: Slot(w.slot),
                    pidref,
                    record: w.clone(),
                    parent: stat.ppid,
                }),
                None => debug!(
                    site = site.name,
                    gen = g.id,
                    worker = w.slot,
                    pid = w.pid,
                    "a previous agent's worker is gone (or its pid is another process's now)"
                ),
            }
        }
    }
    out
}

/// Steps 1–3 and 5 of the module doc for one site; on failure, why, and its workers back.
/// `as_recorded`: `config` is the recorded one, its file does not load (nothing to apply).
#[allow(clippy::type_complexity)]
fn adopt_site(
    site: SiteRecord,
    alive: BTreeMap<GenId, Vec<Alive>>,
    config: &SiteConfig,
    state_dir: &Path,
    agent_file: &Path,
    as_recorded: bool,
) -> Result<Adoption, (String, BTreeMap<GenId, Vec<Alive>>)> {
    // The configuration its workers run with: the recorded text if the file changed since.
    let now_text = if as_recorded {
        site.config_text.clone()
    } else {
        std::fs::read_to_string(&config.file).ok()
    };
    let (ran_with, changed) = match &site.config_text {
        Some(text) if now_text.as_deref() != Some(text.as_str()) => {
            match crate::config::site_from_text(agent_file, &config.file, text) {
                Ok(old) if old != *config => (old, Some(config.clone())),
                Ok(_) => (config.clone(), None),
                Err(e) => {
                    warn!(site = %config.name, "the recorded configuration of the site no longer reads ({e}): its workers are taken as running the current one");
                    (config.clone(), None)
                }
            }
        }
        _ => (config.clone(), None),
    };
    // A worker's number is its place in the site's slots (`SlotMap`): a number beyond the
    // most a site can have (a damaged record) is not taken over, and the workers are stopped.
    let numbers = alive.values().flatten().map(|a| a.slot.0);
    if let Some(n) = numbers.filter(|n| *n >= crate::config::MAX_WORKERS).max() {
        let why = format!(
            "a worker is numbered w-{n}, beyond the {} a site can have",
            crate::config::MAX_WORKERS
        );
        return Err((why, alive));
    }
    // Only the workers found alive, in the machine's record too.
    let mut record = site.machine.clone();
    for g in &mut record.gens {
        let found = alive.get(&GenId(g.id));
        g.workers.retain(|w| {
            found.is_some_and(|ws| {
                ws.iter()
                    .any(|a| a.slot.0 == w.slot && a.pidref.pid() == w.pid)
            })
        });
    }
    let previous = super::generations::read_previous_release(state_dir, &config.name);
    let (machine, actions) = SiteMachine::adopt(ran_with.clone(), record, previous, Instant::now());
    let kept = machine.serving();
    let inodes: Vec<u64> = site
        .gens
        .iter()
        .find(|g| g.id == kept.0)
        .map(|g| g.listeners.clone())
        .unwrap_or_default();
    let specs: Vec<_> = ran_with.agent_listeners().cloned().collect();
    if specs.len() != inodes.len() {
        return Err((
            format!(
                "gen-{kept} had {} listeners recorded, its configuration has {}",
                inodes.len(),
                specs.len()
            ),
            alive,
        ));
    }
    let mut listeners = Vec::new();
    for (spec, ino) in specs.into_iter().zip(inodes) {
        // The kept generation's workers first; a shared socket is held by others too.
        let holders = alive.get(&kept).into_iter().flatten().chain(
            alive
                .iter()
                .filter(|(g, _)| **g != kept)
                .flat_map(|(_, v)| v),
        );
        let mut taken = None;
        let mut last_error = None;
        for a in holders {
            match a.pidref.socket_by_inode(ino) {
                Ok(Some(fd)) => {
                    taken = Some(fd);
                    break;
                }
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
        }
        match taken {
            Some(fd) => listeners.push(Listener { spec, fd }),
            None => {
                let why = match last_error {
                    Some(e) => format!("failed to take {} back from its workers: {e}", spec.addr),
                    None => format!("no live worker holds {} any more", spec.addr),
                };
                return Err((why, alive));
            }
        }
    }
    let config_text = if changed.is_some() {
        site.config_text
    } else {
        now_text
    };
    Ok(Adoption {
        machine,
        actions,
        listeners,
        workers: alive,
        changed,
        config_text,
        steering: site.steering,
    })
}

/// The workers of a site to stop, with what must die with them (step 1).
fn to_stop(
    site: &str,
    alive: BTreeMap<GenId, Vec<Alive>>,
    config: Option<&SiteConfig>,
    cgroups: Option<&CgroupTree>,
) -> Vec<Previous> {
    let stop = config.map_or(
        StopPolicy::single(Signal(libc::SIGTERM), MAX_STOP_WAIT),
        |c| c.stop,
    );
    // Every step its share of the longest wait.
    let steps = u32::try_from(stop.signals().count()).unwrap_or(1).max(1);
    let stop = StopPolicy {
        timeout: stop.timeout.min(MAX_STOP_WAIT / steps),
        ..stop
    };
    let now = Instant::now();
    alive
        .into_values()
        .flatten()
        .map(|a| Previous {
            site: site.to_string(),
            members: if a.record.cgroup.is_some() && cgroups.is_some() {
                Vec::new()
            } else {
                crate::process::group_members(a.record.pid, a.record.pid)
            },
            stop,
            step: 0,
            step_at: now,
            record: a.record,
            pidref: a.pidref,
            settled: false,
            killed: false,
        })
        .collect()
}

/// Steps 2–5 of stopping, for every worker not adopted.
fn stop_all(mut found: Vec<Previous>, cgroups: Option<&CgroupTree>) {
    if found.is_empty() {
        return;
    }
    let pids: Vec<String> = found.iter().map(|p| p.record.pid.to_string()).collect();
    warn!(
        "stopping {} workers of a previous agent (pids {}) before starting the sites",
        found.len(),
        pids.join(" ")
    );
    let start = Instant::now();
    for p in &mut found {
        p.step_at = start;
        if let Err(e) = p.pidref.signal(p.stop.signal.0) {
            error!(
                site = p.site,
                pid = p.record.pid,
                "failed to signal a previous agent's worker: {e}"
            );
        }
    }
    // Wait for each to exit; at each timeout the next signal of its sequence, after the
    // last its tree killed, and no more waiting for it after KILL_GRACE more (the last wait
    // below reports it).
    loop {
        let now = Instant::now();
        for p in found.iter_mut().filter(|p| !p.settled) {
            if p.pidref.has_exited() || (p.killed && now >= p.step_at + KILL_GRACE) {
                p.settled = true;
            } else if !p.killed && now >= p.step_at + p.stop.timeout {
                p.step_at = now;
                if let Some(next) = p.stop.step(p.step + 1) {
                    p.step += 1;
                    debug!(
                        site = p.site,
                        pid = p.record.pid,
                        "a previous agent's worker still runs: {} of its stop sequence",
                        next.name()
                    );
                    if let Err(e) = p.pidref.signal(next.0) {
                        error!(
                            site = p.site,
                            pid = p.record.pid,
                            "failed to signal a previous agent's worker: {e}"
                        );
                    }
                    continue;
                }
                warn!(
                    site = p.site,
                    pid = p.record.pid,
                    "a previous agent's worker did not stop within {:?}: killing its process tree",
                    p.stop.total()
                );
                kill_tree(p, cgroups);
                p.killed = true;
            }
        }
        let waiting: Vec<&Previous> = found.iter().filter(|p| !p.settled).collect();
        let Some(next) = waiting
            .iter()
            .map(|p| p.step_at + if p.killed { KILL_GRACE } else { p.stop.timeout })
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
                    site = p.site,
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

/// What the record of live workers lacks since it was last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Unsaved {
    /// Nothing: it says what is.
    Nothing,
    /// Only that workers told to stop (by a stop, a drain, a scale down, a restart) are
    /// gone. It still lists them, each in a slot recorded as told to stop or beyond the
    /// workers asked for, and a starting agent finds each gone (`PidRef::open_verified`;
    /// one not yet reaped is adopted as stopping, and its exit seen at once),
    /// so it is written with the next change of another kind, not for them alone: a stop
    /// of 10,000 workers rewrote it (2 MB) every 100 ms, a fifth of the agent's work in
    /// the stop.
    Departures,
    /// Anything else: a site fed, a worker started or crashed, workers adopted.
    Changes,
}

impl Agent {
    /// Notes a change the record lacks (never less than one it already lacks).
    pub(super) fn unsaved(&mut self, change: Unsaved) {
        self.unsaved = self.unsaved.max(change);
    }

    /// Rewrites the record if something was fed to a site or a worker started or exited
    /// since it was last written, and it changed (at the end of a turn of the loop; see
    /// [`Agent::save_workers_now`] for the other times); not for workers told to stop that
    /// left alone ([`Unsaved::Departures`]).
    ///
    /// A change of workers alone is put off [`WORKERS_SAVE_DELAY`] (or to the spacing's
    /// end): the workers just started are still in their `execve`, and a write on the
    /// loop's CPU would hold each back by its length.
    pub(super) fn save_workers(&mut self) {
        self.save_workers_as(false);
    }

    /// Rewrites the record now if anything changed since it was last written, put off or
    /// not: before an authorized control request is handled (what a client is told of the
    /// workers that came and went before it survives an agent crash) and before an
    /// upgrade's `execve`.
    pub(super) fn save_workers_now(&mut self) {
        self.save_workers_as(true);
    }

    fn save_workers_as(&mut self, now: bool) {
        if self.unsaved == Unsaved::Nothing {
            return;
        }
        let began = Instant::now();
        let shape = self.record_shape();
        if !now && self.last_shape == Some(shape) && self.unsaved == Unsaved::Departures {
            // Written with the next change of another kind (the loop does not wake for it).
            return;
        }
        if !now && self.last_shape == Some(shape) {
            // Only workers came or went: still dirty, the loop wakes at `save_after`, at
            // least WORKERS_SAVE_DELAY from the first change (and not before the spacing
            // of the last write ends); put off once, not again at each later change.
            if !self.save_put_off {
                self.save_put_off = true;
                let earliest = began + WORKERS_SAVE_DELAY;
                self.save_after = Some(self.save_after.map_or(earliest, |t| t.max(earliest)));
                return;
            }
            if self.save_after.is_some_and(|t| began < t) {
                return;
            }
        }
        self.save_put_off = false;
        self.last_shape = Some(shape);
        self.unsaved = Unsaved::Nothing;
        let _spaced = SaveSpacing {
            began,
            after: &mut self.save_after,
        };
        let sites = self
            .sites
            .iter()
            .map(|(name, site)| SiteRecord {
                name: name.to_string(),
                config_text: site.io.config_text.clone(),
                machine: site.machine.record(),
                steering: site
                    .io
                    .steering
                    .iter()
                    .map(|s| s.as_ref().and_then(|s| s.ids().ok()))
                    .collect(),
                gens: site
                    .io
                    .gens
                    .iter()
                    .map(|(g, gen_io)| GenIoRecord {
                        id: g.0,
                        listeners: gen_io
                            .listeners
                            .iter()
                            .filter_map(|l| rustix::fs::fstat(&l.fd).ok().map(|st| st.st_ino))
                            .collect(),
                        workers: gen_io
                            .workers
                            .iter()
                            .filter_map(|(slot, w)| {
                                Some(WorkerRecord {
                                    slot: slot.0,
                                    pid: w.pidref.pid(),
                                    start_time: w.start_time?,
                                    cgroup: w.cgroup.clone(),
                                })
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        let file = WorkersFile {
            version: FORMAT_VERSION,
            boot_id: self.boot_id.clone(),
            sites,
        };
        // The text streamed to the file, never whole in memory (2 MB with 10,000 workers,
        // which the heap kept after it was freed: the allocator's threshold for returning
        // large blocks rises with them), and hashed on the way, not copied: a text the same
        // as the last one written is not put in its place.
        let path = workers_file(&self.config.state_dir);
        let last = self.last_record;
        let mut hash = None;
        let written = save_with(&path, |f| {
            let mut w = HashWriter {
                hasher: std::collections::hash_map::DefaultHasher::new(),
                out: io::BufWriter::with_capacity(64 * 1024, f),
            };
            serde_json::to_writer(&mut w, &file)?;
            w.out.flush()?;
            let h = std::hash::Hasher::finish(&w.hasher);
            hash = Some(h);
            Ok(last != Some(h))
        });
        match written {
            Ok(()) => self.last_record = hash,
            Err(e) => error!("failed to write {}: {e}", path.display()),
        }
    }
}

impl Agent {
    /// A hash of what the record says beyond which workers run: per site, the generation
    /// that serves, the workers asked for, whether it runs, and each generation's number,
    /// release and state (a deploy's stage, draining, stopping). A change of it is written
    /// at once, never spaced out: a new agent that read an older one would undo a flip
    /// (and find the generation it keeps already told to stop).
    fn record_shape(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, site) in &self.sites {
            let m = &site.machine;
            (
                name.as_str(),
                m.serving().0,
                m.requested(),
                m.pinned(),
                m.is_stopped(),
            )
                .hash(&mut h);
            for g in m.generations() {
                (g.id.0, &g.release, m.generation_state(g)).hash(&mut h);
            }
        }
        h.finish()
    }
}

/// Sets when the record may be written again once a write (or an attempt) is over.
struct SaveSpacing<'a> {
    began: Instant,
    after: &'a mut Option<Instant>,
}

impl Drop for SaveSpacing<'_> {
    fn drop(&mut self) {
        let took = self.began.elapsed();
        *self.after = Some(Instant::now() + (took * SAVE_SPACING).min(MAX_SAVE_DELAY));
    }
}

/// When a process that started `start_time` clock ticks after boot started, by the wall
/// clock (`btime` of `/proc/stat`); now if that cannot be read.
pub(super) fn started_wall(start_time: u64) -> SystemTime {
    // Read once: `/proc/stat` is long, and the boot time does not change.
    static BTIME: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let btime = *BTIME.get_or_init(|| {
        std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    });
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    match btime {
        Some(b) => {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(b)
                + Duration::from_millis(start_time.saturating_mul(1000) / ticks)
        }
        None => SystemTime::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::machine::GenRecord;

    #[test]
    fn a_record_replaced_loses_its_second_name_on_the_removing_thread() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("workers.json");
        let spare = path.with_extension("json.replaced");
        // A second name left by an agent that died is removed too.
        std::fs::write(&spare, "left over").expect("spare");
        for text in ["first", "second", "third"] {
            save_with(&path, |f| f.write_all(text.as_bytes()).map(|()| true)).expect("save");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        }
        assert!(!path.with_extension("json.tmp").exists());
        assert_only_the_record_is_left(&path);
    }

    /// Asserts that the directory of `path` holds `path` alone once the removing thread
    /// has removed the record's second name (it does so after `save_with` returns).
    fn assert_only_the_record_is_left(path: &Path) {
        let spare = path.with_extension("json.replaced");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while spare.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!spare.exists(), "{spare:?} is still there");
        let dir = path.parent().expect("a directory");
        let names: Vec<_> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [WORKERS_FILE], "no temporary file is left");
    }

    fn file(workers: Vec<WorkerRecord>) -> WorkersFile {
        WorkersFile {
            version: FORMAT_VERSION,
            boot_id: boot_id(),
            sites: vec![SiteRecord {
                name: "web".into(),
                config_text: Some("command = [\"app\"]\n".into()),
                machine: MachineRecord {
                    serving: 3,
                    last_gen: 3,
                    requested: 2,
                    pinned: false,
                    running: true,
                    gens: vec![GenRecord {
                        id: 3,
                        release: None,
                        workers: Vec::new(),
                        replaces_shut: false,
                    }],
                },
                gens: vec![GenIoRecord {
                    id: 3,
                    listeners: vec![77],
                    workers,
                }],
                steering: vec![Some([5, 6])],
            }],
        }
    }

    fn record(pid: i32, start_time: u64) -> WorkerRecord {
        WorkerRecord {
            slot: 1,
            pid,
            start_time,
            cgroup: Some("/sys/fs/cgroup/hatchery/sites/web/gen-3/w-1".into()),
        }
    }

    fn write(path: &Path, file: &WorkersFile) {
        save_with(path, |f| {
            serde_json::to_writer(f, file).map_err(io::Error::other)?;
            Ok(true)
        })
        .expect("save");
    }

    #[test]
    fn the_record_survives_a_round_trip_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = workers_file(dir.path());
        assert!(load(&path).expect("no file is fine").is_none());
        let mut f = file(vec![record(10, 20), record(11, 21)]);
        f.sites[0].gens[0].workers[1].cgroup = None;
        write(&path, &f);
        assert_eq!(load(&path).expect("load"), Some(f.clone()));
        f.sites[0].gens[0].workers.pop();
        write(&path, &f);
        assert_eq!(load(&path).expect("load"), Some(f));
        assert_only_the_record_is_left(&path);
    }

    #[test]
    fn a_corrupt_or_foreign_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = workers_file(dir.path());
        for text in ["", "{", "[]", "{\"version\":2}", "\u{0}\u{1}garbage"] {
            std::fs::write(&path, text).expect("write");
            assert!(
                matches!(load(&path), Err(LoadError::Corrupt(..))),
                "{text:?}"
            );
        }
        // The first format, or a later one: told by its version.
        for version in [1, 99] {
            std::fs::write(
                &path,
                format!(
                    "{{\"version\":{version},\"boot_id\":\"{}\",\"workers\":[]}}",
                    boot_id()
                ),
            )
            .expect("write");
            assert!(matches!(
                load(&path),
                Err(LoadError::Version { found, .. }) if found == version
            ));
        }
    }

    /// A recorded pid that now names a process with another start time is left alone:
    /// here this test process itself, which must not receive the stop signal (SIGTERM
    /// would end the test run). The site is not configured any more, so a worker found
    /// alive would be stopped.
    #[test]
    fn a_recorded_pid_with_another_start_time_is_not_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = i32::try_from(std::process::id()).expect("a pid fits");
        let real = crate::process::read_stat(me).expect("stat").start_time;
        let path = workers_file(dir.path());
        write(
            &path,
            &file(vec![
                record(me, real + 1),
                record(me, real.saturating_sub(1)),
            ]),
        );
        let agent_file = dir.path().join("agent.toml");
        let started = Instant::now();
        let adopted = recover(dir.path(), &agent_file, &[], &BTreeMap::new(), None);
        assert!(adopted.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "nothing was waited for"
        );
        // Still here, and a corrupt file does not stop the agent either.
        std::fs::write(&path, "{").expect("write");
        assert!(recover(dir.path(), &agent_file, &[], &BTreeMap::new(), None).is_empty());
    }
}

#[cfg(test)]
mod stop_sequence_tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    /// A previous worker that ignores the first signal of its sequence (`SIGWINCH`, as a
    /// `sleep` does) gets the next one (`SIGTERM`) `timeout` later, and is not killed.
    #[test]
    fn a_previous_worker_gets_each_signal_of_its_stop_sequence() {
        use std::os::unix::process::CommandExt as _;
        // In a group of its own: what is left of its tree gets SIGKILL by group at the end.
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("a pid fits");
        let start_time = crate::process::read_stat(pid).expect("stat").start_time;
        let pidref = PidRef::open_verified(pid, start_time).expect("pidfd");
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        stop_all(
            vec![Previous {
                site: "web".into(),
                record: WorkerRecord {
                    slot: 1,
                    pid,
                    start_time,
                    cgroup: None,
                },
                pidref,
                members: Vec::new(),
                stop: StopPolicy::sequence(
                    &[Signal(libc::SIGWINCH), Signal(libc::SIGTERM)],
                    timeout,
                )
                .expect("two signals"),
                step: 0,
                step_at: started,
                settled: false,
                killed: false,
            }],
            None,
        );
        assert!(started.elapsed() >= timeout, "TERM came after the wait");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }
}

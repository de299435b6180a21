//! The cgroup v2 tree the agent manages.
//!
//! Layout (DESIGN.md): `<base>/sites/<site>/gen-<N>/w-<K>/`, a fresh leaf for each worker
//! process ([`CgroupTree::new_leaf`]), removed when it exits ([`CgroupTree::retire`]), or by
//! the [`Graveyard`] once what the worker left behind has died. The one exception: a
//! worker that crashed and left its leaf empty, never killed, is replaced in the same leaf
//! when its replacement starts at once (`event::Agent::reusable_leaves`).
//! The base is the delegated cgroup the agent runs in (under systemd `Delegate=yes`), or
//! `<cgroup2 mount>/hatchery` when run by hand as root, or a path from the config.
//! When the base is the agent's own cgroup, the agent first moves itself into
//! `<base>/agent/`: a cgroup with processes cannot enable controllers for its children
//! (the no-internal-process rule).
//!
//! Kernel requirements: cgroup v2 (4.5); `CLONE_INTO_CGROUP` (5.7) uses the leaf's
//! directory fd; `cgroup.kill` (5.14) kills a whole tree, with a freeze-and-kill fallback
//! (`cgroup.freeze`, 5.2) on older kernels. Controllers (`memory`, `pids`, `cpu`) are
//! enabled where the parent offers them; on a host whose cgroup v2 has none (hybrid
//! hierarchies), workers are still placed and killed by cgroup, without accounting.
//!
//! Limits (site: `memory.max`, `pids.max`, `cpu.weight`; worker: `memory.max`,
//! `memory.high`, `memory.oom.group`) are written only where the controller is enabled;
//! [`CgroupTree::apply_site_limits`] returns what could not be enforced. Accounting is read
//! on demand ([`read_usage`]): nothing here polls.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::config::{CgroupBase, Limits};

const CGROUP_PROCS: &str = "cgroup.procs";
const CGROUP_KILL: &str = "cgroup.kill";
const CGROUP_FREEZE: &str = "cgroup.freeze";
const CGROUP_EVENTS: &str = "cgroup.events";
const CGROUP_CONTROLLERS: &str = "cgroup.controllers";
const CGROUP_SUBTREE_CONTROL: &str = "cgroup.subtree_control";
/// Enabled for the base's children and for `sites/`'s (each site's cgroup: its
/// `cpu.weight`, `memory.max`, `pids.max`).
const WANTED_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];
/// Enabled below a site (its generations, their leaves): not `cpu`. A cgroup with the cpu
/// controller is a scheduling group of its own, with a run queue and a scheduling entity
/// allocated on every possible CPU (768 bytes a CPU on 6.18, 2.8 KB with real-time group
/// scheduling: 49 or 180 KB a worker on a host of 64), and its tasks scheduled one level
/// deeper. Nothing below a site sets a CPU limit, and `cpu.stat`'s usage and
/// `cpu.pressure` are there without the controller.
const WANTED_BELOW_SITE: &[&str] = &["memory", "pids"];
const MEMORY_MAX: &str = "memory.max";
const MEMORY_HIGH: &str = "memory.high";
const MEMORY_CURRENT: &str = "memory.current";
const MEMORY_PEAK: &str = "memory.peak";
const MEMORY_EVENTS: &str = "memory.events";
const MEMORY_OOM_GROUP: &str = "memory.oom.group";
const PIDS_MAX: &str = "pids.max";
const PIDS_CURRENT: &str = "pids.current";
const CPU_WEIGHT: &str = "cpu.weight";
const CPU_STAT: &str = "cpu.stat";
const CPU_PRESSURE: &str = "cpu.pressure";

/// Accounting of one cgroup; `None` where the kernel or controller does not provide it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// `memory.current`, bytes.
    pub memory_current: Option<u64>,
    /// `memory.peak` (5.19+), bytes.
    pub memory_peak: Option<u64>,
    /// `memory.max` (`None` when unlimited or absent).
    pub memory_max: Option<u64>,
    /// `oom_kill` of `memory.events`.
    pub oom_kills: Option<u64>,
    /// `pids.current`.
    pub pids: Option<u64>,
    /// `usage_usec` of `cpu.stat`.
    pub cpu_usec: Option<u64>,
    /// Where the memory figures come from: the cgroup, or `/proc` where the memory
    /// controller is missing ([`crate::usage`]).
    #[serde(default)]
    pub source: UsageSource,
}

/// Where a [`Usage`]'s memory figures come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The cgroup's own accounting (`memory.current`: every page charged to it once).
    #[default]
    Cgroup,
    /// `/proc`: the resident memory (RSS) of the processes, a shared page counted in each.
    Proc,
}

impl Usage {
    /// The figure the memory cap measures: `memory.peak`, or `memory.current` on kernels
    /// before 5.19 (which lack `memory.peak`; remove once 5.19 is the floor).
    pub fn peak_or_current(&self) -> Option<u64> {
        self.memory_peak.or(self.memory_current)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    read_small(path)?.trim().parse().ok()
}

/// The text of a small kernel file (a cgroup's, or one of `/proc/<pid>`): open, one read,
/// close when it fits in 4 KiB (`fs::read_to_string` also asks for the size, which such a
/// file does not know, and reads again to see the end). `status` reads several per worker.
pub fn read_small(path: &Path) -> Option<String> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut buf = [0u8; 4096];
    let n = rustix::io::read(&fd, &mut buf).ok()?;
    let mut text = buf[..n].to_vec();
    if n == buf.len() {
        // More than one read's worth: the rest, to the end.
        let mut rest = fs::File::from(fd);
        io::Read::read_to_end(&mut rest, &mut text).ok()?;
    }
    String::from_utf8(text).ok()
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`).
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The `oom_kill` count of `dir`'s `memory.events` (one read, for the exit path).
pub fn oom_kills(dir: &Path) -> Option<u64> {
    keyed_value(
        &fs::read_to_string(dir.join(MEMORY_EVENTS)).ok()?,
        "oom_kill",
    )
}

/// What the memory cap measures for `dir`, reading only that: `memory.peak`, or
/// `memory.current` before 5.19 (see [`Usage::peak_or_current`]).
pub fn measured_memory(dir: &Path) -> Option<u64> {
    peak(dir).or_else(|| read_u64(&dir.join(MEMORY_CURRENT)))
}

/// `memory.peak`, unless `HATCHERY_CGROUP_NO_PEAK=1` asks to behave as before 5.19 (to test
/// that path on newer kernels).
fn peak(dir: &Path) -> Option<u64> {
    static NO_PEAK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *NO_PEAK.get_or_init(|| std::env::var("HATCHERY_CGROUP_NO_PEAK").is_ok_and(|v| v == "1")) {
        return None;
    }
    read_u64(&dir.join(MEMORY_PEAK))
}

/// A cgroup's `memory.current`, where the memory controller is enabled.
pub fn memory_current(dir: &Path) -> Option<u64> {
    read_u64(&dir.join(MEMORY_CURRENT))
}

/// What load scaling reads of a generation's cgroup `dir`: its CPU time (`cpu.stat`
/// `usage_usec`, there without the cpu controller too), the time all its tasks waited for
/// a CPU (`cpu.pressure`, its `full` total; kernels before 5.13 have no `full` line for
/// the CPU, and `some`, one task waiting while others run, says nothing of starvation),
/// and its `memory.high` and `memory.max` events (`memory.events`, which counts its
/// leaves' too). Missing files give `None`.
pub fn load_counters(dir: &Path) -> (Option<u64>, Option<u64>, Option<u64>) {
    let cpu = fs::read_to_string(dir.join(CPU_STAT)).ok();
    let pressure = fs::read_to_string(dir.join(CPU_PRESSURE)).ok();
    let events = fs::read_to_string(dir.join(MEMORY_EVENTS)).ok();
    let memory = events
        .as_deref()
        .and_then(|t| Some(keyed_value(t, "high")?.saturating_add(keyed_value(t, "max")?)));
    (
        cpu.as_deref().and_then(|t| keyed_value(t, "usage_usec")),
        pressure.as_deref().and_then(stall_total),
        memory,
    )
}

/// A PSI trigger on `dir`'s `cpu.pressure`: its fd polls `POLLPRI` (at most once per
/// window) when none of the cgroup's tasks ran for half a window while some were
/// runnable. The window is 1 s, or 2 s where the kernel asks an agent without
/// `CAP_SYS_RESOURCE` for a multiple of 2 s. `Err` where the kernel has no PSI (or no
/// `full` line for the CPU, before 5.13). Closing the fd removes the trigger.
pub fn cpu_pressure_trigger(dir: &Path) -> io::Result<OwnedFd> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = io::Error::from(io::ErrorKind::InvalidInput);
    for spec in ["full 500000 1000000", "full 1000000 2000000"] {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(dir.join(CPU_PRESSURE))?;
        match f.write_all(spec.as_bytes()) {
            Ok(()) => return Ok(f.into()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The `full` stall total (µs) of a PSI file.
fn stall_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("full "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Reads the accounting files of `dir` (missing files give `None`). Without
/// `memory.current` (no memory controller), the other memory files are not looked for.
pub fn read_usage(dir: &Path) -> Usage {
    read_usage_below(dir, None)
}

/// [`read_usage`] of a cgroup below one whose usage is `parent`: the files of a controller
/// the parent lacks are not looked for (a controller is enabled from the top down). A
/// missing file is the costly lookup of a cgroup file, and `status` reads every worker's
/// leaf.
pub fn read_usage_below(dir: &Path, parent: Option<&Usage>) -> Usage {
    let cpu = read_small(&dir.join(CPU_STAT));
    let memory_current = parent
        .is_none_or(|p| p.memory_current.is_some())
        .then(|| read_u64(&dir.join(MEMORY_CURRENT)))
        .flatten();
    let memory = memory_current.is_some();
    let events = memory
        .then(|| read_small(&dir.join(MEMORY_EVENTS)))
        .flatten();
    Usage {
        memory_current,
        memory_peak: memory.then(|| peak(dir)).flatten(),
        memory_max: memory.then(|| read_u64(&dir.join(MEMORY_MAX))).flatten(),
        oom_kills: events.as_deref().and_then(|t| keyed_value(t, "oom_kill")),
        pids: parent
            .is_none_or(|p| p.pids.is_some())
            .then(|| read_u64(&dir.join(PIDS_CURRENT)))
            .flatten(),
        cpu_usec: cpu.as_deref().and_then(|t| keyed_value(t, "usage_usec")),
        source: UsageSource::Cgroup,
    }
}

/// Writes `value` to `dir/file` if the file exists; returns whether it did.
fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<bool, CgroupError> {
    use std::io::Write as _;
    let path = dir.join(file);
    let failed = |source| CgroupError::Write {
        path: path.clone(),
        value: value.to_string(),
        source,
    };
    // One open, no stat before it: this runs at every worker start.
    match fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
    {
        Ok(mut f) => f.write_all(value.as_bytes()).map(|()| true).map_err(failed),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(failed(e)),
    }
}

/// Errors managing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 mount was found.
    #[error("no cgroup2 file system is mounted")]
    NoCgroup2,
    /// Creating a directory failed.
    #[error("failed to create cgroup {}", .path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("failed to write {value:?} to {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening a cgroup directory failed.
    #[error("failed to open cgroup {}", .path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another agent holds the base: it would take this one's cgroups for an earlier
    /// agent's, and kill what runs there, as this one would its.
    #[error(
        "another agent{} uses the cgroup base {}: give this one a cgroup_base of its own, or stop that agent",
        .holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .path.display()
    )]
    InUse {
        /// The base.
        path: PathBuf,
        /// The pid that holds its lock, when `/proc/locks` tells it.
        holder: Option<u32>,
    },
}

/// The managed tree.
#[derive(Debug)]
pub struct CgroupTree {
    base: PathBuf,
    /// Controllers enabled for the sites (may be empty).
    pub controllers: Vec<String>,
    /// Whether `cgroup.kill` exists (5.14).
    pub has_kill: bool,
    /// Where the agent was before it moved itself into `<base>/agent`, to move back on exit.
    moved_from: Option<PathBuf>,
    /// The base directory, `flock`ed for the agent's lifetime (released by the kernel
    /// however the agent ends; passed on by an upgrade): one agent per base.
    lock: OwnedFd,
}

/// Whether the cgroup2 mount at `mount` has `favordynmods` (Linux 6.0+): moving a
/// process between cgroups (a zygote-mode worker into its leaf) then skips an RCU grace
/// period (under 1 ms instead of 5 to 20 ms measured here).
pub fn favors_dynmods(mount: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    text.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        let at = left.split_whitespace().nth(4).map(Path::new);
        let mut r = right.split_whitespace();
        r.next() == Some("cgroup2")
            && at == Some(mount)
            && r.nth(1)
                .is_some_and(|opts| opts.split(',').any(|o| o == "favordynmods"))
    })
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup v2 path of process `pid`, as `/proc/<pid>/cgroup` gives it (from the root
/// of the cgroup2 mount as this process sees it); `None` if it exited or has none.
pub fn cgroup_of(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// This process's cgroup v2 directory.
pub fn own_cgroup(mount: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An `flock` on the directory `base`: `inherited` when it is one on that directory (an
/// upgrade passed it), else taken now; [`CgroupError::InUse`] when another process holds it.
fn lock_base(base: &Path, inherited: Option<OwnedFd>) -> Result<OwnedFd, CgroupError> {
    use rustix::fs::FlockOperation;
    let open_err = |e: rustix::io::Errno| CgroupError::Open {
        path: base.to_path_buf(),
        source: e.into(),
    };
    let dir = rustix::fs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_err)?;
    if let Some(held) = inherited {
        let same = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).map(|st| (st.st_dev, st.st_ino));
        if same(held.as_fd()).ok() == same(dir.as_fd()).ok() {
            return Ok(held);
        }
    }
    match rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(dir),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(CgroupError::InUse {
            path: base.to_path_buf(),
            holder: fs::read_to_string("/proc/locks")
                .ok()
                .and_then(|locks| flock_holder(&locks, dir.as_fd())),
        }),
        Err(e) => Err(open_err(e)),
    }
}

/// The pid `/proc/locks` (its text: `locks`) names as holding an `flock` on the file `fd`
/// is open on.
fn flock_holder(locks: &str, fd: BorrowedFd<'_>) -> Option<u32> {
    let st = rustix::fs::fstat(fd).ok()?;
    let want = (
        u64::from(rustix::fs::major(st.st_dev)),
        u64::from(rustix::fs::minor(st.st_dev)),
        st.st_ino,
    );
    locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`; a waiter's has `->` after `1:`.
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let mut id = f.get(5)?.split(':');
        let dev = |s: &str| u64::from_str_radix(s, 16).ok();
        let at = (dev(id.next()?)?, dev(id.next()?)?, id.next()?.parse().ok()?);
        (at == want).then(|| f.get(4)?.parse().ok())?
    })
}

impl CgroupTree {
    /// Resolves the configured base and locks it (`inherited`: the lock an upgraded agent
    /// was passed, used when it is the base's). `Ok(None)` with a reason when cgroups are
    /// off or unusable here (the agent then runs without them and says so);
    /// [`CgroupError::InUse`] when another agent holds the base, before anything in it is
    /// touched.
    pub fn setup(
        base: &CgroupBase,
        inherited: Option<OwnedFd>,
    ) -> Result<Result<CgroupTree, String>, CgroupError> {
        let mount = match cgroup2_mount() {
            Some(m) => m,
            None if *base == CgroupBase::Off => return Ok(Err("cgroup_base = \"off\"".into())),
            None => return Ok(Err("no cgroup2 file system is mounted".into())),
        };
        // Under the keeper (`crate::keeper`), the unit's cgroup is the one delegated: the
        // keeper sits in its `keeper/` leaf, and this agent moves into `agent/` beside it.
        let own = match std::env::var_os(crate::keeper::DELEGATED_ENV) {
            Some(unit) => Some(
                mount.join(
                    Path::new(&unit)
                        .strip_prefix("/")
                        .unwrap_or(Path::new(&unit)),
                ),
            ),
            None => own_cgroup(&mount),
        };
        let root = rustix::process::geteuid().is_root();
        let base_path = match base {
            CgroupBase::Off => return Ok(Err("cgroup_base = \"off\"".into())),
            CgroupBase::Path(p) => p.clone(),
            CgroupBase::Auto => {
                // Delegated by systemd: our own cgroup is writable by us and we are a unit.
                let delegated = std::env::var_os("INVOCATION_ID").is_some()
                    && own
                        .as_ref()
                        .is_some_and(|o| writable(&o.join(CGROUP_SUBTREE_CONTROL)));
                match (&own, delegated, root) {
                    (Some(o), true, _) => o.clone(),
                    (_, false, true) => mount.join("hatchery"),
                    _ => {
                        return Ok(Err(
                            "not root and not in a delegated cgroup (run under systemd with Delegate=yes)".into(),
                        ));
                    }
                }
            }
        };
        if !base_path.starts_with(&mount) {
            return Ok(Err(format!(
                "{} is not inside the cgroup2 mount {}",
                base_path.display(),
                mount.display()
            )));
        }
        mkdir(&base_path)?;
        let lock = lock_base(&base_path, inherited)?;
        let mut moved_from = None;
        if own.as_deref() == Some(base_path.as_path()) {
            let agent = base_path.join("agent");
            mkdir(&agent)?;
            write_file(&agent.join(CGROUP_PROCS), "0")?;
            moved_from = own.clone();
        }
        let controllers = enable_controllers(&base_path, WANTED_CONTROLLERS)?;
        let sites = base_path.join("sites");
        mkdir(&sites)?;
        enable_controllers(&sites, WANTED_CONTROLLERS)?;
        // HATCHERY_TREE_KILL=freeze forces the pre-5.14 path (to test it on newer kernels).
        let forced_freeze = std::env::var("HATCHERY_TREE_KILL").is_ok_and(|v| v == "freeze");
        Ok(Ok(CgroupTree {
            has_kill: sites.join(CGROUP_KILL).exists() && !forced_freeze,
            base: base_path,
            controllers,
            moved_from,
            lock,
        }))
    }

    /// The base's lock, for an upgrade to pass on.
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }

    /// The base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The directory of a site.
    pub fn site_dir(&self, site: &str) -> PathBuf {
        self.base.join("sites").join(site)
    }

    /// Creates the site's cgroup (if needed) and writes its limits. Returns the names of
    /// the limits that could not be enforced (their controller is not available).
    pub fn apply_site_limits(
        &self,
        site: &str,
        limits: &Limits,
    ) -> Result<Vec<&'static str>, CgroupError> {
        let dir = self.site_dir(site);
        if !dir.exists() {
            mkdir(&dir)?;
            enable_controllers(&dir, WANTED_BELOW_SITE)?;
        } else if let Err(e) = drop_cpu_below(&dir) {
            // Still accounted and limited; its leaves stay scheduling groups until the
            // next deploy makes a generation without the controller.
            tracing::warn!(site, "the cpu controller stays enabled below the site: {e}");
        }
        let mut missing = Vec::new();
        let max = |v: Option<u64>| v.map_or_else(|| "max".to_string(), |n| n.to_string());
        if !write_if_present(&dir, MEMORY_MAX, &max(limits.memory))? && limits.memory.is_some() {
            missing.push("memory");
        }
        let pids = limits
            .pids_max
            .map_or_else(|| "max".to_string(), |n| n.to_string());
        if !write_if_present(&dir, PIDS_MAX, &pids)? && limits.pids_max.is_some() {
            missing.push("pids_max");
        }
        let weight = limits.cpu_weight.unwrap_or(100).to_string();
        if !write_if_present(&dir, CPU_WEIGHT, &weight)? && limits.cpu_weight.is_some() {
            missing.push("cpu_weight");
        }
        if !self.has_memory() {
            if limits.worker_memory_max.is_some() {
                missing.push("memory_max");
            }
            if limits.worker_memory_high.is_some() {
                missing.push("memory_high");
            }
        }
        Ok(missing)
    }

    /// Whether the memory controller is enabled for the workers' leaves (their
    /// `memory.*` files are there).
    pub fn has_memory(&self) -> bool {
        self.controllers.iter().any(|c| c == "memory")
    }

    /// Writes the limits of a leaf just made ([`CgroupTree::new_leaf`]): as
    /// [`CgroupTree::apply_worker_limits`], but only what differs from a new cgroup's
    /// defaults (`memory.max` and `memory.high` are `max` already), and nothing where the
    /// memory controller is not enabled (its files are not there): this runs at every
    /// worker start.
    pub fn apply_new_leaf_limits(&self, leaf: &Path, limits: &Limits) -> Result<(), CgroupError> {
        if !self.has_memory() {
            return Ok(());
        }
        if let Some(max) = limits.worker_memory_max {
            write_if_present(leaf, MEMORY_MAX, &max.to_string())?;
        }
        if let Some(high) = limits.worker_memory_high {
            write_if_present(leaf, MEMORY_HIGH, &high.to_string())?;
        }
        write_if_present(leaf, MEMORY_OOM_GROUP, "1")?;
        Ok(())
    }

    /// Writes a worker leaf's limits: `memory.max`, `memory.high`, and `memory.oom.group`
    /// (an OOM kill takes the worker's whole tree, not a random child).
    pub fn apply_worker_limits(leaf: &Path, limits: &Limits) -> Result<(), CgroupError> {
        let max = |v: Option<u64>| v.map_or_else(|| "max".to_string(), |n| n.to_string());
        write_if_present(leaf, MEMORY_MAX, &max(limits.worker_memory_max))?;
        write_if_present(leaf, MEMORY_HIGH, &max(limits.worker_memory_high))?;
        write_if_present(leaf, MEMORY_OOM_GROUP, "1")?;
        Ok(())
    }

    /// Creates a fresh leaf named `name` (`w-<K>` for a worker slot, `exec-<N>` for an
    /// `exec` command) in generation `generation` of `site`, creating the site and
    /// generation cgroups on the way, and opens it for `CLONE_INTO_CGROUP`.
    ///
    /// A leaf that was killed is never reused: on recent kernels (seen on 6.18, not on 6.1
    /// or 6.12) a cgroup that has received `cgroup.kill` SIGKILLs every process later cloned
    /// into it, while a new cgroup, even one created under a killed parent, does not. (The
    /// agent reuses only the empty leaf of a crashed worker whose tree it did not kill, for
    /// its slot's next process: `event::Agent::reusable_leaves`.) While a stale
    /// leaf of that name is there (retired and not yet removed, left by an earlier agent
    /// and buried, or still emptying after its worker's tree was killed), the new leaf
    /// gets the first free name `<name>.<n>`: the stale one is removed by the graveyard,
    /// off the hot path.
    pub fn new_leaf(
        &self,
        site: &str,
        generation: u32,
        name: &str,
    ) -> Result<(PathBuf, OwnedFd), CgroupError> {
        let site_dir = self.site_dir(site);
        let gen_dir = site_dir.join(format!("gen-{generation}"));
        let mut n = 0u32;
        let mut parents_made = false;
        let leaf = loop {
            let mut leaf = if n == 0 {
                gen_dir.join(name)
            } else {
                gen_dir.join(format!("{name}.{n}"))
            };
            match fs::create_dir(&leaf) {
                // Kept by its worker as long as it runs: without the room `join` left
                // (a third of its bytes; 0.3 MB of the agent's heap at 10,000 workers).
                Ok(()) => {
                    leaf.shrink_to_fit();
                    break leaf;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
                // The site or the generation is new: made once, not looked for at every
                // start.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !parents_made => {
                    for dir in [&site_dir, &gen_dir] {
                        if !dir.exists() {
                            mkdir(dir)?;
                            // Not left without its controllers: made again next time.
                            enable_controllers(dir, WANTED_BELOW_SITE).inspect_err(|_| {
                                let _ = fs::remove_dir(dir);
                            })?;
                        }
                    }
                    parents_made = true;
                }
                Err(source) => return Err(CgroupError::Create { path: leaf, source }),
            }
        };
        match CgroupTree::open_leaf(&leaf) {
            Ok(fd) => Ok((leaf, fd)),
            Err(e) => {
                let _ = fs::remove_dir(&leaf);
                Err(e)
            }
        }
    }

    /// Opens `leaf` to clone into (`CLONE_INTO_CGROUP`).
    pub fn open_leaf(leaf: &Path) -> Result<OwnedFd, CgroupError> {
        rustix::fs::open(
            leaf,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupError::Open {
            path: leaf.to_path_buf(),
            source: e.into(),
        })
    }

    /// Retires the leaf of a process that has exited (and been reaped): it is never used
    /// again, and is removed off the hot path ([`CgroupTree::remove_deferred`]): `rmdir`
    /// of a cgroup takes the kernel's global cgroup mutex, which the kernel's own release
    /// of freshly removed cgroups holds too, so ten thousand of them beside the exits and
    /// starts of a mass crash or a stop would make each wait for the others.
    pub fn retire(&self, leaf: &Path, graveyard: &mut Graveyard) {
        graveyard.deferred.push_back(leaf.to_path_buf());
    }

    /// Removes up to `max` retired leaves (oldest first): at once when nothing is left in
    /// one; otherwise what its process left behind is killed and the leaf goes to the
    /// graveyard's watch, which removes it once it is empty. Then, when none is left to
    /// remove, tries the buried cgroups again (a generation goes once its last leaf has).
    /// The kills that failed.
    pub fn remove_deferred(&self, graveyard: &mut Graveyard, max: usize) -> Vec<CgroupError> {
        let mut failed = Vec::new();
        for _ in 0..max {
            let Some(leaf) = graveyard.deferred.pop_front() else {
                break;
            };
            match fs::remove_dir(&leaf) {
                Ok(()) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {}
            }
            if let Err(e) = self.kill(&leaf) {
                failed.push(e);
            }
            graveyard.bury(leaf);
        }
        if graveyard.deferred.is_empty() {
            graveyard.sweep();
        }
        failed
    }

    /// After an agent that did not clean up (killed, crashed): kills whatever still runs
    /// in the site cgroups and hands every leaf and generation cgroup to `graveyard`, so
    /// no new process is ever cloned into a cgroup that may have been killed. The leaves
    /// in `spare` (of workers adopted by this agent) and the generation cgroups that hold
    /// them are left alone; in a site that holds one, only the other leaves are killed.
    /// Site cgroups of sites not in `keep` go too; those in `keep` stay, with their limits.
    pub fn sweep_stale(&self, keep: &[&str], spare: &[PathBuf], graveyard: &mut Graveyard) {
        let sites = self.base.join("sites");
        let Ok(entries) = fs::read_dir(&sites) else {
            return;
        };
        // Looked up once per leaf: a set, and the generation cgroups that hold one.
        let spare_leaves: std::collections::HashSet<&Path> =
            spare.iter().map(PathBuf::as_path).collect();
        let spare_gens: std::collections::HashSet<&Path> =
            spare.iter().filter_map(|p| p.parent()).collect();
        let spare_sites: std::collections::HashSet<&Path> =
            spare_gens.iter().filter_map(|g| g.parent()).collect();
        for site in entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        {
            let dir = site.path();
            let spared = spare_sites.contains(dir.as_path());
            if !spared && CgroupTree::is_populated(&dir) {
                let _ = self.kill(&dir);
            }
            for g in subdirs(&dir) {
                for leaf in subdirs(&g) {
                    if spare_leaves.contains(leaf.as_path()) {
                        continue;
                    }
                    if spared && CgroupTree::is_populated(&leaf) {
                        let _ = self.kill(&leaf);
                    }
                    graveyard.bury(leaf);
                }
                if !spare_gens.contains(g.as_path()) {
                    graveyard.bury(g);
                }
            }
            let name = site.file_name();
            if !spared && !keep.iter().any(|k| name == std::ffi::OsStr::new(k)) {
                graveyard.bury(dir);
            }
        }
    }

    /// Kills every process in `dir` and below: `cgroup.kill`, or freeze, SIGKILL each
    /// pid, thaw.
    pub fn kill(&self, dir: &Path) -> Result<(), CgroupError> {
        if self.has_kill {
            return write_file(&dir.join(CGROUP_KILL), "1");
        }
        // Before 5.14: frozen tasks cannot fork, so the pid list cannot grow while we
        // walk it; SIGKILL is delivered even to frozen tasks.
        let freeze = dir.join(CGROUP_FREEZE);
        let can_freeze = freeze.exists();
        if can_freeze {
            write_file(&freeze, "1")?;
        }
        kill_procs_below(dir);
        if can_freeze {
            write_file(&freeze, "0")?;
        }
        Ok(())
    }

    /// Moves process `pid` into `leaf` (a worker forked by a zygote, born in the zygote's
    /// leaf). Memory it touched before stays charged where it was (the zygote's pages);
    /// what it allocates from now on is charged to `leaf`.
    pub fn move_into(leaf: &Path, pid: i32) -> Result<(), CgroupError> {
        write_file(&leaf.join("cgroup.procs"), &pid.to_string())
    }

    /// Whether any process is in `dir` or below (`cgroup.events` `populated`).
    pub fn is_populated(dir: &Path) -> bool {
        CgroupTree::populated(dir) == Some(true)
    }

    /// Whether `dir` is known to hold no process, itself or below (`populated 0`); not when
    /// its `cgroup.events` cannot be read.
    pub fn is_empty(dir: &Path) -> bool {
        CgroupTree::populated(dir) == Some(false)
    }

    /// `cgroup.events`' `populated` line, in one read (a crashed worker's restart reads it).
    fn populated(dir: &Path) -> Option<bool> {
        let text = read_small(&dir.join(CGROUP_EVENTS))?;
        text.lines().find_map(|l| match l {
            "populated 1" => Some(true),
            "populated 0" => Some(false),
            _ => None,
        })
    }

    /// Removes `dir` and its empty descendants, deepest first. Populated cgroups stay.
    pub fn remove(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    CgroupTree::remove(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }

    /// On agent exit: move back where we came from and remove the now empty tree parts
    /// we created (sites and, if we moved, `agent/`). Idempotent; also run on drop.
    pub fn teardown(&self) {
        CgroupTree::remove(&self.base.join("sites"));
        if let Some(from) = &self.moved_from {
            // The base may hold processes again only without controllers for children.
            let off: Vec<String> = self.controllers.iter().map(|c| format!("-{c}")).collect();
            if !off.is_empty() {
                let _ = fs::write(from.join(CGROUP_SUBTREE_CONTROL), off.join(" "));
            }
            let _ = fs::write(from.join(CGROUP_PROCS), "0");
            let _ = fs::remove_dir(self.base.join("agent"));
        } else {
            let _ = fs::remove_dir(&self.base);
        }
    }
}

/// Whatever ends the agent (a clean stop, or a setup step failing after the tree was made),
/// it leaves its cgroup as it found it, as far as empty cgroups allow.
impl Drop for CgroupTree {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Cgroups to remove once they are empty: leaves whose worker left processes behind
/// (killed, not yet gone), generations and sites that are done.
///
/// `rmdir` of a cgroup fails while a process is in it or below. Each buried cgroup's
/// `cgroup.events` is watched with inotify (its `populated` line changes when its
/// subtree empties, which the kernel reports as a file modification), so removal is
/// retried when something changed, not by polling. Only the buried directories
/// themselves are removed, deepest first: a live cgroup below a buried one (a
/// generation that got a new worker) keeps its parent.
#[derive(Debug)]
pub struct Graveyard {
    inotify: OwnedFd,
    dirs: Vec<PathBuf>,
    /// The same, to tell at once whether one is there.
    buried: std::collections::HashSet<PathBuf>,
    /// Leaves retired and not yet removed ([`CgroupTree::remove_deferred`]).
    deferred: std::collections::VecDeque<PathBuf>,
}

impl Graveyard {
    /// A graveyard with its (non-blocking) inotify fd.
    pub fn new() -> io::Result<Graveyard> {
        let inotify = rustix::fs::inotify::init(
            rustix::fs::inotify::CreateFlags::CLOEXEC | rustix::fs::inotify::CreateFlags::NONBLOCK,
        )?;
        Ok(Graveyard {
            inotify,
            dirs: Vec::new(),
            buried: std::collections::HashSet::new(),
            deferred: std::collections::VecDeque::new(),
        })
    }

    /// The fd to watch for readability: something buried may be empty now.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.inotify.as_fd()
    }

    /// Removes `dir` now if it is empty, else keeps it until it is.
    pub fn bury(&mut self, dir: PathBuf) {
        if try_remove(&dir) {
            return;
        }
        // A watch that cannot be added (the inotify limit) only delays the removal to
        // the next sweep.
        let _ = rustix::fs::inotify::add_watch(
            &self.inotify,
            dir.join(CGROUP_EVENTS),
            rustix::fs::inotify::WatchFlags::MODIFY,
        );
        if self.buried.insert(dir.clone()) {
            self.dirs.push(dir);
        }
    }

    /// Drains the inotify fd and removes every buried cgroup that is empty now.
    pub fn sweep(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rustix::io::read(&self.inotify, &mut buf) {
            if n == 0 {
                break;
            }
        }
        // Deepest first, so a generation goes in the same sweep as its last leaf.
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let buried = &mut self.buried;
        self.dirs.retain(|d| {
            let gone = try_remove(d);
            if gone {
                buried.remove(d);
            }
            !gone
        });
    }

    /// Waits (blocking, at most `timeout`) until everything buried is gone; for an agent
    /// that starts where another died, before it binds what the dead one's workers may
    /// still hold. Returns whether it all went.
    pub fn wait_empty(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.sweep();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.dirs.is_empty() || left.is_zero() {
                return self.dirs.is_empty();
            }
            let mut fds = [rustix::event::PollFd::new(
                &self.inotify,
                rustix::event::PollFlags::IN,
            )];
            let ts = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        }
    }

    /// Whether nothing is left to remove.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.deferred.is_empty()
    }

    /// Whether retired leaves wait to be removed.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Whether a cgroup at or below `dir` waits to be removed: buried, or retired and not
    /// yet removed (it may still hold what its process left behind).
    pub fn holds_below(&self, dir: &Path) -> bool {
        self.dirs
            .iter()
            .chain(&self.deferred)
            .any(|b| b.starts_with(dir))
    }

    /// What is left to remove.
    pub fn remaining(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Removes an empty cgroup; true when it is gone.
fn try_remove(dir: &Path) -> bool {
    match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
}

fn kill_procs_below(dir: &Path) {
    if let Ok(text) = fs::read_to_string(dir.join(CGROUP_PROCS)) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_procs_below(&e.path());
            }
        }
    }
}

/// Turns `cpu` off below an existing site's cgroup where an earlier agent enabled it (a
/// site adopted after an upgrade or a crash; [`WANTED_BELOW_SITE`] says why): in each
/// generation's `cgroup.subtree_control`, then in the site's (the kernel refuses a
/// parent's `-cpu` while a child still enables it). The workers' leaves stop being
/// scheduling groups at once; their processes stay where they are.
fn drop_cpu_below(site_dir: &Path) -> Result<(), CgroupError> {
    let enables_cpu = |dir: &Path| {
        fs::read_to_string(dir.join(CGROUP_SUBTREE_CONTROL))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"))
    };
    // A child can enable only what its parent does.
    if !enables_cpu(site_dir) {
        return Ok(());
    }
    for dir in subdirs(site_dir) {
        if enables_cpu(&dir) {
            write_file(&dir.join(CGROUP_SUBTREE_CONTROL), "-cpu")?;
        }
    }
    write_file(&site_dir.join(CGROUP_SUBTREE_CONTROL), "-cpu")
}

/// Enables the controllers of `wanted` that `dir` offers for its children; returns them.
pub fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<Vec<String>, CgroupError> {
    let offered = fs::read_to_string(dir.join(CGROUP_CONTROLLERS)).unwrap_or_default();
    let enable: Vec<String> = offered
        .split_whitespace()
        .filter(|c| wanted.contains(c))
        .map(str::to_string)
        .collect();
    if !enable.is_empty() {
        let value = enable
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        write_file(&dir.join(CGROUP_SUBTREE_CONTROL), &value)?;
    }
    Ok(enable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_time_is_the_full_line() {
        let both = "some avg10=1.00 avg60=0.00 avg300=0.00 total=365377\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=158825\n";
        assert_eq!(stall_total(both), Some(158_825));
        // Kernels before 5.13 have no `full` line for the CPU.
        let some = "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n";
        assert_eq!(stall_total(some), None);
        assert_eq!(stall_total(""), None);
    }

    #[test]
    fn load_counters_read_a_real_cgroup() {
        // The agent's own cgroup v2 directory, where there is one (`cpu.stat` and
        // `cpu.pressure` are there without any controller).
        let Some(own) = cgroup2_mount().and_then(|m| own_cgroup(&m)) else {
            assert!(
                std::env::var("HATCHERY_TEST_REQUIRE").is_err(),
                "HATCHERY_TEST_REQUIRE is set but there is no cgroup v2 directory of our own"
            );
            eprintln!("skipped: no cgroup v2 directory of our own");
            return;
        };
        let (cpu, _stall, _memory) = load_counters(&own);
        assert!(cpu.is_some_and(|c| c > 0), "{own:?}: {cpu:?}");
    }

    #[test]
    fn controllers_are_enabled_from_what_the_parent_offers() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(CGROUP_CONTROLLERS),
            "cpuset cpu io memory hugetlb pids rdma\n",
        )
        .expect("write");
        fs::write(dir.path().join(CGROUP_SUBTREE_CONTROL), "").expect("write");
        let enabled = enable_controllers(dir.path(), WANTED_CONTROLLERS).expect("enable");
        assert_eq!(enabled, vec!["cpu", "memory", "pids"]);
        assert_eq!(
            fs::read_to_string(dir.path().join(CGROUP_SUBTREE_CONTROL)).expect("read"),
            "+cpu +memory +pids"
        );
        // Below a site: no scheduling group per generation or worker.
        let enabled = enable_controllers(dir.path(), WANTED_BELOW_SITE).expect("enable");
        assert_eq!(enabled, vec!["memory", "pids"]);
        assert_eq!(
            fs::read_to_string(dir.path().join(CGROUP_SUBTREE_CONTROL)).expect("read"),
            "+memory +pids"
        );
    }

    #[test]
    fn no_controllers_offered_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(CGROUP_CONTROLLERS), "\n").expect("write");
        assert!(
            enable_controllers(dir.path(), WANTED_CONTROLLERS)
                .expect("enable")
                .is_empty()
        );
        assert!(!dir.path().join(CGROUP_SUBTREE_CONTROL).exists());
    }

    #[test]
    fn usage_is_read_from_the_accounting_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(MEMORY_CURRENT), "1048576\n").expect("write");
        fs::write(dir.path().join(MEMORY_MAX), "max\n").expect("write");
        fs::write(
            dir.path().join(MEMORY_EVENTS),
            "low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("write");
        fs::write(
            dir.path().join(CPU_STAT),
            "usage_usec 12345\nuser_usec 10000\nsystem_usec 2345\n",
        )
        .expect("write");
        fs::write(dir.path().join(PIDS_CURRENT), "3\n").expect("write");
        let u = read_usage(dir.path());
        assert_eq!(u.memory_current, Some(1 << 20));
        assert_eq!(u.memory_max, None, "max means unlimited");
        assert_eq!(u.memory_peak, None, "no memory.peak before 5.19");
        assert_eq!(
            u.peak_or_current(),
            Some(1 << 20),
            "the cap measures memory.current"
        );
        assert_eq!(measured_memory(dir.path()), Some(1 << 20));
        fs::write(dir.path().join(MEMORY_PEAK), "2097152\n").expect("write");
        assert_eq!(read_usage(dir.path()).peak_or_current(), Some(2 << 20));
        assert_eq!(measured_memory(dir.path()), Some(2 << 20));
        assert_eq!(u.oom_kills, Some(1));
        assert_eq!(u.cpu_usec, Some(12345));
        assert_eq!(u.pids, Some(3));
    }

    #[test]
    fn worker_limits_are_written_where_the_files_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [MEMORY_MAX, MEMORY_HIGH, MEMORY_OOM_GROUP] {
            fs::write(dir.path().join(f), "").expect("write");
        }
        let limits = Limits {
            worker_memory_max: Some(128 << 20),
            ..Limits::default()
        };
        CgroupTree::apply_worker_limits(dir.path(), &limits).expect("apply");
        assert_eq!(
            fs::read_to_string(dir.path().join(MEMORY_MAX)).expect("read"),
            "134217728"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(MEMORY_HIGH)).expect("read"),
            "max"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(MEMORY_OOM_GROUP)).expect("read"),
            "1"
        );
        // Without the memory controller the files are absent: nothing is written, no error.
        let bare = tempfile::tempdir().expect("tempdir");
        CgroupTree::apply_worker_limits(bare.path(), &limits).expect("apply");
        assert!(!bare.path().join(MEMORY_MAX).exists());
    }

    #[test]
    fn a_base_is_locked_once_and_the_refusal_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_base(dir.path(), None).expect("the first lock");
        match lock_base(dir.path(), None) {
            Err(e @ CgroupError::InUse { .. }) => {
                let CgroupError::InUse { holder, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*holder, Some(std::process::id()), "{e}");
                assert!(e.to_string().contains("cgroup_base"), "{e}");
            }
            other => panic!("a second lock of a held base: {other:?}"),
        }
        // The holder's own lock, passed on (an upgrade): taken as it is.
        let again = lock_base(dir.path(), Some(held)).expect("the inherited lock");
        // One on another directory is not the base's: the base is held still.
        let other = tempfile::tempdir().expect("tempdir");
        let stranger = lock_base(other.path(), None).expect("another base");
        assert!(matches!(
            lock_base(dir.path(), Some(stranger)),
            Err(CgroupError::InUse { .. })
        ));
        drop(again);
        lock_base(dir.path(), None).expect("free once its holder closed it");
    }

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd: OwnedFd = fs::File::open(dir.path()).expect("dir").into();
        let st = rustix::fs::fstat(&fd).expect("fstat");
        let id = format!(
            "{:02x}:{:02x}:{}",
            rustix::fs::major(st.st_dev),
            rustix::fs::minor(st.st_dev),
            st.st_ino
        );
        let locks = format!(
            "1: POSIX  ADVISORY  WRITE 11 {id} 0 EOF\n2: FLOCK  ADVISORY  WRITE 22 00:01:5 0 EOF\n3: -> FLOCK  ADVISORY  WRITE 44 {id} 0 EOF\n4: FLOCK  ADVISORY  WRITE 33 {id} 0 EOF\n"
        );
        assert_eq!(flock_holder(&locks, fd.as_fd()), Some(33));
        assert_eq!(flock_holder("", fd.as_fd()), None);
    }

    #[test]
    fn a_new_leaf_gets_only_the_limits_that_differ_from_the_defaults() {
        let tree = |controllers: &[&str]| CgroupTree {
            base: PathBuf::from("/nonexistent"),
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            has_kill: false,
            moved_from: None,
            lock: fs::File::open("/").expect("/").into(),
        };
        let leaf = tempfile::tempdir().expect("tempdir");
        for f in [MEMORY_MAX, MEMORY_HIGH, MEMORY_OOM_GROUP] {
            fs::write(leaf.path().join(f), "default").expect("write");
        }
        let limits = Limits {
            worker_memory_high: Some(64 << 20),
            ..Limits::default()
        };
        // No memory controller: nothing written (its files would not be there).
        tree(&["pids"])
            .apply_new_leaf_limits(leaf.path(), &limits)
            .expect("apply");
        let read = |f: &str| fs::read_to_string(leaf.path().join(f)).expect("read");
        assert_eq!(read(MEMORY_HIGH), "default");
        assert_eq!(read(MEMORY_OOM_GROUP), "default");
        // With it: what is set, and the OOM group; not `memory.max`, `max` already.
        tree(&["memory", "pids"])
            .apply_new_leaf_limits(leaf.path(), &limits)
            .expect("apply");
        assert_eq!(read(MEMORY_HIGH), "67108864");
        assert_eq!(read(MEMORY_OOM_GROUP), "1");
        assert_eq!(read(MEMORY_MAX), "default");
    }

    #[test]
    fn retired_leaves_are_removed_later_in_batches_and_a_new_leaf_takes_a_free_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = CgroupTree {
            base: dir.path().to_path_buf(),
            controllers: Vec::new(),
            has_kill: false,
            moved_from: None,
            lock: fs::File::open(dir.path()).expect("dir").into(),
        };
        fs::create_dir(dir.path().join("sites")).expect("sites");
        let mut graveyard = Graveyard::new().expect("inotify");
        let (first, _fd) = tree.new_leaf("web", 1, "w-0").expect("leaf");
        assert!(
            first.ends_with("sites/web/gen-1/w-0"),
            "{}",
            first.display()
        );
        let leaves: Vec<PathBuf> = (1..4)
            .map(|k| tree.new_leaf("web", 1, &format!("w-{k}")).expect("leaf").0)
            .collect();
        // Retired: still there (no rmdir on the hot path), counted as left to remove.
        tree.retire(&first, &mut graveyard);
        assert!(first.exists() && graveyard.has_deferred() && !graveyard.is_empty());
        assert!(graveyard.holds_below(&dir.path().join("sites/web/gen-1")));
        // The slot's next leaf takes the first free name meanwhile.
        let (next, _fd) = tree.new_leaf("web", 1, "w-0").expect("leaf");
        assert!(
            next.ends_with("sites/web/gen-1/w-0.1"),
            "{}",
            next.display()
        );
        for l in &leaves {
            tree.retire(l, &mut graveyard);
        }
        // Removed oldest first, `max` at a time.
        assert!(tree.remove_deferred(&mut graveyard, 2).is_empty());
        assert!(!first.exists() && !leaves[0].exists() && leaves[1].exists());
        assert!(graveyard.has_deferred());
        assert!(tree.remove_deferred(&mut graveyard, 100).is_empty());
        assert!(leaves.iter().all(|l| !l.exists()));
        assert!(!graveyard.has_deferred() && graveyard.is_empty());
        assert!(next.exists(), "a live leaf is left alone");
        // Its name is free again for the slot's next leaf.
        tree.retire(&next, &mut graveyard);
        assert!(tree.remove_deferred(&mut graveyard, 100).is_empty());
        let (again, _fd) = tree.new_leaf("web", 1, "w-0").expect("leaf");
        assert!(
            again.ends_with("sites/web/gen-1/w-0"),
            "{}",
            again.display()
        );
    }

    #[test]
    fn populated_is_read_from_cgroup_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(CGROUP_EVENTS), "populated 1\nfrozen 0\n").expect("write");
        assert!(CgroupTree::is_populated(dir.path()));
        fs::write(dir.path().join(CGROUP_EVENTS), "populated 0\nfrozen 0\n").expect("write");
        assert!(!CgroupTree::is_populated(dir.path()));
    }
}

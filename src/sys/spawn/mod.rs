//! `clone3(CLONE_PIDFD | CLONE_FILES | CLONE_VFORK | CLONE_INTO_CGROUP)` (and `CLONE_VM` on
//! x86-64) and the post-clone child path.
//!
//! Kernel requirements: `clone3` with `CLONE_PIDFD` (Linux 5.3), `CLONE_INTO_CGROUP`
//! (5.7, only when a cgroup is given), `close_range` (5.9).
//!
//! Everything the child needs is built in the parent first ([`ExecImage`]): the path,
//! the `argv`/`envp` pointer arrays, the fd map and an empty signal mask. The child then
//! runs only raw, async-signal-safe syscalls and never allocates, locks or unwinds,
//! because after a raw `clone3` glibc's per-thread bookkeeping still describes the
//! parent thread (and a lock another thread holds would never be released in a copy).
//!
//! The child shares the parent's fd table (`CLONE_FILES`) instead of receiving a copy:
//! an agent supervising N workers holds 2N fds (pidfds, output pipes), and copying that
//! table into every child, then closing it again at `execve`, made spawning O(N). The
//! parent first places the child's fds in a small reserved block of fd numbers
//! ([`FdBlock`]); the child's first fd operation is `close_range(block end, ~0,
//! CLOSE_RANGE_UNSHARE)` (5.9), which gives it a private table holding only the fds below
//! the block's end. Until then it touches no fd, so the shared table is never changed, and
//! `CLONE_VFORK` keeps the parent thread from changing the block until the child has
//! exec'd. The agent spawns from several threads at once when it starts several processes
//! ([`run_all`], [`StartHelpers`]), each with a block of its own: another thread may
//! open and close other fds meanwhile, and the child's copy of the table may then hold
//! them (another thread's block among them, when it lies below this block's end: its
//! report pipe's write end then closes a little later) until it closes every fd outside
//! its map (step 4); no thread writes into a block that is not its own.
//!
//! On x86-64 the child also shares the parent's memory (`CLONE_VM`, as `posix_spawn`'s
//! vfork does), which spares copying the page tables and the copy-on-write faults that
//! follow; it runs on a stack of its own held by the [`FdBlock`]. Elsewhere it runs on a
//! copy of the parent's memory. Either way it reads the plan in place, and `CLONE_VFORK`
//! keeps the parent thread suspended, so nothing changes the plan (owned by that thread's
//! call; the sandbox steps, shared by a site's spawns, are never written) until the child
//! has exec'd or exited. Without
//! `CLONE_SIGHAND` the child has its own signal handler table, and without `CLONE_SETTLS`
//! it runs on the parent thread's TLS: glibc's wrappers write `errno` into the suspended
//! thread's slot, which nothing reads after `clone3` returns.
//!
//! The child, in order:
//! 0. unshare the fd table, keeping only the fds below the block's end;
//! 1. set every signal whose disposition in the agent is not the default back to
//!    `SIG_DFL` (`SIG_IGN` survives `execve`: Rust ignores `SIGPIPE`, and whoever started
//!    the agent may have ignored others, as `nohup` and a shell's `&` do; and a child that
//!    shares our memory must never run one of our handlers), then unblock every signal
//!    (the agent blocks the ones it reads from its signalfd, and the mask survives
//!    `execve`); in that order, so no signal is delivered to a disposition of ours;
//! 2. `setpgid(0, 0)`: the worker leads a process group of its own, so the agent can
//!    signal its whole tree by group when no cgroup is available; `setsid()` instead, a
//!    session of its own, when the agent has a controlling terminal (so that no worker has
//!    it: a process may read its controlling terminal, inject input into it with
//!    `TIOCSTI`, and is sent the terminal's Ctrl-C when in its foreground group), and for
//!    `hatchery exec` on a PTY (step 5). Not a session for every worker: each session is a
//!    scheduler autogroup where no `cpu` controller groups the worker (a task group with a
//!    run queue on every CPU, made and torn down with the worker and walked by the
//!    scheduler's load balancing; see BENCHMARKS.md for what it cost a mass crash of
//!    10,000). The workers share the agent's session, as a service's processes share the
//!    one systemd gives it;
//! 3. move the fd map into place: every source is first duplicated above the highest
//!    target (so a source sitting on another target's number is never clobbered), then
//!    `dup2`ed onto its target, which also clears `FD_CLOEXEC`;
//! 4. close every other fd (`close_range` of the ranges around the close-on-exec report
//!    pipe and Landlock ruleset);
//! 5. `TIOCSCTTY` on fd 0, for `hatchery exec` on a PTY (after `setsid`: only a session
//!    leader without a controlling terminal may acquire one);
//! 6. to 14. the sandbox, when the image has a [`SandboxPlan`] (`apply_sandbox`; the list
//!    with each ordering reason is in `crate::sandbox`): rlimits, private `/tmp`, `chroot`,
//!    bounding set, groups and gid, uid, capability sets, `no_new_privs`, Landlock
//!    (`landlock_restrict_self` on the ruleset the agent built, once for a generation's
//!    workers, and placed in the block beside the report pipe; with a private `/tmp` the
//!    child builds it, from the paths and rights of the plan);
//! 15. fill in `LISTEN_PID=` with its own pid (only known now), `chdir` to the working
//!     directory (inside the root, as the site's user);
//! 16. `execve`. Any failure writes `(step, errno)` to the report pipe and `_exit(127)`s;
//!     the parent reads EOF when `execve` succeeded (the pipe is close-on-exec).
//!
//! Why not the exec-helper of DESIGN.md (the child `execveat`s the agent binary, which
//! then applies the steps in a fresh image): the second exec of a ~20 MB dynamically linked
//! Rust binary measured 1.6 ms per spawn here against 0.3 ms for the whole spawn of a
//! static worker, which would put cold start and restart far past twice the fork+exec
//! limit. DESIGN.md allows running the steps directly in the child from a plan built in
//! the parent; that is what this module does, sandbox steps included: everything they
//! need (ids, capability masks, rlimits, the root, the Landlock ruleset or its paths as C
//! strings) is built in the parent, the child only makes syscalls.

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;

mod child;
mod helpers;
use self::child::ChildPlan;
#[cfg(target_arch = "x86_64")]
use self::child::child_entry;
#[cfg(not(target_arch = "x86_64"))]
use self::child::child_main;
pub use self::helpers::{StartHelpers, on_whole_set, run_all, set_whole_set_aside, with_whole_set};

thread_local! {
    /// The capabilities this thread dropped from its own bounding set ([`bounding_fits`]):
    /// its children inherit the set without them.
    static BOUNDING_GONE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Whether this thread drops from its own bounding set what its children's sandboxes
    /// drop: the helpers, and the thread that made the one keeping the whole set
    /// ([`set_whole_set_aside`]).
    static MAY_DROP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Lets this thread drop from its own bounding set ([`bounding_fits`]).
fn may_drop_bounding_here() {
    MAY_DROP.set(true);
}

/// Whether this thread's bounding set is whole (it dropped nothing from it): its children
/// may be given any capability.
pub fn keeps_whole_set() -> bool {
    BOUNDING_GONE.get() == 0
}

/// The bounding-set mask of `caps`.
fn cap_mask(caps: &[libc::c_int]) -> u64 {
    caps.iter()
        .filter_map(|&c| u32::try_from(c).ok())
        .fold(0, |m, c| m | 1u64.checked_shl(c).unwrap_or(0))
}

/// Whether `image` may be started from this thread: not when the thread dropped from its
/// bounding set a capability the sandbox keeps there (the child could not have it back:
/// [`on_whole_set`] starts it). On a helper thread, and on the agent's own once it has set
/// a thread with the whole set aside ([`set_whole_set_aside`]), the capabilities the
/// sandbox drops are first dropped from the thread's own set, once for all its later
/// children (which then skip those `PR_CAPBSET_DROP`s: 41 for a sandbox that keeps none,
/// each a copy of the credentials, about a sixth of the child's work before `execve`, and
/// a tenth of a restart after a crash).
pub fn bounding_fits(image: &ExecImage) -> bool {
    let want = image
        .sandbox
        .as_deref()
        .filter(|sb| sb.identity.is_some())
        .map_or(0, |sb| cap_mask(&sb.drop_bounding));
    let mut gone = BOUNDING_GONE.get();
    if gone & !want != 0 {
        return false;
    }
    if MAY_DROP.get() && want & !gone != 0 {
        for cap in 0..64u32 {
            if (want & !gone) >> cap & 1 == 0 {
                continue;
            }
            // SAFETY: plain integer arguments; it changes this thread's credentials only
            // (the bounding set is per thread), which no other thread reads.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                // Left to each child (which says why it cannot).
                break;
            }
            gone |= 1 << cap;
        }
        BOUNDING_GONE.set(gone);
    }
    true
}

/// Most fds a child can be given (stdio plus listeners); bounds the child's stack array.
pub const MAX_CHILD_FDS: usize = 64;
/// Most signals a child sets back to `SIG_DFL` (every signal number fits).
const MAX_SIGNALS: usize = 65;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 10;

/// A step of the child path, reported with its errno when it fails. The numbers are the
/// steps of the module doc (the sandbox steps 6 to 14 are listed in `crate::sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStep {
    /// 0: `close_range(CLOSE_RANGE_UNSHARE)`, a private fd table.
    UnshareFds = 0,
    /// 1: resetting signal dispositions, or `sigprocmask`.
    ResetSignals = 1,
    /// 2: `setpgid` or `setsid`.
    OwnGroup = 2,
    /// 3: duplicating the fd map into place.
    MoveFds = 3,
    /// 4: `close_range` of the fds the worker must not inherit.
    CloseFds = 4,
    /// 5: `TIOCSCTTY` on the terminal given as stdin.
    ControllingTty = 5,
    /// 6: `setrlimit` of a configured limit.
    Rlimits = 6,
    /// 7: a private `/tmp`: a new mount namespace and a tmpfs.
    PrivateTmp = 7,
    /// 8: `chroot` into the site's root.
    Chroot = 8,
    /// 9: dropping capabilities from the bounding set.
    DropBounding = 9,
    /// 10: `setgroups` and `setresgid`.
    SetGroups = 10,
    /// 11: `setresuid`.
    SetUid = 11,
    /// 12: `capset` and the ambient set.
    Capabilities = 12,
    /// 13: `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs = 13,
    /// 14: `landlock_restrict_self`, after building the ruleset when the agent did not.
    Landlock = 14,
    /// 15: `chdir` to the working directory.
    Chdir = 15,
    /// 16: `execve` of the worker.
    Exec = 16,
}

impl ChildStep {
    /// Every step, in order: `ALL[n]` is step `n`.
    const ALL: [ChildStep; 17] = [
        ChildStep::UnshareFds,
        ChildStep::ResetSignals,
        ChildStep::OwnGroup,
        ChildStep::MoveFds,
        ChildStep::CloseFds,
        ChildStep::ControllingTty,
        ChildStep::Rlimits,
        ChildStep::PrivateTmp,
        ChildStep::Chroot,
        ChildStep::DropBounding,
        ChildStep::SetGroups,
        ChildStep::SetUid,
        ChildStep::Capabilities,
        ChildStep::NoNewPrivs,
        ChildStep::Landlock,
        ChildStep::Chdir,
        ChildStep::Exec,
    ];

    fn from_u32(v: u32) -> Option<ChildStep> {
        ChildStep::ALL.get(usize::try_from(v).ok()?).copied()
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::UnshareFds => "unshare the file descriptor table",
            ChildStep::ResetSignals => "reset the signal mask",
            ChildStep::OwnGroup => "lead a process group of its own",
            ChildStep::MoveFds => "move file descriptors into place",
            ChildStep::CloseFds => "close inherited file descriptors",
            ChildStep::ControllingTty => "acquire the controlling terminal",
            ChildStep::Rlimits => "set resource limits",
            ChildStep::PrivateTmp => "mount a private /tmp",
            ChildStep::Chroot => "change root to the site's root",
            ChildStep::DropBounding => "drop capabilities from the bounding set",
            ChildStep::SetGroups => "set the group and supplementary groups",
            ChildStep::SetUid => "set the user",
            ChildStep::Capabilities => "set the capability sets",
            ChildStep::NoNewPrivs => "set no_new_privs",
            ChildStep::Landlock => "build or enforce the Landlock ruleset",
            ChildStep::Chdir => "change to the working directory",
            ChildStep::Exec => "execute the command",
        }
    }
}

/// Why [`spawn`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `clone3` itself failed (no child exists).
    #[error("clone3 failed")]
    Clone(#[source] io::Error),
    /// The report pipe could not be created or read.
    #[error("failed to set up the child's report pipe")]
    Pipe(#[source] io::Error),
    /// The child reached `step` and failed with `errno`; it has been reaped.
    #[error("the child failed to {}", .step.describe())]
    Child {
        /// The failing step.
        step: ChildStep,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
}

/// The sandbox steps of one site, built in the parent (by `crate::sandbox`) and read by
/// the child; shared by every spawn of the site.
#[derive(Debug, Default)]
pub struct SandboxPlan {
    /// `(RLIMIT_*, value)`: soft and hard limit both set to `value`.
    pub rlimits: Vec<(libc::c_int, u64)>,
    /// The host path of `<root>/tmp`, to mount a private tmpfs on.
    pub private_tmp: Option<CString>,
    /// The directory to `chroot` into.
    pub root: Option<CString>,
    /// Capabilities to drop from the bounding set (every one not allowed).
    pub drop_bounding: Vec<libc::c_int>,
    /// `(uid, gid, supplementary groups)` to switch to; `None` keeps the agent's.
    pub identity: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// With an identity: the capabilities kept (permitted, effective, inheritable and
    /// ambient), as a 64-bit mask.
    pub keep_caps: u64,
    /// The Landlock ruleset to build and enforce.
    pub landlock: Option<super::landlock::LandlockPlan>,
}

impl SandboxPlan {
    /// The Landlock ruleset the agent builds for the children it starts with this plan
    /// (`event::workers` keeps one per generation), if it can: not with a private `/tmp`,
    /// whose rules name the tmpfs each child mounts (`sys::landlock`). The paths are
    /// opened as the site's user would (its file-system ids and groups on this thread, for
    /// the moment: the permissions and the protection of symlinks in sticky directories
    /// are the user's, as when the child opens them).
    /// `None` when it cannot: each child then builds its own, and says why it failed if
    /// it does. Only while no other thread of the agent starts processes (the helper
    /// threads wait for their batch): it changes this thread's file-system ids for a
    /// moment (`sys::creds`).
    pub fn build_ruleset(&self) -> Option<OwnedFd> {
        let plan = self
            .landlock
            .as_ref()
            .filter(|_| self.private_tmp.is_none())?;
        // The root as the agent's own: the child enters it before it changes ids.
        let root = match &self.root {
            Some(path) => Some(
                rustix::fs::open(
                    path.as_c_str(),
                    rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .ok()?,
            ),
            None => None,
        };
        let _as_user = match &self.identity {
            Some((uid, gid, groups)) => Some(super::creds::become_fs(*uid, *gid, groups).ok()?),
            None => None,
        };
        super::landlock::build(plan, root.as_ref().map(AsFd::as_fd)).ok()
    }
}

/// Everything `execve` needs, built in the parent before `clone3`.
#[derive(Debug)]
pub struct ExecImage {
    path: CString,
    workdir: Option<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    env: Vec<Box<[u8]>>,
    env_ptrs: Vec<*const c_char>,
    listen_pid: Option<usize>,
    sandbox: Option<std::sync::Arc<SandboxPlan>>,
    /// The sandbox's Landlock ruleset, built by the agent ([`SandboxPlan::build_ruleset`]);
    /// without it the child builds its own.
    ruleset: Option<std::sync::Arc<OwnedFd>>,
    controlling_tty: bool,
    /// A session of its own (`setsid`), not only a process group.
    new_session: bool,
}

impl ExecImage {
    /// Builds the image. `env` entries are `KEY=VALUE`; with `with_listen_pid`, a
    /// `LISTEN_PID=` entry is added that the child fills with its own pid.
    ///
    /// Fails with `InvalidInput` if any string contains a NUL byte or `argv` is empty.
    pub fn new(
        path: &str,
        argv: &[String],
        env: &[String],
        workdir: Option<&str>,
        with_listen_pid: bool,
    ) -> io::Result<ExecImage> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte");
        if argv.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
        }
        let path = CString::new(path).map_err(nul)?;
        let workdir = workdir.map(CString::new).transpose().map_err(nul)?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(nul)?;
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env: Vec<Box<[u8]>> = env
            .iter()
            .map(|e| CString::new(e.as_str()).map(|c| c.into_bytes_with_nul().into()))
            .collect::<Result<_, _>>()
            .map_err(nul)?;
        let mut listen_pid = None;
        if with_listen_pid {
            let mut slot = LISTEN_PID_PREFIX.to_vec();
            slot.extend_from_slice(&[b'0'; PID_DIGITS]);
            slot.push(0);
            listen_pid = Some(env.len());
            env.push(slot.into());
        }
        let mut env_ptrs: Vec<*const c_char> = env.iter().map(|e| e.as_ptr().cast()).collect();
        env_ptrs.push(std::ptr::null());
        Ok(ExecImage {
            path,
            workdir,
            _argv: argv,
            argv_ptrs,
            env,
            env_ptrs,
            listen_pid,
            sandbox: None,
            ruleset: None,
            controlling_tty: false,
            new_session: agent_has_terminal(),
        })
    }

    /// Applies `plan` in the child before `execve`.
    pub fn set_sandbox(&mut self, plan: std::sync::Arc<SandboxPlan>) {
        self.sandbox = Some(plan);
        self.ruleset = None;
    }

    /// Gives the child `ruleset`, built from the plan of [`ExecImage::set_sandbox`] (called
    /// first): it only enforces it.
    pub fn set_ruleset(&mut self, ruleset: std::sync::Arc<OwnedFd>) {
        self.ruleset = Some(ruleset);
    }

    /// Makes fd 0 (a terminal) the child's controlling terminal (in a session of its own).
    pub fn set_controlling_tty(&mut self) {
        self.controlling_tty = true;
        self.new_session = true;
    }
}

/// Whether this process has a controlling terminal (read once: the agent never acquires one,
/// opening terminals with `O_NOCTTY`). Its children are then given sessions of their own.
fn agent_has_terminal() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| tty_nr(&stat))
            // Unreadable: as with a terminal, the safe side.
            .is_none_or(|tty| tty != 0)
    })
}

/// The `tty_nr` field of a `/proc/PID/stat` line: 0 without a controlling terminal.
fn tty_nr(stat: &str) -> Option<i64> {
    // The command name, in parentheses, may hold spaces and parentheses: the fields
    // after it start behind the last `)`: state, ppid, pgrp, session, tty_nr.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(4)?.parse().ok()
}

// SAFETY: the raw pointers of an `ExecImage` (`argv_ptrs`, `env_ptrs`) point into heap
// buffers the image itself owns (`_argv`'s `CString`s, `env`'s boxes), which stay where
// they are when the image moves to another thread; no other value points into them, and
// only a spawn, through `&mut ExecImage`, writes to them (the `LISTEN_PID` digits).
unsafe impl Send for ExecImage {}

/// A child that has successfully `execve`d.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid (for display and for matching `SCM_CREDENTIALS`; always used with `pidfd`).
    pub pid: i32,
    /// Its pidfd, the only handle the agent uses to signal and reap it.
    pub pidfd: OwnedFd,
    /// `CLOCK_BOOTTIME` just before `clone3` and just after it returned, in nanoseconds:
    /// the kernel took the child's start time between the two.
    pub born_between: (u64, u64),
}

// Linux uapi values; libc has no `clone_args` for glibc targets.
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_FILES: u64 = 0x400;
#[cfg(target_arch = "x86_64")]
const CLONE_VM: u64 = 0x100;
/// The child's stack: its path uses well under 4 KiB.
const CHILD_STACK_BYTES: usize = 64 * 1024;
const CLONE_VFORK: u64 = 0x4000;
const CLOSE_RANGE_UNSHARE: libc::c_uint = 1 << 1;
/// The slot of an [`FdBlock`] that holds the Landlock ruleset during a spawn.
const RULESET_SLOT: usize = MAX_CHILD_FDS;

/// A block of consecutive fd numbers reserved for passing fds to children: slot `i`
/// holds the child's future fd `i` during a spawn, slot [`RULESET_SLOT`] the Landlock
/// ruleset, the last slot the report pipe. Between spawns every slot holds a close-on-exec
/// duplicate of `/dev/null`.
#[derive(Debug)]
pub struct FdBlock {
    slots: Vec<OwnedFd>,
    filler: OwnedFd,
    /// The stack the child runs on (x86-64, where it shares our memory: `CLONE_VM`).
    stack: Box<[u128]>,
    /// Slots holding something other than the filler.
    dirty: Vec<usize>,
    /// Signals whose disposition is not the default in this process, read when the
    /// block is reserved (the agent sets its dispositions up before).
    reset_signals: [libc::c_int; MAX_SIGNALS],
    n_reset: usize,
}

impl FdBlock {
    /// Reserves `MAX_CHILD_FDS + 2` consecutive fd numbers above every fd open now.
    pub fn reserve(filler: OwnedFd) -> io::Result<FdBlock> {
        let len = MAX_CHILD_FDS + 2;
        let mut base = rustix::io::fcntl_dupfd_cloexec(&filler, 0)?.as_raw_fd() + 1;
        'search: loop {
            let mut slots = Vec::with_capacity(len);
            for i in 0..len {
                let want = base + RawFd::try_from(i).expect("small");
                let fd = rustix::io::fcntl_dupfd_cloexec(&filler, want)?;
                if fd.as_raw_fd() != want {
                    // Something sits at `want`: start again above it.
                    base = fd.as_raw_fd() + 1;
                    continue 'search;
                }
                slots.push(fd);
            }
            let mut reset_signals = [0; MAX_SIGNALS];
            let non_default = super::signals::non_default();
            let n_reset = non_default.len().min(MAX_SIGNALS);
            reset_signals[..n_reset].copy_from_slice(&non_default[..n_reset]);
            return Ok(FdBlock {
                slots,
                filler,
                stack: vec![0u128; CHILD_STACK_BYTES / 16].into_boxed_slice(),
                dirty: Vec::with_capacity(len),
                reset_signals,
                n_reset,
            });
        }
    }

    fn base(&self) -> RawFd {
        self.slots[0].as_raw_fd()
    }

    fn end(&self) -> RawFd {
        self.base() + RawFd::try_from(self.slots.len()).expect("small")
    }

    /// Puts `fd` into slot `i` (close-on-exec: the child's dup2 clears that).
    fn place(&mut self, i: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.dirty.push(i);
        rustix::io::dup3(fd, &mut self.slots[i], rustix::io::DupFlags::CLOEXEC)
            .map_err(io::Error::from)
    }

    /// Refills every slot with `/dev/null`, dropping the references a spawn placed there.
    fn clear(&mut self) {
        for i in self.dirty.drain(..) {
            let _ = rustix::io::dup3(
                &self.filler,
                &mut self.slots[i],
                rustix::io::DupFlags::CLOEXEC,
            );
        }
    }
}

/// `struct clone_args` as of Linux 5.7 (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Creates a child that runs `image` with `fds[i]` as its fd `i`, born in `cgroup` when
/// given. Returns once the child has `execve`d (or failed to).
///
/// `CLONE_VFORK` suspends only the calling thread: no other thread may use `block` (each
/// spawning thread has its own: the `&mut` says so) or write to `image` meanwhile (the
/// `&mut` again), and none may `dup2` onto a number it did not open (the agent does so only
/// into its blocks). Other threads may open and close fds: the child's copy of the table
/// holds whatever they left below the block's end until step 4 closes it. Nothing outside
/// this crate can call it (`sys` is private; the callers are `crate::spawn`'s, and only the
/// agent holds [`FdBlock`]s).
pub fn spawn(
    image: &mut ExecImage,
    fds: &[BorrowedFd<'_>],
    cgroup: Option<BorrowedFd<'_>>,
    block: &mut FdBlock,
) -> Result<Spawned, SpawnError> {
    let result = spawn_with_block(image, fds, cgroup, block);
    block.clear();
    result
}

fn spawn_with_block(
    image: &mut ExecImage,
    fds: &[BorrowedFd<'_>],
    cgroup: Option<BorrowedFd<'_>>,
    block: &mut FdBlock,
) -> Result<Spawned, SpawnError> {
    if fds.len() > MAX_CHILD_FDS {
        return Err(SpawnError::Clone(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for the child",
        )));
    }
    let sandbox = image.sandbox.clone();
    // The ruleset the agent built, if there is one; else the child builds its own.
    let ruleset = image.ruleset.clone();
    let (report_r, report_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnError::Pipe(e.into()))?;
    let mut raw_fds = [-1 as RawFd; MAX_CHILD_FDS];
    for (i, fd) in fds.iter().enumerate() {
        block.place(i, *fd).map_err(SpawnError::Pipe)?;
        raw_fds[i] = block.base() + RawFd::try_from(i).expect("small");
    }
    let report_slot = block.slots.len() - 1;
    block
        .place(report_slot, report_w.as_fd())
        .map_err(SpawnError::Pipe)?;
    drop(report_w);
    let ruleset_fd = match &ruleset {
        Some(fd) => {
            block
                .place(RULESET_SLOT, fd.as_fd())
                .map_err(SpawnError::Pipe)?;
            block.base() + RawFd::try_from(RULESET_SLOT).expect("small")
        }
        None => -1,
    };
    let listen_pid: *mut u8 = match image.listen_pid {
        Some(i) => image.env[i]
            .as_mut_ptr()
            .wrapping_add(LISTEN_PID_PREFIX.len()),
        None => std::ptr::null_mut(),
    };
    let plan = ChildPlan {
        bounding_gone: BOUNDING_GONE.get(),
        path: image.path.as_c_str(),
        argv: image.argv_ptrs.as_ptr(),
        envp: image.env_ptrs.as_ptr(),
        workdir: image.workdir.as_deref(),
        fds: raw_fds,
        nfds: fds.len(),
        report: block.base() + RawFd::try_from(report_slot).expect("small"),
        unshare_from: libc::c_uint::try_from(block.end()).expect("fds are non-negative"),
        listen_pid,
        sandbox: sandbox.as_deref(),
        ruleset: ruleset_fd,
        controlling_tty: image.controlling_tty,
        new_session: image.new_session,
        reset_signals: block.reset_signals,
        n_reset: block.n_reset,
    };

    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        // CLONE_VFORK suspends us until the child has exec'd or exited, so it has
        // unshared the fd table before we touch the block again.
        flags: CLONE_PIDFD | CLONE_FILES | CLONE_VFORK,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(cg) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(cg.as_raw_fd()).expect("fds are non-negative");
    }
    let before = crate::process::boottime_ns();
    let ret = clone_child(&mut args, &plan, &mut block.stack);
    let after = crate::process::boottime_ns();
    let ret = cvt(ret).map_err(SpawnError::Clone)?;
    // The child has exec'd or exited (CLONE_VFORK): drop our references to its fds, the
    // report pipe's write end among them, so the read below sees EOF on success.
    block.clear();
    let pid = i32::try_from(ret).expect("pids fit in an i32");
    // SAFETY: with CLONE_PIDFD and a successful clone3 the kernel stored a new pidfd in
    // `pidfd`; nobody else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };

    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        match rustix::io::read(&report_r, &mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(SpawnError::Pipe(e.into())),
        }
    }
    if got == 0 {
        return Ok(Spawned {
            pid,
            pidfd,
            born_between: (before, after),
        });
    }
    // The child failed before or at execve and is exiting with 127: reap it now so no
    // zombie is left behind.
    let _ = rustix::process::waitid(
        rustix::process::WaitId::PidFd(pidfd.as_fd()),
        rustix::process::WaitIdOptions::EXITED,
    );
    let step_raw = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Err(SpawnError::Child {
        step: ChildStep::from_u32(step_raw).unwrap_or(ChildStep::Exec),
        source: io::Error::from_raw_os_error(errno),
    })
}

/// `clone3` and the start of the child, x86-64: the child shares our memory (`CLONE_VM`,
/// like `posix_spawn`'s vfork), which spares copying the page tables and the
/// copy-on-write faults that follow, and runs on `stack`.
#[cfg(target_arch = "x86_64")]
fn clone_child(args: &mut CloneArgs, plan: &ChildPlan<'_>, stack: &mut [u128]) -> libc::c_long {
    args.flags |= CLONE_VM;
    args.stack = stack.as_mut_ptr() as u64;
    args.stack_size = u64::try_from(std::mem::size_of_val(stack)).expect("small");
    let ret: libc::c_long;
    // SAFETY: `args` is a fully initialised `clone_args` that outlives the call, passed
    // with its exact size. With CLONE_VM | CLONE_VFORK the kernel suspends this thread
    // until the child has exec'd or exited; the child reads only `plan` and what it points
    // to, which this thread's caller owns and no other thread changes (see `spawn`), and
    // writes only its stack, the `LISTEN_PID` digits of the image and this thread's
    // `errno`; it starts on `stack` (16-byte aligned, `size_of_val` bytes, owned
    // by the caller's `FdBlock` for the whole call), with rsp = stack + size, which is
    // 16-byte aligned before the `call`, as the ABI wants. It never returns into this
    // frame: `child_entry` is `-> !` and the `ud2` after it is unreachable. In the parent
    // the syscall clobbers only rax, rcx and r11; r12 and r13 are read, not written.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") plan as *const ChildPlan<'_>,
            in("r13") child_entry as extern "C" fn(*const ChildPlan<'_>) -> !,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        // Raw syscall: the error is the negated errno, not -1 with errno set.
        let errno = i32::try_from(-ret).unwrap_or(libc::EINVAL);
        // SAFETY: `__errno_location` returns this thread's errno slot.
        unsafe { *libc::__errno_location() = errno };
        return -1;
    }
    ret
}

/// Elsewhere: the child gets a copy of our memory and starts on a copy of this stack.
#[cfg(not(target_arch = "x86_64"))]
fn clone_child(args: &mut CloneArgs, plan: &ChildPlan<'_>, _stack: &mut [u128]) -> libc::c_long {
    // SAFETY: `args` is a fully initialised `clone_args` living until the call returns,
    // passed with its exact size. Without CLONE_VM the child runs on a private copy of
    // this address space and `stack` (0) means "the current stack"; CLONE_VFORK keeps us
    // suspended until it has exec'd or exited.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // SAFETY: we are the freshly cloned child (CLONE_VFORK, neither CLONE_VM,
        // CLONE_SIGHAND nor CLONE_THREAD); `plan` points into our private copy of the
        // parent's memory, unchanged since it was built. It never returns.
        unsafe { child_main(plan) }
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_steps_are_numbered_as_the_module_doc_lists_them() {
        for (n, step) in ChildStep::ALL.iter().enumerate() {
            let n = u32::try_from(n).expect("small");
            assert_eq!(*step as u32, n, "{step:?}");
            assert_eq!(ChildStep::from_u32(n), Some(*step));
        }
        assert_eq!(ChildStep::from_u32(17), None);
        // The module doc's list, "N. ..." or "N. to M. ...", one number per step.
        let doc: Vec<u32> = include_str!("mod.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .filter_map(|l| {
                let (n, rest) = l.strip_prefix("//! ")?.split_once(". ")?;
                let n: u32 = n.parse().ok()?;
                let to = rest
                    .strip_prefix("to ")
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(m, _)| m.parse().ok())
                    .unwrap_or(n);
                Some((n..=to).collect::<Vec<_>>())
            })
            .flatten()
            .collect();
        assert_eq!(doc, (0..=16).collect::<Vec<_>>());
    }

    #[test]
    fn the_controlling_terminal_is_read_behind_the_command_name() {
        let on_pts = "4242 (sh) S 4200 4242 4200 34817 4242 4194304 100 0 0 0";
        assert_eq!(tty_nr(on_pts), Some(34817));
        // A name with spaces and a parenthesis, and no terminal.
        let none = "77 (a) b (c) S 1 77 77 0 -1 4194560 5 0 0 0";
        assert_eq!(tty_nr(none), Some(0));
        assert_eq!(tty_nr("77 (cut short"), None);
        assert_eq!(tty_nr("77 (x) S 1 77"), None);
    }
}

//! The child's side of a spawn: what runs between `clone3` and `execve`, in the order the
//! parent module's documentation lists (steps 0 to 16), with only raw, async-signal-safe
//! syscalls. Everything it reads was built in the parent ([`ChildPlan`]).

use std::ffi::{CStr, c_char};
use std::os::fd::RawFd;

use super::*;

/// The child's first Rust frame, on its own stack (x86-64 `CLONE_VM` path).
#[cfg(target_arch = "x86_64")]
pub(super) extern "C" fn child_entry(plan: *const ChildPlan<'_>) -> ! {
    // SAFETY: `plan` is the pointer the parent passed in r12, to a `ChildPlan` on the
    // parent thread's stack; that thread is suspended (CLONE_VFORK) and no other thread
    // changes what it points to, so it stays valid and unchanged until we exec or exit. The flags are those child_main
    // requires: CLONE_VM | CLONE_VFORK, neither CLONE_SIGHAND nor CLONE_THREAD.
    unsafe { child_main(&*plan) }
}

/// Raw pointers and numbers the child reads; built in the parent.
pub(super) struct ChildPlan<'a> {
    /// The capabilities the parent thread dropped from its own bounding set: inherited
    /// gone, not dropped again.
    pub(super) bounding_gone: u64,
    pub(super) path: &'a CStr,
    pub(super) argv: *const *const c_char,
    pub(super) envp: *const *const c_char,
    pub(super) workdir: Option<&'a CStr>,
    pub(super) fds: [RawFd; MAX_CHILD_FDS],
    pub(super) nfds: usize,
    pub(super) report: RawFd,
    pub(super) unshare_from: libc::c_uint,
    pub(super) listen_pid: *mut u8,
    pub(super) sandbox: Option<&'a SandboxPlan>,
    /// The Landlock ruleset the agent built for the sandbox, -1 when there is none.
    pub(super) ruleset: RawFd,
    pub(super) controlling_tty: bool,
    /// `setsid` rather than `setpgid(0, 0)`.
    pub(super) new_session: bool,
    pub(super) reset_signals: [libc::c_int; MAX_SIGNALS],
    pub(super) n_reset: usize,
}

/// The child side: only raw syscalls, no allocation, no panics. Never returns.
///
/// # Safety
///
/// Must be called only in the child of `clone_child`'s `clone3`: with `CLONE_VFORK`, and
/// without `CLONE_SIGHAND` or `CLONE_THREAD`. On x86-64 the child shares the parent's
/// memory (`CLONE_VM`) and runs on the [`FdBlock`]'s stack; elsewhere it runs on a copy of
/// the parent's memory. Either way `plan` and everything it points to must be valid there
/// and unchanged until the child execs or exits: `CLONE_VFORK` suspends the parent thread
/// for that long, and [`spawn`] requires that no other thread changes it.
pub(super) unsafe fn child_main(plan: &ChildPlan<'_>) -> ! {
    // Step 0: a private fd table with only the fds below the block's end. Nothing before
    // this line may touch an fd: the table is still the parent's.
    // SAFETY: close_range takes plain integers; with CLOSE_RANGE_UNSHARE the kernel first
    // gives this task its own copy of the table (only fds below `unshare_from`), so the
    // parent's table is not changed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            plan.unshare_from,
            libc::c_uint::MAX,
            CLOSE_RANGE_UNSHARE,
        )
    };
    if ret != 0 {
        // The report pipe is in the shared table: writing to it changes no table.
        fail(plan.report, ChildStep::UnshareFds);
    }

    // Step 1: signals. Dispositions first, while the agent's mask still blocks what it
    // reads; without CLONE_SIGHAND this child has its own copy of the handler table, so
    // the agent's stays as it is.
    let mut k = 0;
    while k < plan.n_reset.min(MAX_SIGNALS) {
        // SAFETY: we are the child, with a handler table of our own (no CLONE_SIGHAND);
        // SIG_DFL installs no handler.
        if unsafe { crate::sys::signals::raw_set_default(plan.reset_signals[k]) } != 0 {
            fail(plan.report, ChildStep::ResetSignals);
        }
        k += 1;
    }
    let empty = crate::sys::signals::SigSet::of(&[]);
    // SAFETY: `empty.0` is an initialised empty set on this stack; no old mask returned.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty.0, std::ptr::null_mut()) } != 0 {
        fail(plan.report, ChildStep::ResetSignals);
    }

    // Step 2: our own process group, in a session of our own when asked.
    let led = if plan.new_session {
        // SAFETY: plain syscall without pointers.
        unsafe { libc::setsid() }
    } else {
        // SAFETY: plain syscall with integer arguments (0, 0: this process, its own pid).
        unsafe { libc::setpgid(0, 0) }
    };
    if led < 0 {
        fail(plan.report, ChildStep::OwnGroup);
    }

    // Step 3: fd map. Duplicate every source above the highest target first.
    let n = plan.nfds.min(MAX_CHILD_FDS);
    let base = libc::c_int::try_from(n).unwrap_or(0);
    let mut high = [-1 as RawFd; MAX_CHILD_FDS];
    let mut i = 0;
    while i < n {
        // SAFETY: F_DUPFD_CLOEXEC on an fd we inherited; the kernel picks the lowest
        // free number >= base, so no open fd is replaced.
        let fd = unsafe { libc::fcntl(plan.fds[i], libc::F_DUPFD_CLOEXEC, base) };
        if fd < 0 {
            fail(plan.report, ChildStep::MoveFds);
        }
        high[i] = fd;
        i += 1;
    }
    // SAFETY: as above, for the report pipe, so it survives the dup2 targets and the
    // close below; it is close-on-exec.
    let report = unsafe { libc::fcntl(plan.report, libc::F_DUPFD_CLOEXEC, base) };
    if report < 0 {
        fail(plan.report, ChildStep::MoveFds);
    }
    // And the ruleset, used at step 14 and closed by execve.
    let ruleset = if plan.ruleset >= 0 {
        // SAFETY: as above.
        let fd = unsafe { libc::fcntl(plan.ruleset, libc::F_DUPFD_CLOEXEC, base) };
        if fd < 0 {
            fail(report, ChildStep::MoveFds);
        }
        fd
    } else {
        -1
    };
    let mut target = 0;
    while target < n {
        let t = libc::c_int::try_from(target).unwrap_or(0);
        // SAFETY: dup2 between two fds of this process; the new fd has FD_CLOEXEC clear.
        if unsafe { libc::dup2(high[target], t) } < 0 {
            fail(report, ChildStep::MoveFds);
        }
        target += 1;
    }

    // Step 4: close everything else except the report pipe and the ruleset (closed by
    // execve itself), outright rather than marking it close-on-exec: the sandbox steps may
    // open fds of their own (Landlock rules built here) after a RLIMIT_NOFILE that the
    // agent's fd numbers may exceed.
    if !close_all_but(n, [report, ruleset]) {
        fail(report, ChildStep::CloseFds);
    }

    // Step 5: the controlling terminal (`hatchery exec` on a PTY): after setsid, since
    // only a session leader without one may acquire it, and after fd 0 is in place.
    if plan.controlling_tty {
        // SAFETY: TIOCSCTTY takes an int argument (0: do not steal), no pointer.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            fail(report, ChildStep::ControllingTty);
        }
    }
    if let Some(sb) = plan.sandbox {
        // SAFETY: `sb` is the parent's plan, valid and unchanged until we exec (see the
        // contract of child_main).
        unsafe { apply_sandbox(sb, report, ruleset, plan.bounding_gone) };
    }

    // Step 15: LISTEN_PID and the working directory.
    if !plan.listen_pid.is_null() {
        // SAFETY: raw getpid syscall: glibc's cached tid may describe the parent.
        let mut pid = unsafe { libc::syscall(libc::SYS_getpid) };
        let mut digits = [b'0'; PID_DIGITS];
        let mut k = PID_DIGITS;
        while pid > 0 && k > 0 {
            k -= 1;
            digits[k] = b'0' + u8::try_from(pid % 10).unwrap_or(0);
            pid /= 10;
        }
        let len = PID_DIGITS - k;
        let mut j = 0;
        while j < PID_DIGITS {
            let byte = if j < len { digits[k + j] } else { 0 };
            // SAFETY: `listen_pid` points at the PID_DIGITS-byte digit area of a
            // PID_DIGITS+1-byte slot (ending in NUL) of the image's env buffer: on x86-64
            // the parent's own (`CLONE_VM`), which `spawn` holds by `&mut` for the whole
            // call and the next spawn overwrites whole; elsewhere this child's copy.
            // j < PID_DIGITS keeps the write inside it. Writing 0 after the digits
            // terminates the string early.
            unsafe { plan.listen_pid.add(j).write(byte) };
            j += 1;
        }
    }
    if let Some(dir) = plan.workdir {
        // SAFETY: `dir` is a NUL-terminated string of the parent's plan (see child_main).
        if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
            fail(report, ChildStep::Chdir);
        }
    }

    // Step 16: execve.
    // SAFETY: path, argv and envp are NUL-terminated strings and null-terminated pointer
    // arrays built by `ExecImage::new`, valid and unchanged until we exec (see child_main).
    unsafe { libc::execve(plan.path.as_ptr(), plan.argv, plan.envp) };
    fail(report, ChildStep::Exec)
}

/// Closes every fd from `first` up but those of `keep` (-1: none). False if a
/// `close_range` failed.
fn close_all_but(first: usize, keep: [RawFd; 2]) -> bool {
    let mut keep = keep;
    keep.sort_unstable();
    let mut from = libc::c_uint::try_from(first).unwrap_or(0);
    for k in keep {
        let Ok(k) = libc::c_uint::try_from(k) else {
            continue;
        };
        if k < from {
            continue;
        }
        // SAFETY: plain integers; the range ends below `k`, which stays open.
        if k > from && unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) } != 0 {
            return false;
        }
        from = k + 1;
    }
    // SAFETY: plain integers; every fd kept is below `from`.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0) == 0 }
}

/// Steps 6 to 14 of the module doc: the sandbox. Only raw syscalls; every failure ends
/// the child through [`fail`]. `ruleset`: the Landlock ruleset the agent built, or -1;
/// `bounding_gone`: the capabilities already gone from the bounding set.
///
/// # Safety
///
/// Must be called only in the child, with `sb` valid in its view of the parent's memory.
unsafe fn apply_sandbox(sb: &SandboxPlan, report: RawFd, ruleset: RawFd, bounding_gone: u64) {
    // Step 6: rlimits, while we still have CAP_SYS_RESOURCE (raising a hard limit needs it).
    for &(resource, value) in &sb.rlimits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `lim` is on this stack; the resource is one of RLIMIT_* (from config).
        if unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                resource,
                &lim,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        } != 0
        {
            fail(report, ChildStep::Rlimits);
        }
    }
    // Step 7: a private /tmp: our own mount namespace (CAP_SYS_ADMIN, so before dropping
    // privileges; before Landlock, which forbids mounting), made private so the tmpfs does
    // not propagate back to the host, then a tmpfs on <root>/tmp.
    if let Some(tmp) = &sb.private_tmp {
        // SAFETY: plain flag argument.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            fail(report, ChildStep::PrivateTmp);
        }
        // SAFETY: NUL-terminated static strings; no data argument.
        if unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } != 0
        {
            fail(report, ChildStep::PrivateTmp);
        }
        // SAFETY: `tmp` is a NUL-terminated path in the parent's plan; the options string
        // is static.
        if unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                tmp.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777,size=64m".as_ptr().cast(),
            )
        } != 0
        {
            fail(report, ChildStep::PrivateTmp);
        }
    }
    // Step 8: chroot (CAP_SYS_CHROOT, so before dropping privileges), then chdir("/") so
    // the working directory is not left outside the new root (the classic `..` escape).
    if let Some(root) = &sb.root {
        // SAFETY: NUL-terminated path in the parent's plan.
        if unsafe { libc::chroot(root.as_ptr()) } != 0 {
            fail(report, ChildStep::Chroot);
        }
        // SAFETY: static NUL-terminated path.
        if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
            fail(report, ChildStep::Chroot);
        }
    }
    if let Some((uid, gid, groups)) = &sb.identity {
        // Step 9: the bounding set, while we have CAP_SETPCAP (gone after setresuid to a
        // non-root user); a root worker would regain every capability left in it at exec.
        for &cap in &sb.drop_bounding {
            let bit = u32::try_from(cap).map_or(0, |c| 1u64.checked_shl(c).unwrap_or(0));
            if bounding_gone & bit != 0 {
                continue;
            }
            // SAFETY: plain integer arguments.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                fail(report, ChildStep::DropBounding);
            }
        }
        // Step 10: groups, then gid: both need CAP_SETGID, gone after setresuid.
        // SAFETY: `groups` is a live slice in the parent's plan; the length matches it.
        // Raw, like setresgid and setresuid below: glibc's wrapper is a setxid call too.
        if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
            fail(report, ChildStep::SetGroups);
        }
        // SAFETY: plain integer arguments. Raw syscalls: glibc's setxid broadcast to
        // other threads does not apply to this single task.
        if unsafe { libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) } != 0 {
            fail(report, ChildStep::SetGroups);
        }
        // Step 11: the uid, last of the identity. KEEPCAPS keeps the permitted set across
        // it when some capabilities are allowed (step 12 then trims it).
        if sb.keep_caps != 0 {
            // SAFETY: plain integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
                fail(report, ChildStep::SetUid);
            }
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) } != 0 {
            fail(report, ChildStep::SetUid);
        }
        // Step 12: effective, permitted and inheritable = the allow-list; then ambient, so
        // the allowed capabilities survive execve for a non-root user. After setresuid,
        // which cleared the effective set.
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let lo = u32::try_from(sb.keep_caps & 0xffff_ffff).unwrap_or(0);
        let hi = u32::try_from(sb.keep_caps >> 32).unwrap_or(0);
        let data = [
            CapData {
                effective: lo,
                permitted: lo,
                inheritable: lo,
            },
            CapData {
                effective: hi,
                permitted: hi,
                inheritable: hi,
            },
        ];
        // SAFETY: header and data live on this stack; version 3 takes two CapData.
        if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
            fail(report, ChildStep::Capabilities);
        }
        // SAFETY: plain integer arguments.
        if unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        } != 0
        {
            fail(report, ChildStep::Capabilities);
        }
        let mut cap = 0;
        while cap < 64 {
            if sb.keep_caps & (1u64 << cap) != 0 {
                // SAFETY: plain integer arguments.
                if unsafe {
                    libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0)
                } != 0
                {
                    fail(report, ChildStep::Capabilities);
                }
            }
            cap += 1;
        }
    }
    // Step 13: no_new_privs, always: setuid files and file capabilities grant nothing at
    // execve. Before Landlock, which requires it of a task without CAP_SYS_ADMIN.
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        fail(report, ChildStep::NoNewPrivs);
    }
    // Step 14: Landlock, last: nothing the child still does (chdir, execve of an allowed
    // path) is refused by it, and the mount of step 7 would be. The ruleset the agent
    // built when it could; with a private /tmp, built here, after the tmpfs exists and
    // inside the root, so its rules name the worker's inodes.
    let enforced = match (ruleset, &sb.landlock) {
        (fd, _) if fd >= 0 => crate::sys::landlock::child_restrict(fd),
        // SAFETY: `ll` is the parent's plan, valid until we exec; no_new_privs is set.
        (_, Some(ll)) => unsafe { crate::sys::landlock::child_enforce(ll) },
        (_, None) => Ok(()),
    };
    if enforced.is_err() {
        fail(report, ChildStep::Landlock);
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Reports `(step, errno)` on the report pipe and exits the child with 127.
fn fail(report: RawFd, step: ChildStep) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut msg = [0u8; 8];
    let (a, b) = msg.split_at_mut(4);
    a.copy_from_slice(&(step as u32).to_ne_bytes());
    b.copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: `msg` is an 8-byte stack buffer; a short or failed write only loses the
    // diagnosis (the parent then sees EOF and the worker's exit status 127).
    unsafe { libc::write(report, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: `_exit` ends the child immediately (`exit_group` of the child's own thread
    // group: no CLONE_THREAD), without running atexit handlers or destructors, which
    // belong to the parent whose memory this child shares or copies.
    unsafe { libc::_exit(127) }
}

//! The only module allowed to use `unsafe`: one kernel facility per file, no policy.
//!
//! Everything here is a thin, documented wrapper over a syscall that `rustix` does not
//! cover (or cannot cover safely for our use):
//!
//! - [`spawn`]: `clone3(CLONE_PIDFD | CLONE_FILES | CLONE_VFORK)`, with `CLONE_VM` on
//!   x86-64 and `CLONE_INTO_CGROUP` when a cgroup is given, and the post-clone child path,
//!   which runs only raw, allocation-free syscalls before `execve` (Linux 5.3; the cgroup
//!   flag needs 5.7 and is optional; `close_range` 5.9).
//! - [`bpf`]: `bpf(2)` map create/update and `SK_REUSEPORT` program load, and
//!   `SO_ATTACH_REUSEPORT_EBPF` (Linux 4.19; select-or-migrate 5.14).
//! - [`fork`]: `fork(2)` for a zygote (refused unless the process has one thread),
//!   `_exit(2)`, and setting the environment in the forked child.
//! - [`activation`]: adopting fds passed with `LISTEN_FDS` (the worker side).
//! - [`creds`]: `setfsuid`/`setfsgid`/`setgroups` for a moment, to resolve a path with a
//!   site user's permissions.
//! - [`signals`]: `sigprocmask` + `signalfd`, so the event loop receives signals as fd
//!   readiness (Linux 2.6.27).
//! - [`wait`]: `waitid(P_ALL, WNOWAIT)` to find which child became a zombie, for reaping
//!   orphans re-parented to us as child subreaper.
//! - [`pidfd`]: `pidfd_send_signal` with the null signal, to confirm a process opened
//!   with `pidfd_open` is still the one we looked at (Linux 5.1), and `PIDFD_GET_INFO`
//!   for the exit status of a process that is not our child (Linux 6.15).
//! - [`landlock`]: probing the ABI version, building a ruleset in the agent for a
//!   generation's workers (inside the site's root, as its user), and enforcing it, or building it
//!   too, in the spawn child (called from [`spawn`]'s child path, after `chroot` and the
//!   private `/tmp`; `crate::sandbox` prepares the paths and rights).
//! - [`inherit`]: taking ownership of the fds an earlier image of the agent kept across
//!   its `execve` (`hatchery upgrade`), and that `execve` with the agent's signals blocked.
//! - [`ptrace`]: `PTRACE_ATTACH`, for the probe worker's attacks only.
//! - [`seccomp`]: a filter refusing `io_uring_setup`, for the probe (tests of the epoll
//!   fall-back where io_uring is refused).
//! - [`peek`]: `SO_PEEK_OFF`, so the agent reads its workers' output by peeking and
//!   takes it off the socket only once it is in the site's log (nothing lost to a crash).
//! - [`tcp`]: `TCP_INFO` on a listener, to read its accept-queue length.
//! - [`users`]: users and groups through NSS (`getpwnam_r`, `getgrnam_r`,
//!   `getgrouplist`), not by reading `/etc/passwd`.
//! - [`uring`]: the io_uring submission side (pushing entries is unsafe because the
//!   kernel may read memory the entry points to until the operation completes).
//!
//! Each function returns `io::Result`, takes `BorrowedFd`/`AsFd` and returns `OwnedFd`.
//! Nothing here logs or reads configuration.

pub mod activation;
pub mod bpf;
pub mod creds;
pub mod fork;
pub mod inherit;
pub mod landlock;
pub mod peek;
pub mod pidfd;
pub mod ptrace;
pub mod seccomp;
pub mod signals;
pub mod spawn;
pub mod tcp;
pub mod uring;
pub mod users;
pub mod wait;

use std::io;

/// Makes every thread of this process allocate from one heap (glibc's `M_ARENA_MAX` = 1).
/// The agent's helper threads, which start workers beside the first
/// (`crate::spawn::start_all`), would otherwise each get a heap of its own, whose small blocks
/// (each leaf's path, kept as long as its worker) held 8 MiB more resident at 10,000
/// workers. The threads only start workers together, so they rarely wait for the lock.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` takes two integers and only changes glibc's allocator settings;
    // `M_ARENA_MAX` (-8) is a valid parameter, and it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Turns a libc-style `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

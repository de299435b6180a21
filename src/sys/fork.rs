//! `fork(2)` for a zygote, `_exit(2)`, and the environment of the forked child.
//!
//! A zygote (`crate::zygote::serve`) forks twice per worker: it must keep the memory it
//! loaded, so `clone3` into a fresh image (see [`super::spawn`]) does not apply. Forking
//! is sound only when the calling process has exactly one thread: the child starts with
//! a copy of the calling thread alone, and any lock another thread held at that moment
//! (the allocator's, stdout's, the environment's) would stay locked in the child for
//! good. With one thread, no other thread can hold a lock or be halfway through
//! changing shared state, so the child is a consistent copy and may run ordinary Rust
//! code (allocate, print, start threads of its own). [`fork_single_threaded`] reads the
//! thread count from `/proc/self/status` (`Threads:`) and refuses with `EDEADLK`
//! otherwise; only the calling thread could start another between that check and the
//! fork, and it is busy in this function.
//!
//! Not covered by that argument: state shared with other *processes* (file offsets of
//! inherited fds, locks on files); the zygote's callers own those.

use std::ffi::OsStr;
use std::io;

/// Which side of a fork this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkSide {
    /// The parent, with the child's pid.
    Parent(i32),
    /// The child (single-threaded: a copy of the calling thread).
    Child,
}

/// The number of threads of this process, from `/proc/self/status`.
fn thread_count() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads line in /proc/self/status"))
}

/// `fork()`, refused (`EDEADLK`) unless this process has exactly one thread.
pub fn fork_single_threaded() -> io::Result<ForkSide> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::Deadlock,
            format!("refusing to fork a process with {threads} threads"),
        ));
    }
    // SAFETY: fork(2) and POSIX limit the child to async-signal-safe calls only "after a
    // fork() in a multithreaded program". This process has exactly one thread (checked
    // just above; only this thread could have started another since, and it did not),
    // so no lock in the allocator, stdio or the environment is held by a thread the
    // child would lack, and the child is a consistent copy of this one thread's state:
    // it may run ordinary code. Its callers' children do: `zygote::serve`'s intermediate
    // reads /proc, forks again, writes a pid and `_exit`s; its worker reads a pipe, sets
    // its environment and runs the application's worker entry, which may start threads
    // of its own. glibc's `pthread_atfork` handlers run as usual. fork(2) takes no
    // pointers.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(ForkSide::Child),
        pid => Ok(ForkSide::Parent(pid)),
    }
}

/// `_exit(code)`: ends the process at once, without running destructors, `atexit`
/// handlers or flushing stdio (a forked child must not run the parent's clean-up twice).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) takes an int, never returns and touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// Sets (`Some`) or removes (`None`) an environment variable in a child just forked by
/// [`fork_single_threaded`], before it starts any thread.
pub fn set_env_in_forked_child(name: &str, value: Option<&OsStr>) -> io::Result<()> {
    // The precondition of `set_var`/`remove_var` below, checked rather than assumed.
    if thread_count()? != 1 {
        return Err(io::Error::new(
            io::ErrorKind::Deadlock,
            "refusing to change the environment of a process with several threads",
        ));
    }
    match value {
        // SAFETY: this process has one thread (checked above), so nothing reads or
        // writes the environment concurrently.
        Some(v) => unsafe { std::env::set_var(name, v) },
        // SAFETY: as above, one thread.
        None => unsafe { std::env::remove_var(name) },
    }
    Ok(())
}

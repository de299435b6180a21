//! Fds kept across the agent's own `execve` (`hatchery upgrade`), and that `execve`.
//!
//! The old image clears `FD_CLOEXEC` on the few fds the new one needs and names their
//! numbers in `HATCHERY_UPGRADE`; the new image takes ownership of each number once
//! ([`take_inherited`]). [`exec_keeping_mask`] executes a [`Command`] in this process
//! (same pid, same children) with the agent's signals still blocked: `std` empties the
//! signal mask before `execve`, and a pending `SIGTERM` would then end the agent with the
//! default action instead of waiting in its new signalfd.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

use super::signals::SigSet;

/// The numbers already taken: each inherited fd is owned once.
static TAKEN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Takes ownership of the inherited fd `raw` (left without `FD_CLOEXEC`, so that it can be
/// passed on again if this image fails). Errors if it is not open or was taken already.
pub fn take_inherited(raw: i32) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if taken.contains(&raw) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("fd {raw} was taken already"),
        ));
    }
    // SAFETY: F_GETFD only inspects the fd table entry; it fails with EBADF if `raw` is
    // not open, which we report instead of adopting a closed number.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    taken.insert(raw);
    // SAFETY: whoever started this image handed `raw` to it: the previous image of the
    // agent (the number is in HATCHERY_UPGRADE, read once and removed) or the agent
    // starting a zygote (the number is in HATCHERY_ZYGOTE_FD, see `crate::zygote`);
    // nothing else in this process owns the number, `TAKEN` guarantees it is adopted
    // once, and it is open (checked above).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Replaces this process's image with `cmd` (same pid), with `blocked` blocked again
/// after `std` emptied the mask. Returns only on failure.
pub fn exec_keeping_mask(cmd: &mut Command, blocked: &SigSet) -> io::Error {
    let set = blocked.0;
    // SAFETY: the closure runs in this process just before `execve`, after std reset the
    // signal mask; it only calls `sigprocmask`, which is async-signal-safe, allocates
    // nothing and reads `set`, a copy owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.exec()
}

/// Reads and removes the environment variable `name`, so that no process started later
/// (a worker) inherits it.
pub fn take_env(name: &str) -> Option<std::ffi::OsString> {
    let value = std::env::var_os(name)?;
    // SAFETY: called by the agent at its start, on its only thread (its helper threads,
    // `spawn::StartHelpers`, are made later, in `Agent::start`), before anything reads the
    // environment concurrently.
    unsafe { std::env::remove_var(name) };
    Some(value)
}

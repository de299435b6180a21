//! The receiving side of socket activation: taking ownership of inherited listener fds.
//!
//! The protocol (`sd_listen_fds(3)`): when `LISTEN_PID` is our pid, fds `3 ..
//! 3 + LISTEN_FDS` are listening sockets handed to this process. Used by the built-in
//! demo worker and the test workers; servers such as gunicorn do the same themselves.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

const SD_LISTEN_FDS_START: i32 = 3;
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listener fds passed to this process, with their names; empty if none were passed
/// to this pid. Can be called once per process (later calls return nothing), so no fd
/// is ever owned twice.
pub fn listen_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !for_us || count <= 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    let mut out = Vec::new();
    for i in 0..count.min(1024) {
        let raw = SD_LISTEN_FDS_START + i;
        // SAFETY: F_GETFD only inspects the fd table entry; it fails with EBADF if `raw`
        // is not open, which we report instead of adopting a closed number.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the activation protocol transfers ownership of fds 3..3+LISTEN_FDS to
        // this process when LISTEN_PID names it; `TAKEN` guarantees each is adopted once,
        // and the fd is open (checked above).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = names
            .get(usize::try_from(i).unwrap_or(0))
            .cloned()
            .unwrap_or_default();
        out.push((name, fd));
    }
    Ok(out)
}

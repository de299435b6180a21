//! `pidfd_send_signal(pidfd, 0, NULL, 0)`: whether the process a pidfd refers to can still
//! be signalled (Linux 5.1).
//!
//! rustix's `pidfd_send_signal` takes a `Signal`, which cannot be 0 (the "null signal"
//! of kill(2) that checks existence and permission without sending anything), hence this
//! wrapper. A pidfd pins its process, not its number: if this succeeds, the process the
//! pidfd was opened for is not yet reaped, so its pid (and a process group it leads) has
//! not been reused.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::cvt;

/// `Ok(())` while the process is alive or an unreaped zombie; `ESRCH` once reaped.
pub fn test_signal(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with signal 0 sends nothing; the info pointer is null
    // (allowed: the kernel then fills in the siginfo itself) and flags are 0. `pidfd` is
    // borrowed, so it stays open for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    cvt(ret).map(drop)
}

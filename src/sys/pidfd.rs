//! `pidfd_send_signal(pidfd, 0, NULL, 0)`: whether the process a pidfd refers to can still
//! be signalled (Linux 5.1).
//!
//! rustix's `pidfd_send_signal` takes a `Signal`, which cannot be 0 (the "null signal"
//! of kill(2) that checks existence and permission without sending anything), hence this
//! wrapper. A pidfd pins its process, not its number: if this succeeds, the process the
//! pidfd was opened for is not yet reaped, so its pid (and a process group it leads) has
//! not been reused.
//!
//! And `PIDFD_GET_INFO` with `PIDFD_INFO_EXIT` (Linux 6.15): the exit status of a process
//! that is not our child (a worker adopted after an agent restart), which `waitid` cannot
//! give (`ECHILD`).

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

/// `PIDFD_GET_INFO` (`_IOWR(0xFF, 11, struct pidfd_info)`) with the first published,
/// 64-byte `struct pidfd_info` (`PIDFD_INFO_SIZE_VER0`): the kernel accepts any size from
/// that one up and fills in what fits.
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_EXIT` (Linux 6.15): ask for, and be told of, the exit status.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// `struct pidfd_info` up to `PIDFD_INFO_SIZE_VER0` (`include/uapi/linux/pidfd.h`); the
/// last field was `__spare0` before 6.15 added the exit status there.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// The wait status (as `waitpid` gives it) of the exited process a pidfd refers to, even
/// if it is not our child and another process reaped it (`PIDFD_GET_INFO` with
/// `PIDFD_INFO_EXIT`, Linux 6.15). `Ok(None)`: the kernel does not say (yet: it records
/// the status when the process is reaped). `ENOTTY`/`EINVAL`: the kernel has no such
/// ioctl (before 6.13).
pub fn exit_status(pidfd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: `info` is a live, writable `#[repr(C)]` struct of exactly the 64 bytes the
    // request number encodes, so the kernel's copy in and out stays inside it; `pidfd` is
    // borrowed, so it stays open for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO,
            std::ptr::from_mut(&mut info),
        )
    };
    cvt(libc::c_long::from(ret))?;
    Ok((info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code))
}

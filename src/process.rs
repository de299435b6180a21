//! Processes are referenced by pidfd from birth ([`PidRef`]).
//!
//! Kernel requirements: `pidfd_send_signal` (5.1), pidfd poll (5.3), `waitid(P_PIDFD)`
//! (5.4). A pid is only ever signalled through its pidfd, so a recycled pid can never be
//! hit by mistake; the process group kill (for workers without a cgroup) goes through
//! `kill(-pgid)` only while the pidfd shows the group leader has not been reaped.
//!
//! Also this process's own signal dispositions: [`set_default_disposition`] (the CLI's
//! `SIGPIPE`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::process::{Pid, Signal as RSignal, WaitId, WaitIdOptions};

use crate::supervisor::slots::ExitReason;

pub use crate::sys::signals::set_default as set_default_disposition;

/// A live (or not yet reaped) child: its pid and its pidfd.
#[derive(Debug)]
pub struct PidRef {
    pid: i32,
    pidfd: OwnedFd,
}

impl PidRef {
    /// Wraps a pid and the pidfd `clone3` returned for it.
    pub fn new(pid: i32, pidfd: OwnedFd) -> PidRef {
        PidRef { pid, pidfd }
    }

    /// The pid, for display and credential matching.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` through the pidfd. `ESRCH` (already exited) is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let sig = RSignal::from_named_raw(signal)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match rustix::process::pidfd_send_signal(&self.pidfd, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `signal` to the process group the worker leads (it called `setsid`), while
    /// the leader is not yet reaped, so the group id cannot have been reused.
    pub fn signal_group(&self, signal: i32) -> io::Result<()> {
        let sig = RSignal::from_named_raw(signal)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let pid =
            Pid::from_raw(self.pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        match rustix::process::kill_process_group(pid, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reaps the process if it has exited (`waitid(P_PIDFD, WNOHANG)`).
    ///
    /// `Ok(None)`: still running. `ECHILD` means someone else reaped it, which cannot
    /// happen in the agent (it is the only reaper).
    pub fn try_wait(&self) -> io::Result<Option<ExitReason>> {
        let status = rustix::process::waitid(
            WaitId::PidFd(self.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        )?;
        Ok(status.and_then(|st| {
            if let Some(code) = st.exit_status() {
                if st.exited() {
                    return Some(ExitReason::Exited { code });
                }
            }
            st.terminating_signal()
                .map(|signal| ExitReason::Signaled { signal })
        }))
    }
}

impl AsFd for PidRef {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

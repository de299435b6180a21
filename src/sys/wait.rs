//! Finding zombies without reaping them: `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`.
//!
//! As child subreaper (`PR_SET_CHILD_SUBREAPER`, Linux 3.4) the agent inherits orphaned
//! grandchildren of its workers. On `SIGCHLD` it asks which child is a zombie without
//! consuming it: a tracked worker is then reaped through its pidfd (so its exit status
//! reaches the supervisor), anything else is reaped by pid. Each call consumes exactly one
//! zombie in the caller, so the loop terminates. rustix's `WaitIdStatus` does not expose
//! `si_pid`, hence this wrapper.

use std::io;
use std::mem::MaybeUninit;

use super::cvt;

/// The pid of some child that has exited and is not yet reaped, if any.
pub fn peek_zombie() -> io::Result<Option<i32>> {
    let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: `info` is a zeroed local `siginfo_t` the kernel may fill; P_ALL ignores the
    // id argument. With WNOHANG and no zombie the kernel leaves si_pid at 0 (hence zeroed).
    let ret = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            info.as_mut_ptr(),
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    match cvt(ret.into()) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
        Err(e) => return Err(e),
    }
    // SAFETY: zero-initialised above and possibly filled by a successful waitid; reading
    // `si_pid` of a zeroed or CLD_* siginfo is defined.
    let pid = unsafe { info.assume_init().si_pid() };
    Ok((pid > 0).then_some(pid))
}

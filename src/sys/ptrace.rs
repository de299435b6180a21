//! `ptrace(PTRACE_ATTACH)`: only used by the probe worker's attacks, to show that a
//! sandboxed worker cannot trace another site's worker or the agent.

use std::io;

/// Tries to attach to `pid` as a tracer; detaches at once if that worked.
pub fn attach_and_detach(pid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_ATTACH takes no pointers (addr and data are ignored); the kernel
    // checks PTRACE_MODE_ATTACH against our credentials.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    super::cvt(ret)?;
    // SAFETY: as above; we are now its tracer, so detaching is allowed.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Ok(())
}

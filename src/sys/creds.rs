//! Looking at the file system as another user, for a moment: `setfsuid`, `setfsgid` and the
//! supplementary groups of the calling thread, set back when the guard drops.
//!
//! The agent runs as root; when a site's user names a path (`deploy --release`), the path
//! must be resolved with that user's permissions, or the user could probe and use what
//! only root may reach. The file-system ids are what the kernel checks for path walks and
//! opens; changing them from 0 also drops the file-system capabilities
//! (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, …) from the effective set, and changing them
//! back restores them (capabilities(7), "Effect of user ID changes on capabilities").
//! Raw syscalls change the calling thread only: the agent's helper threads, and the one that
//! keeps the whole bounding set, start processes only while this one waits for them
//! (`sys::spawn::run_all`, `sys::spawn::on_whole_set`), and nothing else runs while the
//! guard lives (no io_uring submission, no spawn).
//!
//! `setfsuid` reports no error: the change is verified by reading the value back.

use std::io;

/// The thread's file-system identity while it lives; the previous one when dropped.
#[derive(Debug)]
pub struct FsIdentity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// Switches the calling thread's file-system uid, gid and supplementary groups.
pub fn become_fs(uid: u32, gid: u32, groups: &[u32]) -> io::Result<FsIdentity> {
    let mut old_groups = vec![0 as libc::gid_t; 65536];
    // SAFETY: `old_groups` has room for the kernel's maximum of 65536 groups; the kernel
    // writes at most that many and returns how many.
    let n = unsafe { libc::getgroups(65536, old_groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    old_groups.truncate(usize::try_from(n).expect("non-negative"));
    // SAFETY: -1 is not a valid id: the call changes nothing and returns the current one.
    let old_gid = unsafe { libc::syscall(libc::SYS_setfsgid, -1i64) };
    // SAFETY: as above.
    let old_uid = unsafe { libc::syscall(libc::SYS_setfsuid, -1i64) };
    let old = FsIdentity {
        uid: libc::uid_t::try_from(old_uid).unwrap_or(0),
        gid: libc::gid_t::try_from(old_gid).unwrap_or(0),
        groups: old_groups,
    };
    // Groups and gid first: both need CAP_SETGID, which the uid change below keeps
    // (setfsuid drops only the file-system capabilities).
    set(uid, gid, groups)?;
    Ok(old)
}

fn set(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: `groups` is a live slice; the raw syscall changes this thread only.
    let ret = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain integer arguments; changes this thread's fsgid.
    unsafe { libc::syscall(libc::SYS_setfsgid, i64::from(gid)) };
    // SAFETY: as above, for the fsuid.
    unsafe { libc::syscall(libc::SYS_setfsuid, i64::from(uid)) };
    // SAFETY: -1 changes nothing and returns the current value.
    let now_uid = unsafe { libc::syscall(libc::SYS_setfsuid, -1i64) };
    // SAFETY: as above.
    let now_gid = unsafe { libc::syscall(libc::SYS_setfsgid, -1i64) };
    if now_uid != i64::from(uid) || now_gid != i64::from(gid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("could not take file-system identity {uid}:{gid}"),
        ));
    }
    Ok(())
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // Back to root first (so the group changes are allowed), then the groups.
        // SAFETY: plain integer argument; this thread only.
        unsafe { libc::syscall(libc::SYS_setfsuid, i64::from(self.uid)) };
        if set(self.uid, self.gid, &self.groups).is_err() {
            // The agent cannot go on with another user's permissions.
            std::process::abort();
        }
    }
}

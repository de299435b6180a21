//! Users and groups through the C library's name service switch (NSS): `getpwnam_r`,
//! `getpwuid_r`, `getgrnam_r` and `getgrouplist`, so that every source `nsswitch.conf`
//! names (files, LDAP, systemd's dynamic users, ...) is consulted, as `id(1)` does.
//!
//! The `_r` forms write into a buffer the caller owns; a buffer too small is `ERANGE`,
//! and the call is repeated with a larger one, up to [`MAX_BUFFER`]. "No such entry" is
//! a null result pointer with 0 returned (or, by some modules, `ENOENT`, `ESRCH`, `EBADF`
//! or `EPERM`: getpwnam_r(3), "RETURN VALUE"), which is `Ok(None)` here.

use std::ffi::{CStr, CString};
use std::io;

/// The largest entry buffer tried (the first is 4 KiB, doubled on `ERANGE`).
const MAX_BUFFER: usize = 1 << 20;

/// A user's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Whether `code`, returned by a `get*_r` call with a null result, means "not found".
fn not_found(code: i32) -> bool {
    matches!(
        code,
        0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM
    )
}

/// Runs `call` with a growing buffer until it is large enough; `call` returns the
/// function's return code and whether it found an entry.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char]) -> (i32, Option<T>),
) -> io::Result<Option<T>> {
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        match call(&mut buf) {
            (0, found @ Some(_)) => return Ok(found),
            (code, None) if not_found(code) => return Ok(None),
            (libc::ERANGE, _) if size < MAX_BUFFER => size *= 2,
            (code, _) => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

/// Copies a C string field of an entry.
///
/// # Safety
///
/// `p` is null or points to a NUL-terminated string that lives as long as the buffer
/// the entry was written into.
unsafe fn field(p: *const libc::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, and by the caller's contract NUL-terminated and alive.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Converts the `passwd` the C library filled in.
///
/// # Safety
///
/// `pw`'s string pointers point into the buffer passed with it, which is still alive.
unsafe fn passwd(pw: &libc::passwd) -> Passwd {
    // SAFETY: the caller's contract: each pointer is null or into the live buffer.
    unsafe {
        Passwd {
            name: field(pw.pw_name),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
            home: field(pw.pw_dir),
            shell: field(pw.pw_shell),
        }
    }
}

/// The user named `name`, if any.
pub fn user_by_name(name: &str) -> io::Result<Option<Passwd>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buf| {
        // SAFETY: all-zero is a valid `passwd` (integers and null pointers).
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated; `pw`, `buf` (of `buf.len()` bytes) and
        // `result` are live, writable locals for the whole call; the library writes the
        // strings into `buf` and points `pw`'s fields at them.
        let code = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        // SAFETY: a non-null `result` is `&pw`, whose strings point into `buf`, alive
        // until this closure returns.
        let found = (!result.is_null()).then(|| unsafe { passwd(&pw) });
        (code, found)
    })
}

/// The user with uid `uid`, if any.
pub fn user_by_uid(uid: u32) -> io::Result<Option<Passwd>> {
    with_buffer(|buf| {
        // SAFETY: all-zero is a valid `passwd` (integers and null pointers).
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`: live, writable locals for the whole call.
        let code =
            unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
        // SAFETY: a non-null `result` is `&pw`, whose strings point into `buf`, alive
        // until this closure returns.
        let found = (!result.is_null()).then(|| unsafe { passwd(&pw) });
        (code, found)
    })
}

/// The gid of the group named `name`, if any.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buf| {
        // SAFETY: all-zero is a valid `group` (an integer and null pointers).
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated; `gr`, `buf` (of `buf.len()` bytes) and
        // `result` are live, writable locals for the whole call.
        let code = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut gr,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        (code, (!result.is_null()).then_some(gr.gr_gid))
    })
}

/// The groups `user` belongs to (its primary group `gid` included), as `initgroups(3)`
/// would set them.
pub fn group_list(user: &str, gid: u32) -> io::Result<Vec<u32>> {
    let Ok(cname) = CString::new(user) else {
        return Ok(vec![gid]);
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `cname` is NUL-terminated; `groups` has room for `n` gids, and the
        // library writes at most `n` and sets `n` to the number the user has.
        let r = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let count = usize::try_from(n).unwrap_or(0);
        if r >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        // -1: too small; `n` now holds the size needed (glibc), else double.
        let next = count.max(groups.len() * 2);
        if next > 65536 {
            return Err(io::Error::other("more than 65536 groups"));
        }
        groups.resize(next, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_its_group_are_found_and_a_stranger_is_not() {
        let root = user_by_name("root").expect("lookup").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(
            user_by_uid(0).expect("lookup").map(|u| u.name),
            Some("root".into())
        );
        assert_eq!(group_by_name("root").expect("lookup"), Some(0));
        assert_eq!(
            user_by_name("no-such-user-hopefully").expect("lookup"),
            None
        );
        assert_eq!(
            group_by_name("no-such-group-hopefully").expect("lookup"),
            None
        );
        assert_eq!(user_by_name("a\0b").expect("lookup"), None);
        assert!(group_list("root", 0).expect("groups").contains(&0));
    }
}

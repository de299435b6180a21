//! Landlock: querying the kernel's ABI version, and building and enforcing a ruleset
//! ([`LandlockPlan`], prepared in the parent).
//!
//! For the workers of a generation the agent builds the ruleset once, at its first start
//! ([`build`]; `event::workers` keeps it for the generation's later starts, restarts
//! included), with each path resolved inside the site's root (`openat2` with
//! `RESOLVE_IN_ROOT`, as the `chroot`ed worker resolves it, magic links refused) with the
//! site user's file-system ids; each child then only calls `landlock_restrict_self` on it
//! ([`child_restrict`]). Built in the child, the default 4 paths cost it 19 of its 80
//! syscalls before `execve` (about a third of its time there); given the ruleset, 3.
//!
//! Otherwise the child builds it itself ([`child_enforce`]): a zygote or a `hatchery
//! exec` session, a ruleset the agent could not build (the child then says why), and a
//! private `/tmp`, where it is
//! built after the tmpfs is mounted and after `chroot`: Landlock rules are tied to inodes,
//! and a rule on the `/tmp` directory the agent sees would not cover the tmpfs mounted
//! over it (Landlock skips covered mount points when it walks up a path). That costs one
//! `open(O_PATH)`, one `fstat` and one `landlock_add_rule` per path, all
//! allocation-free.
//!
//! Kernel requirements: Landlock ABI 1 (Linux 5.13) for filesystem rules, ABI 2 (5.19)
//! for `REFER`, ABI 3 (6.2) for `TRUNCATE`, ABI 4 (6.7) for TCP bind/connect rules, ABI 6
//! (6.12) for scopes (signals and abstract unix sockets); `openat2` (5.6).
//! Probed with `LANDLOCK_CREATE_RULESET_VERSION`; 0 means Landlock is unavailable
//! (not built, or not in the `lsm=` list). Debian's 6.1 reports 2, 6.12 reports 6.
//! See `Documentation/userspace-api/landlock.rst`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `LANDLOCK_ACCESS_FS_*` (uapi/linux/landlock.h).
pub mod fs {
    /// Execute a file.
    pub const EXECUTE: u64 = 1 << 0;
    /// Open a file for writing.
    pub const WRITE_FILE: u64 = 1 << 1;
    /// Open a file for reading.
    pub const READ_FILE: u64 = 1 << 2;
    /// List a directory.
    pub const READ_DIR: u64 = 1 << 3;
    /// Remove an empty directory.
    pub const REMOVE_DIR: u64 = 1 << 4;
    /// Unlink a file.
    pub const REMOVE_FILE: u64 = 1 << 5;
    /// Create a character device.
    pub const MAKE_CHAR: u64 = 1 << 6;
    /// Create a directory.
    pub const MAKE_DIR: u64 = 1 << 7;
    /// Create a regular file.
    pub const MAKE_REG: u64 = 1 << 8;
    /// Create a unix socket.
    pub const MAKE_SOCK: u64 = 1 << 9;
    /// Create a fifo.
    pub const MAKE_FIFO: u64 = 1 << 10;
    /// Create a block device.
    pub const MAKE_BLOCK: u64 = 1 << 11;
    /// Create a symlink.
    pub const MAKE_SYM: u64 = 1 << 12;
    /// Link or rename across directories (ABI 2).
    pub const REFER: u64 = 1 << 13;
    /// Truncate a file (ABI 3).
    pub const TRUNCATE: u64 = 1 << 14;
    /// The rights that apply to a file (not a directory) in a path rule.
    pub const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE;
    /// The rights of ABI 1.
    pub const ABI_1: u64 = EXECUTE
        | WRITE_FILE
        | READ_FILE
        | READ_DIR
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM;
}

/// `LANDLOCK_ACCESS_NET_*` (ABI 4).
pub mod net {
    /// `bind(2)` a TCP socket to a port.
    pub const BIND_TCP: u64 = 1 << 0;
    /// `connect(2)` a TCP socket to a port.
    pub const CONNECT_TCP: u64 = 1 << 1;
}

/// `LANDLOCK_SCOPE_*` (ABI 6).
pub mod scope {
    /// Connecting to an abstract unix socket created outside the domain.
    pub const ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    /// Sending a signal to a process outside the domain.
    pub const SIGNAL: u64 = 1 << 1;
}

/// The filesystem rights a kernel with Landlock ABI `abi` knows.
pub fn fs_rights_for_abi(abi: u32) -> u64 {
    match abi {
        0 => 0,
        1 => fs::ABI_1,
        2 => fs::ABI_1 | fs::REFER,
        _ => fs::ABI_1 | fs::REFER | fs::TRUNCATE,
    }
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const LANDLOCK_RULE_NET_PORT: libc::c_int = 2;
// Syscall numbers are the same on every architecture (the unified table, 5.13).
const SYS_LANDLOCK_CREATE_RULESET: libc::c_long = 444;
const SYS_LANDLOCK_ADD_RULE: libc::c_long = 445;
const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = 446;

/// A ruleset to build (in the agent, or in the child with a private `/tmp`) and enforce
/// in the child.
#[derive(Debug, Default)]
pub struct LandlockPlan {
    /// Handled filesystem rights (0: no filesystem rules).
    pub fs: u64,
    /// Handled network rights (0: no network rules; ABI 4+).
    pub net: u64,
    /// Scopes (`scope::*`, ABI 6+): what may not reach outside the domain.
    pub scoped: u64,
    /// `(path as the worker sees it, rights)`; a path that does not exist is skipped.
    pub paths: Vec<(std::ffi::CString, u64)>,
    /// `(TCP port, rights)`.
    pub ports: Vec<(u16, u64)>,
}

/// `landlock_create_ruleset` for `plan`: the new ruleset's fd, or -1 with `errno` set.
fn create(plan: &LandlockPlan) -> libc::c_int {
    let attr = RulesetAttr {
        handled_access_fs: plan.fs,
        handled_access_net: plan.net,
        scoped: plan.scoped,
    };
    // An older kernel's struct is shorter: pass only the fields in use.
    let size = if plan.scoped != 0 {
        std::mem::size_of::<RulesetAttr>()
    } else if plan.net != 0 {
        2 * std::mem::size_of::<u64>()
    } else {
        std::mem::size_of::<u64>()
    };
    // SAFETY: `attr` is on this stack for the call; `size` is at most its size.
    let ret = unsafe { libc::syscall(SYS_LANDLOCK_CREATE_RULESET, &attr, size, 0u32) };
    libc::c_int::try_from(ret).unwrap_or(-1)
}

/// Adds the rule of one path, opened as `fd` (`O_PATH`), to `ruleset`: `access`, or its
/// file rights only when `fd` is not a directory. 0, or -1 with `errno` set. No allocation.
fn add_path_rule(ruleset: libc::c_int, fd: libc::c_int, access: u64) -> libc::c_long {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable stat buffer on this stack; fstat takes any fd number.
    let is_dir = unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0
        // SAFETY: fstat succeeded, so it filled `st`.
        && unsafe { st.assume_init_ref() }.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let rule = PathBeneathAttr {
        allowed_access: if is_dir {
            access
        } else {
            access & fs::FILE_RIGHTS
        },
        parent_fd: fd,
    };
    // SAFETY: `rule` is on this stack for the call; the kernel checks both fds.
    unsafe {
        libc::syscall(
            SYS_LANDLOCK_ADD_RULE,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            std::ptr::addr_of!(rule),
            0u32,
        )
    }
}

/// Adds the port rules of `plan` to `ruleset`. On failure `errno` holds the cause. No
/// allocation.
fn add_port_rules(ruleset: libc::c_int, plan: &LandlockPlan) -> Result<(), ()> {
    for &(port, access) in &plan.ports {
        let rule = NetPortAttr {
            allowed_access: access,
            port: u64::from(port),
        };
        // SAFETY: `rule` is on this stack for the call; the kernel checks the fd.
        let ret = unsafe {
            libc::syscall(
                SYS_LANDLOCK_ADD_RULE,
                ruleset,
                LANDLOCK_RULE_NET_PORT,
                &rule,
                0u32,
            )
        };
        if ret != 0 {
            return Err(());
        }
    }
    Ok(())
}

/// In the agent: the ruleset of `plan`, each path resolved as a worker `chroot`ed into
/// `root` (a directory fd) resolves it (`RESOLVE_IN_ROOT`: `..` and absolute symlinks stay inside it), or
/// from `/` without a root; magic links (`/proc/<pid>/root`, ...) are refused. The
/// caller takes the worker's file-system ids first, so its permissions decide what is
/// reachable.
pub fn build(plan: &LandlockPlan, root: Option<BorrowedFd<'_>>) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = create(plan);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `create` returned a new fd that nothing else owns.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
    let (dir, resolve) = match root {
        Some(r) => (r, ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS),
        None => (rustix::fs::CWD, ResolveFlags::NO_MAGICLINKS),
    };
    for (path, access) in &plan.paths {
        let flags = OFlags::PATH | OFlags::CLOEXEC;
        let opened = rustix::fs::openat2(dir, path.as_c_str(), flags, Mode::empty(), resolve);
        let target = match opened {
            Ok(t) => t,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if add_path_rule(ruleset.as_raw_fd(), target.as_raw_fd(), *access) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    add_port_rules(ruleset.as_raw_fd(), plan).map_err(|()| std::io::Error::last_os_error())?;
    Ok(ruleset)
}

/// In the child: enforces the ruleset `ruleset` ([`build`]) on this task. On failure
/// `errno` holds the cause. `no_new_privs` must be set (or the task hold `CAP_SYS_ADMIN`).
pub(super) fn child_restrict(ruleset: libc::c_int) -> Result<(), ()> {
    // SAFETY: plain integer arguments; the kernel checks the fd.
    let ret = unsafe { libc::syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0u32) };
    if ret != 0 { Err(()) } else { Ok(()) }
}

/// In the child: builds the ruleset of `plan` and enforces it on this task (with a
/// private `/tmp`: see the module doc). On failure `errno` holds the cause.
///
/// # Safety
///
/// Only raw syscalls: callable in the `clone3` child, with `plan` valid in its view of
/// the parent's memory. `no_new_privs` must be set (or the task hold `CAP_SYS_ADMIN`).
pub(super) unsafe fn child_enforce(plan: &LandlockPlan) -> Result<(), ()> {
    let ruleset = create(plan);
    if ruleset < 0 {
        return Err(());
    }
    for (path, access) in &plan.paths {
        // SAFETY: `path` is a NUL-terminated string in the parent's plan; O_PATH opens
        // without reading. The fd is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                continue;
            }
            return Err(());
        }
        let ret = add_path_rule(ruleset, fd, *access);
        // SAFETY: closing the fd opened above, used by nothing else.
        unsafe { libc::close(fd) };
        if ret != 0 {
            return Err(());
        }
    }
    add_port_rules(ruleset, plan)?;
    let ret = child_restrict(ruleset);
    // SAFETY: the ruleset fd is ours and no longer needed (the domain holds the rules).
    unsafe { libc::close(ruleset) };
    ret
}

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[repr(C)]
struct NetPortAttr {
    allowed_access: u64,
    port: u64,
}

/// The Landlock ABI version of this kernel, 0 when Landlock is unavailable.
pub fn abi_version() -> u32 {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION the attr pointer must be NULL and the
    // size 0; the kernel only returns a number, no fd is created.
    let ret = unsafe {
        libc::syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(ret).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_abi_adds_its_rights_above_the_last() {
        // uapi/linux/landlock.h numbers the filesystem rights from bit 0 in the order the
        // ABIs added them: 13 in ABI 1, REFER in 2, TRUNCATE in 3.
        assert_eq!(fs_rights_for_abi(0), 0);
        assert_eq!(fs_rights_for_abi(1), (1 << 13) - 1);
        assert_eq!(fs_rights_for_abi(2), (1 << 14) - 1);
        assert_eq!(fs_rights_for_abi(3), (1 << 15) - 1);
        assert_eq!(fs_rights_for_abi(6), fs_rights_for_abi(3));
    }
}

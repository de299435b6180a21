//! Landlock: building a ruleset in the parent (`landlock_create_ruleset`,
//! `landlock_add_rule`) and querying the kernel's ABI version. The child applies the
//! ruleset with `landlock_restrict_self` in [`super::spawn`].
//!
//! Kernel requirements: Landlock ABI 1 (Linux 5.13) for filesystem rules, ABI 2 (5.19)
//! for `REFER`, ABI 3 (6.2) for `TRUNCATE`, ABI 4 (6.7) for TCP bind/connect rules.
//! Probed with `LANDLOCK_CREATE_RULESET_VERSION`; 0 means Landlock is unavailable
//! (not built, or not in the `lsm=` list). Debian's 6.1 reports 2, 6.12 reports 6.
//! See `Documentation/userspace-api/landlock.rst`.

use std::io;
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
}

/// `LANDLOCK_ACCESS_NET_*` (ABI 4).
pub mod net {
    /// `bind(2)` a TCP socket to a port.
    pub const BIND_TCP: u64 = 1 << 0;
    /// `connect(2)` a TCP socket to a port.
    pub const CONNECT_TCP: u64 = 1 << 1;
}

/// The filesystem rights a kernel with Landlock ABI `abi` knows.
pub fn fs_rights_for_abi(abi: u32) -> u64 {
    match abi {
        0 => 0,
        1 => (1 << 13) - 1,
        2 => (1 << 14) - 1,
        _ => (1 << 15) - 1,
    }
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const LANDLOCK_RULE_NET_PORT: libc::c_int = 2;
// Syscall numbers are the same on every architecture (the unified table, 5.13).
const SYS_LANDLOCK_CREATE_RULESET: libc::c_long = 444;
const SYS_LANDLOCK_ADD_RULE: libc::c_long = 445;
/// `landlock_restrict_self`, used by the child path.
pub(super) const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = 446;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
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

/// Creates a ruleset handling `fs` rights (and `net` rights, ABI 4+; pass 0 below it).
pub fn create_ruleset(fs: u64, net: u64) -> io::Result<OwnedFd> {
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: net,
    };
    // Below ABI 4 the kernel's struct has only the first field: pass only that.
    let size = if net == 0 {
        std::mem::size_of::<u64>()
    } else {
        std::mem::size_of::<RulesetAttr>()
    };
    // SAFETY: `attr` lives on this stack for the whole call and `size` is at most its
    // size; the kernel copies it and returns a new fd that nobody else owns.
    let ret = unsafe { libc::syscall(SYS_LANDLOCK_CREATE_RULESET, &attr, size, 0u32) };
    let fd = super::cvt(ret)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a successful landlock_create_ruleset returns a new fd owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Allows `access` beneath the file or directory `parent` (opened with `O_PATH`).
pub fn add_path_rule(
    ruleset: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    access: u64,
) -> io::Result<()> {
    let attr = PathBeneathAttr {
        allowed_access: access,
        parent_fd: parent.as_raw_fd(),
    };
    // SAFETY: `attr` is a packed landlock_path_beneath_attr on this stack, alive for the
    // call; both fds are borrowed, so they stay open until it returns.
    let ret = unsafe {
        libc::syscall(
            SYS_LANDLOCK_ADD_RULE,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_PATH_BENEATH,
            std::ptr::addr_of!(attr),
            0u32,
        )
    };
    super::cvt(ret).map(|_| ())
}

/// Allows `access` (bind/connect) on TCP `port` (ABI 4+).
pub fn add_port_rule(ruleset: BorrowedFd<'_>, port: u16, access: u64) -> io::Result<()> {
    let attr = NetPortAttr {
        allowed_access: access,
        port: u64::from(port),
    };
    // SAFETY: `attr` is a landlock_net_port_attr on this stack, alive for the call; the
    // ruleset fd is borrowed.
    let ret = unsafe {
        libc::syscall(
            SYS_LANDLOCK_ADD_RULE,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_NET_PORT,
            &attr,
            0u32,
        )
    };
    super::cvt(ret).map(|_| ())
}

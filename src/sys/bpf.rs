//! Raw `bpf(2)` for the reuseport steering program: map create, map update, program load,
//! and `SO_ATTACH_REUSEPORT_EBPF`.
//!
//! Kernel requirements: `BPF_PROG_TYPE_SK_REUSEPORT` and `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`
//! (Linux 4.19), `expected_attach_type = BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (5.14).
//! Privileges: CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN). Nothing is probed here; the
//! caller (`steering::probe`) tries the calls and reports.
//!
//! Neither `libc` nor `rustix` defines `bpf_attr` or the BPF enums, so the few layouts and
//! constants used are spelled here as in `include/uapi/linux/bpf.h` and tested below.
//! Each `bpf_attr` variant is a local `#[repr(C)]` struct holding only the leading fields
//! this code sets; the kernel zero-extends a shorter `size` (`bpf_check_uarg_tail_zero`).
//!
//! And, for an agent that adopts the workers of an earlier one, what recovers its steering
//! maps: `BPF_MAP_GET_FD_BY_ID` (CAP_SYS_ADMIN), `BPF_OBJ_GET_INFO_BY_FD` (to check what
//! an id names) and `BPF_MAP_LOOKUP_ELEM`.
//!
//! What this does not do: pin objects or detach programs.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;

/// `enum bpf_cmd`.
pub const BPF_MAP_CREATE: libc::c_int = 0;
/// `enum bpf_cmd`.
pub const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
/// `enum bpf_cmd`.
pub const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
/// `enum bpf_cmd` (Linux 4.13).
pub const BPF_MAP_GET_FD_BY_ID: libc::c_int = 14;
/// `enum bpf_cmd` (Linux 4.13).
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
/// `enum bpf_cmd`.
pub const BPF_PROG_LOAD: libc::c_int = 5;

/// `enum bpf_map_type`.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `enum bpf_map_type` (Linux 4.19).
pub const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

/// `enum bpf_prog_type` (Linux 4.19).
pub const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;

/// `enum bpf_attach_type` (Linux 4.19).
pub const BPF_SK_REUSEPORT_SELECT: u32 = 39;
/// `enum bpf_attach_type` (Linux 5.14).
pub const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

/// `BPF_ANY` for `BPF_MAP_UPDATE_ELEM`: create or overwrite.
pub const BPF_ANY: u64 = 0;
/// `BPF_F_RDONLY_PROG`-free map flags: none.
const NO_MAP_FLAGS: u32 = 0;

/// `SO_ATTACH_REUSEPORT_EBPF` (`asm-generic/socket.h`; same value on x86-64 and arm64).
pub const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `bpf_attr` for `BPF_MAP_CREATE` (leading fields).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `bpf_attr` for `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_*_GET_FD_BY_ID` (`start_id`/`prog_id`/`map_id` is one union).
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_map_info` (leading fields; the kernel copies at most `info_len` bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Its id (system-wide, not reused until the counter wraps).
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Entries.
    pub max_entries: u32,
    /// Creation flags.
    pub map_flags: u32,
}

/// `bpf_attr` for `BPF_PROG_LOAD` (through `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Why a program load failed, with the verifier's log when it produced one.
#[derive(Debug, thiserror::Error)]
#[error("BPF_PROG_LOAD failed{}", if log.is_empty() { String::new() } else { format!(" (verifier log: {})", log.trim_end()) })]
pub struct ProgLoadError {
    /// The `errno` of the failed call.
    #[source]
    pub source: io::Error,
    /// The verifier log (empty when the kernel wrote none).
    pub log: String,
}

/// Issues `bpf(cmd, attr, sizeof attr)` and returns the fd it creates.
///
/// # Safety
///
/// `attr` must be the `bpf_attr` variant the kernel expects for `cmd`, and every pointer
/// inside it must be valid for the kernel's access during the call.
unsafe fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: forwarded from this function's contract.
    let fd = unsafe { bpf_call(cmd, attr) }?;
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: BPF_MAP_CREATE and BPF_PROG_LOAD return a new fd that nothing else owns
    // (the kernel creates every bpf object fd with O_CLOEXEC).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// As for [`bpf_fd`].
unsafe fn bpf_call<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(size_of::<T>()).expect("bpf_attr variants are small");
    let ptr: *mut T = attr;
    // SAFETY: the caller guarantees `attr` matches `cmd` and its pointers are valid; `attr`
    // itself is a live exclusive borrow of `size` bytes for the duration of the call.
    cvt(unsafe { libc::syscall(libc::SYS_bpf, cmd, ptr, size) })
}

/// Creates a map of `map_type` with the given key and value sizes and entries.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: NO_MAP_FLAGS,
    };
    // SAFETY: a BPF_MAP_CREATE attr with no pointers.
    unsafe { bpf_fd(BPF_MAP_CREATE, &mut attr) }
}

/// Sets `map[key] = value` (`BPF_ANY`), for a map with a `u32` key and `value.len()`-byte
/// values. For a reuseport sockarray the value is the socket's fd as `u64`.
fn map_update(map: BorrowedFd<'_>, key: u32, value: &[u8]) -> io::Result<()> {
    let fd =
        u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut attr = MapElemAttr {
        map_fd: fd,
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_ptr() as u64,
        flags: BPF_ANY,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` (4 bytes) and `value` are borrows that outlive the call; the kernel
    // reads the map's `key_size` and `value_size` bytes from them, so the map must have a
    // u32 key and at most `value.len()`-byte values: both callers pass 8-byte values, and
    // the only maps this module creates for them have 4- or 8-byte values.
    let ret = unsafe { bpf_call(BPF_MAP_UPDATE_ELEM, &mut attr) };
    ret.map(drop)
}

/// The 8-byte value at `key` of `map` (a `u32` array's value in the low-order bytes as the
/// machine orders them; a reuseport sockarray's socket cookie). Maps with larger values
/// are refused (`EINVAL`) before the call.
pub fn map_lookup(map: BorrowedFd<'_>, key: u32) -> io::Result<[u8; 8]> {
    if map_info(map)?.value_size > 8 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let fd =
        u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut value = [0u8; 8];
    let mut attr = MapElemAttr {
        map_fd: fd,
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_mut_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` (4 bytes) and `value` (8 bytes) outlive the call; the kernel reads the
    // map's `key_size` bytes from `key` (every map this is used on has u32 keys) and writes
    // `value_size` bytes to `value`, checked above to be at most 8.
    let ret = unsafe { bpf_call(BPF_MAP_LOOKUP_ELEM, &mut attr) };
    ret.map(|_| value)
}

/// A new fd for the map with id `id` (CAP_SYS_ADMIN).
pub fn map_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..GetFdByIdAttr::default()
    };
    // SAFETY: the attr holds no pointers; the returned fd is new and ours.
    unsafe { bpf_fd(BPF_MAP_GET_FD_BY_ID, &mut attr) }
}

/// What the map `map` is (type, id, sizes).
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let fd =
        u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd,
        info_len: u32::try_from(size_of::<MapInfo>()).expect("small"),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `info` is a live `#[repr(C)]` struct of `info_len` bytes, and the kernel
    // writes at most `info_len` bytes to it; `map` is borrowed for the call.
    let ret = unsafe { bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    ret.map(|_| info)
}

/// Inserts the socket `sock` at `key` of the reuseport sockarray `map` (8-byte values).
pub fn sockarray_insert(map: BorrowedFd<'_>, key: u32, sock: BorrowedFd<'_>) -> io::Result<()> {
    let fd =
        u64::try_from(sock.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    map_update(map, key, &fd.to_ne_bytes())
}

/// Sets `map[key] = value` in a `u32 → u32` array map.
pub fn array_set_u32(map: BorrowedFd<'_>, key: u32, value: u32) -> io::Result<()> {
    // Padded to 8 bytes so that even a map with 8-byte values reads only this buffer.
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&value.to_ne_bytes());
    map_update(map, key, &buf)
}

/// How many times a load interrupted with `EAGAIN` is tried.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads a `BPF_PROG_TYPE_SK_REUSEPORT` program of raw `bpf_insn`s (8 bytes each, as
/// encoded by `steering`) with `expected_attach_type`, capturing the verifier log on
/// failure.
pub fn prog_load_sk_reuseport(
    insns: &[[u8; 8]],
    license: &CStr,
    expected_attach_type: u32,
) -> Result<OwnedFd, ProgLoadError> {
    let mut log = vec![0u8; 64 * 1024];
    let load = |log_level: u32, log: &mut [u8]| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
            insn_cnt: u32::try_from(insns.len()).expect("program is small"),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size: if log_level == 0 {
                0
            } else {
                u32::try_from(log.len()).expect("log buffer is small")
            },
            log_buf: if log_level == 0 {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            expected_attach_type,
            ..ProgLoadAttr::default()
        };
        // SAFETY: `insns` (insn_cnt * 8 bytes), `license` (NUL-terminated) and `log`
        // (log_size bytes, written by the kernel) are borrows that outlive the call.
        unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
    };
    // The verifier gives up with EAGAIN when the loading thread has a signal or task work
    // pending (`signal_pending()`: an io_uring completion queued to this thread counts):
    // returning to user space runs the work, so a new attempt goes through (as libbpf does).
    let load = |log_level: u32, log: &mut [u8]| {
        let mut attempt = 1;
        loop {
            match load(log_level, log) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    };
    // First without a log (cheap); on failure load again with the log to say why.
    match load(0, &mut log) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            if first.raw_os_error() != Some(libc::EACCES)
                && first.raw_os_error() != Some(libc::EINVAL)
            {
                return Err(ProgLoadError {
                    source: first,
                    log: String::new(),
                });
            }
            match load(1, &mut log) {
                Ok(fd) => Ok(fd),
                Err(source) => {
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    Err(ProgLoadError {
                        source,
                        log: String::from_utf8_lossy(&log[..end]).into_owned(),
                    })
                }
            }
        }
    }
}

/// Attaches `prog` to the reuseport group of `sock` (`SO_ATTACH_REUSEPORT_EBPF`).
pub fn attach_reuseport_prog(sock: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let prog_fd: libc::c_int = prog.as_raw_fd();
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int is small");
    // SAFETY: `prog_fd` is a local int the kernel reads `len` bytes of; both fds are
    // borrowed for the call (the kernel takes its own reference on the program).
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            std::ptr::from_ref(&prog_fd).cast(),
            len,
        )
    };
    cvt(ret.into()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn bpf_attr_offsets_match_the_uapi_header() {
        assert_eq!(offset_of!(MapCreateAttr, max_entries), 12);
        assert_eq!(offset_of!(MapCreateAttr, map_flags), 16);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, value), 16);
        assert_eq!(offset_of!(MapElemAttr, flags), 24);
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_level), 24);
        assert_eq!(offset_of!(ProgLoadAttr, log_size), 28);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, prog_ifindex), 64);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(offset_of!(GetFdByIdAttr, open_flags), 8);
        assert_eq!(offset_of!(InfoAttr, info), 8);
        assert_eq!(offset_of!(MapInfo, max_entries), 16);
        assert_eq!(size_of::<MapInfo>(), 24);
    }

    #[test]
    fn constants_match_the_uapi_header() {
        assert_eq!(
            (BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD),
            (0, 2, 5)
        );
        assert_eq!(
            (
                BPF_MAP_LOOKUP_ELEM,
                BPF_MAP_GET_FD_BY_ID,
                BPF_OBJ_GET_INFO_BY_FD
            ),
            (1, 14, 15)
        );
        assert_eq!(BPF_MAP_TYPE_ARRAY, 2);
        assert_eq!(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 20);
        assert_eq!(BPF_PROG_TYPE_SK_REUSEPORT, 21);
        assert_eq!(BPF_SK_REUSEPORT_SELECT, 39);
        assert_eq!(BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, 40);
        assert_eq!(SO_ATTACH_REUSEPORT_EBPF, 52);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(libc::SYS_bpf, 321);
    }
}

//! A seccomp filter that refuses `io_uring_setup` with `EPERM`, as container runtimes do
//! (Docker's default profile blocks io_uring): used by the probe to start the agent where
//! io_uring is refused, so its automatic fall-back to epoll is tested for real.
//!
//! Classic BPF (`SECCOMP_MODE_FILTER`, Linux 3.5): check the architecture, load the
//! syscall number, return `SECCOMP_RET_ERRNO | EPERM` for `io_uring_setup`, allow the
//! rest. Needs `CAP_SYS_ADMIN` or `no_new_privs`; it is set here, which only stops
//! `execve` from granting privileges (setuid files), not the agent's own identity changes.

use std::io;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// `__NR_io_uring_setup`, the same on every architecture (the unified numbers).
const NR_IO_URING_SETUP: u32 = 425;

/// Installs the filter on the calling thread (and, inherited, on what it execs).
pub fn deny_io_uring_setup() -> io::Result<()> {
    let filter = [
        libc::sock_filter {
            code: BPF_LD | BPF_W | BPF_ABS,
            jt: 0,
            jf: 0,
            k: ARCH_OFFSET,
        },
        // Another architecture's syscall numbers mean other things: allow.
        libc::sock_filter {
            code: BPF_JMP | BPF_JEQ | BPF_K,
            jt: 0,
            jf: 3,
            k: AUDIT_ARCH,
        },
        libc::sock_filter {
            code: BPF_LD | BPF_W | BPF_ABS,
            jt: 0,
            jf: 0,
            k: NR_OFFSET,
        },
        libc::sock_filter {
            code: BPF_JMP | BPF_JEQ | BPF_K,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: BPF_RET | BPF_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | u32::try_from(libc::EPERM).expect("a small positive errno"),
        },
        libc::sock_filter {
            code: BPF_RET | BPF_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).expect("six instructions"),
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `prog` points at `filter`, both live on this stack for the call; the kernel
    // copies the program before returning.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

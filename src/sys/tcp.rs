//! `getsockopt(TCP_INFO)` on a listening socket: its accept-queue length.
//!
//! For a socket in `LISTEN` state the kernel reports the number of connections waiting
//! in the accept queue in `tcpi_unacked` (and the backlog in `tcpi_sacked`); see
//! `tcp_get_info` in `net/ipv4/tcp.c`. Available on every supported kernel.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::cvt;

/// The number of connections queued on the listening socket `fd`, not yet accepted.
pub fn accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .expect("tcp_info is small");
    // SAFETY: `info` is a zeroed local buffer of `len` bytes that the kernel fills up to
    // `len`; `len` is a local it updates. The fd is borrowed for the call.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    cvt(ret.into())?;
    // SAFETY: zero-initialised, and possibly partly overwritten by the kernel: every bit
    // pattern is a valid `tcp_info` (it holds only integers).
    Ok(unsafe { info.assume_init() }.tcpi_unacked)
}

//! `SO_PEEK_OFF` on a unix stream socket: where the next `MSG_PEEK` reads from.
//!
//! With a peek offset set (0 or more; -1, the default, turns it off), each `recvmsg`
//! with `MSG_PEEK` returns the bytes after those already peeked and moves the offset past
//! them, and a read that takes bytes off the queue moves it back by as many (down to 0):
//! see `sk_peek_offset_fwd`/`sk_peek_offset_bwd` in `include/net/sock.h` and
//! `unix_stream_read_generic` in `net/unix/af_unix.c` (unix stream sockets since 3.x).
//! The offset belongs to the socket, so it outlives a process that had the socket and
//! died: it tells the next reader how many bytes were peeked and not taken.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::cvt;

/// The socket's peek offset: -1 if peeking from an offset is off.
pub fn peek_offset(sock: BorrowedFd<'_>) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int is small");
    // SAFETY: `value` is a local int and `len` its size, both of which the kernel may
    // write; the fd is borrowed for the call.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    cvt(ret.into())?;
    Ok(value)
}

/// Sets the socket's peek offset (`-1` turns peeking from an offset off).
pub fn set_peek_offset(sock: BorrowedFd<'_>, offset: i32) -> io::Result<()> {
    let value: libc::c_int = offset;
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int is small");
    // SAFETY: `value` is a local int the kernel reads `len` bytes of; the fd is borrowed
    // for the call.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            std::ptr::from_ref(&value).cast(),
            len,
        )
    };
    cvt(ret.into()).map(drop)
}

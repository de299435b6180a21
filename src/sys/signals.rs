//! Signals as file-descriptor readiness: block them with `sigprocmask`, read them from a
//! `signalfd` (Linux 2.6.27 for `SFD_CLOEXEC | SFD_NONBLOCK`).
//!
//! The event loop polls the signalfd and reads it inline (never with an io_uring read:
//! signalfd has a history of hangs there, see liburing#5 and #180). The mask is inherited
//! across `clone3`, so the spawn child unblocks everything before `execve`
//! ([`super::spawn`]).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// A set of signal numbers, as `sigset_t`.
pub struct SigSet(pub(super) libc::sigset_t);

impl SigSet {
    /// The set holding exactly `signals`.
    pub fn of(signals: &[i32]) -> SigSet {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigemptyset` initialises the whole `sigset_t` it is given; `set` is a
        // local that outlives the call.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised by `sigemptyset` just above.
        let mut set = unsafe { set.assume_init() };
        for &sig in signals {
            // SAFETY: `set` is an initialised local; an invalid `sig` makes the call
            // return EINVAL without touching memory, which we ignore because callers
            // pass constants from `libc`.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
        SigSet(set)
    }
}

/// Blocks `set` for the calling thread (the agent is single-threaded, so for the process).
pub fn block(set: &SigSet) -> io::Result<()> {
    // SAFETY: `set.0` is an initialised `sigset_t` borrowed for the duration of the call;
    // the old-mask pointer is null, so the kernel writes nothing back.
    let ret = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) };
    cvt(ret.into()).map(drop)
}

/// Sets `signal`'s disposition back to the default.
///
/// Used for `SIGPIPE`, which Rust's runtime ignores and which would otherwise stay
/// ignored in every child (`SIG_IGN` survives `execve`).
pub fn set_default(signal: i32) -> io::Result<()> {
    // SAFETY: `SIG_DFL` is a valid disposition for every catchable signal; no handler
    // function pointer is installed, so nothing can run asynchronously in this process.
    let old = unsafe { libc::signal(signal, libc::SIG_DFL) };
    if old == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a non-blocking, close-on-exec signalfd for `set` (which should be blocked).
pub fn signalfd(set: &SigSet) -> io::Result<OwnedFd> {
    // SAFETY: fd -1 asks for a new signalfd; `set.0` is initialised and only read during
    // the call.
    let fd = unsafe { libc::signalfd(-1, &set.0, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    let fd = cvt(fd.into())?;
    let fd = i32::try_from(fd).expect("the kernel returns fds that fit in an i32");
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a non-blocking signalfd; `None` when drained.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a local buffer of exactly `size` bytes, writable for the call;
    // the fd is borrowed and stays open for the call's duration.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(err);
    }
    if usize::try_from(n).ok() != Some(size) {
        return Ok(None);
    }
    // SAFETY: the kernel wrote a whole `signalfd_siginfo` (n == size, checked above).
    let info = unsafe { info.assume_init() };
    Ok(i32::try_from(info.ssi_signo).ok())
}

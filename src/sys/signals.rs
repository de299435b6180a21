//! Signals as file-descriptor readiness: block them with `sigprocmask`, read them from a
//! `signalfd` (Linux 2.6.27 for `SFD_CLOEXEC | SFD_NONBLOCK`).
//!
//! The event loop polls the signalfd and reads it inline (never with an io_uring read:
//! signalfd has a history of hangs there, see liburing#5 and #180). The mask is inherited
//! across `clone3`, so the spawn child sets back every disposition that is not the default
//! and unblocks everything before `execve` ([`super::spawn`]).

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

/// Blocks `set` for the calling thread (and the threads it makes later: the agent blocks its
/// signals before it makes its helper threads, so for the process).
pub fn block(set: &SigSet) -> io::Result<()> {
    // SAFETY: `set.0` is an initialised `sigset_t` borrowed for the duration of the call;
    // the old-mask pointer is null, so the kernel writes nothing back.
    let ret = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) };
    cvt(ret.into()).map(drop)
}

/// Sets `signal`'s disposition back to the default.
///
/// The agent does this, while they are blocked, for every signal it reads from its
/// signalfd: a signal ignored by whoever started it (`nohup` ignores `SIGHUP`, a shell's
/// `&` ignores `SIGINT` and `SIGQUIT`) would otherwise be discarded whenever it is not
/// blocked. The CLI does it for `SIGPIPE` (Rust's runtime ignores it), so a closed stdout
/// ends it quietly, as it ends any Unix tool.
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

/// The kernel's `struct sigaction` (x86-64 and the generic layout: handler, flags,
/// restorer, a 64-bit mask), for raw `rt_sigaction`: glibc's wrapper refuses the two
/// signals it reserves for its threads (32 and 33), which glibc's own `posix_spawn` leaves
/// ignored in the processes it starts.
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The highest signal number (`_NSIG - 1`).
const MAX_SIGNAL: i32 = 64;

/// Signals whose disposition is not `SIG_DFL` in this process (ignored, or with a
/// handler), glibc's reserved ones included. A child must set them back before it
/// unblocks signals: `SIG_IGN` survives `execve`, and a child that shares our memory
/// (`CLONE_VM`) must never run one of our handlers.
pub fn non_default() -> Vec<i32> {
    let mut out = Vec::new();
    for sig in 1..=MAX_SIGNAL {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: a null new action only reads the current one into `old`, a local of
        // the kernel's layout that outlives the call; the mask size is the kernel's (8).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        if ret == 0 && old.handler != libc::SIG_DFL {
            out.push(sig);
        }
    }
    out
}

/// Sets `sig` back to `SIG_DFL` with a raw `rt_sigaction` (async-signal-safe, and for
/// glibc's reserved signals too); for the spawn child. Returns the syscall's result.
///
/// # Safety
///
/// Only for a task that may change its own dispositions: the spawn child, which has its
/// own handler table (no `CLONE_SIGHAND`).
pub(super) unsafe fn raw_set_default(sig: libc::c_int) -> libc::c_long {
    let act = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: `act` lives on this stack for the call; no old action is read back; the
    // mask size is the kernel's (8).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &act as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        )
    }
}

/// A signal read from a signalfd, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The signal number.
    pub signal: i32,
    /// The sender's pid (0 when the kernel sent it).
    pub pid: u32,
    /// The sender's real uid.
    pub uid: u32,
    /// `si_code`: `SI_USER` from `kill`, `SI_KERNEL` from the kernel itself.
    pub code: i32,
}

impl Received {
    /// Whether the kernel sent it rather than a process: a terminal's hang-up, or a process
    /// group left orphaned with a stopped process in it (`SIGHUP` and `SIGCONT` to the
    /// group), which any process of the session can bring about.
    pub fn sent_by_kernel(&self) -> bool {
        self.code == libc::SI_KERNEL
    }
}

/// Reads one pending signal number from a non-blocking signalfd; `None` when drained.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    Ok(read_signal_info(fd)?.map(|r| r.signal))
}

/// As [`read_signal`], with the sender.
pub fn read_signal_info(fd: BorrowedFd<'_>) -> io::Result<Option<Received>> {
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
    Ok(i32::try_from(info.ssi_signo).ok().map(|signal| Received {
        signal,
        pid: info.ssi_pid,
        uid: info.ssi_uid,
        code: info.ssi_code,
    }))
}

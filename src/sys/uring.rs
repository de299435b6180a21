//! An io_uring used as a readiness engine: one-shot `POLL_ADD`s on fds, one `TIMEOUT` for
//! the loop's next deadline, `ASYNC_CANCEL` to withdraw a poll.
//!
//! Kernel requirements: io_uring with `POLL_ADD` (5.1), `TIMEOUT` (5.4), `ASYNC_CANCEL`
//! and `TIMEOUT_REMOVE` (5.5), probed with `IORING_REGISTER_PROBE` (5.6) at creation;
//! any missing opcode makes [`Uring::new`] fail so that the caller picks epoll.
//!
//! Pushing a submission is unsafe because the kernel may read memory the entry points
//! to until it completes. Only `TIMEOUT` points at memory (its timespec): it is boxed in
//! [`Uring`] and never freed while the ring lives. User tokens must be below 2^63; the
//! top bit marks the ring's own bookkeeping completions, which [`Uring::wait`] drops.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};

const INTERNAL: u64 = 1 << 63;
const TIMEOUT_TAG: u64 = INTERNAL | 1;
const CANCEL_TAG: u64 = INTERNAL | 2;

/// A single-threaded io_uring driving readiness polls.
pub struct Uring {
    ring: IoUring,
    timespec: Box<types::Timespec>,
    timeout_pending: bool,
    /// Tokens completed while the submission queue was being emptied, for the next wait.
    early: Vec<u64>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

impl Uring {
    /// Creates a ring whose completion queue holds `cq_entries`, after checking every
    /// opcode this module uses.
    pub fn new(cq_entries: u32) -> io::Result<Uring> {
        let ring = IoUring::builder().setup_cqsize(cq_entries).build(256)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::PollAdd::CODE,
            opcode::Timeout::CODE,
            opcode::TimeoutRemove::CODE,
            opcode::AsyncCancel::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {code} is not supported"),
                ));
            }
        }
        Ok(Uring {
            ring,
            timespec: Box::new(types::Timespec::new()),
            timeout_pending: false,
            early: Vec::new(),
        })
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entries built in this module point at no memory except the
            // boxed timespec of `self`, which lives as long as the ring; fds are only
            // read at submission (POLL_ADD takes its own file reference).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand the queued entries to the kernel and retry.
            match self.ring.submit() {
                Ok(_) => {}
                // Completions the kernel could not post yet (EBUSY) or a transient lack of
                // memory (EAGAIN): take the completions, then submit again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.reap_completions();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completions that are there into `early`.
    fn reap_completions(&mut self) {
        let mut tokens = std::mem::take(&mut self.early);
        self.collect(&mut tokens);
        self.early = tokens;
    }

    fn collect(&mut self, ready: &mut Vec<u64>) {
        for cqe in self.ring.completion() {
            let token = cqe.user_data();
            if token == TIMEOUT_TAG {
                self.timeout_pending = false;
            } else if token & INTERNAL == 0 && cqe.result() != -libc::ECANCELED {
                ready.push(token);
            }
        }
    }

    /// Arms a one-shot poll of `fd` for `events` (`POLLIN`/`POLLOUT`), completing with
    /// `token`.
    pub fn poll(&mut self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        debug_assert!(token & INTERNAL == 0);
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events)
            .build()
            .user_data(token);
        self.push(&entry)
    }

    /// Cancels the poll armed with `token`, if it is still pending.
    pub fn cancel(&mut self, token: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(token)
            .build()
            .user_data(CANCEL_TAG);
        self.push(&entry)
    }

    /// Submits everything queued and waits for at least one completion or `timeout`;
    /// appends the tokens of completed polls to `ready`.
    pub fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<u64>) -> io::Result<()> {
        if self.timeout_pending {
            let entry = opcode::TimeoutRemove::new(TIMEOUT_TAG)
                .build()
                .user_data(CANCEL_TAG);
            self.push(&entry)?;
            self.timeout_pending = false;
        }
        if let Some(t) = timeout {
            *self.timespec = types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos());
            let entry = opcode::Timeout::new(&*self.timespec)
                .build()
                .user_data(TIMEOUT_TAG);
            self.push(&entry)?;
            self.timeout_pending = true;
        }
        ready.append(&mut self.early);
        let want = usize::from(ready.is_empty());
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            // Interrupted, or completions waiting to be posted (EBUSY), or short of
            // memory for a moment (EAGAIN): take what is there; the loop comes back.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        self.collect(ready);
        Ok(())
    }
}

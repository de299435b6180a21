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
//!
//! The ring belongs to the thread that made it (`SINGLE_ISSUER`, when the kernel has
//! `DEFER_TASKRUN`): only that thread may submit to it or wait on it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};

const INTERNAL: u64 = 1 << 63;
const TIMEOUT_TAG: u64 = INTERNAL | 1;
const CANCEL_TAG: u64 = INTERNAL | 2;
/// Calls made at most after a wait for completions still flagged as not posted.
const MORE_CALLS: usize = 1024;

/// When the kernel's work that posts a completion runs (see [`Uring::taskrun`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRun {
    /// When the ring's thread waits for completions (`DEFER_TASKRUN`, Linux 6.1).
    Deferred,
    /// At the ring's thread's next entry into the kernel, without interrupting it
    /// (`COOP_TASKRUN`, 5.19).
    Cooperative,
    /// At once: the thread is interrupted wherever it runs (older kernels).
    Interrupting,
}

impl TaskRun {
    /// The name shown in the agent's feature report.
    pub fn name(self) -> &'static str {
        match self {
            TaskRun::Deferred => "completions posted when the loop waits (DEFER_TASKRUN)",
            TaskRun::Cooperative => {
                "completions posted at the loop's next system call (COOP_TASKRUN)"
            }
            TaskRun::Interrupting => "each completion interrupts the loop",
        }
    }
}

/// A single-threaded io_uring driving readiness polls.
pub struct Uring {
    ring: IoUring,
    taskrun: TaskRun,
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
        let (ring, taskrun) = Self::build(cq_entries)?;
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
            taskrun,
            timespec: Box::new(types::Timespec::new()),
            timeout_pending: false,
            early: Vec::new(),
        })
    }

    /// The ring, with the work that posts a completion run only when this thread asks
    /// for completions (`DEFER_TASKRUN`, 6.1), or at least without interrupting it
    /// (`COOP_TASKRUN`, 5.19): otherwise each poll that completes (a worker's exit, in the
    /// exiting process's own exit path) interrupts this thread wherever it runs, with an
    /// inter-processor interrupt when it is on another CPU, to post that one completion.
    /// A kernel that does not know a flag refuses it (`EINVAL`): the next is tried.
    fn build(cq_entries: u32) -> io::Result<(IoUring, TaskRun)> {
        let mut deferred = IoUring::builder();
        deferred
            .setup_cqsize(cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag();
        let mut cooperative = IoUring::builder();
        cooperative
            .setup_cqsize(cq_entries)
            .setup_coop_taskrun()
            .setup_taskrun_flag();
        let mut plain = IoUring::builder();
        plain.setup_cqsize(cq_entries);
        let mut refused = None;
        for (builder, taskrun) in [
            (deferred, TaskRun::Deferred),
            (cooperative, TaskRun::Cooperative),
            (plain, TaskRun::Interrupting),
        ] {
            match builder.build(256) {
                Ok(ring) => return Ok((ring, taskrun)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => refused = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(refused.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// When the work that posts a completion runs on this ring.
    pub fn taskrun(&self) -> TaskRun {
        self.taskrun
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
        passing(self.ring.submit_and_wait(want))?;
        self.collect(ready);
        // A kernel may post only some of the deferred completions per call (6.13 and later:
        // 20 or so, then the rest at the next one); those left are flagged: take them now,
        // so that what is ready comes in one batch (a crash of a thousand workers is handled
        // in one turn of the loop).
        for _ in 0..MORE_CALLS {
            let before = ready.len();
            if !self.ring.submission().taskrun() {
                break;
            }
            passing(self.ring.submit())?;
            self.collect(ready);
            if ready.len() == before {
                break;
            }
        }
        Ok(())
    }
}

/// The result of an `io_uring_enter` that waited or took completions, with what passes
/// treated as done: interrupted, completions waiting to be posted (`EBUSY`), or short of
/// memory for a moment (`EAGAIN`): what is there is taken, and the loop comes back.
fn passing(entered: io::Result<usize>) -> io::Result<()> {
    match entered {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The kernel's release as (major, minor).
    fn release() -> (u32, u32) {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut parts = r.trim().split(|c: char| !c.is_ascii_digit());
        let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (next(), next())
    }

    fn ring() -> Option<Uring> {
        match Uring::new(1024) {
            Ok(r) => Some(r),
            Err(e) => {
                assert!(
                    std::env::var("HATCHERY_TEST_REQUIRE").is_err(),
                    "HATCHERY_TEST_REQUIRE is set but io_uring is unavailable: {e}"
                );
                eprintln!("skipped: io_uring unavailable here: {e}");
                None
            }
        }
    }

    #[test]
    fn completions_are_posted_when_the_loop_waits_on_kernels_that_can() {
        let Some(mut ring) = ring() else { return };
        // Every kernel since 6.1 has DEFER_TASKRUN (older ones may have it backported).
        if release() >= (6, 1) {
            assert_eq!(ring.taskrun(), TaskRun::Deferred, "kernel {:?}", release());
        }
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        ring.poll(r.as_fd(), libc::POLLIN as u32, 7).expect("poll");
        let mut ready = Vec::new();
        ring.wait(Some(Duration::ZERO), &mut ready).expect("wait");
        assert!(ready.is_empty(), "nothing written yet: {ready:?}");
        rustix::io::write(&w, b"x").expect("write");
        if ring.taskrun() == TaskRun::Deferred {
            // Ready, but not posted until this thread asks.
            assert!(ring.ring.completion().is_empty());
            assert!(
                ring.ring.submission().taskrun(),
                "flagged as waiting to be posted"
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ready.is_empty() && std::time::Instant::now() < deadline {
            ring.wait(Some(Duration::from_secs(1)), &mut ready)
                .expect("wait");
        }
        assert_eq!(ready, vec![7]);
    }

    #[test]
    fn what_is_ready_together_comes_in_one_wait() {
        let Some(mut ring) = ring() else { return };
        let pipes: Vec<_> = (0..300)
            .map(|_| rustix::pipe::pipe().expect("pipe"))
            .collect();
        for (token, (r, _)) in (0u64..).zip(&pipes) {
            ring.poll(r.as_fd(), libc::POLLIN as u32, token)
                .expect("poll");
        }
        let mut ready = Vec::new();
        ring.wait(Some(Duration::ZERO), &mut ready).expect("wait");
        assert!(ready.is_empty(), "nothing written yet: {ready:?}");
        for (_, w) in &pipes {
            rustix::io::write(w, b"x").expect("write");
        }
        ring.wait(Some(Duration::from_secs(10)), &mut ready)
            .expect("wait");
        ready.sort_unstable();
        assert_eq!(ready, (0..300).collect::<Vec<u64>>());
    }
}

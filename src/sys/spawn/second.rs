//! A second thread that starts processes beside the agent's own ([`SecondStarter`]).
//!
//! A start is mostly waiting: the parent sleeps in `clone3` (`CLONE_VFORK`) while its child
//! applies the sandbox and `execve`s, and on a small host that child often waits for the
//! other CPU first. Two starts at once keep both CPUs busy where one leaves a third of the
//! machine idle (BENCHMARKS.md, "Two starts at a time").
//!
//! The thread lives as long as the agent: the kernel takes the thread that cloned a
//! process as its parent, and a thread that ends sends its children their parent-death
//! signal (`PR_SET_PDEATHSIG`), so a thread made for each batch would signal every worker
//! it started that asked for one. It ends only with the agent (its exit, or the `execve`
//! of an upgrade, which ends every thread but the caller's).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use super::{ExecImage, FdBlock, SpawnError, Spawned, share_rulesets, spawn};

/// One process to start among several ([`spawn_all`]).
pub struct SpawnJob<'a> {
    /// What it runs.
    pub image: ExecImage,
    /// Its fds 0, 1, 2, ...
    pub fds: Vec<BorrowedFd<'a>>,
    /// The cgroup it is born in.
    pub cgroup: Option<BorrowedFd<'a>>,
}

/// A job as the second thread sees it: fd numbers, open until the batch is done.
struct RawJob {
    index: usize,
    image: ExecImage,
    fds: Vec<RawFd>,
    cgroup: Option<RawFd>,
}

/// A batch both threads take jobs from, and their answers.
#[derive(Default)]
struct Batch {
    jobs: Mutex<VecDeque<RawJob>>,
    done: Mutex<Vec<(usize, Result<Spawned, SpawnError>)>>,
}

impl Batch {
    fn next(&self) -> Option<RawJob> {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    /// Starts jobs until none is left, with `block`.
    fn work(&self, block: &mut FdBlock) {
        while let Some(mut job) = self.next() {
            // SAFETY: the numbers are those of `BorrowedFd`s that `spawn_all` holds for its
            // whole call, and it does not return (nor unwind past the `Finished` guard)
            // before this thread has said it is done with the batch: they stay open.
            let fds: Vec<BorrowedFd<'_>> = job
                .fds
                .iter()
                .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
                .collect();
            // SAFETY: as above.
            let cgroup = job.cgroup.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
            let result = spawn(&mut job.image, &fds, cgroup, block);
            self.done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((job.index, result));
        }
    }
}

/// The second thread: batches go to it, and it says when it is done with each.
pub struct SecondStarter {
    batches: SyncSender<Arc<Batch>>,
    finished: Receiver<()>,
}

impl std::fmt::Debug for SecondStarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecondStarter")
    }
}

impl SecondStarter {
    /// Starts the thread, which starts processes with `block`. Its signal mask is the
    /// caller's: call it once the agent has blocked the signals it reads.
    pub fn new(mut block: FdBlock) -> std::io::Result<SecondStarter> {
        let (batches, incoming) = sync_channel::<Arc<Batch>>(1);
        let (done, finished) = sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("hatchery-start".into())
            .spawn(move || {
                while let Ok(batch) = incoming.recv() {
                    batch.work(&mut block);
                    drop(batch);
                    if done.send(()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(SecondStarter { batches, finished })
    }
}

/// Waits, even while unwinding, until the second thread is done with a batch.
struct Finished<'a>(Option<&'a SecondStarter>);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        if let Some(second) = self.0 {
            let _ = second.finished.recv();
        }
    }
}

/// Starts every job, as [`spawn`] does, from this thread with `block` and, when there
/// are several and `second` is there, from the second thread at the same time; says how
/// each went, in order.
pub fn spawn_all(
    jobs: Vec<SpawnJob<'_>>,
    block: &mut FdBlock,
    second: Option<&SecondStarter>,
) -> Vec<Result<Spawned, SpawnError>> {
    let n = jobs.len();
    let mut jobs = jobs;
    if n > 1 {
        share_rulesets(jobs.iter_mut().map(|job| &mut job.image));
    }
    let batch = Arc::new(Batch::default());
    {
        let mut queue = batch.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        for (index, job) in jobs.into_iter().enumerate() {
            queue.push_back(RawJob {
                index,
                image: job.image,
                fds: job.fds.iter().map(|fd| fd.as_raw_fd()).collect(),
                cgroup: job.cgroup.map(|fd| fd.as_raw_fd()),
            });
        }
    }
    let helped = second.filter(|s| n > 1 && s.batches.send(batch.clone()).is_ok());
    {
        let _finished = Finished(helped);
        batch.work(block);
    }
    let mut done = std::mem::take(&mut *batch.done.lock().unwrap_or_else(PoisonError::into_inner));
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

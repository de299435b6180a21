//! A second thread that works beside the agent's own ([`SecondStarter`]): it starts
//! processes ([`spawn_all`]), and can do any other work split in items ([`run_all`]).
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

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

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

/// Item `i` of a [`run_all`], done with the block of the thread that does it.
pub type Task<'a, T> = dyn Fn(usize, &mut FdBlock) -> T + Sync + 'a;

/// Work the second thread shares with the caller's.
trait Work: Send + Sync {
    /// Does items until none is left, with the calling thread's `block`.
    fn work(&self, block: &mut FdBlock);
    /// The second thread is done with this work (it takes no more items, and holds none).
    fn helper_done(&self);
}

/// A [`Task`] whose borrows the type system cannot follow through the channel to the
/// second thread: [`run_all`] holds the task, and all it borrows, for its whole call and
/// does not return (nor unwind past its `Finished` guard) before that thread has said it
/// is done with this very run (`Run::helper`).
struct Erased<T: 'static>(*const Task<'static, T>);

// SAFETY: the pointer is to a `Task`, which is `Sync`: calling it through a shared
// reference from either thread is what its type allows; it stays valid while the items are
// done (see `Erased`).
unsafe impl<T> Send for Erased<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Erased<T> {}

/// The items of one [`run_all`], which both threads take in turn, and their results.
struct Run<T: 'static> {
    n: usize,
    next: AtomicUsize,
    task: Erased<T>,
    done: Mutex<Vec<(usize, T)>>,
    /// Set by the second thread once it is done with this run, even while unwinding.
    helper: (Mutex<bool>, Condvar),
}

impl<T> Run<T> {
    /// Waits until the second thread is done with this run.
    fn wait_for_helper(&self) {
        let (lock, cvar) = &self.helper;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = cvar.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T: Send> Work for Run<T> {
    fn work(&self, block: &mut FdBlock) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: `run_all` holds the task for its whole call and does not return
            // before this thread is done with the run (see `Erased`).
            let task = unsafe { &*self.task.0 };
            let result = task(i, block);
            self.done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((i, result));
        }
    }

    fn helper_done(&self) {
        let (lock, cvar) = &self.helper;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_all();
    }
}

/// Says the second thread is done with a run when dropped, also while it unwinds.
struct HelperDone(Arc<dyn Work>);

impl Drop for HelperDone {
    fn drop(&mut self) {
        self.0.helper_done();
    }
}

/// The second thread: work goes to it, and it says in the work when it is done with it.
pub struct SecondStarter {
    batches: SyncSender<Arc<dyn Work>>,
}

impl std::fmt::Debug for SecondStarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecondStarter")
    }
}

impl SecondStarter {
    /// Starts the thread, which does its part of each [`run_all`] (starts) with
    /// `block`. Its signal mask is the caller's: call it once the agent has blocked the
    /// signals it reads.
    pub fn new(mut block: FdBlock) -> std::io::Result<SecondStarter> {
        let (batches, incoming) = sync_channel::<Arc<dyn Work>>(1);
        std::thread::Builder::new()
            .name("hatchery-start".into())
            .spawn(move || {
                ON_SECOND.with(|on| on.set(true));
                while let Ok(batch) = incoming.recv() {
                    let done = HelperDone(batch);
                    done.0.work(&mut block);
                }
            })?;
        Ok(SecondStarter { batches })
    }
}

thread_local! {
    /// Whether this is the second thread: a run it starts itself it does alone (it cannot
    /// help itself).
    static ON_SECOND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Waits, even while unwinding, until the second thread is done with a run it was given.
struct Finished<'a, T: 'static>(Option<&'a Run<T>>);

impl<T> Drop for Finished<'_, T> {
    fn drop(&mut self) {
        if let Some(run) = self.0 {
            run.wait_for_helper();
        }
    }
}

/// Does `task` for each of `0..n`, from this thread with `block` and, when there are
/// several and `second` is there, from the second thread at the same time (each item once,
/// by whichever thread takes it next); the results in order. `task` must be safe to run
/// on either thread: that is, it may not rely on this thread's own state (its credentials,
/// its signal mask, its TLS), which the second thread does not share.
pub fn run_all<T: Send + 'static>(
    n: usize,
    block: &mut FdBlock,
    second: Option<&SecondStarter>,
    task: &Task<'_, T>,
) -> Vec<T> {
    // SAFETY: only the lifetime changes (same pointer, same vtable); see `Erased` for why
    // the pointer stays valid while it is used.
    let erased =
        unsafe { std::mem::transmute::<*const Task<'_, T>, *const Task<'static, T>>(task) };
    let run = Arc::new(Run {
        n,
        next: AtomicUsize::new(0),
        task: Erased(erased),
        done: Mutex::new(Vec::with_capacity(n)),
        helper: (Mutex::new(false), Condvar::new()),
    });
    // Sent, the run is the second thread's until it says it is done with it; not sent
    // (one item; called on the second thread itself; another run already waiting for it;
    // no thread: it ended), this thread does every item.
    let helped = n > 1
        && !ON_SECOND.with(std::cell::Cell::get)
        && second.is_some_and(|s| s.batches.try_send(run.clone()).is_ok());
    {
        let _finished = Finished(helped.then_some(&*run));
        run.work(block);
    }
    let mut done = std::mem::take(&mut *run.done.lock().unwrap_or_else(PoisonError::into_inner));
    assert_eq!(done.len(), n, "every item of a run is done once");
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
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
    let jobs: Vec<Mutex<Option<SpawnJob<'_>>>> =
        jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    run_all(n, block, second, &|i, block| {
        let mut job = jobs[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .expect("each job is taken once");
        spawn(&mut job.image, &job.fds, job.cgroup, block)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> FdBlock {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        FdBlock::reserve(null.into()).expect("a block")
    }

    #[test]
    fn run_all_does_each_item_once_and_answers_in_order() {
        let second = SecondStarter::new(block()).expect("the second thread");
        let mut own = block();
        for n in [0, 1, 2, 500] {
            let times: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let out = run_all(n, &mut own, Some(&second), &|i, _| {
                times[i].fetch_add(1, Ordering::Relaxed);
                i * 3
            });
            assert_eq!(out, (0..n).map(|i| i * 3).collect::<Vec<_>>());
            assert!(times.iter().all(|t| t.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_run_inside_a_run_waits_for_its_own_items() {
        let second = SecondStarter::new(block()).expect("the second thread");
        let mut own = block();
        let outer = run_all(4, &mut own, Some(&second), &|i, block| {
            let inner: Vec<usize> = run_all(50, block, Some(&second), &|j, _| {
                std::thread::yield_now();
                i * 100 + j
            });
            inner.iter().sum::<usize>()
        });
        let want: Vec<usize> = (0..4).map(|i| (0..50).map(|j| i * 100 + j).sum()).collect();
        assert_eq!(outer, want);
    }
}

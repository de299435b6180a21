//! Threads that work beside the agent's own ([`StartHelpers`]): they do work split in
//! items ([`run_all`]), mostly starting processes (`crate::spawn::start_all`); and the one
//! that keeps the whole bounding set ([`set_whole_set_aside`]), for the processes the others
//! cannot start once they dropped from their own.
//!
//! A start is mostly waiting: the parent sleeps in `clone3` (`CLONE_VFORK`) while its child
//! applies the sandbox and `execve`s, and on a small host that child often waits for a CPU
//! first. Several starts at once keep the CPUs busy where one leaves a third of the machine
//! idle (BENCHMARKS.md, "Two starts at a time" and "More threads that start workers").
//!
//! The threads live as long as the agent: the kernel takes the thread that cloned a
//! process as its parent, and a thread that ends sends its children their parent-death
//! signal (`PR_SET_PDEATHSIG`), so a thread made for each batch would signal every worker
//! it started that asked for one. They end only with the agent (its exit, or the `execve`
//! of an upgrade, which ends every thread but the one keeping the whole set, its caller).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::FdBlock;

/// Item `i` of a [`run_all`], done with the block of the thread that does it.
pub type Task<'a, T> = dyn Fn(usize, &mut FdBlock) -> T + Sync + 'a;

/// Work the helper threads share with the caller's.
trait Work: Send + Sync {
    /// Does items until none is left, with the calling thread's `block`.
    fn work(&self, block: &mut FdBlock);
    /// A helper thread is done with this work (it takes no more items, and holds none).
    fn helper_done(&self);
}

/// A [`Task`] whose borrows the type system cannot follow through the channel to the
/// helper threads: [`run_all`] holds the task, and all it borrows, for its whole call and
/// does not return (nor unwind past its `Finished` guard) before each thread it gave the run
/// to has said it is done with this very run (`Run::helper`).
struct Erased<T: 'static>(*const Task<'static, T>);

// SAFETY: the pointer is to a `Task`, which is `Sync`: calling it through a shared
// reference from any thread is what its type allows; it stays valid while the items are
// done (see `Erased`).
unsafe impl<T> Send for Erased<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Erased<T> {}

/// The items of one [`run_all`], which the threads take in turn, and their results.
struct Run<T: 'static> {
    n: usize,
    next: AtomicUsize,
    task: Erased<T>,
    done: Mutex<Vec<(usize, T)>>,
    /// How many of the copies sent to the helpers are done with: a helper counts each copy
    /// it took once, after its items, even while unwinding (one that took two copies of a
    /// run counts two).
    helper: (Mutex<usize>, Condvar),
}

impl<T: Send + 'static> Run<T> {
    /// A run of `task` over `0..n`.
    ///
    /// # Safety
    ///
    /// The caller holds `task`, and all it borrows, until each thread it gives the run to
    /// is done with it ([`Run::wait_for_helpers`]), also while unwinding: the run forgets
    /// the borrow's lifetime (see `Erased`).
    unsafe fn new(n: usize, task: &Task<'_, T>) -> Arc<Run<T>> {
        // SAFETY: only the lifetime changes (same pointer, same vtable); the caller keeps
        // the pointer valid while it is used (above).
        let erased =
            unsafe { std::mem::transmute::<*const Task<'_, T>, *const Task<'static, T>>(task) };
        Arc::new(Run {
            n,
            next: AtomicUsize::new(0),
            task: Erased(erased),
            done: Mutex::new(Vec::with_capacity(n)),
            helper: (Mutex::new(0), Condvar::new()),
        })
    }

    /// The results, in order, once every item is done.
    fn results(&self) -> Vec<T> {
        let mut done =
            std::mem::take(&mut *self.done.lock().unwrap_or_else(PoisonError::into_inner));
        assert_eq!(done.len(), self.n, "every item of a run is done once");
        done.sort_unstable_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, r)| r).collect()
    }
}

impl<T> Run<T> {
    /// Waits until each of the `sent` copies of this run is done with.
    fn wait_for_helpers(&self, sent: usize) {
        let (lock, cvar) = &self.helper;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while *done < sent {
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
        *lock.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        cvar.notify_all();
    }
}

/// Says a helper thread is done with a run when dropped, also while it unwinds.
struct HelperDone(Arc<dyn Work>);

impl Drop for HelperDone {
    fn drop(&mut self) {
        self.0.helper_done();
    }
}

/// The helper threads: work goes to them (one channel, each run sent once per helper it
/// asks for), and each says in the work when it is done with it.
pub struct StartHelpers {
    batches: SyncSender<Arc<dyn Work>>,
    threads: usize,
}

impl std::fmt::Debug for StartHelpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartHelpers")
    }
}

impl StartHelpers {
    /// Starts one thread per block, each doing its part of each [`run_all`] (starts) with
    /// its block. Their signal mask is the caller's: call it once the agent has blocked the
    /// signals it reads. An error only when a thread could not be made and none was (no
    /// blocks: no threads, and every run is done by its caller alone).
    pub fn new(blocks: Vec<FdBlock>) -> std::io::Result<StartHelpers> {
        let (batches, incoming) = sync_channel::<Arc<dyn Work>>(blocks.len().max(1));
        let incoming = Arc::new(Mutex::new(incoming));
        let mut threads = 0;
        for mut block in blocks {
            let incoming = incoming.clone();
            let made = std::thread::Builder::new()
                .name("hatchery-start".into())
                .spawn(move || {
                    ON_HELPER.with(|on| on.set(true));
                    super::may_drop_bounding_here();
                    loop {
                        let batch = incoming
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv();
                        let Ok(batch) = batch else { break };
                        let done = HelperDone(batch);
                        done.0.work(&mut block);
                    }
                });
            match made {
                Ok(_) => threads += 1,
                Err(e) if threads == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(StartHelpers { batches, threads })
    }
}

thread_local! {
    /// Whether this is a helper thread: a run it starts itself (a run inside a run) it does
    /// alone.
    static ON_HELPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The thread that keeps the whole bounding set ([`set_whole_set_aside`]), when there is one:
/// its runs' channel.
static WHOLE_SET: Mutex<Option<SyncSender<Arc<dyn Work>>>> = Mutex::new(None);

/// Makes the thread that keeps its whole bounding set (one for the process: a later call
/// keeps the first and drops `block`), and lets the calling thread drop from its own set
/// what its children's sandboxes drop, as the helpers do: what this thread can then no
/// longer start ([`super::bounding_fits`]), and the agent's own programs (the next agent of
/// an upgrade, the fd holder), that thread starts ([`on_whole_set`]). Like the helpers, it
/// lives as long as the process, and has the caller's signal mask: call it once the agent
/// has blocked the signals it reads.
pub fn set_whole_set_aside(mut block: FdBlock) -> std::io::Result<()> {
    let mut whole = WHOLE_SET.lock().unwrap_or_else(PoisonError::into_inner);
    if whole.is_none() {
        // No buffer: a run sent is one the thread took (and will say it is done with).
        let (runs, incoming) = sync_channel::<Arc<dyn Work>>(0);
        std::thread::Builder::new()
            .name("hatchery-whole".into())
            .spawn(move || {
                for run in incoming {
                    let done = HelperDone(run);
                    done.0.work(&mut block);
                }
            })?;
        *whole = Some(runs);
    }
    super::may_drop_bounding_here();
    Ok(())
}

/// Does `task` for each of `0..n` on a thread whose bounding set is whole, and gives the
/// results in order: on this thread with `block` when it has dropped nothing from its set,
/// otherwise on the thread [`set_whole_set_aside`] made (this one waits), or, when there is
/// none (the agent's thread drops only once it made one, and with `panic = "abort"` it
/// cannot end before the process), here after all: `task` checks where it runs
/// ([`super::keeps_whole_set`]) where that matters to it.
pub fn on_whole_set<T: Send + 'static>(
    n: usize,
    block: &mut FdBlock,
    task: &Task<'_, T>,
) -> Vec<T> {
    to_whole_set(n, task).unwrap_or_else(|| (0..n).map(|i| task(i, block)).collect())
}

/// Runs `f` as [`on_whole_set`] runs a task, for work that needs no block of fds (a
/// `std::process::Command` of the agent's own).
pub fn with_whole_set<T: Send + 'static>(f: &(dyn Fn() -> T + Sync)) -> T {
    match to_whole_set(1, &|_, _| f()) {
        Some(mut done) => done.pop().expect("one item"),
        None => f(),
    }
}

/// [`on_whole_set`] on the thread that keeps its whole set, when this one does not and that
/// thread takes the work; `None` (nothing done) otherwise.
fn to_whole_set<T: Send + 'static>(n: usize, task: &Task<'_, T>) -> Option<Vec<T>> {
    // Nothing to do is done here, without a hand-off (most starts leave nothing).
    if n == 0 || super::keeps_whole_set() {
        return None;
    }
    let whole = WHOLE_SET
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()?;
    // SAFETY: `task` outlives this call, which, once the run is sent, waits for the thread
    // to be done with it (nothing between can unwind).
    let run = unsafe { Run::new(n, task) };
    whole.send(run.clone()).ok()?;
    run.wait_for_helpers(1);
    Some(run.results())
}

/// Waits, even while unwinding, until each helper thread a run was given to is done with it.
struct Finished<'a, T: 'static>(&'a Run<T>, usize);

impl<T> Drop for Finished<'_, T> {
    fn drop(&mut self) {
        self.0.wait_for_helpers(self.1);
    }
}

/// Does `task` for each of `0..n`, from this thread with `block` and, when there are
/// several and `helpers` is there, from helper threads at the same time (each item once,
/// by whichever thread takes it next); the results in order. `task` must be safe to run
/// on any thread: that is, it may not rely on this thread's own state (its credentials,
/// its signal mask, its TLS), which the helper threads do not share.
pub fn run_all<T: Send + 'static>(
    n: usize,
    block: &mut FdBlock,
    helpers: Option<&StartHelpers>,
    task: &Task<'_, T>,
) -> Vec<T> {
    // SAFETY: `task` outlives this call, which does not return (nor unwind past its
    // `Finished` guard) before each helper it sent the run to is done with it.
    let run = unsafe { Run::new(n, task) };
    // Sent, the run is shared with each helper it was sent for until that helper says it is
    // done with it; not sent (one item; called on a helper itself; the channel full;
    // no thread: it ended), this thread does every item.
    let mut sent = 0;
    if n > 1 && !ON_HELPER.with(std::cell::Cell::get) {
        if let Some(h) = helpers {
            while sent < h.threads.min(n - 1) && h.batches.try_send(run.clone()).is_ok() {
                sent += 1;
            }
        }
    }
    {
        let _finished = Finished(&run, sent);
        run.work(block);
    }
    run.results()
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
        let second = StartHelpers::new(vec![block()]).expect("a helper thread");
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
    fn three_helpers_do_each_item_once_and_each_takes_part() {
        let helpers = StartHelpers::new(vec![block(), block(), block()]).expect("helpers");
        let mut own = block();
        for _ in 0..20 {
            let n = 400;
            let times: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let out = run_all(n, &mut own, Some(&helpers), &|i, _| {
                times[i].fetch_add(1, Ordering::Relaxed);
                std::thread::current().id()
            });
            assert_eq!(out.len(), n);
            assert!(times.iter().all(|t| t.load(Ordering::Relaxed) == 1));
        }
        // Every helper thread took items at some point: a run is sent once per helper, and
        // each helper waits for runs on the one channel. (Which ones take part in a given
        // run depends on the scheduler; over runs of slow items, all of them do.)
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        for _ in 0..50 {
            run_all(8, &mut own, Some(&helpers), &|_, _| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                seen.lock()
                    .expect("lock")
                    .insert(std::thread::current().id());
            });
            if seen.lock().expect("lock").len() == 4 {
                break;
            }
        }
        assert_eq!(
            seen.lock().expect("lock").len(),
            4,
            "the caller and three helpers"
        );
    }

    #[test]
    fn work_for_the_whole_set_runs_here_until_this_thread_drops_from_its_own() {
        let name = || std::thread::current().name().map(str::to_string);
        // A thread of its own: this test pretends it dropped from its bounding set.
        std::thread::spawn(move || {
            set_whole_set_aside(block()).expect("the thread");
            let mut own = block();
            let here = name();
            let done = on_whole_set(3, &mut own, &|i, _| (i, name()));
            assert_eq!(done, (0..3).map(|i| (i, here.clone())).collect::<Vec<_>>());
            assert_eq!(with_whole_set(&name), here, "nothing dropped: here");
            super::super::BOUNDING_GONE.set(1 << 21);
            let there = Some("hatchery-whole".to_string());
            let done = on_whole_set(3, &mut own, &|i, _| (i, name()));
            assert_eq!(done, (0..3).map(|i| (i, there.clone())).collect::<Vec<_>>());
            // Nothing to do is not handed off: with the whole-set thread busy, it is answered
            // at once all the same (10 s bound only a failure).
            let (started, started_rx) = std::sync::mpsc::channel();
            let busy = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    super::super::BOUNDING_GONE.set(1 << 21);
                    with_whole_set(&|| {
                        started.send(()).expect("told");
                        busy.wait();
                    })
                });
                started_rx.recv().expect("the whole-set thread is busy");
                let (answer, answered) = std::sync::mpsc::channel();
                s.spawn(move || {
                    super::super::BOUNDING_GONE.set(1 << 21);
                    let none: Vec<()> = on_whole_set(0, &mut block(), &|_, _| unreachable!());
                    answer.send(none.len()).expect("answered");
                });
                let got = answered.recv_timeout(std::time::Duration::from_secs(10));
                busy.wait();
                assert_eq!(got, Ok(0), "no hand-off for nothing");
            });
            assert_eq!(with_whole_set(&name), there);
            assert!(with_whole_set(&super::super::keeps_whole_set));
        })
        .join()
        .expect("the test's thread");
    }

    #[test]
    fn a_run_inside_a_run_waits_for_its_own_items() {
        let second = StartHelpers::new(vec![block()]).expect("a helper thread");
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

//! Threads that work beside the agent's own ([`StartHelpers`]): they do work split in
//! items ([`run_all`]), mostly starting processes (`crate::spawn::start_all`).
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
//! of an upgrade, which ends every thread but the caller's).

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

/// Whether this is one of the helper threads.
pub(super) fn on_helper() -> bool {
    ON_HELPER.with(std::cell::Cell::get)
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
    // SAFETY: only the lifetime changes (same pointer, same vtable); see `Erased` for why
    // the pointer stays valid while it is used.
    let erased =
        unsafe { std::mem::transmute::<*const Task<'_, T>, *const Task<'static, T>>(task) };
    let run = Arc::new(Run {
        n,
        next: AtomicUsize::new(0),
        task: Erased(erased),
        done: Mutex::new(Vec::with_capacity(n)),
        helper: (Mutex::new(0), Condvar::new()),
    });
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
    let mut done = std::mem::take(&mut *run.done.lock().unwrap_or_else(PoisonError::into_inner));
    assert_eq!(done.len(), n, "every item of a run is done once");
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
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

//! What `SiteCore` keeps up to date beside its slots, so that no input costs a pass over
//! every slot: counts (processes, ready workers, ready workers still settling, …), the
//! stopped slots, and the slots' deadlines in time order.
//!
//! Each slot remembers what it added to the index ([`Indexed`], in `SlotState::indexed`).
//! After every change to a slot's phase, process, busy report or settle time,
//! [`SiteCore::sync`] takes that contribution back and adds the new one; a slot is removed
//! through [`SiteCore::remove_slot`], which takes its contribution back. So an input
//! costs O(log N) per slot it changes, with N slots.
//!
//! Invariant: the index equals the one built afresh from the slots. In debug builds (every
//! test, the simulation) [`SiteCore::check_index`] rebuilds it and asserts so after every
//! input to a site of up to 256 slots, and after every `slots / 256`th input to a larger
//! one; release builds do not pay for it.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{AfterStop, Phase, SiteCore, Slot, SlotState};

/// Up to this many slots, debug builds check the index after every input.
#[cfg(debug_assertions)]
const CHECK_EVERY_INPUT: usize = 256;

/// What one slot adds to the [`Index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Indexed {
    /// It has a process (`Phase::has_process`).
    process: bool,
    /// `Ready`.
    ready: bool,
    /// `Ready`, and not yet settled.
    settling: bool,
    /// `Ready`, and its process said it is busy.
    ready_busy: bool,
    /// `Starting`, its spawn reported (a process to probe).
    spawned: bool,
    /// `Stopped`.
    stopped: bool,
    /// `Stopping`, to be removed.
    removing: bool,
    /// Its deadline as [`SiteCore::next_deadline`] counts it.
    deadline: Option<Instant>,
    /// When it will have settled (whatever its phase: `settle` clears it then).
    settles_at: Option<Instant>,
}

impl Indexed {
    /// What `slot` adds to the index.
    pub fn of(slot: &SlotState) -> Indexed {
        let ready = slot.phase == Phase::Ready;
        Indexed {
            process: slot.phase.has_process(),
            ready,
            settling: ready && slot.settles_at.is_some(),
            ready_busy: ready && slot.busy(),
            spawned: matches!(slot.phase, Phase::Starting { .. }) && slot.pid.is_some(),
            stopped: slot.phase == Phase::Stopped,
            removing: matches!(
                slot.phase,
                Phase::Stopping {
                    then: AfterStop::Remove,
                    ..
                }
            ),
            deadline: match slot.phase {
                Phase::Starting { deadline } => deadline,
                Phase::Stopping { deadline, .. } => deadline,
                Phase::Backoff { until } => Some(until),
                Phase::Ready => slot.settles_at,
                Phase::Failed | Phase::Stopped => None,
            },
            settles_at: slot.settles_at,
        }
    }
}

/// Counts and ordered sets over a site's slots (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    /// Slots with a process.
    pub live: usize,
    /// `Ready` slots.
    pub ready: usize,
    /// `Ready` slots not yet settled.
    pub settling: usize,
    /// `Ready` slots whose process is busy.
    pub ready_busy: usize,
    /// `Starting` slots whose spawn was reported.
    pub spawned: usize,
    /// Slots stopping to be removed.
    pub removing: usize,
    /// `Stopped` slots.
    pub stopped: BTreeSet<Slot>,
    /// Every slot's deadline (see [`Indexed::deadline`]), earliest first.
    pub deadlines: BTreeSet<(Instant, Slot)>,
    /// Every slot's settle time, earliest first.
    pub settles: BTreeSet<(Instant, Slot)>,
}

impl Index {
    /// Adds slot `id`'s contribution.
    fn add(&mut self, id: Slot, e: Indexed) {
        self.live += usize::from(e.process);
        self.ready += usize::from(e.ready);
        self.settling += usize::from(e.settling);
        self.ready_busy += usize::from(e.ready_busy);
        self.spawned += usize::from(e.spawned);
        self.removing += usize::from(e.removing);
        if e.stopped {
            self.stopped.insert(id);
        }
        if let Some(t) = e.deadline {
            self.deadlines.insert((t, id));
        }
        if let Some(t) = e.settles_at {
            self.settles.insert((t, id));
        }
    }

    /// Takes slot `id`'s contribution back (a set entry already taken out is no error:
    /// `settle` pops due settle times before it syncs).
    fn take(&mut self, id: Slot, e: Indexed) {
        self.live -= usize::from(e.process);
        self.ready -= usize::from(e.ready);
        self.settling -= usize::from(e.settling);
        self.ready_busy -= usize::from(e.ready_busy);
        self.spawned -= usize::from(e.spawned);
        self.removing -= usize::from(e.removing);
        if e.stopped {
            self.stopped.remove(&id);
        }
        if let Some(t) = e.deadline {
            self.deadlines.remove(&(t, id));
        }
        if let Some(t) = e.settles_at {
            self.settles.remove(&(t, id));
        }
    }
}

impl SiteCore {
    /// Brings the index up to date with slot `id` after a change to it (nothing if it has
    /// none, or the slot is gone: see `remove_slot`).
    pub(super) fn sync(&mut self, id: Slot) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let new = Indexed::of(slot);
        let old = std::mem::replace(&mut slot.indexed, new);
        if old != new {
            self.index.take(id, old);
            self.index.add(id, new);
        }
    }

    /// Removes slot `id` and its contribution to the index.
    pub(super) fn remove_slot(&mut self, id: Slot) {
        if let Some(slot) = self.slots.remove(&id) {
            self.index.take(id, slot.indexed);
        }
    }

    /// Checks the index after an input (debug builds): after every input while the site
    /// has at most [`CHECK_EVERY_INPUT`] slots (every property test and simulation), else
    /// after one input in `slots / CHECK_EVERY_INPUT`, so that a test of 10,000 workers
    /// stays O(N) per check but not O(N) per input. A slot changed without a sync stays
    /// wrong until its next sync, so a later check still finds most such mistakes.
    #[cfg(debug_assertions)]
    pub(super) fn check_index_often(&mut self) {
        self.unchecked += 1;
        if self.unchecked * CHECK_EVERY_INPUT >= self.slots.len() {
            self.unchecked = 0;
            self.check_index();
        }
    }

    /// Asserts that the index is the one built afresh from the slots, and that each slot
    /// remembers what it added (O(N): debug builds and tests only).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn check_index(&self) {
        let mut fresh = Index::default();
        for (id, slot) in self.slots.iter() {
            let e = Indexed::of(slot);
            assert_eq!(slot.indexed, e, "slot {id} changed without a sync");
            fresh.add(*id, e);
        }
        assert_eq!(self.index, fresh, "the slot index went stale");
    }
}

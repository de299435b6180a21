//! A site's slots by number.
//!
//! Slot numbers are handed out lowest first (`SiteCore::fill_slots`), so they are mostly
//! dense (a scale down that keeps a busy high slot leaves gaps below it, filled first by
//! the next scale up): a vector indexed by the number holds them in 192 bytes a slot where
//! a `BTreeMap` kept about 360 (its nodes half full): 1.7 MB of the agent's heap at 10,000
//! workers. Lookups become O(1); walks go in increasing order, as the map's did (over the
//! gaps too: a walk costs the highest number, not the count).

use std::ops::Index;

use super::{Slot, SlotState};

/// Slots by number (see the module doc). A slot is kept under its own `id`.
#[derive(Debug, Clone, Default)]
pub struct SlotMap {
    /// Slot `n` at index `n`; never ends with `None`.
    slots: Vec<Option<SlotState>>,
    /// The `Some`s in `slots`.
    len: usize,
}

fn index(id: Slot) -> usize {
    // Lossless: a usize has at least 32 bits on every target Hatchery builds for.
    id.0 as usize
}

impl SlotMap {
    /// How many slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slot `id`.
    pub fn get(&self, id: &Slot) -> Option<&SlotState> {
        self.slots.get(index(*id)).and_then(Option::as_ref)
    }

    /// Slot `id`, to change (its `id` must stay).
    pub fn get_mut(&mut self, id: &Slot) -> Option<&mut SlotState> {
        self.slots.get_mut(index(*id)).and_then(Option::as_mut)
    }

    /// Whether slot `id` exists.
    pub fn contains_key(&self, id: &Slot) -> bool {
        self.get(id).is_some()
    }

    /// Room for slots up to `last` without growing again: a site's start or scale up
    /// fills the gaps and then adds its new slots at the end, in one step. Many at once
    /// get just that room; one at a time (`workers = "auto"` growing) doubles it.
    pub fn reserve_up_to(&mut self, last: Slot) {
        let needed = (index(last) + 1).saturating_sub(self.slots.len());
        self.slots.reserve(needed);
    }

    /// Puts `slot` under its `id`; returns the slot it replaced.
    pub fn insert(&mut self, slot: SlotState) -> Option<SlotState> {
        let i = index(slot.id);
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        let old = self.slots[i].replace(slot);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Takes slot `id` out. The room left past the highest slot still there is given back
    /// once it is three times what is below it (a site scaled down from thousands).
    pub fn remove(&mut self, id: &Slot) -> Option<SlotState> {
        let old = self.slots.get_mut(index(*id)).and_then(Option::take)?;
        self.len -= 1;
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        if self.slots.capacity() > 4 * self.slots.len().max(16) {
            self.slots.shrink_to(2 * self.slots.len());
        }
        Some(old)
    }

    /// The slots with their numbers, in increasing order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Slot, &SlotState)> {
        self.values().map(|s| (&s.id, s))
    }

    /// The slots' numbers, in increasing order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &Slot> {
        self.values().map(|s| &s.id)
    }

    /// The slots, in increasing order of their numbers.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &SlotState> {
        self.slots.iter().flatten()
    }

    /// The slots, to change (their `id`s must stay), in increasing order.
    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut SlotState> {
        self.slots.iter_mut().flatten()
    }

    /// The slot with the highest number.
    pub fn last_key_value(&self) -> Option<(&Slot, &SlotState)> {
        // The vector never ends with a `None`.
        self.slots
            .last()
            .and_then(Option::as_ref)
            .map(|s| (&s.id, s))
    }
}

impl Index<&Slot> for SlotMap {
    type Output = SlotState;

    fn index(&self, id: &Slot) -> &SlotState {
        self.get(id).expect("no such slot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(m: &SlotMap) -> Vec<u32> {
        m.keys().map(|s| s.0).collect()
    }

    #[test]
    fn slots_are_kept_by_number_in_order_and_the_end_is_trimmed() {
        let mut m = SlotMap::default();
        assert!(m.is_empty() && m.last_key_value().is_none());
        m.reserve_up_to(Slot(3));
        for n in [3, 0, 1] {
            assert!(m.insert(SlotState::new(Slot(n))).is_none());
        }
        assert_eq!((m.len(), ids(&m)), (3, vec![0, 1, 3]));
        assert!(m.contains_key(&Slot(3)) && !m.contains_key(&Slot(2)));
        assert!(m.get(&Slot(7)).is_none() && m.get_mut(&Slot(2)).is_none());
        assert_eq!(m[&Slot(1)].id, Slot(1));
        assert_eq!(
            m.keys().rev().map(|s| s.0).collect::<Vec<_>>(),
            vec![3, 1, 0]
        );
        // Replacing keeps the count.
        let mut again = SlotState::new(Slot(1));
        again.restarts = 4;
        assert!(m.insert(again).is_some());
        assert_eq!((m.len(), m[&Slot(1)].restarts), (3, 4));
        // Removing the last trims what is left empty behind it.
        assert_eq!(m.remove(&Slot(3)).map(|s| s.id), Some(Slot(3)));
        assert_eq!(m.last_key_value().map(|(k, _)| k.0), Some(1));
        assert!(m.remove(&Slot(3)).is_none() && m.remove(&Slot(9)).is_none());
        assert_eq!((m.len(), ids(&m)), (2, vec![0, 1]));
        assert_eq!(m.slots.len(), 2);
        let walked: Vec<(u32, u32)> = m.iter().map(|(k, v)| (k.0, v.id.0)).collect();
        assert_eq!(walked, vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn room_is_given_back_after_a_large_scale_down() {
        let mut m = SlotMap::default();
        m.reserve_up_to(Slot(9_999));
        for n in 0..10_000 {
            m.insert(SlotState::new(Slot(n)));
        }
        assert_eq!(m.slots.capacity(), 10_000);
        for n in (100..10_000).rev() {
            m.remove(&Slot(n));
        }
        assert_eq!((m.len(), m.slots.len()), (100, 100));
        assert!(m.slots.capacity() <= 400, "{}", m.slots.capacity());
    }
}

//! The supervisor's identifiers: newtypes, so a generation number is never taken for a
//! slot number or a client.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A generation of a site, shown as `gen-<N>`; numbers are never reused within an agent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct GenId(pub u32);

impl GenId {
    /// The next generation's number.
    pub fn next(self) -> GenId {
        GenId(self.0 + 1)
    }
}

impl fmt::Display for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A worker slot of a generation, shown as `w-<K>`: a numbered place for one worker,
/// whose process comes and goes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Slot(pub u32);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One worker of a site: a slot of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId {
    /// Its generation.
    pub generation: GenId,
    /// Its slot.
    pub slot: Slot,
}

/// A client waiting for the outcome of what it asked (a control connection, to the event
/// loop; anything unique to a simulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

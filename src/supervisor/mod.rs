//! The supervisor core: pure state machines, no I/O.
//!
//! [`slots::SiteCore`] holds one site's worker slots and decides, for each input (a worker
//! spawned, became ready, exited; a deadline passed; an operator asked to start, stop,
//! scale or restart), the new state and a list of [`slots::Action`]s for the event loop to
//! carry out. Time is an input, so every policy here is tested with plain `cargo test`,
//! including a randomized simulation against the invariants of DESIGN.md.

pub mod capacity;
pub mod deploy;
pub mod ids;
pub mod load;
pub mod machine;
pub mod policy;
pub mod slots;

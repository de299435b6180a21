//! Parts of the `hatchery` binary beside `main.rs`: how the CLI shows what the agent says.

pub mod docs;
pub mod events;
pub mod help;
pub mod remote;
pub mod render;
pub mod reply;
pub mod top;

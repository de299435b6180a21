//! Parts of the `hatchery` binary beside `main.rs`: how the CLI shows what the agent says.

pub mod events;
pub mod render;
pub mod top;

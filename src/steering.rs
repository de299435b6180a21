//! Connection steering between generations (placeholder until the eBPF program lands:
//! every site uses the shared-listener fallback).

use std::os::fd::BorrowedFd;

/// What this kernel/privilege allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteeringSupport {
    /// `SELECT_OR_MIGRATE`.
    Migrate,
    /// `SELECT` only.
    Select,
    /// None, and why.
    Unavailable(String),
}

/// Probes the kernel.
pub fn probe() -> SteeringSupport {
    SteeringSupport::Unavailable("the eBPF steering program is not built in yet".into())
}

/// Errors of steering.
#[derive(Debug, thiserror::Error)]
#[error("eBPF steering is unavailable")]
pub struct SteeringError;

/// One reuseport group's program and maps.
#[derive(Debug)]
pub struct Steering(());

impl Steering {
    /// Attaches to the group of `member`.
    pub fn attach(_member: BorrowedFd<'_>) -> Result<Steering, SteeringError> {
        Err(SteeringError)
    }
    /// Steers new connections to `listener`.
    pub fn steer_to(&mut self, _listener: BorrowedFd<'_>) -> Result<(), SteeringError> {
        Err(SteeringError)
    }
    /// Whether queued connections migrate.
    pub fn migrates(&self) -> bool {
        false
    }
}

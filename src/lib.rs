//! Hatchery: a kernel-assisted process supervisor for hosting many web sites on one host.
//!
//! The module tree follows the layers of DESIGN.md, each using only those beneath it:
//!
//! - `sys`, private to the crate, is the only place with `unsafe`: `clone3` and the
//!   post-clone child path, `signalfd`, `waitid(P_ALL, WNOWAIT)`, `fork` for a zygote,
//!   the io_uring submission side, `bpf(2)` and Landlock. The few of its safe calls that the CLI and the tests use
//!   are re-exported by the modules that own the concept:
//!   [`net::accept_queue_len`], [`steering::load_select_program`],
//!   [`sandbox::landlock_abi`] and [`process::set_default_disposition`].
//! - Kernel-facing mechanism: [`process`] (a pid always with its pidfd), [`cgroup`] (the
//!   cgroup v2 tree as directory fds), [`net`] (listeners bound by the agent, the notify
//!   socket), [`spawn`] (turning a site's configuration into a ready-to-clone image),
//!   [`steering`] (the eBPF program that sends a reuseport group's new connections to the
//!   serving generation's listener), [`sandbox`] (checking a site's root and preparing
//!   the plan of sandbox steps the child applies before `execve`).
//! - Policy without I/O: [`supervisor`] (per-generation worker slot state machine, restart
//!   backoff and flapping control, the memory cap, the deploy plan).
//! - [`event`]: the single-threaded loop (io_uring or epoll readiness) that feeds kernel
//!   events to the supervisor and carries out its actions, plus the control server and
//!   deploys by generations.
//! - Used anywhere: [`config`] (parsing and validation), [`logs`] (per-site worker log
//!   files with rotation), [`control`] (the JSON protocol and its client), [`features`]
//!   (what this kernel provides and what is enforced), [`metrics`] (the Prometheus text
//!   encoding of a `status` report and the agent's counters).
//!
//! The `hatchery` binary (`src/main.rs`) is the CLI and `hatchery agent`; [`demo`] holds
//! the built-in demo site and its tiny HTTP worker; [`probe`] is a small worker that
//! reports what it sees of itself (and tries what a hostile worker would), for tests and
//! diagnostics; [`terminal`] is the client side of `hatchery exec`; [`fdholder`] is the fd
//! holder (`hatchery fd-holder`), a separate process that keeps the read ends of workers'
//! output pipes open across an agent's death, and its client; [`keeper`] is the unit's main
//! process under systemd, which starts the agent and starts another when it dies, so that
//! the agent's crash is not the unit's; [`zygote`] is zygote mode's
//! protocol (a per-generation process that loads the app once and forks workers on the
//! agent's request): the agent's side and the side of a zygote written in Rust. Both
//! exchange datagrams with fds through [`scm`].

/// This build's version: the crate's, with `+<id>` when built with `HATCHERY_BUILD_ID` set
/// (so that two builds of one version tell apart in `status` after `hatchery upgrade`).
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match option_env!("HATCHERY_BUILD_ID") {
        Some(id) if !id.is_empty() => format!("{}+{id}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    })
}

pub mod cgroup;
pub mod config;
pub mod control;
pub mod demo;
pub mod event;
pub mod fdholder;
pub mod features;
pub mod journal;
pub mod keeper;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod process;
pub mod sandbox;
pub mod scm;
pub mod spawn;
pub mod status;
pub mod steering;
pub mod supervisor;
#[allow(unsafe_code)]
mod sys;
pub mod terminal;
pub mod usage;
pub mod zygote;

pub use control::{Client, ClientError};

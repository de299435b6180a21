//! The file format: one `serde` struct per table of the agent file and of a site file,
//! mirroring what is written exactly. `deny_unknown_fields` everywhere, so a typo is an
//! error, not a silently ignored key. Nothing here checks a value: see `site` and `load`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::sandbox;

/// The agent file, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Path of the control socket.
    pub control_socket: Option<PathBuf>,
    /// Directory for logs and the notify socket.
    pub state_dir: Option<PathBuf>,
    /// Directory holding one `<site>.toml` per site.
    pub sites_dir: Option<PathBuf>,
    /// `auto`, `off`, or the path of the cgroup v2 directory to manage.
    pub cgroup_base: Option<String>,
    /// Default log rotation for every site.
    pub logs: Option<RawLogs>,
    /// Memory kept for the host and the agent: site budgets must leave this much free.
    pub memory_reserve: Option<String>,
    /// TCP address (`127.0.0.1:9464`) to serve Prometheus metrics on (`GET /metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// A site file, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    /// The site's name (must match the file name).
    pub name: Option<String>,
    /// The worker's argv.
    pub command: Option<Vec<String>>,
    /// How workers start: `"exec"` (each runs `command`) or `"zygote"` (`command` starts a
    /// zygote per generation, and workers are forked from it).
    pub mode: Option<String>,
    /// Where workers' stdout and stderr go: `"pipe"` (one per worker) or `"socket"` (one
    /// for the site).
    pub output: Option<String>,
    /// How many workers: a number, or `"auto"` (as many as the memory budget holds).
    pub workers: Option<RawWorkers>,
    /// With `workers = "auto"`: the fewest workers.
    pub workers_min: Option<u32>,
    /// With `workers = "auto"`: the most workers.
    pub workers_max: Option<u32>,
    /// Expected memory of one worker, until workers have been measured.
    pub worker_memory: Option<String>,
    /// The user the workers run as.
    pub user: Option<String>,
    /// The group the workers run as.
    pub group: Option<String>,
    /// The working directory of the workers.
    pub workdir: Option<PathBuf>,
    /// The release symlink: each generation runs its target, `{release}` in `command`,
    /// `workdir` and `env`.
    pub release: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Listeners bound by the agent and passed to every worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<RawListen>,
    /// How workers are stopped.
    pub stop: Option<RawStop>,
    /// How crashed workers are restarted.
    pub restart: Option<RawRestart>,
    /// How readiness is decided.
    pub ready: Option<RawReady>,
    /// How deploys go.
    pub deploy: Option<RawDeploy>,
    /// Periodic HTTP health checks of the serving generation.
    pub health: Option<RawHealth>,
    /// Log rotation for this site.
    pub logs: Option<RawLogs>,
    /// The site's memory budget (`memory.max` of its cgroup).
    pub memory: Option<String>,
    /// Most processes the site may have (`pids.max`).
    pub pids_max: Option<u32>,
    /// CPU weight of the site against others (`cpu.weight`, 1 to 10000).
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of each worker (`memory.max` of its leaf).
    pub memory_max: Option<String>,
    /// Memory level above which each worker is throttled and reclaimed (`memory.high`).
    pub memory_high: Option<String>,
    /// The sandbox (`[sandbox]`).
    pub sandbox: Option<sandbox::RawSandbox>,
    /// How `workers = "auto"` sizes the site (`[scale]`).
    pub scale: Option<RawScale>,
}

/// `[scale]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawScale {
    /// `"memory"` (as many workers as the budget holds) or `"load"` (as many as the load
    /// needs, within the budget).
    pub by: Option<String>,
    /// The utilisation aimed at: a fraction (`0.7`) or a percentage (`"70%"`).
    pub target: Option<RawFraction>,
    /// How often the load is sampled.
    pub interval: Option<String>,
    /// The least time between two growths.
    pub grow_cooldown: Option<String>,
    /// How long fewer workers must have done before the site shrinks (and between two
    /// shrinks).
    pub shrink_cooldown: Option<String>,
}

/// A fraction as written: `0.7` or `"70%"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawFraction {
    /// A number.
    Number(f64),
    /// A percentage, or anything else (refused by validation).
    Text(String),
}

// Files are compared only after parsing; a NaN (which TOML can spell) is refused by
// validation before anything keeps it.
impl Eq for RawFraction {}

/// `workers`: a count or `"auto"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawWorkers {
    /// A fixed count.
    Count(u32),
    /// `"auto"`.
    Auto(String),
}

/// `[[listen]]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// The fd name passed in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// A TCP address, `host:port`.
    pub tcp: Option<String>,
    /// A unix socket path.
    pub unix: Option<PathBuf>,
    /// The listen backlog.
    pub backlog: Option<u32>,
    /// Who binds it: `"agent"` (default: bound by the agent, passed as an fd) or `"own"`
    /// (the app binds this TCP port itself; the sandbox allows that bind).
    pub mode: Option<String>,
}

/// `[stop]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStop {
    /// The signal asking a worker to stop.
    pub signal: Option<String>,
    /// How long before `SIGKILL`.
    pub timeout: Option<String>,
}

/// `[restart]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    /// The delay after the second quick crash.
    pub backoff_initial: Option<String>,
    /// The longest delay.
    pub backoff_max: Option<String>,
    /// How long a worker must run for its backoff to reset.
    pub healthy_after: Option<String>,
    /// `{ exits = N, within = "10s" }`.
    pub flapping: Option<RawFlapping>,
}

/// `[restart] flapping`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlapping {
    /// Exits of one worker slot...
    pub exits: Option<u32>,
    /// ...within this window mark the site failed.
    pub within: Option<String>,
}

/// `[ready]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReady {
    /// `notify`, `tcp`, `http` or `none`.
    pub check: Option<String>,
    /// How long a worker may take to become ready.
    pub timeout: Option<String>,
    /// How long a worker must stay up once ready before `start`, `scale` and `restart`
    /// call it a success.
    pub settle: Option<String>,
    /// `http`: the path asked for.
    pub path: Option<String>,
    /// `http`: the statuses that count as ready (`2xx`, `200`, `200-399`).
    pub status: Option<String>,
    /// `http`: the `Host` header.
    pub host: Option<String>,
}

/// `[health]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// How often the serving generation is checked.
    pub interval: Option<String>,
    /// How long a check may take to be answered.
    pub timeout: Option<String>,
    /// Failed checks of one worker before it is restarted.
    pub failures: Option<u32>,
    /// The path asked for.
    pub path: Option<String>,
    /// The statuses that count as healthy (`2xx`, `200`, `200-399`).
    pub status: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
}

/// `[deploy]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    /// How long a new generation's workers must stay up, all ready, before the flip.
    pub probation: Option<String>,
    /// `[deploy.canary_abort]`: what rolls a canary back by itself.
    pub canary_abort: Option<RawCanaryAbort>,
    /// Requests sent to every new worker before the flip: paths, or a number of requests
    /// of the ready path.
    pub warmup: Option<RawWarmup>,
}

/// `deploy.warmup`, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawWarmup {
    /// This many requests of the ready path (`/` without an `http` check).
    Count(u32),
    /// These paths, in order.
    Paths(Vec<String>),
}

/// `[deploy.canary_abort]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanaryAbort {
    /// Exits of the canary's workers that roll it back (0: none do).
    pub crashes: Option<u32>,
}

/// `[logs]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogs {
    /// Rotate when the file reaches this size.
    pub max_size: Option<String>,
    /// How many rotated files to keep.
    pub keep: Option<u32>,
}

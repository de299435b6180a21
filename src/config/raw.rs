//! The file format: one `serde` struct per table of the agent file and of a site file,
//! mirroring what is written exactly. `deny_unknown_fields` everywhere, so a typo is an
//! error, not a silently ignored key. Nothing here checks a value: see `site` and `load`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::sandbox;

/// `deserialize_with` helpers for keys written as text of one kind: a value of another
/// type is refused with what the key expects (`expected a duration like "30s", found
/// integer 30`), not serde's "expected a string". The text itself is checked by
/// validation, which says what is wrong with it.
pub(crate) mod text {
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    /// Reads a string, expecting `what`.
    struct Text(&'static str);

    impl<'de> Visitor<'de> for Text {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }

        // A `null` where the raw structs travel as JSON (`check --json`).
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    /// A duration: `"30s"`, `"1m30s"`, `"500ms"`.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Text("a duration like \"30s\""))
    }

    /// A size: `"512MiB"`, `"2G"`, or a number of bytes written as text.
    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Text("a size like \"512MiB\""))
    }

    /// A signal: `"SIGTERM"`, `"HUP"`.
    pub fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Text("a signal name like \"SIGTERM\""))
    }

    /// A TCP address: `"127.0.0.1:8000"`.
    pub fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Text("an address like \"127.0.0.1:8000\""))
    }

    /// Any other text.
    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Text("a string in double quotes"))
    }
}

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
    #[serde(default, deserialize_with = "text::string")]
    pub cgroup_base: Option<String>,
    /// Default log rotation for every site.
    pub logs: Option<RawLogs>,
    /// Memory kept for the host and the agent: site budgets must leave this much free.
    #[serde(default, deserialize_with = "text::size")]
    pub memory_reserve: Option<String>,
    /// TCP address (`127.0.0.1:9464`) to serve Prometheus metrics on (`GET /metrics`).
    #[serde(
        default,
        deserialize_with = "text::address",
        skip_serializing_if = "Option::is_none"
    )]
    pub metrics: Option<String>,
}

/// A site file, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    /// The site's name (must match the file name).
    #[serde(default, deserialize_with = "text::string")]
    pub name: Option<String>,
    /// The worker's argv.
    pub command: Option<Vec<String>>,
    /// How workers start: `"exec"` (each runs `command`) or `"zygote"` (`command` starts a
    /// zygote per generation, and workers are forked from it).
    #[serde(default, deserialize_with = "text::string")]
    pub mode: Option<String>,
    /// Where workers' stdout and stderr go: `"pipe"` (one per worker) or `"socket"` (one
    /// for the site).
    #[serde(default, deserialize_with = "text::string")]
    pub output: Option<String>,
    /// How many workers: a number, or `"auto"` (as many as the memory budget holds).
    pub workers: Option<RawWorkers>,
    /// With `workers = "auto"`: the fewest workers.
    pub workers_min: Option<u32>,
    /// With `workers = "auto"`: the most workers.
    pub workers_max: Option<u32>,
    /// Expected memory of one worker, until workers have been measured.
    #[serde(default, deserialize_with = "text::size")]
    pub worker_memory: Option<String>,
    /// The user the workers run as.
    #[serde(default, deserialize_with = "text::string")]
    pub user: Option<String>,
    /// The group the workers run as.
    #[serde(default, deserialize_with = "text::string")]
    pub group: Option<String>,
    /// The working directory of the workers.
    pub workdir: Option<PathBuf>,
    /// The release symlink: each generation runs its target, `{release}` in `command`,
    /// `workdir` and `env`.
    pub release: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A file of `KEY=VALUE` lines adding to `env` (whose own keys win); relative to the
    /// site file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
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
    #[serde(default, deserialize_with = "text::size")]
    pub memory: Option<String>,
    /// Most processes the site may have (`pids.max`).
    pub pids_max: Option<u32>,
    /// CPU weight of the site against others (`cpu.weight`, 1 to 10000).
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of each worker (`memory.max` of its leaf).
    #[serde(default, deserialize_with = "text::size")]
    pub memory_max: Option<String>,
    /// Memory level above which each worker is throttled and reclaimed (`memory.high`).
    #[serde(default, deserialize_with = "text::size")]
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
    #[serde(default, deserialize_with = "text::string")]
    pub by: Option<String>,
    /// The utilisation aimed at: a fraction (`0.7`) or a percentage (`"70%"`).
    pub target: Option<RawFraction>,
    /// How often the load is sampled.
    #[serde(default, deserialize_with = "text::duration")]
    pub interval: Option<String>,
    /// The least time between two growths.
    #[serde(default, deserialize_with = "text::duration")]
    pub grow_cooldown: Option<String>,
    /// How long fewer workers must have done before the site shrinks (and between two
    /// shrinks).
    #[serde(default, deserialize_with = "text::duration")]
    pub shrink_cooldown: Option<String>,
}

/// A fraction as written: `0.7` or `"70%"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "expected a fraction like 0.7 or a percentage like \"70%\""
)]
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
#[serde(
    untagged,
    expecting = "expected a number of workers like 4, or \"auto\""
)]
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
    #[serde(default, deserialize_with = "text::string")]
    pub name: Option<String>,
    /// A TCP address, `host:port`.
    #[serde(default, deserialize_with = "text::address")]
    pub tcp: Option<String>,
    /// A unix socket path.
    pub unix: Option<PathBuf>,
    /// The listen backlog.
    pub backlog: Option<u32>,
    /// Who binds it: `"agent"` (default: bound by the agent, passed as an fd) or `"own"`
    /// (the app binds this TCP port itself; the sandbox allows that bind).
    #[serde(default, deserialize_with = "text::string")]
    pub mode: Option<String>,
}

/// `[stop]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStop {
    /// The signal asking a worker to stop.
    #[serde(default, deserialize_with = "text::signal")]
    pub signal: Option<String>,
    /// A sequence of signals asking a worker to stop, each followed by `timeout`
    /// (instead of `signal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<Vec<String>>,
    /// How long before `SIGKILL`.
    #[serde(default, deserialize_with = "text::duration")]
    pub timeout: Option<String>,
}

/// `[restart]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    /// The delay after the second quick crash.
    #[serde(default, deserialize_with = "text::duration")]
    pub backoff_initial: Option<String>,
    /// The longest delay.
    #[serde(default, deserialize_with = "text::duration")]
    pub backoff_max: Option<String>,
    /// How long a worker must run for its backoff to reset.
    #[serde(default, deserialize_with = "text::duration")]
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
    #[serde(default, deserialize_with = "text::duration")]
    pub within: Option<String>,
}

/// `[ready]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReady {
    /// `notify`, `tcp`, `http` or `none`.
    #[serde(default, deserialize_with = "text::string")]
    pub check: Option<String>,
    /// How long a worker may take to become ready.
    #[serde(default, deserialize_with = "text::duration")]
    pub timeout: Option<String>,
    /// How long a worker must stay up once ready before `start`, `scale` and `restart`
    /// call it a success.
    #[serde(default, deserialize_with = "text::duration")]
    pub settle: Option<String>,
    /// `http`: the path asked for.
    #[serde(default, deserialize_with = "text::string")]
    pub path: Option<String>,
    /// `http`: the statuses that count as ready (`2xx`, `200`, `200-399`).
    #[serde(default, deserialize_with = "text::string")]
    pub status: Option<String>,
    /// `http`: the `Host` header.
    #[serde(default, deserialize_with = "text::string")]
    pub host: Option<String>,
}

/// `[health]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// How often the serving generation is checked.
    #[serde(default, deserialize_with = "text::duration")]
    pub interval: Option<String>,
    /// How long a check may take to be answered.
    #[serde(default, deserialize_with = "text::duration")]
    pub timeout: Option<String>,
    /// Failed checks of one worker before it is restarted.
    pub failures: Option<u32>,
    /// The path asked for.
    #[serde(default, deserialize_with = "text::string")]
    pub path: Option<String>,
    /// The statuses that count as healthy (`2xx`, `200`, `200-399`).
    #[serde(default, deserialize_with = "text::string")]
    pub status: Option<String>,
    /// The `Host` header.
    #[serde(default, deserialize_with = "text::string")]
    pub host: Option<String>,
}

/// `[deploy]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    /// How long a new generation's workers must stay up, all ready, before the flip.
    #[serde(default, deserialize_with = "text::duration")]
    pub probation: Option<String>,
    /// `[deploy.canary_abort]`: what rolls a canary back by itself.
    pub canary_abort: Option<RawCanaryAbort>,
    /// Requests sent to every new worker before the flip: paths, or a number of requests
    /// of the ready path.
    pub warmup: Option<RawWarmup>,
}

/// `deploy.warmup`, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "expected a number of requests like 3, or paths like [\"/\", \"/about\"]"
)]
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
    #[serde(default, deserialize_with = "text::size")]
    pub max_size: Option<String>,
    /// How many rotated files to keep.
    pub keep: Option<u32>,
}

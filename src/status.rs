//! What `status` answers, as types: built by the agent, rendered by the CLI, read by the
//! tests, all through these structs (the JSON of `status --json` is their serde form).
//!
//! Optional fields are `null` when unknown or not applicable: a site that could not be
//! started has only its `name`, `state` (`failed`), `error`, `file` and the counts it was
//! configured with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::Usage;
use crate::features::Feature;

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The agent itself.
    pub agent: AgentStatus,
    /// The sites the caller may see (one, when a site was named).
    pub sites: Vec<SiteStatus>,
}

/// The agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Its pid.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// The control protocol it speaks ([`crate::control::PROTOCOL_VERSION`]); 1 when an
    /// agent from before the field does not say.
    #[serde(default = "crate::control::first_protocol")]
    pub protocol: u32,
    /// When it started (UTC).
    pub started_at: String,
    /// The version it replaced with `hatchery upgrade`, and when (since its start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded_from: Option<UpgradedFrom>,
    /// Bytes of its own log it could not write (a stderr closed, full or failing).
    pub log_bytes_dropped: u64,
    /// Its configuration file.
    pub config: PathBuf,
    /// What this host provides and what is not enforced.
    pub features: Vec<Feature>,
}

/// The agent's last upgrade: the same process, another binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradedFrom {
    /// The version that ran before.
    pub version: String,
    /// When the new binary took over (UTC).
    pub at: String,
}

/// A site's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    /// Workers are kept running.
    Running,
    /// A worker flapped or could not start (the others keep serving), or the site could
    /// not be started at all (`error` says why).
    Failed,
    /// Stopping every worker.
    Stopping,
    /// No worker runs, by request.
    Stopped,
}

impl SiteState {
    /// The name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            SiteState::Running => "running",
            SiteState::Failed => "failed",
            SiteState::Stopping => "stopping",
            SiteState::Stopped => "stopped",
        }
    }
}

/// One site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: SiteState,
    /// Why it could not be started, when it could not; or, for a site that runs, why its
    /// file is not what it runs with (the file does not load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its file, when it could not be started or does not load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The serving generation.
    pub generation: Option<u32>,
    /// The serving generation's release directory.
    #[serde(default)]
    pub release: Option<PathBuf>,
    /// The release the serving one replaced (what `rollback` returns to).
    #[serde(default)]
    pub previous_release: Option<PathBuf>,
    /// Every live generation.
    #[serde(default)]
    pub generations: Vec<GenerationStatus>,
    /// The deploy under way.
    #[serde(default)]
    pub deploy: Option<DeployStatus>,
    /// Deploys waiting for it.
    #[serde(default)]
    pub queued_deploys: usize,
    /// What the last deploy did.
    #[serde(default)]
    pub last_deploy: Option<DeployRecord>,
    /// How connections reach the serving generation: `ebpf` or `shared listener`.
    #[serde(default)]
    pub steering: Option<String>,
    /// Workers the serving generation runs (the cap may hold it below `requested`).
    pub desired: u32,
    /// Workers asked for (configuration or `scale`).
    #[serde(default)]
    pub requested: u32,
    /// `workers = "auto"`: its range.
    #[serde(default)]
    pub auto: Option<AutoRange>,
    /// The memory cap and its derivation.
    #[serde(default)]
    pub capacity: Option<CapacityStatus>,
    /// Load scaling, for a site that follows its load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleStatus>,
    /// Ready workers of the serving generation.
    pub ready: u32,
    /// Whether a rolling restart is under way.
    #[serde(default)]
    pub restarting: bool,
    /// Its listeners (`tcp 127.0.0.1:8000`, `unix /run/x.sock`).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Its log file.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Its configured limits, and those this host cannot enforce.
    #[serde(default)]
    pub limits: Option<LimitsStatus>,
    /// Accounting of its cgroup.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// What its sandbox enforces here.
    #[serde(default)]
    pub sandbox: Option<SandboxStatus>,
    /// Every worker slot of every generation.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// How deploys go when not by generations side by side: `stop-then-start: blog binds
    /// its own port 127.0.0.1:8000` (a `[[listen]]` with `mode = "own"`).
    #[serde(default)]
    pub deploys: Option<String>,
}

/// One worker slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its slot number (`w-<id>`).
    pub id: u32,
    /// Its generation.
    pub generation: u32,
    /// Its process, if it has one.
    pub pid: Option<i32>,
    /// `starting`, `ready`, `stopping`, `backoff`, `failed`, `stopped`.
    pub state: String,
    /// It said `BUSY=1` (until `BUSY=0`).
    pub busy: bool,
    /// Restarts after a crash.
    pub restarts: u32,
    /// When its process started (UTC).
    pub started_at: Option<String>,
    /// How long its process has run.
    pub uptime_ms: Option<u64>,
    /// How its last process ended (`exited with code 3`, `killed by SIGKILL`,
    /// `oom-killed`, ...).
    pub last_exit: Option<String>,
    /// Its cgroup leaf.
    pub cgroup: Option<PathBuf>,
    /// Accounting of its leaf.
    pub usage: Option<Usage>,
}

/// One generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// Its number.
    pub id: u32,
    /// `serving`, `starting`, `probation`, `draining`, `retiring`.
    pub state: String,
    /// Its release directory.
    pub release: Option<PathBuf>,
    /// Workers it is asked to run.
    pub desired: u32,
    /// Ready workers.
    pub ready: u32,
    /// Processes alive.
    pub live: u32,
    /// Exits of its workers it did not ask for.
    #[serde(default)]
    pub crashes: u32,
    /// While a canary runs: the share of new connections it takes (`"10%"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<String>,
    /// Its zygote (`mode = "zygote"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zygote: Option<ZygoteStatus>,
}

/// A generation's zygote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZygoteStatus {
    /// `starting`, `ready`, `backoff`, `stopping`, `stopped`.
    pub state: String,
    /// It died while ready and no new one is ready yet: the workers run on, new ones wait.
    pub degraded: bool,
    /// Times it ended (or failed to start) without being asked.
    pub restarts: u32,
    /// Its process.
    pub pid: Option<i32>,
    /// Its cgroup leaf.
    pub cgroup: Option<PathBuf>,
    /// Its leaf's usage (the memory its workers share is charged here).
    pub usage: Option<Usage>,
    /// The workers it forked ahead and named (`SPARE`), already in the leaf of the slot
    /// each is expected to get.
    #[serde(default)]
    pub spares: Vec<SpareStatus>,
}

/// A zygote's worker forked ahead, moved ahead into a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareStatus {
    /// Its process.
    pub pid: i32,
    /// The slot its leaf is for.
    pub slot: u32,
    /// Its leaf.
    pub cgroup: PathBuf,
}

/// The deploy under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployStatus {
    /// The serving generation it started from.
    pub from: u32,
    /// The new generation.
    pub to: u32,
    /// `starting`, `probation`, `draining`.
    pub stage: String,
    /// The release being deployed.
    pub release: Option<PathBuf>,
    /// Workers the new generation ends up with.
    pub target: u32,
    /// Most workers of both generations together.
    pub cap: Option<u32>,
    /// Whether it returns to the previous release.
    pub rollback: bool,
    /// When it began (UTC).
    pub started_at: String,
    /// A canary deploy: the new generation's share of new connections (`"10%"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Whether the canary was promoted (it grows, then is flipped to).
    #[serde(default)]
    pub promoted: bool,
}

/// How a deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployResult {
    /// The new generation serves, the old one retired.
    Done,
    /// The new generation serves, but one of its workers died once the old one was
    /// told to stop.
    DoneWithCrashes,
    /// The new generation was stopped; the old one serves.
    RolledBack,
}

/// What a deploy did (the site's `last_deploy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    /// How it ended.
    pub result: DeployResult,
    /// The generation it started from.
    pub from: u32,
    /// The generation it started.
    pub to: u32,
    /// The release it deployed.
    pub release: Option<PathBuf>,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it took, when it went through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When it ended (UTC).
    pub finished_at: String,
    /// `CLOCK_MONOTONIC` just before and just after the steering was flipped (or flipped
    /// back), to correlate with other records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_monotonic_ns: Option<[u64; 2]>,
}

/// The range of `workers = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoRange {
    /// `workers_min`.
    pub min: u32,
    /// `workers_max`.
    pub max: u32,
}

/// Load scaling (`[scale] by = "load"`): why the site has the workers it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleStatus {
    /// `scale N` pinned the count (until `scale SITE auto`).
    pub pinned: bool,
    /// The utilisation aimed at, percent.
    pub target_percent: u32,
    /// How often the load is sampled, ms.
    pub interval_ms: u64,
    /// `scale.grow_cooldown`, ms.
    pub grow_cooldown_ms: u64,
    /// `scale.shrink_cooldown`, ms.
    pub shrink_cooldown_ms: u64,
    /// Whether the load is sampled now (else why not).
    pub sampling: bool,
    /// Whether the kernel wakes the agent when the site goes without a CPU (a PSI
    /// trigger on the serving generation's `cpu.pressure`).
    #[serde(default)]
    pub pressure_trigger: bool,
    /// Why not, when it is not.
    #[serde(default)]
    pub idle_reason: Option<String>,
    /// The signals at the last sample.
    #[serde(default)]
    pub signals: Option<crate::supervisor::load::Signals>,
    /// Signals this site does not have, and why.
    #[serde(default)]
    pub unavailable: Vec<String>,
    /// Why the last sample that wanted more workers did not grow the site.
    #[serde(default)]
    pub held: Option<String>,
    /// The last change of the count.
    #[serde(default)]
    pub last_decision: Option<ScaleDecision>,
}

/// A change of the count by load scaling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleDecision {
    /// Workers before.
    pub from: u32,
    /// Workers after.
    pub to: u32,
    /// Why, in words.
    pub reason: String,
    /// When (UTC).
    pub at: String,
}

/// The memory cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityStatus {
    /// Most workers.
    pub workers: u32,
    /// Bytes counted per worker.
    pub per_worker: u64,
    /// `estimate` or `measured`.
    pub basis: crate::supervisor::capacity::Basis,
    /// The site's budget.
    pub budget: u64,
    /// Bytes of it the zygote holds (zygote mode), left out of the workers' share.
    #[serde(default)]
    pub zygote: u64,
    /// `512M budget / 115M per worker (measured peak + 15%) = 4`.
    pub derivation: String,
}

/// A site's configured limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsStatus {
    /// `memory` (the site budget).
    pub memory: Option<u64>,
    /// `pids_max`.
    pub pids_max: Option<u32>,
    /// `cpu_weight`.
    pub cpu_weight: Option<u32>,
    /// `memory_max` per worker.
    pub memory_max: Option<u64>,
    /// `memory_high` per worker.
    pub memory_high: Option<u64>,
    /// Those this host cannot enforce.
    pub not_enforced: Vec<String>,
}

/// A site's sandbox on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// What is enforced, one line each.
    pub enforced: Vec<String>,
    /// What is not.
    pub not_enforced: Vec<String>,
}

/// What `hatchery check --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether every site file is valid.
    pub valid: bool,
    /// Every problem found: invalid files first, then what this host would refuse.
    pub problems: Vec<Problem>,
    /// Each valid site's effective file: what it says, with every default filled in.
    pub sites: Vec<crate::config::RawSite>,
    /// What the kernel offers.
    pub features: Vec<Feature>,
    /// Each valid site's sandbox on this host, by site name.
    pub sandbox: std::collections::BTreeMap<String, SandboxCheck>,
    /// The limits of each site that this host's cgroup v2 mount cannot enforce (its
    /// controller is not offered), by site name; sites whose limits all hold are absent.
    #[serde(default)]
    pub limits_not_enforced: std::collections::BTreeMap<String, Vec<String>>,
}

/// A problem `check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The site (`-` for the agent file).
    pub site: String,
    /// What kind.
    pub kind: ProblemKind,
    /// The file at fault, for a problem of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<std::path::PathBuf>,
    /// The line of the file, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// The key at fault (`stop.timeout`, `listen[1].tcp`; `-` for the whole file), for a
    /// problem of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What is wrong (and, without `file`, where).
    pub message: String,
}

impl Problem {
    /// An invalid file's problem `e`, of `site`.
    pub fn of_file(site: &str, e: &crate::config::ConfigError) -> Problem {
        Problem {
            site: site.to_string(),
            kind: ProblemKind::Invalid,
            file: Some(e.file.clone()),
            line: e.line,
            key: Some(e.key.clone()),
            message: e.message.clone(),
        }
    }
}

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The file is not valid (exit 2).
    Invalid,
    /// The file is valid but this host would refuse the site (exit 1).
    Refused,
}

/// A site's sandbox as `check` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SandboxCheck {
    /// This host would refuse it.
    Refused {
        /// Why.
        refused: String,
    },
    /// What it would enforce.
    Prepared(SandboxStatus),
}

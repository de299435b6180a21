//! The agent's event loop: one thread, one reactor, only events.
//!
//! Sources, each a one-shot readiness registration identified by a never-reused token:
//! the signalfd (`SIGTERM`, `SIGINT`, `SIGHUP`, `SIGCHLD`), every worker's pidfd (exit),
//! every worker's output pipe, the notify socket (`READY=1`), the control socket and its
//! connections. Deadlines (backoff, stop and ready timeouts, TCP ready probes) come from
//! the supervisor's state and set the reactor's wait timeout; when nothing is due the
//! loop sleeps without a timeout, so an idle agent uses no CPU.
//!
//! Inputs go to [`SiteCore`](crate::supervisor::slots::SiteCore) machines; their actions
//! (spawn, signal, kill, notes) are carried out here, and the resulting inputs fed back
//! until nothing is left. Errors of single operations are logged once, here, with the
//! site, worker and pid; the loop itself only stops on a failure of the reactor.

mod deploy;
mod exec;
pub mod reactor;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use rustix::net::{SocketFlags, sockopt};
use tracing::{debug, error, info, warn};

use self::reactor::{Interest, Reactor};
use crate::cgroup::{CgroupTree, Graveyard};
use crate::config::{self, AgentConfig, ListenAddr, ReadyCheck, SiteConfig, SiteName};
use crate::control::{Done, ErrorKind, MAX_CONNECTIONS, MAX_REQUEST, Reply, Request};
use crate::features::{self, Feature};
use crate::logs::{self, LineSplitter, SiteLog};
use crate::net::{Listener, NotifySocket};
use crate::process::PidRef;
use crate::sandbox::SandboxError;
use crate::spawn::SpawnFailure;
use crate::status::{
    AgentStatus, AutoRange, CapacityStatus, GenerationStatus, LimitsStatus, SiteState, SiteStatus,
    Status, WorkerStatus,
};
use crate::supervisor::capacity::{self, Capacity};
use crate::supervisor::slots::{
    Action, ExitReason, Input, Note, Phase, Policies, RunState, SiteCore, Slot,
};
use crate::sys::signals::{self, SigSet};

/// Errors that stop the agent from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A setup step failed.
    #[error("failed to {what}")]
    Setup {
        /// What was attempted.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The reactor failed.
    #[error("the event loop failed")]
    Reactor(#[source] io::Error),
}

fn setup_err(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> AgentError {
    AgentError::Setup {
        what: what.into(),
        source: Box::new(source),
    }
}

/// Interval of TCP readiness probes while a worker of a `tcp`-checked site is starting.
const TCP_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long a starting agent waits for what an earlier one left to die.
const STALE_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for killed processes to leave their cgroups.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most bytes buffered for a slow control client before it is dropped.
const MAX_CONN_BUFFER: usize = 4 << 20;
/// Most bytes buffered for a `logs -f` client: one that falls this far behind the log is
/// dropped with a notice (the lines are in the file).
const MAX_FOLLOW_BUFFER: usize = 256 << 10;
/// How long a client has to send its request after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one uid other than root and the agent's may hold at once.
const MAX_CONNECTIONS_PER_UID: usize = 8;
/// Connections only root and the agent's user may use.
const RESERVED_FOR_ADMIN: usize = 16;

#[derive(Debug, Clone)]
enum Source {
    Signals,
    Control,
    Notify,
    Pidfd(SiteName, GenId, Slot),
    Pipe,
    ConnRead(u64),
    ConnWrite(u64),
    /// The pidfd of a `hatchery exec` command.
    Exec(i32),
    /// The graveyard's inotify fd: a cgroup waiting for removal may be empty now.
    Graveyard,
}

#[derive(Debug)]
struct Worker {
    pidref: PidRef,
    token: u64,
    /// Its own cgroup leaf, fresh for this process.
    cgroup: Option<PathBuf>,
    started_wall: SystemTime,
}

#[derive(Debug)]
struct Pipe {
    site: SiteName,
    id: Slot,
    pid: i32,
    fd: OwnedFd,
    splitter: LineSplitter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    Stopped,
    Settled,
    RestartDone,
}

#[derive(Debug)]
struct Waiter {
    conn: u64,
    until: WaitFor,
}

/// A generation number, shown as `gen-<N>`.
pub type GenId = u32;

/// One generation of a site: what it runs, its listeners and its workers.
#[derive(Debug)]
struct Gen {
    id: GenId,
    /// The resolved release directory (sites with `release`).
    release: Option<PathBuf>,
    /// The site's configuration as this generation runs it (`{release}` filled in).
    config: SiteConfig,
    core: SiteCore,
    /// The agent's copies of the listeners passed to this generation's workers.
    listeners: Vec<Listener>,
    workers: HashMap<Slot, Worker>,
    tcp_probe: Option<(TcpStream, Instant)>,
    /// Worker exits and failed spawns it was not asked for.
    crashes: u32,
    /// Being rolled back or retired: removed once its last worker is gone.
    leaving: bool,
}

#[derive(Debug)]
struct Site {
    config: SiteConfig,
    /// Every live generation; `serving` is the one that takes new connections.
    gens: BTreeMap<GenId, Gen>,
    serving: GenId,
    /// The highest generation number used so far (numbers are never reused).
    last_gen: GenId,
    /// The deploy under way, and those waiting for it.
    deploy: Option<deploy::Deploy>,
    queued_deploys: std::collections::VecDeque<deploy::Queued>,
    /// What the last deploy did, for `status`.
    last_deploy: Option<crate::status::DeployRecord>,
    /// The release the serving generation replaced (for `rollback`).
    previous_release: Option<PathBuf>,
    /// Per listener (by index): the eBPF program steering its reuseport group, if any.
    steering: Vec<Option<crate::steering::Steering>>,
    log: SiteLog,
    followers: Vec<u64>,
    waiters: Vec<Waiter>,
    removing: bool,
    /// Configured limits this host cannot enforce.
    not_enforced: Vec<&'static str>,
    /// Workers asked for (configuration or `scale`); the cap may hold the site below it.
    requested: u32,
    /// The memory cap, for sites with a budget and a per-worker figure.
    capacity: Option<Capacity>,
    /// When to re-measure and re-derive the cap (sites with a budget only).
    next_capacity_check: Option<Instant>,
    /// The measured peak at the previous check: growth waits until it holds still.
    last_peak: Option<u64>,
    /// The sandbox, prepared at the first spawn (see `exec.rs`).
    sandbox: Option<crate::sandbox::Prepared>,
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    uid: u32,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    read_token: Option<u64>,
    write_token: Option<u64>,
    /// No further request is read; close once `outbuf` is flushed.
    done: bool,
    /// Streaming (logs -f) or waiting for an operation.
    held: bool,
    /// When the connection is closed unless its request has arrived.
    deadline: Option<Instant>,
    /// The rest of a `logs` client's backlog, sent as its buffer drains.
    backlog: Option<LogStream>,
}

/// A `logs` request being answered from the site's file.
#[derive(Debug)]
struct LogStream {
    site: SiteName,
    backlog: logs::Backlog,
    follow: bool,
}

impl Site {
    /// The serving generation.
    fn cur(&self) -> &Gen {
        self.gens
            .get(&self.serving)
            .expect("the serving generation exists while the site does")
    }

    fn cur_mut(&mut self) -> &mut Gen {
        self.gens
            .get_mut(&self.serving)
            .expect("the serving generation exists while the site does")
    }

    /// Whether no generation has a process or anything left to do.
    fn all_stopped(&self) -> bool {
        self.gens.values().all(|g| g.core.run == RunState::Stopped)
    }
}

/// A site that could not be started.
#[derive(Debug)]
struct Broken {
    /// Its file.
    file: PathBuf,
    /// Why, for `status` and the log.
    reason: String,
    /// Its configuration, when the file was valid (the failure was the host's: a port
    /// taken, a release that does not resolve): `start` tries again with it.
    config: Option<SiteConfig>,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    reg: Registry,
    reactor_note: Option<String>,
    signalfd: OwnedFd,
    control: OwnedFd,
    /// Held while the agent runs: see `lock_control`.
    _lock: OwnedFd,
    notify: NotifySocket,
    devnull: File,
    fd_block: crate::sys::spawn::FdBlock,
    cgroups: Option<CgroupTree>,
    cgroup_note: Option<String>,
    /// Cgroups to remove once empty (with cgroups only).
    graveyard: Option<Graveyard>,
    /// When shutdown stops waiting for killed processes to leave their cgroups.
    shutdown_deadline: Option<Instant>,
    sites: BTreeMap<SiteName, Site>,
    /// Sites that could not be started (a bad file, a port taken), by name: shown as
    /// failed; `start` tries again, a reload replaces them.
    broken: BTreeMap<String, Broken>,
    pipes: HashMap<u64, Pipe>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    pids: HashMap<i32, (SiteName, GenId, Slot)>,
    shutting_down: bool,
    kernel: Vec<Feature>,
    /// Whether eBPF connection steering can be used here.
    steering_support: crate::steering::SteeringSupport,
    started: SystemTime,
    /// Running `hatchery exec` commands, by pid (see `exec.rs`).
    execs: HashMap<i32, exec::ExecSession>,
    next_exec: u32,
}

impl Agent {
    /// Sets everything up from the configuration file at `path`: signals, reactor,
    /// cgroups, the notify and control sockets, and every site's listeners. Nothing is
    /// started yet.
    pub fn new(path: &std::path::Path) -> Result<Agent, AgentError> {
        // A bad site file only keeps that site from starting (shown as failed).
        let (config, broken_files) = config::load_each(path)?;
        let lock = lock_control(&config.control_socket)?;
        let read = agent_signals();
        let set = SigSet::of(&read);
        signals::block(&set).map_err(|e| setup_err("block signals", e))?;
        // Blocked now: set back to the default what whoever started us may have ignored
        // (an ignored signal that is not blocked is discarded; SIGCHLD ignored would
        // even stop zombies from being kept for us to reap).
        for &sig in &read {
            signals::set_default(sig)
                .map_err(|e| setup_err(format!("reset the disposition of signal {sig}"), e))?;
        }
        let signalfd = signals::signalfd(&set).map_err(|e| setup_err("create the signalfd", e))?;
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(|e| setup_err("become child subreaper", io::Error::from(e)))?;
        raise_nofile_limit();
        let (reactor, reactor_note) =
            Reactor::from_env().map_err(|e| setup_err("create the event loop", e))?;

        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| setup_err(format!("create {}", config.state_dir.display()), e))?;
        let (cgroups, cgroup_note) = match CgroupTree::setup(&config.cgroup_base) {
            Ok(Ok(tree)) => (Some(tree), None),
            Ok(Err(reason)) => (None, Some(reason)),
            Err(e) => (None, Some(format!("{e}: {}", error_chain(&e)))),
        };
        // Delegated with a memory limit (systemd MemoryMax=): budgets must fit in it too.
        if let Some(limit) = cgroups
            .as_ref()
            .and_then(|t| crate::cgroup::read_usage(t.base()).memory_max)
        {
            config::check_budgets(
                &config.file,
                &config.sites,
                config.memory_reserve,
                limit,
                "the agent's own memory.max",
            )?;
        }
        let graveyard = match &cgroups {
            Some(tree) => {
                let mut g = Graveyard::new().map_err(|e| setup_err("create an inotify fd", e))?;
                let names: Vec<&str> = config.sites.iter().map(|s| s.name.as_str()).collect();
                tree.sweep_stale(&names, &mut g);
                if !g.is_empty() {
                    // What an earlier agent's workers hold (their listeners) must be
                    // closed before the sites bind again.
                    let gone = g.wait_empty(STALE_GRACE);
                    warn!(
                        "killed what an earlier agent left in its cgroups{}",
                        if gone {
                            String::new()
                        } else {
                            format!("; {} cgroups are still emptying", g.remaining().len())
                        }
                    );
                }
                Some(g)
            }
            None => None,
        };
        let notify = NotifySocket::bind(&config.state_dir.join("notify.sock"))
            .map_err(|e| setup_err("bind the notify socket", e))?;
        let control = bind_control(&config.control_socket)?;
        let devnull = OpenOptions::new()
            .read(true)
            .open("/dev/null")
            .map_err(|e| setup_err("open /dev/null", e))?;
        let filler = devnull
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| setup_err("dup /dev/null", e))?;
        let fd_block = crate::sys::spawn::FdBlock::reserve(filler)
            .map_err(|e| setup_err("reserve file descriptors for spawning", e))?;

        let mut agent = Agent {
            config: config.clone(),
            reg: Registry {
                reactor,
                tokens: HashMap::new(),
                next_token: 1,
            },
            reactor_note,
            signalfd,
            control,
            _lock: lock,
            notify,
            devnull,
            fd_block,
            cgroups,
            cgroup_note,
            graveyard,
            shutdown_deadline: None,
            sites: BTreeMap::new(),
            broken: BTreeMap::new(),
            pipes: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            pids: HashMap::new(),
            shutting_down: false,
            kernel: features::probe_kernel(),
            steering_support: crate::steering::probe(),
            started: SystemTime::now(),
            execs: HashMap::new(),
            next_exec: 0,
        };
        for b in broken_files {
            error!(site = b.name, "not started: {}", b.error);
            agent.broken.insert(
                b.name,
                Broken {
                    file: b.error.file.clone(),
                    reason: b.error.to_string(),
                    config: None,
                },
            );
        }
        for site in &config.sites {
            match agent.make_site(site.clone()) {
                Ok(s) => {
                    agent.sites.insert(site.name.clone(), s);
                }
                Err(e) => {
                    let reason = format!("{e}: {}", error_chain(&e));
                    error!(site = %site.name, "not started: {reason}");
                    agent.broken.insert(
                        site.name.to_string(),
                        Broken {
                            file: site.file.clone(),
                            reason,
                            config: Some(site.clone()),
                        },
                    );
                }
            }
        }
        Ok(agent)
    }

    /// The feature report of this agent.
    pub fn features(&self) -> Vec<Feature> {
        let mut out = self.kernel.clone();
        out.push(Feature::on(
            "event loop",
            match &self.reactor_note {
                None => self.reg.reactor.backend().name().to_string(),
                Some(why) => format!("{} ({why})", self.reg.reactor.backend().name()),
            },
        ));
        match (&self.cgroups, &self.cgroup_note) {
            (Some(t), _) => {
                out.push(Feature::on(
                    "cgroup v2",
                    format!(
                        "workers born in {}/sites/<site>/gen-<N>/w-<K> (clone3 CLONE_INTO_CGROUP)",
                        t.base().display()
                    ),
                ));
                out.push(if t.has_kill {
                    Feature::on("tree kill", "cgroup.kill")
                } else {
                    Feature::on(
                        "tree kill",
                        "cgroup.freeze + SIGKILL each process (no cgroup.kill before 5.14)",
                    )
                });
                out.push(if t.controllers.is_empty() {
                    Feature::off("accounting", "no cgroup v2 controllers available: memory, pids and cpu are not accounted or limited")
                } else {
                    Feature::on("accounting", format!("controllers: {}", t.controllers.join(" ")))
                });
            }
            (None, note) => {
                let why = note.clone().unwrap_or_default();
                out.push(Feature::off(
                    "cgroup v2",
                    format!("not used ({why}): no accounting, limits or cgroup placement"),
                ));
                out.push(Feature::off("tree kill", "process group SIGKILL instead of cgroup.kill (a worker that leaves its process group escapes)"));
            }
        }
        out.push(features::steering(&self.steering_support));
        out.push(Feature::on(
            "subreaper",
            "orphaned worker descendants are reaped by the agent",
        ));
        out
    }

    fn make_site(&mut self, config: SiteConfig) -> Result<Site, AgentError> {
        let mut listeners = Vec::new();
        for spec in &config.listen {
            let l = Listener::bind(spec, config.uid, config.gid).map_err(|e| {
                setup_err(format!("set up the listeners of site {}", config.name), e)
            })?;
            listeners.push(l);
        }
        let log = SiteLog::open(
            &self.config.state_dir.join("logs"),
            config.name.as_str(),
            config.logs,
            Some(config.gid),
        )
        .map_err(|e| setup_err(format!("open the log of site {}", config.name), e))?;
        let not_enforced = self.apply_site_limits(&config);
        let requested = config.workers;
        let cap = config.limits.memory.and_then(|budget| {
            capacity::capacity(budget, config.limits.worker_estimate(), None, requested)
        });
        let initial = match (config.auto, cap) {
            (Some(a), Some(c)) => a.min.min(c.workers),
            (None, Some(c)) => requested.min(c.workers),
            (_, None) => requested,
        };
        if initial < requested && config.auto.is_none() {
            if let Some(c) = &cap {
                warn!(site = %config.name, "{requested} workers do not fit the memory budget: capped at {}", c.describe());
            }
        }
        let next_capacity_check = config
            .limits
            .memory
            .map(|_| Instant::now() + capacity::SETTLE);
        let core = SiteCore::new(initial, policies(&config));
        let (release, gen_config) = match &config.release {
            Some(link) => {
                let target = config::resolve_release(link).map_err(|e| {
                    setup_err(
                        format!("resolve the release of site {}", config.name),
                        io::Error::new(io::ErrorKind::NotFound, e),
                    )
                })?;
                let c = config.for_release(&target);
                (Some(target), c)
            }
            None => (None, config.clone()),
        };
        let first = Gen {
            id: 1,
            release,
            config: gen_config,
            core,
            listeners,
            workers: HashMap::new(),
            tcp_probe: None,
            crashes: 0,
            leaving: false,
        };
        let previous_release = deploy::read_previous_release(&self.config.state_dir, &config.name);
        let steering =
            deploy::attach_steering(&self.steering_support, &config.name, &first.listeners);
        Ok(Site {
            config,
            gens: BTreeMap::from([(1, first)]),
            serving: 1,
            last_gen: 1,
            deploy: None,
            queued_deploys: std::collections::VecDeque::new(),
            last_deploy: None,
            previous_release,
            steering,
            log,
            followers: Vec::new(),
            waiters: Vec::new(),
            removing: false,
            not_enforced,
            requested,
            capacity: cap,
            next_capacity_check,
            last_peak: None,
            sandbox: None,
        })
    }

    /// Re-derives a budgeted site's cap from its workers' measured memory and moves the
    /// desired count toward it (automatic sites grow one worker per check).
    fn refresh_capacity(&mut self, name: &SiteName) {
        let now = Instant::now();
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(budget) = site.config.limits.memory else {
            return;
        };
        if site.deploy.is_some() {
            // The deploy plan moves workers between generations; measure afterwards.
            site.next_capacity_check = Some(now + capacity::SETTLE);
            return;
        }
        let measured = site
            .cur()
            .workers
            .values()
            .filter(|w| w.started_wall.elapsed().unwrap_or_default() >= capacity::SETTLE)
            .filter_map(|w| w.cgroup.as_deref())
            .filter_map(crate::cgroup::measured_memory)
            .max();
        let cap = capacity::capacity(
            budget,
            site.config.limits.worker_estimate(),
            measured,
            site.requested,
        );
        site.capacity = cap;
        let desired = site.cur().core.desired;
        let newest_settled = site
            .cur()
            .workers
            .values()
            .all(|w| w.started_wall.elapsed().unwrap_or_default() >= capacity::SETTLE);
        // Memory still growing (a worker still warming up) would under-estimate the
        // per-worker figure: only grow once the peak held within 5% since the last check.
        let stable = match (measured, site.last_peak) {
            (Some(now_peak), Some(before)) => now_peak <= before.saturating_add(before / 20),
            _ => false,
        };
        site.last_peak = measured;
        let core = &site.cur().core;
        let settled = newest_settled
            && stable
            && core.slots.len() == desired as usize
            && core.ready() == desired as usize
            && core.run == RunState::Running;
        let target = match (site.config.auto, cap) {
            (Some(a), Some(c)) => {
                capacity::auto_step(desired, c.workers.min(site.requested), a.min, settled)
            }
            (None, Some(c)) => Some(site.requested.min(c.workers)).filter(|t| *t != desired),
            (_, None) => None,
        };
        let growing = site.config.auto.is_some()
            && cap.is_some_and(|c| desired < c.workers.min(site.requested));
        site.next_capacity_check = Some(
            now + if growing {
                capacity::SETTLE
            } else {
                capacity::SETTLE * 5
            },
        );
        if let Some(t) = target {
            if let Some(c) = &cap {
                info!(site = %name, "workers {desired} -> {t} ({})", c.describe());
            }
            let serving = site.serving;
            self.feed(name, serving, Input::ScaleRequested(t));
        }
    }

    /// Writes the site's cgroup limits; returns (and logs) those not enforced here.
    fn apply_site_limits(&self, config: &SiteConfig) -> Vec<&'static str> {
        let l = &config.limits;
        let wanted: Vec<&'static str> = [
            (l.memory.is_some(), "memory"),
            (l.pids_max.is_some(), "pids_max"),
            (l.cpu_weight.is_some(), "cpu_weight"),
            (l.worker_memory_max.is_some(), "memory_max"),
            (l.worker_memory_high.is_some(), "memory_high"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        let missing = match &self.cgroups {
            Some(tree) => match tree.apply_site_limits(config.name.as_str(), l) {
                Ok(m) => m,
                Err(e) => {
                    error!(site = %config.name, "failed to apply cgroup limits: {e}: {}", error_chain(&e));
                    wanted
                }
            },
            None => wanted,
        };
        if !missing.is_empty() {
            warn!(site = %config.name, "limits not enforced on this host (no cgroup controller): {}", missing.join(", "));
        }
        missing
    }

    /// Starts every site and runs until `SIGTERM`/`SIGINT` has stopped them all.
    pub fn run(mut self) -> Result<(), AgentError> {
        self.reg
            .arm(self.signalfd.as_fd(), Interest::Readable, Source::Signals)
            .map_err(AgentError::Reactor)?;
        self.reg
            .arm(self.control.as_fd(), Interest::Readable, Source::Control)
            .map_err(AgentError::Reactor)?;
        self.reg
            .arm(self.notify.as_fd(), Interest::Readable, Source::Notify)
            .map_err(AgentError::Reactor)?;
        if let Some(g) = &self.graveyard {
            self.reg
                .arm(g.fd(), Interest::Readable, Source::Graveyard)
                .map_err(AgentError::Reactor)?;
        }

        info!(
            sites = self.sites.len(),
            reactor = self.reg.reactor.backend().name(),
            socket = %self.config.control_socket.display(),
            "agent started"
        );
        for f in self.features().iter().filter(|f| !f.in_use) {
            warn!(feature = f.name, "not enforced: {}", f.detail);
        }
        let names: Vec<SiteName> = self.sites.keys().cloned().collect();
        for name in names {
            self.feed(&name, 1, Input::StartRequested);
        }
        notify_systemd("READY=1");

        let mut ready = Vec::new();
        loop {
            if self.shutting_down && self.sites.values().all(Site::all_stopped) {
                // Then wait (a bounded time) for what the workers left behind to leave
                // their cgroups, so the tree can be removed.
                let deadline = *self
                    .shutdown_deadline
                    .get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                let empty = self.graveyard.as_ref().is_none_or(Graveyard::is_empty);
                if empty || Instant::now() >= deadline {
                    break;
                }
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            ready.clear();
            self.reg
                .reactor
                .wait(timeout, &mut ready)
                .map_err(AgentError::Reactor)?;
            // Exits first: a crashed worker's replacement should not wait behind output
            // and control traffic that arrived in the same batch.
            ready.sort_by_key(|t| match self.reg.tokens.get(t) {
                Some(Source::Pidfd(..)) => 0,
                Some(Source::Signals) => 1,
                _ => 2,
            });
            for &token in &ready {
                if let Some(source) = self.reg.tokens.remove(&token) {
                    self.dispatch(token, source);
                }
            }
            self.fire_deadlines();
        }
        self.shutdown();
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.sites
            .values()
            .filter_map(|s| {
                let probe = (s.config.ready.check == ReadyCheck::Tcp
                    && s.gens.values().any(|g| {
                        !g.leaving
                            && g.core
                                .slots
                                .values()
                                .any(|x| matches!(x.phase, Phase::Starting { .. }))
                    }))
                .then(|| Instant::now() + TCP_PROBE_INTERVAL);
                let gens = s.gens.values().filter_map(|g| g.core.next_deadline()).min();
                [gens, probe, s.next_capacity_check, self.deploy_deadline(s)]
                    .into_iter()
                    .flatten()
                    .min()
            })
            .chain(self.shutdown_deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min()
    }

    fn fire_deadlines(&mut self) {
        let now = Instant::now();
        self.expire_connections(now);
        let due: Vec<(SiteName, GenId)> = self
            .sites
            .iter()
            .flat_map(|(n, s)| {
                s.gens
                    .values()
                    .filter(|g| g.core.next_deadline().is_some_and(|d| d <= now))
                    .map(|g| (n.clone(), g.id))
            })
            .collect();
        for (name, g) in due {
            self.feed(&name, g, Input::DeadlineReached);
        }
        let deploying: Vec<SiteName> = self
            .sites
            .iter()
            .filter(|(_, s)| s.deploy.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in deploying {
            self.advance_deploy(&name);
        }
        let probing: Vec<(SiteName, GenId)> = self
            .sites
            .iter()
            .filter(|(_, s)| s.config.ready.check == ReadyCheck::Tcp)
            .flat_map(|(n, s)| {
                s.gens
                    .values()
                    .filter(|g| {
                        !g.leaving
                            && g.core
                                .slots
                                .values()
                                .any(|x| matches!(x.phase, Phase::Starting { .. }))
                    })
                    .map(move |g| (n.clone(), g.id))
            })
            .collect();
        for (name, g) in probing {
            self.tcp_probe(&name, g);
        }
        let measuring: Vec<SiteName> = self
            .sites
            .iter()
            .filter(|(_, s)| s.next_capacity_check.is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in measuring {
            self.refresh_capacity(&name);
        }
    }

    /// The `tcp` ready check of generation `g`: a probe connection to its first TCP
    /// listener is made; once that listener's accept queue no longer holds it (a worker
    /// accepted it), every starting worker of `g` counts as ready. A generation that is
    /// not serving yet is reached through the steering program's probe entry, from the
    /// port the probe socket was bound to; nothing else reaches it before the flip.
    fn tcp_probe(&mut self, name: &SiteName, g: GenId) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let serving = site.serving;
        let Some((index, addr)) = site.gens.get(&g).and_then(|gen_| {
            gen_.listeners
                .iter()
                .enumerate()
                .find_map(|(i, l)| match l.spec.addr {
                    ListenAddr::Tcp(a) => Some((i, a)),
                    ListenAddr::Unix(_) => None,
                })
        }) else {
            return;
        };
        let Some(gen_) = site.gens.get_mut(&g) else {
            return;
        };
        let accepted = match &gen_.tcp_probe {
            None => {
                let steering = if g == serving {
                    None
                } else {
                    match site.steering.get_mut(index).and_then(Option::as_mut) {
                        Some(st) => Some(st),
                        None => {
                            // Refused when the deploy is asked for; nothing to probe here.
                            debug!(site = %name, gen = g, "tcp ready probe: no steering");
                            return;
                        }
                    }
                };
                match start_tcp_probe(
                    loopback_for(addr),
                    steering,
                    gen_.listeners[index].fd.as_fd(),
                ) {
                    Ok(sock) => gen_.tcp_probe = Some((sock, Instant::now())),
                    Err(e) => debug!(site = %name, gen = g, "tcp ready probe: {e}"),
                }
                false
            }
            Some((sock, _)) => {
                if rustix::net::getpeername(sock).is_err() {
                    // Not connected yet, or refused: look again (or start over) next tick.
                    if sock.take_error().ok().flatten().is_some() {
                        gen_.tcp_probe = None;
                    }
                    false
                } else {
                    gen_.listeners[index].queued() == Some(0)
                }
            }
        };
        if accepted {
            gen_.tcp_probe = None;
            if g != serving {
                if let Some(st) = site.steering.get_mut(index).and_then(Option::as_mut) {
                    if let Err(e) = st.clear_probe() {
                        warn!(site = %name, gen = g, "failed to clear the steering probe: {e}");
                    }
                }
            }
            let starting: Vec<Slot> = gen_
                .core
                .slots
                .values()
                .filter(|x| matches!(x.phase, Phase::Starting { .. }) && x.pid.is_some())
                .map(|x| x.id)
                .collect();
            for id in starting {
                self.feed(name, g, Input::ReadyNotified { id });
            }
        }
    }

    fn dispatch(&mut self, token: u64, source: Source) {
        match source {
            Source::Signals => self.on_signals(),
            Source::Control => self.on_accept(),
            Source::Notify => self.on_notify(),
            Source::Pidfd(site, g, id) => self.on_pidfd(&site, g, id, token),
            Source::Pipe => self.on_pipe(token),
            Source::ConnRead(c) => self.on_conn_read(c),
            Source::Exec(pid) => self.exec_exited(pid),
            Source::Graveyard => {
                if let Some(g) = &mut self.graveyard {
                    g.sweep();
                }
                self.rearm(Source::Graveyard);
            }
            Source::ConnWrite(c) => {
                if let Some(conn) = self.conns.get_mut(&c) {
                    conn.write_token = None;
                }
                self.flush(c);
            }
        }
    }

    fn rearm(&mut self, source: Source) {
        let fd = match &source {
            Source::Signals => self.signalfd.as_fd(),
            Source::Control => self.control.as_fd(),
            Source::Notify => self.notify.as_fd(),
            Source::Graveyard => match &self.graveyard {
                Some(g) => g.fd(),
                None => return,
            },
            _ => return,
        };
        let result = self.reg.arm(fd, Interest::Readable, source.clone());
        if let Err(e) = result {
            error!("failed to re-arm {source:?}: {e}");
        }
    }

    // ------------------------------------------------------------ signals and exits

    fn on_signals(&mut self) {
        loop {
            match signals::read_signal_info(self.signalfd.as_fd()).map(|r| r.map(|r| (r.signal, r)))
            {
                Ok(Some((libc::SIGCHLD, _))) => self.reap(),
                Ok(Some((libc::SIGHUP, _))) => {
                    info!("SIGHUP: reloading the configuration");
                    if let Err(e) = self.reload() {
                        error!("reload refused, nothing changed: {e}");
                    }
                }
                Ok(Some((sig @ (libc::SIGTERM | libc::SIGINT), _))) => {
                    if self.shutting_down {
                        warn!(
                            "second {}: killing every worker now",
                            config::Signal(sig).name()
                        );
                        self.kill_everything();
                    } else {
                        info!("{}: stopping every site", config::Signal(sig).name());
                        self.begin_shutdown();
                    }
                }
                Ok(Some((sig, from))) => warn!(
                    sender_pid = from.pid,
                    sender_uid = from.uid,
                    "{} ignored: the agent stops on SIGTERM and SIGINT and reloads on SIGHUP",
                    config::Signal(sig).name()
                ),
                Ok(None) => break,
                Err(e) => {
                    error!("failed to read the signalfd: {e}");
                    break;
                }
            }
        }
        self.rearm(Source::Signals);
    }

    /// Reaps zombies: tracked workers through their pidfd, orphans by pid.
    fn reap(&mut self) {
        self.reap_zombies();
        // An orphan that was killed with its worker's leaf may have been the last
        // process in it.
        if let Some(g) = &mut self.graveyard {
            g.sweep();
        }
    }

    fn reap_zombies(&mut self) {
        for _ in 0..100_000 {
            let pid = match crate::sys::wait::peek_zombie() {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(e) => {
                    error!("waitid failed: {e}");
                    return;
                }
            };
            if let Some((site, g, id)) = self.pids.get(&pid).cloned() {
                self.worker_exited(&site, g, id);
            } else if self.execs.contains_key(&pid) {
                self.exec_exited(pid);
            } else if let Some(p) = rustix::process::Pid::from_raw(pid) {
                match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                    Ok(_) => debug!(pid, "reaped an orphaned descendant"),
                    Err(e) => {
                        error!(pid, "failed to reap: {e}");
                        return;
                    }
                }
            }
        }
    }

    fn on_pidfd(&mut self, site: &SiteName, g: GenId, id: Slot, token: u64) {
        let current = self
            .sites
            .get(site)
            .and_then(|s| s.gens.get(&g))
            .and_then(|x| x.workers.get(&id))
            .is_some_and(|w| w.token == token);
        if current {
            self.worker_exited(site, g, id);
        }
    }

    fn worker_exited(&mut self, name: &SiteName, g: GenId, id: Slot) {
        let tree = self.cgroups.as_ref();
        let graveyard = &mut self.graveyard;
        let Some(site) = self.sites.get_mut(name).and_then(|s| s.gens.get_mut(&g)) else {
            return;
        };
        let Some(worker) = site.workers.get(&id) else {
            return;
        };
        if tree.is_none() {
            // The exited leader still holds its pid as process group id until reaped:
            // take its group with it.
            let _ = worker.pidref.signal_group(libc::SIGKILL);
        }
        let reason = match worker.pidref.try_wait() {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Not exited after all (spurious wake-up): watch again.
                match self.reg.arm(
                    worker.pidref.as_fd(),
                    Interest::Readable,
                    Source::Pidfd(name.clone(), g, id),
                ) {
                    Ok(t) => {
                        if let Some(w) = site.workers.get_mut(&id) {
                            w.token = t;
                        }
                    }
                    Err(e) => error!(site = %name, worker = %id, "failed to watch the pidfd: {e}"),
                }
                return;
            }
            Err(e) => {
                error!(site = %name, worker = %id, "waitid failed: {e}");
                ExitReason::Exited { code: -1 }
            }
        };
        let worker = site.workers.remove(&id).expect("checked above");
        self.reg.tokens.remove(&worker.token);
        self.pids.remove(&worker.pidref.pid());
        // An OOM kill shows as SIGKILL; the leaf's memory.events tells them apart (the
        // leaf is this process's own, so any count is its).
        let reason = match (&reason, worker.cgroup.as_deref()) {
            (
                ExitReason::Signaled {
                    signal: libc::SIGKILL,
                },
                Some(dir),
            ) if crate::cgroup::oom_kills(dir).is_some_and(|n| n > 0) => ExitReason::OomKilled,
            _ => reason,
        };
        if let (Some(tree), Some(dir), Some(graveyard)) = (tree, &worker.cgroup, graveyard) {
            if let Err(e) = tree.retire(dir, graveyard) {
                warn!(site = %name, worker = %id, "failed to kill what the worker left behind: {e}");
            }
        }
        let level_crash = !matches!(
            site.core.slots.get(&id).map(|s| s.phase),
            Some(Phase::Stopping { .. })
        );
        if level_crash {
            site.crashes += 1;
        }
        if level_crash && !self.shutting_down {
            warn!(site = %name, gen = g, worker = %id, pid = worker.pidref.pid(), "worker {reason}");
        } else {
            debug!(site = %name, gen = g, worker = %id, pid = worker.pidref.pid(), "worker {reason}");
        }
        self.feed(name, g, Input::Exited { id, reason });
    }

    // ------------------------------------------------------------ the supervisor

    /// Feeds `input` to generation `g` of site `name`, carries out the actions, feeds
    /// back what they produce, then lets the deploy plan and removals follow.
    fn feed(&mut self, name: &SiteName, g: GenId, input: Input) {
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let Some(gn) = self.sites.get_mut(name).and_then(|s| s.gens.get_mut(&g)) else {
                return;
            };
            let actions = gn.core.handle(input, Instant::now());
            for action in actions {
                if let Some(next) = self.act(name, g, action) {
                    queue.push(next);
                }
            }
        }
        self.after_feed(name, g);
    }

    fn after_feed(&mut self, name: &SiteName, g: GenId) {
        let Some(site) = self.sites.get(name) else {
            return;
        };
        let gone = site
            .gens
            .get(&g)
            .is_some_and(|x| x.leaving && x.core.run == RunState::Stopped);
        if gone {
            self.remove_generation(name, g);
        }
        if self.sites.get(name).is_some_and(|s| s.deploy.is_some()) {
            self.advance_deploy(name);
        }
        let Some(site) = self.sites.get(name) else {
            return;
        };
        if site.removing && site.all_stopped() {
            self.drop_site(name);
        }
    }

    fn act(&mut self, name: &SiteName, g: GenId, action: Action) -> Option<Input> {
        match action {
            Action::Spawn(id) => Some(self.spawn(name, g, id)),
            Action::Signal(id, sig) => {
                let site = self.sites.get(name)?.gens.get(&g)?;
                let w = site.workers.get(&id)?;
                if let Err(e) = w.pidref.signal(sig.0) {
                    error!(site = %name, worker = %id, pid = w.pidref.pid(), "failed to send {}: {e}", sig.name());
                }
                None
            }
            Action::Kill(id) => {
                let site = self.sites.get(name)?.gens.get(&g)?;
                let w = site.workers.get(&id)?;
                warn!(site = %name, worker = %id, pid = w.pidref.pid(), "stop timeout: killing the worker's process tree");
                let result = match (&self.cgroups, &w.cgroup) {
                    (Some(tree), Some(dir)) => tree.kill(dir).map_err(|e| e.to_string()),
                    _ => w
                        .pidref
                        .signal_group(libc::SIGKILL)
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = result {
                    error!(site = %name, worker = %id, "failed to kill: {e}; sending SIGKILL to the worker itself");
                    let _ = w.pidref.signal(libc::SIGKILL);
                }
                None
            }
            Action::Note(note) => {
                self.on_note(name, g, note);
                None
            }
        }
    }

    fn spawn(&mut self, name: &SiteName, g: GenId, id: Slot) -> Input {
        match self.try_spawn(name, g, id) {
            Ok(pid) => Input::Spawned { id, pid },
            Err(failure) => {
                let error = failure.describe();
                error!(site = %name, gen = g, worker = %id, "failed to spawn: {error}");
                if let Some(gn) = self.sites.get_mut(name).and_then(|s| s.gens.get_mut(&g)) {
                    gn.crashes += 1;
                }
                Input::SpawnFailed {
                    id,
                    error,
                    permanent: failure.permanent(),
                }
            }
        }
    }

    fn try_spawn(&mut self, name: &SiteName, g: GenId, id: Slot) -> Result<i32, SpawnFailure> {
        let notify_path = self.notify.path.clone();
        let plan = self.site_sandbox(name)?;
        let site = self
            .sites
            .get(name)
            .and_then(|s| s.gens.get(&g))
            .expect("a slot is spawned only in a generation that exists");
        if let Some(root) = &site.config.sandbox.root {
            // `chroot` follows the path again at every spawn: whoever could change a
            // directory on the way since it was prepared could now point it elsewhere.
            crate::sandbox::check_root_path(root).map_err(SandboxError::Root)?;
        }
        let mut image =
            crate::spawn::worker_image(&site.config, &site.listeners, &notify_path, id.0, g)?;
        image.set_sandbox(plan);
        let (pipe_r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| SpawnFailure::Pipe(e.into()))?;
        rustix::io::ioctl_fionbio(&pipe_r, true).map_err(|e| SpawnFailure::Pipe(e.into()))?;
        let mut fds: Vec<BorrowedFd<'_>> =
            vec![self.devnull.as_fd(), pipe_w.as_fd(), pipe_w.as_fd()];
        fds.extend(site.listeners.iter().map(|l| l.fd.as_fd()));
        let leaf = match (&self.cgroups, &mut self.graveyard) {
            (Some(tree), Some(graveyard)) => Some(crate::spawn::Leaf {
                tree,
                graveyard,
                site: name.as_str(),
                generation: g,
                name: format!("w-{id}"),
                limits: Some(&site.config.limits),
            }),
            _ => None,
        };
        let spawned = crate::spawn::launch(&mut image, &fds, leaf, &mut self.fd_block);
        drop(fds);
        drop(pipe_w);
        let spawned = spawned?;
        let pid = spawned.pid;
        let pidref = PidRef::new(pid, spawned.pidfd);
        let token = self
            .reg
            .arm(
                pidref.as_fd(),
                Interest::Readable,
                Source::Pidfd(name.clone(), g, id),
            )
            .map_err(|e| {
                let _ = pidref.signal(libc::SIGKILL);
                SpawnFailure::Watch(e)
            })?;
        match self
            .reg
            .arm(pipe_r.as_fd(), Interest::Readable, Source::Pipe)
        {
            Ok(t) => {
                self.pipes.insert(
                    t,
                    Pipe {
                        site: name.clone(),
                        id,
                        pid,
                        fd: pipe_r,
                        splitter: LineSplitter::default(),
                    },
                );
            }
            Err(e) => warn!(site = %name, worker = %id, "worker output is not captured: {e}"),
        }
        self.pids.insert(pid, (name.clone(), g, id));
        let site = self
            .sites
            .get_mut(name)
            .and_then(|s| s.gens.get_mut(&g))
            .expect("looked up above");
        site.workers.insert(
            id,
            Worker {
                pidref,
                token,
                cgroup: spawned.leaf,
                started_wall: SystemTime::now(),
            },
        );
        debug!(site = %name, gen = g, worker = %id, pid, "spawned");
        Ok(pid)
    }

    fn on_note(&mut self, name: &SiteName, g: GenId, note: Note) {
        let text = match &note {
            Note::Started(id, pid) => format!("w-{id} started (pid {pid})"),
            Note::Ready(id) => format!("w-{id} ready"),
            Note::Exited(id, reason) => format!("w-{id} {reason}"),
            Note::Crashed(id, reason, ran) => format!(
                "w-{id} {reason}, {} after it started",
                config::format_duration(*ran)
            ),
            Note::RestartFailed(id) => format!(
                "restart stopped at w-{id}: its new process did not stay up; the workers not yet restarted keep running"
            ),
            Note::BackingOff(id, ms) => format!("w-{id} restarting in {ms} ms"),
            Note::Killed(id) => format!("w-{id} did not stop in time: killed"),
            Note::Failed(id) => {
                format!("w-{id} failed: not restarted until `hatchery start {name}`")
            }
            Note::AllStopped => "all workers stopped".to_string(),
            Note::RestartDone => "restart done".to_string(),
            Note::Settled => "all workers ready".to_string(),
        };
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        if g != site.serving {
            // A generation being deployed, rolled back or drained: its notes are deploy
            // progress, not the site's state.
            if matches!(note, Note::Settled | Note::RestartDone) {
                return;
            }
            let conns: Vec<u64> = site.deploy.iter().flat_map(|d| d.conns.clone()).collect();
            for conn in conns {
                self.send(conn, &Reply::Event(format!("gen-{g}: {text}")));
            }
            return;
        }
        if let Note::Failed(id) = note {
            error!(site = %name, worker = %id, "site failed: worker flapping or unstartable");
        }
        let finished: Vec<(u64, Reply)> = {
            let mut done = Vec::new();
            let mut keep = Vec::new();
            for w in site.waiters.drain(..) {
                let reply = match (w.until, &note) {
                    (WaitFor::Stopped, Note::AllStopped)
                    | (WaitFor::Settled, Note::Settled)
                    | (WaitFor::RestartDone, Note::RestartDone) => {
                        Some(Reply::ok(&Done::new(name, text.clone())))
                    }
                    (WaitFor::Settled | WaitFor::RestartDone, Note::Failed(_)) => Some(
                        Reply::error(ErrorKind::Failed, format!("site {name} failed: {text}")),
                    ),
                    // A worker that dies right after it started (or became ready) is not
                    // a success, whatever the count looked like a moment before.
                    (WaitFor::Settled | WaitFor::RestartDone, Note::Crashed(..))
                    | (WaitFor::RestartDone, Note::RestartFailed(_)) => Some(Reply::error(
                        ErrorKind::Failed,
                        format!("site {name}: {text} (see `hatchery logs {name}`)"),
                    )),
                    _ => None,
                };
                match reply {
                    Some(r) => done.push((w.conn, r)),
                    None => keep.push(w),
                }
            }
            site.waiters = keep;
            done
        };
        let watching: Vec<u64> = site.waiters.iter().map(|w| w.conn).collect();
        for conn in watching {
            self.send(conn, &Reply::Event(text.clone()));
        }
        for (conn, reply) in finished {
            self.finish(conn, &reply);
        }
    }

    // ------------------------------------------------------------ worker output

    fn on_pipe(&mut self, token: u64) {
        let Some(mut pipe) = self.pipes.remove(&token) else {
            return;
        };
        let mut buf = [0u8; 65536];
        let mut eof = false;
        let mut records = Vec::new();
        let now = SystemTime::now();
        for _ in 0..16 {
            match rustix::io::read(&pipe.fd, &mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => pipe.splitter.feed(&buf[..n], |line| {
                    records.push(logs::record(pipe.id.0, pipe.pid, line, now))
                }),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(site = %pipe.site, worker = %pipe.id, "failed to read worker output: {e}");
                    eof = true;
                    break;
                }
            }
        }
        if eof {
            pipe.splitter.feed(b"", |_| {});
            pipe.splitter
                .finish(|line| records.push(logs::record(pipe.id.0, pipe.pid, line, now)));
        }
        self.write_records(&pipe.site, &records);
        if !eof {
            match self
                .reg
                .arm(pipe.fd.as_fd(), Interest::Readable, Source::Pipe)
            {
                Ok(t) => {
                    self.pipes.insert(t, pipe);
                }
                Err(e) => {
                    warn!(site = %pipe.site, worker = %pipe.id, "stopped capturing worker output: {e}")
                }
            }
        }
    }

    fn write_records(&mut self, name: &SiteName, records: &[Vec<u8>]) {
        if records.is_empty() {
            return;
        }
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        for r in records {
            if let Err(e) = site.log.append(r) {
                warn!(site = %name, "failed to write {}: {e}", site.log.path().display());
                break;
            }
        }
        let followers = site.followers.clone();
        for conn in followers {
            let behind = self
                .conns
                .get(&conn)
                .is_some_and(|c| c.outbuf.len() > MAX_FOLLOW_BUFFER);
            if behind {
                let path = site_log_path(&self.sites, name);
                warn!(site = %name, "a logs -f client fell behind: dropped");
                self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Failed,
                        format!(
                            "logs -f dropped: more than {} KiB behind the log; the lines are in {path}",
                            MAX_FOLLOW_BUFFER >> 10
                        ),
                    ),
                );
                continue;
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            for r in records {
                let line = String::from_utf8_lossy(r.strip_suffix(b"\n").unwrap_or(r)).into_owned();
                c.outbuf.extend_from_slice(&Reply::Line(line).to_line());
            }
            self.flush(conn);
        }
    }

    // ------------------------------------------------------------ notify socket

    fn on_notify(&mut self) {
        loop {
            match self.notify.recv() {
                Ok(Some(n)) => {
                    let Some((site, g, id)) = self.pids.get(&n.pid).cloned() else {
                        self.foreign_notification(&n);
                        continue;
                    };
                    if n.ready {
                        self.feed(&site, g, Input::ReadyNotified { id });
                    }
                    if let Some(busy) = n.busy {
                        self.feed(&site, g, Input::BusyReported { id, busy });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("failed to read the notify socket: {e}");
                    break;
                }
            }
        }
        self.rearm(Source::Notify);
    }

    /// A notification from a pid that is not a worker. `READY=1` from a worker's child
    /// (e.g. `systemd-notify --ready`, which can speak for its parent only with
    /// CAP_SYS_ADMIN, dropped by the sandbox) is said in the agent's and the site's log,
    /// since that worker would otherwise wait for readiness in silence.
    fn foreign_notification(&mut self, n: &crate::net::Notification) {
        let parent = n
            .ready
            .then(|| parent_pid(n.pid))
            .flatten()
            .and_then(|ppid| self.pids.get(&ppid).cloned());
        let Some((site, g, id)) = parent else {
            debug!(pid = n.pid, "notification from an unknown pid, ignored");
            return;
        };
        let msg = format!(
            "READY=1 from pid {} (a child of gen-{g} w-{id}) ignored: only the worker itself may report; a helper such as systemd-notify speaks for its parent only with CAP_SYS_ADMIN (use ready.check = \"tcp\", or send READY=1 from the worker)",
            n.pid
        );
        warn!(site = %site, "{msg}");
        if let Some(s) = self.sites.get_mut(&site) {
            let record = format!(
                "{} hatchery: {msg}\n",
                logs::utc_timestamp(SystemTime::now())
            );
            let _ = s.log.append(record.as_bytes());
        }
    }

    // ------------------------------------------------------------ control socket

    fn on_accept(&mut self) {
        loop {
            let fd = match rustix::net::accept_with(
                &self.control,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    error!("failed to accept a control connection: {e}");
                    break;
                }
            };
            let uid = match sockopt::socket_peercred(&fd) {
                Ok(cred) => cred.uid.as_raw(),
                Err(e) => {
                    warn!("no peer credentials on a control connection, closing it: {e}");
                    continue;
                }
            };
            let refusal = self.connection_refusal(uid);
            let id = self.next_conn;
            self.next_conn += 1;
            let conn = Conn {
                fd,
                uid,
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                read_token: None,
                write_token: None,
                done: false,
                held: false,
                deadline: Some(Instant::now() + REQUEST_TIMEOUT),
                backlog: None,
            };
            self.conns.insert(id, conn);
            if let Some(why) = refusal {
                warn!(uid, "refused a control connection: {why}");
                self.finish(id, &Reply::error(ErrorKind::Refused, why));
                continue;
            }
            self.arm_conn_read(id);
        }
        self.rearm(Source::Control);
    }

    /// Why a new connection from `uid` is refused, if it is: the total limit, or, for
    /// anyone but root and the agent's user, a share of it (`MAX_CONNECTIONS_PER_UID`
    /// each, and never the last `RESERVED_FOR_ADMIN`), so that no burst of local clients
    /// can keep root from `status`, `stop` or `reload`.
    fn connection_refusal(&self, uid: u32) -> Option<String> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Some(format!("too many connections (limit {MAX_CONNECTIONS})"));
        }
        if self.is_admin(uid) {
            return None;
        }
        let others = self
            .conns
            .values()
            .filter(|c| !self.is_admin(c.uid))
            .count();
        if others >= MAX_CONNECTIONS - RESERVED_FOR_ADMIN {
            return Some(format!(
                "too many connections from users other than root (limit {})",
                MAX_CONNECTIONS - RESERVED_FOR_ADMIN
            ));
        }
        let mine = self.conns.values().filter(|c| c.uid == uid).count();
        if mine >= MAX_CONNECTIONS_PER_UID {
            return Some(format!(
                "too many connections from uid {uid} (limit {MAX_CONNECTIONS_PER_UID})"
            ));
        }
        None
    }

    /// Closes connections that did not send their request in time.
    fn expire_connections(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let uid = self.conns.get(&id).map(|c| c.uid);
            debug!(?uid, "a control connection sent no request in time: closed");
            self.finish(
                id,
                &Reply::error(
                    ErrorKind::BadRequest,
                    format!(
                        "no complete request within {}",
                        config::format_duration(REQUEST_TIMEOUT)
                    ),
                ),
            );
        }
    }

    fn arm_conn_read(&mut self, id: u64) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        match self
            .reg
            .arm(conn.fd.as_fd(), Interest::Readable, Source::ConnRead(id))
        {
            Ok(t) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.read_token = Some(t);
                }
            }
            Err(e) => {
                warn!("failed to watch a control connection: {e}");
                self.close_conn(id);
            }
        }
    }

    fn on_conn_read(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.read_token = None;
        let mut buf = [0u8; 8192];
        let mut closed = false;
        loop {
            match rustix::io::read(&conn.fd, &mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    if conn.held || conn.done {
                        // A streaming or waiting client only ever hangs up.
                        continue;
                    }
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if conn.inbuf.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if conn.held || conn.done {
            if closed {
                self.close_conn(id);
            } else {
                self.arm_conn_read(id);
            }
            return;
        }
        let uid = conn.uid;
        if let Some(pos) = conn.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.inbuf.drain(..=pos).collect();
            conn.inbuf = Vec::new();
            conn.deadline = None;
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => self.handle_request(id, uid, req),
                Err(e) => self.finish(
                    id,
                    &Reply::error(ErrorKind::BadRequest, format!("invalid request: {e}")),
                ),
            }
        } else if conn.inbuf.len() > MAX_REQUEST {
            self.finish(
                id,
                &Reply::error(
                    ErrorKind::BadRequest,
                    format!("request larger than {MAX_REQUEST} bytes"),
                ),
            );
        } else if closed {
            self.close_conn(id);
        } else {
            self.arm_conn_read(id);
        }
    }

    fn send(&mut self, id: u64, reply: &Reply) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.outbuf.len() > MAX_CONN_BUFFER {
            warn!("a control client is not reading: dropping it");
            self.close_conn(id);
            return;
        }
        conn.outbuf.extend_from_slice(&reply.to_line());
        self.flush(id);
    }

    /// Sends the final reply and closes the connection once it is flushed.
    fn finish(&mut self, id: u64, reply: &Reply) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.done = true;
            conn.held = false;
            conn.deadline = None;
            conn.backlog = None;
        }
        for site in self.sites.values_mut() {
            site.followers.retain(|c| *c != id);
            site.waiters.retain(|w| w.conn != id);
        }
        self.send(id, reply);
    }

    /// Writes what the connection has buffered; a `logs` client whose buffer ran empty
    /// gets its next chunk of backlog, one chunk per event (the next one when the socket
    /// is writable again), so no client's backlog delays the others' requests for long.
    fn flush(&mut self, id: u64) {
        let mut pumped = false;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            while !conn.outbuf.is_empty() {
                match rustix::io::write(&conn.fd, &conn.outbuf) {
                    Ok(n) => {
                        conn.outbuf.drain(..n);
                    }
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => {
                        self.close_conn(id);
                        return;
                    }
                }
            }
            if conn.outbuf.is_empty() && conn.backlog.is_some() {
                if pumped {
                    // More when the loop comes back to this connection.
                    if conn.write_token.is_none() {
                        match self.reg.arm(
                            conn.fd.as_fd(),
                            Interest::Writable,
                            Source::ConnWrite(id),
                        ) {
                            Ok(t) => conn.write_token = Some(t),
                            Err(_) => self.close_conn(id),
                        }
                    }
                    return;
                }
                pumped = true;
                if self.pump_backlog(id) {
                    continue;
                }
                return;
            }
            if conn.outbuf.is_empty() {
                if conn.done {
                    self.close_conn(id);
                }
            } else if conn.write_token.is_none() {
                match self
                    .reg
                    .arm(conn.fd.as_fd(), Interest::Writable, Source::ConnWrite(id))
                {
                    Ok(t) => conn.write_token = Some(t),
                    Err(_) => self.close_conn(id),
                }
            }
            return;
        }
    }

    /// Moves the next chunk of a `logs` client's backlog into its buffer. Once the
    /// backlog is done the client follows the log (`-f`) or gets its final answer. Returns
    /// whether anything was buffered.
    fn pump_backlog(&mut self, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let Some(stream) = conn.backlog.as_mut() else {
            return false;
        };
        let Some(site) = self.sites.get_mut(&stream.site) else {
            conn.backlog = None;
            return false;
        };
        match stream.backlog.next_lines(&site.log) {
            Ok(Some(lines)) => {
                for l in lines {
                    conn.outbuf.extend_from_slice(&Reply::Line(l).to_line());
                }
                true
            }
            Ok(None) => {
                let stream = conn.backlog.take().expect("checked above");
                if stream.follow {
                    site.followers.push(id);
                    false
                } else {
                    let path = site.log.path().to_path_buf();
                    let name = stream.site;
                    self.finish(
                        id,
                        &Reply::ok(&crate::control::LogsEnded {
                            site: name.to_string(),
                            log: path,
                        }),
                    );
                    true
                }
            }
            Err(e) => {
                let path = site.log.path().display().to_string();
                self.finish(
                    id,
                    &Reply::error(ErrorKind::Failed, format!("failed to read {path}: {e}")),
                );
                true
            }
        }
    }

    fn close_conn(&mut self, id: u64) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        for t in [conn.read_token, conn.write_token].into_iter().flatten() {
            self.reg.tokens.remove(&t);
            let _ = self.reg.reactor.disarm(conn.fd.as_fd(), t);
        }
        // A unix socket closed with unread data resets the peer's reads, and the client
        // would lose the answer already sent (a refusal, a timeout): drain first.
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            if !matches!(rustix::io::read(&conn.fd, &mut scratch), Ok(n) if n > 0) {
                break;
            }
        }
        for site in self.sites.values_mut() {
            site.followers.retain(|c| *c != id);
            site.waiters.retain(|w| w.conn != id);
        }
        self.hang_up_execs(Some(id));
    }

    fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || uid == rustix::process::geteuid().as_raw()
    }

    fn handle_request(&mut self, conn: u64, uid: u32, req: Request) {
        let admin = self.is_admin(uid);
        // Authorization first: a site request needs root, the agent's user, or the
        // site's own user; the answer for someone else's site does not reveal whether
        // it exists.
        if let Some(site) = req.site() {
            let owner = self
                .sites
                .iter()
                .find(|(n, _)| n.as_str() == site)
                .map(|(_, s)| s.config.uid)
                .or_else(|| {
                    // A broken site: its owner if its file said, else root's alone.
                    self.broken
                        .get(site)
                        .map(|b| b.config.as_ref().map_or(0, |c| c.uid))
                });
            if !admin && owner != Some(uid) {
                warn!(uid, site, "refused a control request");
                return self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Refused,
                        format!("uid {uid} may not control site {site}"),
                    ),
                );
            }
            if owner.is_none() {
                return self.finish(
                    conn,
                    &Reply::error(ErrorKind::NotFound, format!("no such site: {site}")),
                );
            }
        } else if !admin {
            let owns_any = self.sites.values().any(|s| s.config.uid == uid);
            let allowed = matches!(req, Request::Status { .. }) && owns_any;
            if !allowed {
                warn!(uid, "refused a control request");
                return self.finish(
                    conn,
                    &Reply::error(ErrorKind::Refused, format!("uid {uid} may not do this")),
                );
            }
        }
        if let Some(site) = req.site().filter(|s| self.broken.contains_key(*s)) {
            let site = site.to_string();
            return self.broken_site_request(conn, uid, admin, &site, req);
        }
        let name = req
            .site()
            .map(|s| SiteName::new(s).expect("an existing site's name is valid"));
        match req {
            Request::Status { .. } => {
                let status = self.status(name.as_ref(), uid, admin);
                self.finish(conn, &Reply::ok(&status));
            }
            Request::Start { .. } => {
                let name = name.expect("site request");
                let serving = self.sites[&name].serving;
                self.hold(&name, conn, WaitFor::Settled);
                self.feed(&name, serving, Input::StartRequested);
                self.reply_if_settled(&name, conn);
            }
            Request::Stop { .. } => {
                let name = name.expect("site request");
                if self.sites[&name].all_stopped() {
                    return self.finish(conn, &Reply::ok(&Done::new(&name, "already stopped")));
                }
                self.cancel_deploys(&name, "the site was stopped");
                self.hold(&name, conn, WaitFor::Stopped);
                let gens: Vec<GenId> = self.sites[&name].gens.keys().copied().collect();
                for g in gens {
                    self.feed(&name, g, Input::StopRequested);
                }
            }
            Request::Restart { .. } => {
                let name = name.expect("site request");
                if let Some(busy) = self.deploy_busy(&name) {
                    return self.finish(conn, &busy);
                }
                let serving = self.sites[&name].serving;
                if self.sites[&name].cur().core.run == RunState::Stopped {
                    self.hold(&name, conn, WaitFor::Settled);
                    self.feed(&name, serving, Input::StartRequested);
                    self.reply_if_settled(&name, conn);
                } else {
                    self.hold(&name, conn, WaitFor::RestartDone);
                    self.feed(&name, serving, Input::RestartRequested);
                }
            }
            Request::Deploy { release, .. } => {
                let name = name.expect("site request");
                // A site's owner deploys only what it can reach itself: a directory it
                // names, or what its `release` symlink (which it may repoint) resolves to.
                let config = &self.sites[&name].config;
                let asked = match (release.map(PathBuf::from), &config.release) {
                    (Some(dir), _) if !admin => Some(deploy::release_for_owner(config, &dir, true)),
                    (None, Some(link)) if !admin => {
                        Some(deploy::release_for_owner(config, link, false))
                    }
                    (other, _) => other.map(Ok),
                };
                let release = match asked.transpose() {
                    Ok(r) => r,
                    Err(why) => {
                        warn!(uid, site = %name, "refused a deploy: {why}");
                        return self.finish(conn, &Reply::error(ErrorKind::Refused, why));
                    }
                };
                self.request_deploy(conn, &name, release, false);
            }
            Request::Rollback { .. } => {
                let name = name.expect("site request");
                self.request_rollback(conn, &name);
            }
            Request::Scale { workers, .. } => {
                let name = name.expect("site request");
                if let Some(busy) = self.deploy_busy(&name) {
                    return self.finish(conn, &busy);
                }
                if workers > config::MAX_WORKERS {
                    return self.finish(
                        conn,
                        &Reply::error(
                            ErrorKind::BadRequest,
                            format!(
                                "{workers} workers is too many: use 0 to {}",
                                config::MAX_WORKERS
                            ),
                        ),
                    );
                }
                let site = self.sites.get_mut(&name).expect("checked above");
                // A site's owner may scale up to what its configuration allows; more is
                // root's decision (and the memory cap bounds everyone).
                let allowed = site.config.auto.map_or(site.config.workers, |a| a.max);
                let auto = site.config.auto.is_some();
                if !admin && workers > allowed {
                    warn!(uid, site = %name, workers, "refused a scale beyond the configuration");
                    return self.finish(
                        conn,
                        &Reply::error(
                            ErrorKind::Refused,
                            format!(
                                "uid {uid} may scale site {name} to at most {allowed} workers (its {}); more needs root",
                                if auto { "workers_max" } else { "configured workers" }
                            ),
                        ),
                    );
                }
                let site = self.sites.get_mut(&name).expect("checked above");
                site.requested = workers;
                let cap = site.capacity.filter(|c| c.workers < workers);
                let target = match (site.config.auto, cap) {
                    (_, Some(c)) => c.workers.min(workers),
                    // Automatic sites grow toward the request one worker at a time.
                    (Some(a), None) => site.cur().core.desired.max(a.min).min(workers),
                    (None, None) => workers,
                };
                if let Some(c) = cap {
                    self.send(
                        conn,
                        &Reply::Event(format!("capped at {} workers: {}", c.workers, c.describe())),
                    );
                }
                let workers = target;
                let serving = self.sites[&name].serving;
                if self.sites[&name].cur().core.run == RunState::Stopped {
                    self.feed(&name, serving, Input::ScaleRequested(workers));
                    return self.finish(
                        conn,
                        &Reply::ok(&Done::new(&name, format!("{workers} workers when started"))),
                    );
                }
                self.hold(&name, conn, WaitFor::Settled);
                self.feed(&name, serving, Input::ScaleRequested(workers));
                self.reply_if_settled(&name, conn);
            }
            Request::Signal { signal, .. } => {
                let name = name.expect("site request");
                let sig = match config::Signal::parse(&signal) {
                    Ok(s) => s,
                    Err(m) => return self.finish(conn, &Reply::error(ErrorKind::BadRequest, m)),
                };
                let site = &self.sites[&name];
                let mut sent = 0;
                for gn in site.gens.values() {
                    for (id, w) in &gn.workers {
                        match w.pidref.signal(sig.0) {
                            Ok(()) => sent += 1,
                            Err(e) => {
                                warn!(site = %name, gen = gn.id, worker = %id, "failed to send {}: {e}", sig.name())
                            }
                        }
                    }
                }
                self.finish(
                    conn,
                    &Reply::ok(&crate::control::Signalled {
                        site: name.to_string(),
                        signal: sig.name(),
                        workers: sent,
                    }),
                );
            }
            Request::Logs { lines, follow, .. } => {
                let name = name.expect("site request");
                let log = &self.sites[&name].log;
                match logs::Backlog::start(log, lines.min(MAX_LOG_LINES), follow) {
                    Ok(backlog) => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.held = true;
                            c.backlog = Some(LogStream {
                                site: name,
                                backlog,
                                follow,
                            });
                        }
                        // Reads now only notice a hang-up.
                        self.arm_conn_read(conn);
                        self.flush(conn);
                    }
                    Err(e) => {
                        let path = log.path().display().to_string();
                        self.finish(
                            conn,
                            &Reply::error(ErrorKind::Failed, format!("failed to read {path}: {e}")),
                        );
                    }
                }
            }
            Request::Exec {
                command,
                tty,
                rows,
                cols,
                term,
                ..
            } => {
                let name = name.expect("site request");
                let params = exec::ExecParams {
                    command,
                    tty,
                    rows,
                    cols,
                    term,
                };
                self.start_exec(conn, &name, params);
            }
            Request::Reload => match self.reload() {
                Ok(summary) => self.finish(conn, &Reply::ok(&summary)),
                Err(e) => {
                    let text = match &e {
                        AgentError::Config(_) => e.to_string(),
                        _ => format!("{e}: {}", error_chain(&e)),
                    };
                    error!("reload refused, nothing changed: {text}");
                    // A bad file is a configuration error; a port taken is the host's.
                    let kind = match e {
                        AgentError::Config(_) => ErrorKind::Config,
                        _ => ErrorKind::Failed,
                    };
                    self.finish(
                        conn,
                        &Reply::error(kind, format!("reload refused, nothing changed: {text}")),
                    );
                }
            },
        }
    }

    /// A request for a site that could not be started: `status` shows why, `start` tries
    /// again (when the file was valid), anything else is refused with the reason.
    fn broken_site_request(&mut self, conn: u64, uid: u32, admin: bool, site: &str, req: Request) {
        match req {
            Request::Status { .. } => {
                let name = SiteName::new(site).ok();
                let status = self.status(name.as_ref(), uid, admin);
                self.finish(conn, &Reply::ok(&status));
            }
            Request::Start { .. } => {
                let Some(config) = self.broken.get(site).and_then(|b| b.config.clone()) else {
                    let reason = self
                        .broken
                        .get(site)
                        .map(|b| b.reason.clone())
                        .unwrap_or_default();
                    return self.finish(
                        conn,
                        &Reply::error(
                            ErrorKind::Config,
                            format!("site {site} is not valid: {reason}; fix its file and reload"),
                        ),
                    );
                };
                let name = config.name.clone();
                match self.make_site(config) {
                    Ok(s) => {
                        info!(site = %name, "started after an earlier failure");
                        self.broken.remove(site);
                        self.sites.insert(name.clone(), s);
                        self.hold(&name, conn, WaitFor::Settled);
                        self.feed(&name, 1, Input::StartRequested);
                        self.reply_if_settled(&name, conn);
                    }
                    Err(e) => {
                        let reason = format!("{e}: {}", error_chain(&e));
                        if let Some(b) = self.broken.get_mut(site) {
                            b.reason = reason.clone();
                        }
                        self.finish(
                            conn,
                            &Reply::error(
                                ErrorKind::Failed,
                                format!("site {site} could not be started: {reason}"),
                            ),
                        );
                    }
                }
            }
            _ => {
                let reason = self
                    .broken
                    .get(site)
                    .map(|b| b.reason.clone())
                    .unwrap_or_default();
                self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Failed,
                        format!("site {site} is not running: it could not be started: {reason}"),
                    ),
                );
            }
        }
    }

    fn hold(&mut self, name: &SiteName, conn: u64, until: WaitFor) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.held = true;
        }
        if let Some(site) = self.sites.get_mut(name) {
            site.waiters.push(Waiter { conn, until });
        }
        self.arm_conn_read(conn);
    }

    /// `Settled` is only noted on a change; answer a waiter whose wish already holds.
    fn reply_if_settled(&mut self, name: &SiteName, conn: u64) {
        let Some(site) = self.sites.get(name) else {
            return;
        };
        let waiting = site.waiters.iter().any(|w| w.conn == conn);
        if waiting && site.cur().core.is_settled() {
            self.finish(conn, &Reply::ok(&Done::new(name, "all workers ready")));
        }
    }

    fn status(&self, only: Option<&SiteName>, uid: u32, admin: bool) -> Status {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut sites: Vec<SiteStatus> = self
            .sites
            .iter()
            .filter(|(n, s)| only.is_none_or(|o| o == *n) && (admin || s.config.uid == uid))
            .map(|(name, s)| {
                let workers = s
                    .gens
                    .values()
                    .flat_map(|g| g.core.slots.values().map(move |slot| (g, slot)))
                    .map(|(g, slot)| {
                        let worker = g.workers.get(&slot.id);
                        let started_at = worker.map(|w| w.started_wall).or_else(|| {
                            slot.started
                                .map(|t| wall - now.saturating_duration_since(t))
                        });
                        WorkerStatus {
                            id: slot.id.0,
                            generation: g.id,
                            pid: slot.pid,
                            state: slot.phase.name().to_string(),
                            busy: slot.busy,
                            restarts: slot.restarts,
                            started_at: started_at.map(logs::utc_timestamp),
                            uptime_ms: slot.pid.and(slot.started).map(|t| {
                                u64::try_from(now.saturating_duration_since(t).as_millis())
                                    .unwrap_or(u64::MAX)
                            }),
                            last_exit: slot.last_exit.as_ref().map(|r| r.to_string()),
                            cgroup: worker.and_then(|w| w.cgroup.clone()),
                            usage: worker
                                .and_then(|w| w.cgroup.as_deref())
                                .map(crate::cgroup::read_usage),
                        }
                    })
                    .collect();
                let cur = s.cur();
                SiteStatus {
                    name: name.to_string(),
                    state: cur.core.run.state(),
                    error: None,
                    file: None,
                    generation: Some(s.serving),
                    release: cur.release.clone(),
                    previous_release: s.previous_release.clone(),
                    generations: s
                        .gens
                        .values()
                        .map(|g| GenerationStatus {
                            id: g.id,
                            state: self.generation_state(s, g).to_string(),
                            release: g.release.clone(),
                            desired: g.core.desired,
                            ready: count(g.core.ready()),
                            live: count(g.core.live()),
                        })
                        .collect(),
                    deploy: s.deploy.as_ref().map(|d| d.describe()),
                    queued_deploys: s.queued_deploys.len(),
                    last_deploy: s.last_deploy.clone(),
                    steering: Some(self.steering_mode(s).to_string()),
                    desired: cur.core.desired,
                    requested: s.requested,
                    auto: s.config.auto.map(|a| AutoRange {
                        min: a.min,
                        max: a.max,
                    }),
                    capacity: s.capacity.map(|c| CapacityStatus {
                        workers: c.workers,
                        per_worker: c.per_worker,
                        basis: c.basis,
                        budget: c.budget,
                        derivation: c.describe(),
                    }),
                    ready: count(cur.core.ready()),
                    restarting: cur.core.is_restarting(),
                    listen: cur
                        .listeners
                        .iter()
                        .map(|l| l.spec.addr.to_string())
                        .collect(),
                    log: Some(s.log.path().to_path_buf()),
                    limits: Some(LimitsStatus {
                        memory: s.config.limits.memory,
                        pids_max: s.config.limits.pids_max,
                        cpu_weight: s.config.limits.cpu_weight,
                        memory_max: s.config.limits.worker_memory_max,
                        memory_high: s.config.limits.worker_memory_high,
                        not_enforced: s.not_enforced.iter().map(|x| x.to_string()).collect(),
                    }),
                    usage: self
                        .cgroups
                        .as_ref()
                        .map(|t| crate::cgroup::read_usage(&t.site_dir(name.as_str()))),
                    sandbox: s.sandbox.as_ref().map(exec::sandbox_status),
                    workers,
                }
            })
            .collect();
        for (name, b) in &self.broken {
            let visible = admin || b.config.as_ref().is_some_and(|c| c.uid == uid);
            if !visible || only.is_some_and(|o| o.as_str() != name) {
                continue;
            }
            sites.push(SiteStatus {
                name: name.clone(),
                state: SiteState::Failed,
                error: Some(b.reason.clone()),
                file: Some(b.file.clone()),
                generation: None,
                release: None,
                previous_release: None,
                generations: Vec::new(),
                deploy: None,
                queued_deploys: 0,
                last_deploy: None,
                steering: None,
                desired: b.config.as_ref().map_or(0, |c| c.workers),
                requested: b.config.as_ref().map_or(0, |c| c.workers),
                auto: None,
                capacity: None,
                ready: 0,
                restarting: false,
                listen: b
                    .config
                    .iter()
                    .flat_map(|c| c.listen.iter().map(|l| l.addr.to_string()))
                    .collect(),
                log: None,
                limits: None,
                usage: None,
                sandbox: None,
                workers: Vec::new(),
            });
        }
        Status {
            agent: AgentStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: logs::utc_timestamp(self.started),
                log_bytes_dropped: logs::AGENT_LOG_DROPPED
                    .load(std::sync::atomic::Ordering::Relaxed),
                config: self.config.file.clone(),
                features: self.features(),
            },
            sites,
        }
    }

    // ------------------------------------------------------------ reload

    /// Re-reads the configuration. On any error nothing changes. Added sites start,
    /// removed sites stop, changed sites restart their workers one at a time (or only
    /// scale, if only `workers` changed).
    fn reload(&mut self) -> Result<crate::control::Reloaded, AgentError> {
        // Sites that run with the same listeners keep their addresses: a conflict is the
        // other file's fault.
        let holds = |sc: &SiteConfig| {
            self.sites
                .get(&sc.name)
                .is_some_and(|s| s.config.listen == sc.listen)
        };
        let new = config::load_keeping(&self.config.file, &holds)?;
        if new.control_socket != self.config.control_socket
            || new.state_dir != self.config.state_dir
            || new.cgroup_base != self.config.cgroup_base
        {
            warn!(
                "control_socket, state_dir and cgroup_base changes take effect when the agent restarts"
            );
        }
        for sc in &new.sites {
            if let Some(site) = self.sites.get(&sc.name) {
                if site.config != *sc && (site.deploy.is_some() || site.gens.len() > 1) {
                    return Err(setup_err(
                        format!("reload site {}", sc.name),
                        io::Error::other("a deploy is under way: reload once it is done"),
                    ));
                }
            }
        }
        // Bind what is new first: if anything fails, drop it all and change nothing.
        let mut prepared: Vec<(SiteConfig, Option<Vec<Listener>>, Option<Site>)> = Vec::new();
        for sc in &new.sites {
            match self.sites.get(&sc.name) {
                None => prepared.push((sc.clone(), None, Some(self.make_site(sc.clone())?))),
                Some(old) if old.config.listen != sc.listen => {
                    let mut ls = Vec::new();
                    for spec in &sc.listen {
                        match old.cur().listeners.iter().position(|l| l.spec == *spec) {
                            Some(_) => ls.push(None),
                            None => ls.push(Some(Listener::bind(spec, sc.uid, sc.gid).map_err(
                                |e| {
                                    setup_err(
                                        format!("set up the listeners of site {}", sc.name),
                                        e,
                                    )
                                },
                            )?)),
                        }
                    }
                    // Reuse unchanged listeners by duplicating their fds.
                    let mut full = Vec::new();
                    for (spec, l) in sc.listen.iter().zip(ls) {
                        match l {
                            Some(l) => full.push(l),
                            None => {
                                let old_l = old
                                    .cur()
                                    .listeners
                                    .iter()
                                    .find(|l| l.spec == *spec)
                                    .expect("found above");
                                let fd = old_l
                                    .fd
                                    .try_clone()
                                    .map_err(|e| setup_err("duplicate a listener", e))?;
                                full.push(Listener {
                                    spec: spec.clone(),
                                    fd,
                                });
                            }
                        }
                    }
                    prepared.push((sc.clone(), Some(full), None));
                }
                Some(_) => prepared.push((sc.clone(), None, None)),
            }
        }
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let new_names: Vec<SiteName> = new.sites.iter().map(|s| s.name.clone()).collect();
        for name in self.sites.keys().cloned().collect::<Vec<_>>() {
            if !new_names.contains(&name) {
                removed.push(name.to_string());
                if let Some(s) = self.sites.get_mut(&name) {
                    s.removing = true;
                }
                self.cancel_deploys(&name, "the site was removed from the configuration");
                let gens: Vec<GenId> = self.sites[&name].gens.keys().copied().collect();
                for g in gens {
                    self.feed(&name, g, Input::StopRequested);
                }
            }
        }
        for (sc, listeners, fresh) in prepared {
            let name = sc.name.clone();
            if let Some(site) = fresh {
                added.push(name.to_string());
                self.sites.insert(name.clone(), site);
                self.feed(&name, 1, Input::StartRequested);
                continue;
            }
            let Some(site) = self.sites.get_mut(&name) else {
                continue;
            };
            if site.config == sc {
                continue;
            }
            changed.push(name.to_string());
            let only_count = SiteConfig {
                workers: site.config.workers,
                ..sc.clone()
            } == site.config;
            let workers = sc.workers;
            if let Some(ls) = listeners {
                for old in &site.cur().listeners {
                    if !ls.iter().any(|l| l.spec.addr == old.spec.addr) {
                        old.unlink();
                    }
                }
                site.steering = deploy::attach_steering(&self.steering_support, &name, &ls);
                site.cur_mut().listeners = ls;
            }
            let cur = site.cur_mut();
            cur.core.policies = policies(&sc);
            cur.config = match &cur.release {
                Some(r) => sc.for_release(r),
                None => sc.clone(),
            };
            if let Err(e) = site.log.set_policy(sc.logs, Some(sc.gid)) {
                warn!(site = %name, "failed to set the permissions of {}: {e}", site.log.path().display());
            }
            // Prepared again, from the new configuration, at the next spawn.
            site.sandbox = None;
            let limits_changed = site.config.limits != sc.limits;
            site.config = sc;
            site.requested = workers;
            if site.config.limits.memory.is_some() && site.next_capacity_check.is_none() {
                site.next_capacity_check = Some(Instant::now());
            }
            if limits_changed {
                let cfg = site.config.clone();
                let missing = self.apply_site_limits(&cfg);
                let Some(site) = self.sites.get_mut(&name) else {
                    continue;
                };
                site.not_enforced = missing;
                for w in site.gens.values().flat_map(|g| g.workers.values()) {
                    if let Some(dir) = &w.cgroup {
                        if let Err(e) = CgroupTree::apply_worker_limits(dir, &cfg.limits) {
                            warn!(site = %name, "failed to update worker limits: {e}");
                        }
                    }
                }
            }
            let has_budget = self
                .sites
                .get(&name)
                .is_some_and(|s| s.config.limits.memory.is_some());
            let serving = self.sites[&name].serving;
            if has_budget {
                // The cap decides how many of the requested workers run.
                self.refresh_capacity(&name);
            } else {
                self.feed(&name, serving, Input::ScaleRequested(workers));
            }
            if !only_count {
                self.feed(&name, serving, Input::RestartRequested);
            }
        }
        self.config = AgentConfig {
            sites: Vec::new(),
            ..new
        };
        // Every site is valid and started now.
        self.broken.clear();
        info!(?added, ?changed, ?removed, "configuration reloaded");
        Ok(crate::control::Reloaded {
            added,
            changed,
            removed,
        })
    }

    fn drop_site(&mut self, name: &SiteName) {
        let Some(site) = self.sites.remove(name) else {
            return;
        };
        for l in site.gens.values().flat_map(|g| &g.listeners) {
            l.unlink();
        }
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            let dir = tree.site_dir(name.as_str());
            for g in site.gens.keys() {
                graveyard.bury(dir.join(format!("gen-{g}")));
            }
            graveyard.bury(dir);
        }
        let conns: Vec<u64> = site
            .followers
            .iter()
            .copied()
            .chain(site.waiters.iter().map(|w| w.conn))
            .collect();
        for c in conns {
            self.finish(c, &Reply::ok(&Done::new(name, "site removed")));
        }
        info!(site = %name, "site removed");
    }

    // ------------------------------------------------------------ shutdown

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        notify_systemd("STOPPING=1");
        self.hang_up_execs(None);
        let names: Vec<SiteName> = self.sites.keys().cloned().collect();
        for name in names {
            self.cancel_deploys(&name, "the agent is shutting down");
            let gens: Vec<GenId> = self.sites[&name].gens.keys().copied().collect();
            for g in gens {
                self.feed(&name, g, Input::StopRequested);
            }
        }
    }

    fn kill_everything(&mut self) {
        for site in self.sites.values() {
            for w in site.gens.values().flat_map(|g| g.workers.values()) {
                let _ = match (&self.cgroups, &w.cgroup) {
                    (Some(tree), Some(dir)) => {
                        tree.kill(dir).map_err(|e| io::Error::other(e.to_string()))
                    }
                    _ => w.pidref.signal_group(libc::SIGKILL),
                };
            }
        }
    }

    fn shutdown(&mut self) {
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for c in conns {
            self.finish(
                c,
                &Reply::error(ErrorKind::Failed, "the agent is shutting down"),
            );
        }
        // What the workers left behind was killed with their leaves and reaped in the
        // loop; anything still in the tree now did not die within SHUTDOWN_GRACE.
        self.reap_zombies();
        if let Some(g) = &self.graveyard {
            if !g.is_empty() {
                warn!(
                    "processes killed at shutdown are still in {} cgroups (uninterruptible?): {:?}",
                    g.remaining().len(),
                    g.remaining()
                );
            }
        }
        for l in self
            .sites
            .values()
            .flat_map(|s| s.gens.values())
            .flat_map(|g| &g.listeners)
        {
            l.unlink();
        }
        if let Some(tree) = &self.cgroups {
            tree.teardown();
        }
        let _ = std::fs::remove_file(&self.config.control_socket);
        let _ = std::fs::remove_file(&self.notify.path);
        info!("agent stopped");
    }
}

/// A count of slots, as `status` shows it.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn site_log_path(sites: &BTreeMap<SiteName, Site>, name: &SiteName) -> String {
    sites
        .get(name)
        .map(|s| s.log.path().display().to_string())
        .unwrap_or_default()
}

/// Most past lines one `logs` request may ask for.
const MAX_LOG_LINES: usize = 100_000;

fn policies(c: &SiteConfig) -> Policies {
    Policies {
        restart: c.restart,
        stop: c.stop,
        ready: c.ready,
    }
}

/// Every signal the agent reads from its signalfd: those it acts on (`SIGTERM`, `SIGINT`,
/// `SIGHUP`, `SIGCHLD`), and every other one whose default action would end it, which it
/// only logs. A stray `kill -USR1` must not take every site's supervisor down. Faults the
/// kernel raises itself (a real `SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGILL`, `SIGSYS`, `SIGTRAP`)
/// still end the agent: the kernel delivers them even when blocked, with the default
/// action; `abort()` unblocks `SIGABRT` before raising it. Blocked here, a signal sent with
/// `kill` is the same event every time (logged), never swallowed once and fatal the next.
/// `SIGPIPE` stays ignored (writes report `EPIPE`); stop signals (`SIGTSTP`, `SIGTTIN`,
/// `SIGTTOU`) keep their default.
fn agent_signals() -> Vec<i32> {
    let mut out = vec![
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGCHLD,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGTRAP,
        libc::SIGSYS,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGABRT,
    ];
    out.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    out
}

/// Connects a non-blocking probe socket to `target`; with `steering`, its connection goes
/// to `listener` (a generation that is not serving yet) through the probe entry.
fn start_tcp_probe(
    target: SocketAddr,
    steering: Option<&mut crate::steering::Steering>,
    listener: BorrowedFd<'_>,
) -> Result<TcpStream, String> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (family, any): (AddressFamily, SocketAddr) = if target.is_ipv4() {
        (
            AddressFamily::INET,
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        )
    } else {
        (
            AddressFamily::INET6,
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        )
    };
    let sock = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(st) = steering {
        // The port is chosen at bind, so the probe entry can name it before the SYN.
        rustix::net::bind(&sock, &any).map_err(|e| format!("bind: {e}"))?;
        let local = rustix::net::getsockname(&sock).map_err(|e| format!("getsockname: {e}"))?;
        let port = SocketAddr::try_from(local)
            .map_err(|e| format!("getsockname: {e}"))?
            .port();
        st.probe_from(port, listener)
            .map_err(|e| format!("{e}: {}", error_chain(&e)))?;
    }
    match rustix::net::connect(&sock, &target) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(sock)),
        Err(e) => Err(format!("connect to {target}: {e}")),
    }
}

/// The parent of `pid` from `/proc/<pid>/stat`, if it is still there.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses (which may hold spaces): state, then ppid.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

fn bind_control(path: &std::path::Path) -> Result<OwnedFd, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup_err(format!("create {}", dir.display()), e))?;
    }
    // No agent runs on this socket (`lock_control` says so): whatever is at the path is
    // stale. A connect could still succeed: io_uring tears a killed agent's ring down
    // asynchronously, and the ring's poll on the old listening socket keeps it alive
    // (and accepting into its backlog) for a while after the agent died.
    let _ = std::fs::remove_file(path);
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| setup_err("create the control socket", io::Error::from(e)))?;
    let addr = rustix::net::SocketAddrUnix::new(path)
        .map_err(|e| setup_err("name the control socket", io::Error::from(e)))?;
    rustix::net::bind(&fd, &addr)
        .map_err(|e| setup_err(format!("bind {}", path.display()), io::Error::from(e)))?;
    // Everyone may connect; SO_PEERCRED decides what each peer may do.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| setup_err(format!("chmod {}", path.display()), e))?;
    rustix::net::listen(&fd, 128)
        .map_err(|e| setup_err("listen on the control socket", io::Error::from(e)))?;
    Ok(fd)
}

/// The pid of the agent running on `socket`, if one holds its lock.
pub fn running_agent(socket: &std::path::Path) -> Option<u32> {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    let mut file = File::open(PathBuf::from(name)).ok()?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok() {
        // Nobody holds it: no agent.
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).ok()?;
    text.trim().parse().ok()
}

/// Takes the lock `<control socket>.lock` for the agent's lifetime (an `flock`, released
/// by the kernel when the agent exits, however it exits), before anything else is touched:
/// a second agent on the same socket would otherwise sweep the first one's cgroups.
fn lock_control(socket: &std::path::Path) -> Result<OwnedFd, AgentError> {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup_err(format!("create {}", dir.display()), e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| setup_err(format!("open {}", path.display()), e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // The pid, for `check` to tell the running agent's listeners from strangers.
            use std::io::Write as _;
            let mut f = file;
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            Ok(OwnedFd::from(f))
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Err(setup_err(
            format!("lock {}", path.display()),
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another agent is running on the control socket {}",
                    socket.display()
                ),
            ),
        )),
        Err(e) => Err(setup_err(
            format!("lock {}", path.display()),
            io::Error::from(e),
        )),
    }
}

fn raise_nofile_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Sends `state` to systemd's `NOTIFY_SOCKET`, if the agent runs under it.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))
    };
    if let Err(e) = result {
        warn!("failed to notify systemd: {e}");
    }
}

/// The causes of an error, joined (for errors turned into strings).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

/// The reactor and the owners of its tokens.
#[derive(Debug)]
struct Registry {
    reactor: Reactor,
    tokens: HashMap<u64, Source>,
    next_token: u64,
}

impl Registry {
    /// Arms a one-shot notification for `fd`, under a fresh token owned by `source`.
    fn arm(&mut self, fd: BorrowedFd<'_>, interest: Interest, source: Source) -> io::Result<u64> {
        let t = self.next_token;
        self.next_token += 1;
        self.reactor.arm(fd, interest, t)?;
        self.tokens.insert(t, source);
        Ok(t)
    }
}

//! The agent's event loop: one thread, one reactor, only events (helper threads only start
//! processes beside it, while it waits: `sys::spawn::StartHelpers`, and the one that keeps
//! the whole bounding set, `sys::spawn::set_whole_set_aside`).
//!
//! Sources, each a one-shot readiness registration identified by a never-reused token:
//! the signalfd (`SIGTERM`, `SIGINT`, `SIGHUP`, `SIGCHLD`), every worker's pidfd (exit),
//! every worker's output pipe (or its site's output socket), the notify socket
//! (`READY=1`), the control socket and its connections. Deadlines (backoff, stop and ready
//! timeouts, TCP ready probes, deploy stages, capacity checks) come from the site
//! machines, the summaries of folded log lines from [`fold`], the next write of the record
//! of workers and the removal of retired cgroup leaves from the loop itself; they set the
//! reactor's wait timeout; when nothing is due the loop sleeps without a timeout, so an
//! idle agent uses no CPU.
//!
//! All policy is in the site machines ([`crate::supervisor::machine`]): this module is
//! mechanism. Each event becomes an input to a site's machine; its actions are carried
//! out (`sites.rs`), and the results some have are fed back until nothing is left.
//! Errors of single operations are logged once, here, with the site, worker and pid;
//! the loop itself only stops on a failure of the reactor.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the agent: setup, the loop, dispatch, signals, shutdown |
//! | `sites.rs` | a site's machine beside its kernel objects; feeding inputs, carrying out actions |
//! | `generations.rs` | listeners beside the serving generation, steering, the `tcp` probe |
//! | `workers.rs` | spawning, reaping, output pipes, notifications |
//! | `output.rs` | the socket a site's workers write their output to |
//! | `control.rs` | control connections and requests |
//! | `status.rs` | the `status` report |
//! | `watch.rs` | `watch`: snapshots pushed to subscribers (`hatchery top`) on a timer |
//! | `reload.rs` | `reload` |
//! | `exec.rs` | the sandbox as prepared, and `hatchery exec` |
//! | `render.rs` | the words for the machines' events and outcomes |
//! | `fold.rs` | per-worker lines by the thousand folded into summaries (log and progress) |
//! | `history.rs` | the event history: one `emit` to the agent's log, the site's log and `events.jsonl`; `hatchery events` |
//! | `recovery.rs` | the record of a running agent; adopting (or stopping) the workers of an earlier one |
//! | `holder.rs` | handing worker output pipes to the fd holder, and taking them back |
//! | `upgrade.rs` | `hatchery upgrade`: executing a new binary in place, and coming up from one |
//! | `setup.rs` | the control socket's lock, signals, limits, systemd notification |
//! | `reactor.rs` | io_uring and epoll |
//! | `metrics.rs` | the metrics listener: `GET /metrics` over HTTP, with its limits |

mod control;
mod cursor;
mod exec;
pub mod fold;
mod generations;
mod health;
pub mod history;
mod holder;
mod metrics;
mod output;
mod pressure;
pub mod reactor;
mod recovery;
mod reload;
mod render;
mod setup;
mod shut_watch;
mod sites;
mod sites_runtime;
mod status;
mod systemd;
mod upgrade;
mod warmup;
mod watch;
mod workers;
mod zygote;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use self::holder::start_holder;
use self::reactor::{Interest, Reactor};
pub use self::recovery::FORMAT_VERSION as RECORD_VERSION;
pub use self::setup::running_agent;
use self::setup::{agent_signals, bind_control, lock_control, notify_systemd, raise_nofile_limit};
use self::sites::Site;
use crate::cgroup::{CgroupTree, Graveyard};
use crate::config::{self, AgentConfig, SiteConfig, SiteName};
use crate::control::{ErrorKind, Reply};
use crate::features::{self, Feature};
use crate::logs::{self, LineSplitter};
use crate::net::NotifySocket;
use crate::supervisor::ids::{GenId, Slot, WorkerId};
use crate::supervisor::machine::{Action, CancelReason, Input, TCP_PROBE_INTERVAL};
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

/// How long a starting agent waits for what an earlier one left to die.
const STALE_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for killed processes to leave their cgroups.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Retired cgroup leaves are removed once no event came for this long (a stop or a mass
/// restart brings exits and starts one after another until it is over).
const QUIET_BEFORE_REMOVALS: Duration = Duration::from_millis(5);
/// Retired cgroup leaves removed in a quiet turn of the loop (a few milliseconds).
const REMOVALS_QUIET: usize = 64;
/// Under events that never stop for that long, some are removed this often anyway.
const REMOVALS_AT_LEAST_EVERY: Duration = Duration::from_secs(1);
/// Under exits that never stop for that long (longer than a stop of 10,000 workers), the
/// workers whose exit was handled are reaped anyway (`Agent::reap_held`).
const REAP_AT_LEAST_EVERY: Duration = Duration::from_secs(1);
/// Signals sent per turn of the loop: a stop of thousands of workers is sent between the
/// turns that handle the first exits, not all before the first exit is handled (the loop,
/// then one among thousands of runnable workers, handles the exits last, on one CPU) nor
/// so few a turn that the workers signalled are gone before the loop sends more (the
/// CPUs idle meanwhile: 32 a turn left them idle 13 % of a stop of 10,000). At about 8 µs
/// a signal, a turn sends for 4 ms at most.
const SIGNALS_PER_TURN: usize = 512;

/// The threads that start workers beside the loop's own (`sys::spawn::StartHelpers`):
/// two starting threads per CPU in all, at most [`crate::config::START_THREADS`] with the
/// one that starts only what the others cannot (each holds a block of fds, counted in the
/// agent's own fds). A starting thread mostly waits
/// (in `clone3`, until its child has `execve`d), so more threads than CPUs keep the CPUs
/// busy: on 2 CPUs, mass-crash recovery of 10,000 workers took 4.9 to 5.3 s with three
/// helpers against 5.8 to 6.5 s with one (BENCHMARKS.md, "More threads that start
/// workers"); more than four threads were not measured.
fn start_helpers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    // Less the one that keeps the whole bounding set (`sys::spawn::set_whole_set_aside`).
    (2 * cpus).clamp(2, crate::config::START_THREADS - 1) - 1
}
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

/// Most past lines one `logs` request may ask for.
const MAX_LOG_LINES: usize = 100_000;

#[derive(Debug, Clone)]
enum Source {
    Signals,
    Control,
    Notify,
    Pidfd(SiteName, WorkerId),
    Pipe,
    ConnRead(u64),
    ConnWrite(u64),
    /// The pidfd of a `hatchery exec` command.
    Exec(i32),
    /// The graveyard's inotify fd: a cgroup waiting for removal may be empty now.
    Graveyard,
    /// A zygote's pidfd (it exited), by its number in `Agent::zygotes`.
    ZygoteExit(u64),
    /// A zygote's link (it said something, or closed it).
    ZygoteLink(u64),
    /// A site's CPU pressure trigger fired (see `pressure.rs`).
    Pressure(SiteName),
    /// A listener watched was shut down (see `shut_watch.rs`).
    ListenersShut,
    /// One of a site's output sockets (its workers' stdout, or stderr) is readable (see
    /// `output.rs`).
    Output(SiteName, crate::logs::StdStream),
    /// The metrics listener (see `metrics.rs`).
    Metrics,
    /// A metrics connection, by number (readable or writable: see `metrics.rs`).
    MetricsConn(u64),
}

#[derive(Debug)]
struct Pipe {
    site: SiteName,
    writer: crate::logs::Writer,
    pid: i32,
    /// Which of the writer's streams the pipe is.
    stream: crate::logs::StdStream,
    fd: OwnedFd,
    /// The name the fd holder keeps the pipe under, if it does.
    held_as: Option<String>,
    splitter: LineSplitter,
    /// Whether the sandbox's bind rule was explained after one of its lines.
    hinted: bool,
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
    /// `outbuf` is written before the loop waits again (see `Agent::send`).
    to_flush: bool,
}

impl Conn {
    /// A new connection of peer `uid`, nothing read or written yet.
    fn new(fd: OwnedFd, uid: u32, deadline: Option<Instant>) -> Conn {
        Conn {
            fd,
            uid,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            read_token: None,
            write_token: None,
            done: false,
            held: false,
            deadline,
            backlog: None,
            to_flush: false,
        }
    }
}

/// A `logs` request being answered from the site's file.
#[derive(Debug)]
struct LogStream {
    site: SiteName,
    backlog: logs::Backlog,
    follow: bool,
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
    /// The threads that start workers beside this one (`crate::spawn::start_all`), each
    /// with its own block; none if they could not be made.
    helpers: Option<crate::sys::spawn::StartHelpers>,
    /// While the loop handles a batch of exits (and the first sites are started): the
    /// workers whose start was asked for, started together once the batch is handled
    /// (`Agent::start_deferred`).
    deferred_spawns: Option<Vec<(SiteName, GenId, Slot)>>,
    /// Signals the machines asked for, sent a batch per turn of the loop
    /// (`Agent::send_signals`).
    signals_to_send: VecDeque<sites::SignalToSend>,
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
    /// Running sites whose file does not load, by name, with why: adopted at the agent's
    /// start with the configuration their workers run with (`recovery`). A reload, which
    /// loads every file, clears it.
    not_loading: BTreeMap<String, Broken>,
    pipes: HashMap<u64, Pipe>,
    /// The buffer sites' output sockets are read into (`output.rs`).
    output_buf: Vec<u8>,
    /// Where reads of the workers' output stand, for the next agent (`cursor.rs`).
    cursor: cursor::Cursor,
    /// Connections with something to write before the loop waits again.
    to_flush: Vec<u64>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    pids: HashMap<i32, (SiteName, WorkerId)>,
    shutting_down: bool,
    /// `SIGHUP`s the kernel sent (ignored; see `handle_pending_signals`).
    kernel_hangups: u64,
    kernel: Vec<Feature>,
    /// Whether eBPF connection steering can be used here.
    steering_support: crate::steering::SteeringSupport,
    started: SystemTime,
    /// Running `hatchery exec` commands, by pid (see `exec.rs`).
    execs: HashMap<i32, exec::ExecSession>,
    next_exec: u32,
    /// What the record of live workers lacks since it was last written.
    unsaved: recovery::Unsaved,
    /// The sites whose output was read this turn of the loop, before its exits were
    /// handled (see `Agent::drain_before_exits`).
    drained_before_exits: Vec<SiteName>,
    /// The leaves of workers that crashed this turn, empty and never killed, by slot: the
    /// slot's next process is born in it again if it starts in the same turn (no `mkdir` on
    /// a restart's path, no `rmdir` and cgroup release after it); those still here at the
    /// end of the turn are retired (`Agent::retire_unused_leaves`).
    reusable_leaves: HashMap<(SiteName, GenId, Slot), PathBuf>,
    /// Exits handled this turn and not yet told (log line, history entry): told once their
    /// replacements are started, or before anything else is (`Agent::tell_exits`).
    exits_to_tell: Vec<workers::ExitToTell>,
    /// Workers whose exit was handled, by site, to reap (`Agent::reap_held`).
    zombies: BTreeMap<SiteName, Vec<crate::process::PidRef>>,
    /// Since when the first of them waits.
    zombies_since: Option<Instant>,
    /// A `SIGCHLD` came while some waited to be reaped: the look for other zombies is
    /// owed (`Agent::reap`).
    scan_owed: bool,
    /// A hash of the record as last written (it is written again only when it changed).
    last_record: Option<u64>,
    /// The shape of the record last written (`Agent::record_shape`): a change of it is
    /// written without waiting for `save_after`.
    last_shape: Option<u64>,
    /// The record is not written again before this (see `recovery::save_workers`).
    save_after: Option<Instant>,
    /// The record's write was put off to `save_after` (see `recovery::save_workers`).
    save_put_off: bool,
    /// When retired cgroup leaves were last removed (see `remove_retired`).
    last_removals: Option<Instant>,
    /// The agent's copies of the listeners, watched for a shutdown (none where epoll
    /// could not be had).
    shut_watch: Option<shut_watch::ShutWatch>,
    /// Sites whose workers were adopted from an earlier agent: the actions their machines
    /// start with, and the configuration to apply (their file changed while no agent ran).
    adopted: BTreeMap<SiteName, (Vec<Action>, Option<SiteConfig>)>,
    /// Configurations that changed while no agent ran, waiting for their site to take
    /// them (a generation of the earlier agent is still stopping).
    missed_changes: BTreeMap<SiteName, SiteConfig>,
    /// The fd holder (`None` if it could not be started; see `holder.rs`).
    holder: Option<crate::fdholder::HolderClient>,
    holder_path: PathBuf,
    /// When the holder was last started again after it went.
    holder_retry: Option<Instant>,
    /// What the holder held when this agent started, by name, until adoption claims it.
    held: HashMap<String, OwnedFd>,
    /// Zygote processes (`mode = "zygote"`), by number (see `zygote.rs`).
    zygotes: HashMap<u64, zygote::Zygote>,
    next_zygote: u64,
    /// Zygotes by pid, for `reap`.
    zygote_pids: HashMap<i32, u64>,
    /// Workers zygotes forked ahead and named in a `SPARE`, moved ahead into a leaf, by
    /// pid (see `zygote.rs`).
    spares: HashMap<i32, zygote::SpareLeaf>,
    /// CPU pressure triggers of sites that follow their load (see `pressure.rs`).
    pressure: HashMap<SiteName, pressure::Trigger>,
    /// When `Agent::new` began (for the time adoption took).
    born: Instant,
    /// This boot's id, written in the record of live workers.
    boot_id: String,
    /// The binary this agent runs (the default of `upgrade`).
    exe: PathBuf,
    /// The version this agent was upgraded from, and when.
    upgraded_from: Option<crate::status::UpgradedFrom>,
    /// The client of the upgrade that started this image, and its answer (see `upgrade.rs`).
    upgrade_reply: Option<(OwnedFd, Reply)>,
    /// Connections passed by the old image whose request is yet to be read.
    upgrade_pending: Vec<OwnedFd>,
    /// The event history (see `history.rs`).
    history: history::History,
    /// `watch` subscribers (see `watch.rs`).
    watchers: watch::Watchers,
    /// Workers' usage (leaf and `/proc`), reused for a few seconds by `watch` and metrics.
    usage_cache: crate::usage::UsageCache,
    /// The metrics listener (`metrics` in the agent file; see `metrics.rs`).
    metrics: Option<metrics::MetricsServer>,
    /// Counters kept for metrics alone (loop turns, requests, deploys, crashes by cause).
    counters: crate::metrics::Counters,
    /// What systemd is told (`READY=1`, `STATUS=`, the watchdog; see `systemd.rs`).
    systemd: systemd::Systemd,
}

impl Agent {
    /// Sets everything up from the configuration file at `path`: signals, reactor,
    /// cgroups, the notify and control sockets, and every site's listeners. Nothing is
    /// started yet.
    ///
    /// Started by `hatchery upgrade` (`HATCHERY_UPGRADE` set), it takes the lock and the
    /// sockets from the old image and adopts every worker; if that fails it resumes the
    /// old binary (see `upgrade.rs`).
    pub fn new(path: &std::path::Path) -> Result<Agent, AgentError> {
        let inherited = match upgrade::Inherited::from_env() {
            None => return Agent::start(path, None),
            Some(Ok(i)) => i,
            Some(Err(e)) => {
                return Err(setup_err(
                    "take what the previous binary passed",
                    io::Error::new(io::ErrorKind::InvalidInput, e),
                ));
            }
        };
        // Tests make a new image fail here (it is removed at once: the previous binary,
        // resumed, does not see it).
        let fail = crate::sys::inherit::take_env(upgrade::FAIL_ENV);
        let started = match fail {
            Some(_) if inherited.failed.is_none() => Err(setup_err(
                "take over",
                io::Error::other(format!("{} is set", upgrade::FAIL_ENV)),
            )),
            _ => Agent::start(path, Some(&inherited)),
        };
        let started = started.and_then(|mut agent| {
            agent.upgraded(&inherited)?;
            Ok(agent)
        });
        match started {
            // The passed originals close here; the agent holds duplicates.
            Ok(agent) => Ok(agent),
            Err(e) if inherited.failed.is_none() => {
                let reason = match &e {
                    AgentError::Config(_) => e.to_string(),
                    _ => format!("{e}: {}", error_chain(&e)),
                };
                error!("the new binary cannot take over ({reason}): resuming the previous one");
                let failed = inherited.resume_previous(&reason);
                error!("failed to resume the previous binary: {failed}");
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn start(
        path: &std::path::Path,
        inherited: Option<&upgrade::Inherited>,
    ) -> Result<Agent, AgentError> {
        let born = Instant::now();
        // A bad site file only keeps that site from starting (shown as failed), unless it
        // runs: the workers an earlier agent left run on as they run (`recovery`), and
        // the other files are loaded beside what they run with.
        let (config, broken_files) = config::load_each(path)?;
        let running = recovery::running_configs(&config.state_dir, &config.file, &config.sites_dir);
        let (config, broken_files) = if running.is_empty() {
            (config, broken_files)
        } else {
            config::load_each_running(path, &running)?
        };
        // A site that runs where `metrics` now points keeps its address: its listener
        // and the metrics socket would share the connections. (`config.metrics` stays
        // what the file said: an upgrade compares it with the file.)
        let mut serve_metrics = true;
        if let Some(m) = config.metrics {
            let metrics = config::ListenAddr::Tcp(m);
            if let Some((site, l)) = running.values().find_map(|r| {
                r.listen
                    .iter()
                    .find(|l| l.addr.overlaps(&metrics))
                    .map(|l| (&r.name, &l.addr))
            }) {
                error!(
                    "metrics are not served: {m} overlaps {l}, where site {site} runs (move metrics in {} and restart the agent)",
                    config.file.display()
                );
                serve_metrics = false;
            }
        }
        let lock = match inherited {
            Some(i) => i.lock(&config.control_socket)?,
            None => lock_control(&config.control_socket)?,
        };
        // A port taken is an error before anything else is set up.
        let metrics = if serve_metrics {
            Agent::bind_metrics(&config)?
        } else {
            None
        };
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
        crate::sys::one_malloc_arena();
        let (reactor, reactor_note) =
            Reactor::from_env().map_err(|e| setup_err("create the event loop", e))?;

        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| setup_err(format!("create {}", config.state_dir.display()), e))?;
        let inherited_lock = match inherited {
            Some(i) => i.cgroup_lock()?,
            None => None,
        };
        let (cgroups, cgroup_note) = match CgroupTree::setup(&config.cgroup_base, inherited_lock) {
            Ok(Ok(tree)) => (Some(tree), None),
            Ok(Err(reason)) => (None, Some(reason)),
            // Not a reason to run without cgroups: this agent would kill the other's
            // workers at its next start with them, and leave its own unaccounted.
            Err(e @ crate::cgroup::CgroupError::InUse { .. }) => {
                return Err(setup_err(
                    "take the cgroup base",
                    io::Error::new(io::ErrorKind::AddrInUse, e),
                ));
            }
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
        // The fd holder keeps the read ends of worker output pipes open while no agent runs;
        // one that is already there (an earlier agent's) hands back what it holds.
        let holder_path = config.state_dir.join(config::HOLDER_SOCKET);
        let (holder, held) = start_holder(&holder_path);
        // Before any site binds: a previous agent's workers still hold its listeners. Those
        // of sites still configured are adopted; the others are stopped here, and with
        // cgroups the sweep kills what is left beside the adopted ones.
        // An upgrade resumes from the record the old image has just written: without it
        // (missing, unreadable, another format), this image rejects the state.
        if inherited.is_some() {
            let record = recovery::workers_file(&config.state_dir);
            match recovery::load(&record) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(setup_err(
                        "resume after the upgrade",
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{} is missing", record.display()),
                        ),
                    ));
                }
                Err(e) => return Err(setup_err("resume after the upgrade", e)),
            }
        }
        // A site whose file does not load (and was running) runs on as recorded.
        let invalid: BTreeMap<String, PathBuf> = broken_files
            .iter()
            .map(|b| {
                let file = config.sites_dir.join(format!("{}.toml", b.name));
                (b.name.clone(), file)
            })
            .collect();
        let mut adoptions = recovery::recover(
            &config.state_dir,
            &config.file,
            &config.sites,
            &invalid,
            cgroups.as_ref(),
        );
        let graveyard = match &cgroups {
            Some(tree) => {
                let mut g = Graveyard::new().map_err(|e| setup_err("create an inotify fd", e))?;
                let names: Vec<&str> = config
                    .sites
                    .iter()
                    .map(|s| s.name.as_str())
                    .chain(adoptions.keys().map(String::as_str))
                    .collect();
                let spare: Vec<PathBuf> = adoptions
                    .values()
                    .flat_map(|a| a.workers.values().flatten())
                    .filter_map(|w| w.record.cgroup.clone())
                    .collect();
                tree.sweep_stale(&names, &spare, &mut g);
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
        let notify_path = config.state_dir.join(config::NOTIFY_SOCKET);
        let (notify, control) = match inherited {
            Some(i) => (
                NotifySocket::inherited(&notify_path, i.notify(&notify_path)?),
                i.control(&config.control_socket)?,
            ),
            None => (
                NotifySocket::bind(&notify_path)
                    .map_err(|e| setup_err("bind the notify socket", e))?,
                bind_control(&config.control_socket)?,
            ),
        };
        let devnull = OpenOptions::new()
            .read(true)
            .open("/dev/null")
            .map_err(|e| setup_err("open /dev/null", e))?;
        // One block of fds for each thread that starts workers.
        let reserve = || {
            let filler = devnull
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| setup_err("dup /dev/null", e))?;
            crate::sys::spawn::FdBlock::reserve(filler)
                .map_err(|e| setup_err("reserve file descriptors for spawning", e))
        };
        let fd_block = reserve()?;
        // As many as can be reserved: fewer helpers only start workers more slowly.
        let mut helper_blocks = Vec::new();
        for _ in 0..start_helpers() {
            match reserve() {
                Ok(block) => helper_blocks.push(block),
                Err(e) => {
                    warn!(
                        "workers are started by {} helper threads, not {}: reserving fds for another failed: {e}",
                        helper_blocks.len(),
                        start_helpers()
                    );
                    break;
                }
            }
        }
        // Made once the signals the agent reads are blocked: the threads keep that mask.
        let helpers = crate::sys::spawn::StartHelpers::new(helper_blocks)
            .inspect_err(|e| warn!("workers are started one at a time: no helper thread: {e}"))
            .ok();
        // With a thread that keeps the whole bounding set, this one drops from its own what
        // its workers' sandboxes drop, as the helpers do: a restart's child then skips it.
        if let Err(e) = reserve().and_then(|block| {
            crate::sys::spawn::set_whole_set_aside(block)
                .map_err(|e| setup_err("make the thread that keeps the bounding set", e))
        }) {
            warn!("every child of the agent's own thread drops its bounding set itself: {e}");
        }

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
            helpers,
            deferred_spawns: None,
            signals_to_send: VecDeque::new(),
            cgroups,
            cgroup_note,
            graveyard,
            shutdown_deadline: None,
            sites: BTreeMap::new(),
            broken: BTreeMap::new(),
            not_loading: BTreeMap::new(),
            pipes: HashMap::new(),
            output_buf: Vec::new(),
            cursor: cursor::Cursor::default(),
            to_flush: Vec::new(),
            conns: HashMap::new(),
            next_conn: 1,
            pids: HashMap::new(),
            shutting_down: false,
            kernel_hangups: 0,
            kernel: features::probe_kernel(),
            steering_support: crate::steering::probe(),
            started: SystemTime::now(),
            execs: HashMap::new(),
            next_exec: 0,
            zygotes: HashMap::new(),
            next_zygote: 0,
            zygote_pids: HashMap::new(),
            spares: HashMap::new(),
            pressure: HashMap::new(),
            unsaved: recovery::Unsaved::Changes,
            drained_before_exits: Vec::new(),
            reusable_leaves: HashMap::new(),
            exits_to_tell: Vec::new(),
            zombies: BTreeMap::new(),
            zombies_since: None,
            scan_owed: false,
            last_record: None,
            last_shape: None,
            save_after: None,
            save_put_off: false,
            last_removals: None,
            shut_watch: match shut_watch::ShutWatch::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!("listeners shut down by a worker will not be noticed: {e}");
                    None
                }
            },
            boot_id: recovery::boot_id(),
            adopted: BTreeMap::new(),
            missed_changes: BTreeMap::new(),
            holder,
            holder_path,
            holder_retry: None,
            held,
            born,
            exe: std::env::current_exe().unwrap_or_default(),
            upgraded_from: None,
            upgrade_reply: None,
            upgrade_pending: Vec::new(),
            history: history::History::new(&config.state_dir),
            watchers: watch::Watchers::default(),
            usage_cache: crate::usage::UsageCache::default(),
            metrics,
            counters: crate::metrics::Counters::default(),
            systemd: systemd::Systemd::from_env(),
        };
        agent.cursor = cursor::Cursor::inherit(agent.held.remove(cursor::CURSOR_NAME));
        // The sites whose file does not load that were adopted run on as recorded; the
        // others are not started.
        let mut running_as_recorded = Vec::new();
        for b in broken_files {
            let reason = b.error.to_string();
            match adoptions.remove(&b.name) {
                Some(adoption) => {
                    let recorded = adoption.machine.config().clone();
                    error!(
                        site = b.name,
                        "its file does not load, so its workers run on with the configuration they were started with (`hatchery reload` applies the file once it is mended): {reason}"
                    );
                    agent.not_loading.insert(
                        b.name,
                        Broken {
                            file: b.error.file.clone(),
                            reason,
                            config: None,
                        },
                    );
                    running_as_recorded.push((recorded, adoption));
                }
                None => {
                    error!(site = b.name, "not started: {reason}");
                    agent.broken.insert(
                        b.name,
                        Broken {
                            file: b.error.file.clone(),
                            reason,
                            config: None,
                        },
                    );
                }
            }
        }
        let configured: Vec<_> = config
            .sites
            .iter()
            .map(|site| (site.clone(), adoptions.remove(site.name.as_str())))
            .collect();
        let as_recorded = running_as_recorded
            .into_iter()
            .map(|(site, adoption)| (site, Some(adoption)));
        for (site, adoption) in configured.into_iter().chain(as_recorded) {
            let made = match adoption {
                Some(adoption) => agent.adopt_site(&site, adoption),
                None => agent.make_site(site.clone()),
            };
            match made {
                Ok(s) => {
                    agent.sites.insert(site.name.clone(), s);
                    agent.watch_listeners(&site.name, None);
                    // Its workers' output waits in the socket the holder kept: read on.
                    if agent.held_output(&site.name) {
                        if let Err(e) = agent.ensure_output(&site.name) {
                            warn!(site = %site.name, "failed to read the output of its workers: {e}");
                        }
                    }
                }
                Err(e) => {
                    // Not running after all: its file's error is what it is shown with.
                    if let Some(b) = agent.not_loading.remove(site.name.as_str()) {
                        error!(site = %site.name, "not started: {e}: {}", error_chain(&e));
                        agent.broken.insert(site.name.to_string(), b);
                        continue;
                    }
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
        // The agent before's last read of output is settled, or was of a socket or pipe no
        // longer here.
        agent.inherited_settled();
        // What the holder held for workers not adopted: theirs are gone, or stopped. A
        // pipe the holder drops by itself once its worker is gone; an output socket of a
        // site no longer here it is told to drop.
        let unclaimed: Vec<String> = agent
            .held
            .keys()
            .filter(|n| output::is_output_name(n))
            .cloned()
            .collect();
        if let (false, Some(h)) = (unclaimed.is_empty(), &mut agent.holder) {
            let names: Vec<&str> = unclaimed.iter().map(String::as_str).collect();
            if let Err(e) = h.drop_names(&names) {
                warn!("failed to tell the fd holder to let unclaimed output sockets go: {e}");
            }
        }
        agent.held.clear();
        Ok(agent)
    }

    /// The feature report of this agent.
    pub fn features(&self) -> Vec<Feature> {
        let mut out = self.kernel.clone();
        out.push(Feature::on(
            "event loop",
            match (&self.reactor_note, self.reg.reactor.detail()) {
                (Some(why), _) => format!("{} ({why})", self.reg.reactor.backend().name()),
                (None, Some(how)) => format!("{}; {how}", self.reg.reactor.backend().name()),
                (None, None) => self.reg.reactor.backend().name().to_string(),
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
                if let Some(mount) = crate::cgroup::cgroup2_mount() {
                    out.push(Feature::on(
                        "cgroup moves",
                        if crate::cgroup::favors_dynmods(&mount) {
                            format!("{} has favordynmods: a zygote-mode worker is moved into its leaf in well under a millisecond", mount.display())
                        } else {
                            format!("a zygote-mode worker is moved into its leaf after its fork (a spare the zygote names ahead, before its request); {} lacks favordynmods (Linux 6.0+), so a move may wait for an RCU grace period (5-20 ms seen): `mount -o remount,favordynmods {}` avoids it", mount.display(), mount.display())
                        },
                    ));
                }
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
        if let Some(w) = &self.shut_watch {
            self.reg
                .arm(w.fd(), Interest::Readable, Source::ListenersShut)
                .map_err(AgentError::Reactor)?;
        }
        self.arm_metrics()?;

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
        let adopted_sites = self.adopted.len();
        // Every site's first workers are started together, after every site was asked.
        self.deferred_spawns = Some(Vec::new());
        for name in names {
            match self.adopted.remove(&name) {
                Some((actions, changed)) => {
                    self.carry_out(&name, actions);
                    if let Some(config) = changed {
                        self.apply_missed_change(&name, config);
                    }
                }
                None => self.feed(&name, Input::Start(None)),
            }
        }
        self.start_deferred();
        if adopted_sites > 0 {
            let workers: usize = self
                .sites
                .values()
                .flat_map(|s| s.io.gens.values())
                .flat_map(|g| g.workers.values())
                .filter(|w| w.adopted)
                .count();
            info!(
                "supervising {workers} adopted workers of {adopted_sites} sites, {} µs after the agent started",
                self.born.elapsed().as_micros()
            );
        }
        self.answer_upgrade();

        let mut ready = Vec::new();
        loop {
            self.counters.loop_iterations += 1;
            if self.shutting_down && self.sites.values().all(|s| s.machine.is_stopped()) {
                // Then wait (a bounded time) for what the workers left behind to leave
                // their cgroups, and for the zygotes to exit, so the tree can be removed.
                let deadline = *self
                    .shutdown_deadline
                    .get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                let empty = self.graveyard.as_ref().is_none_or(Graveyard::is_empty)
                    && self.zygotes.is_empty()
                    && self.spares.is_empty();
                if empty || Instant::now() >= deadline {
                    break;
                }
            }
            self.tell_systemd();
            // At most once per iteration, however many workers started or exited in it
            // (and spaced out when it is long: see `save_workers`).
            self.save_workers();
            let save = self
                .save_after
                .filter(|_| self.unsaved == recovery::Unsaved::Changes);
            // Retired cgroup leaves are removed once the loop is quiet: wait only that
            // long while some are left.
            let removing = self.graveyard.as_ref().is_some_and(Graveyard::has_deferred);
            let quiet = removing.then(|| Instant::now() + QUIET_BEFORE_REMOVALS);
            self.send_signals(SIGNALS_PER_TURN);
            // Signals to send: only what is ready now, then on.
            let more = (!self.signals_to_send.is_empty()).then(Instant::now);
            let reap = self.zombies_since.map(|t| t + REAP_AT_LEAST_EVERY);
            let timeout = [self.next_deadline(), save, quiet, more, reap]
                .into_iter()
                .flatten()
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            ready.clear();
            // What this turn emitted, in one write per file.
            self.flush_history(false);
            self.flush_pending();
            self.reg
                .reactor
                .wait(timeout, &mut ready)
                .map_err(AgentError::Reactor)?;
            // Exits first: a crashed worker's replacement should not wait behind output
            // and control traffic that arrived in the same batch.
            ready.sort_by_key(|t| self.reg.tokens.get(t).map_or(2, rank));
            self.drain_before_exits(&ready);
            // The workers that the exits of this batch restart are started together once
            // every exit is handled, before the signals; those that the signals restart
            // (exits reaped at a SIGCHLD, a reload) together once they are handled, before
            // anything else.
            self.deferred_spawns = Some(Vec::new());
            let mut handling = 0;
            for &token in &ready {
                if let Some(source) = self.reg.tokens.remove(&token) {
                    let next = rank(&source);
                    if next != handling {
                        self.start_deferred();
                        if next == 1 {
                            self.deferred_spawns = Some(Vec::new());
                        }
                        handling = next;
                    }
                    self.dispatch(token, source);
                }
            }
            self.start_deferred();
            self.fire_deadlines();
            self.reap_after_turn();
            self.retire_unused_leaves();
            let stopping = self.sites.values().any(|s| s.machine.is_stopping());
            // Off the hot path: when nothing happened (while a stop waits for exits: for
            // QUIET_BEFORE_REMOVALS), or now and then beside events that never stop (not
            // while a stop waits for exits).
            let quiet =
                ready.is_empty() && (!stopping || quiet.is_some_and(|t| Instant::now() >= t));
            if removing
                && self.signals_to_send.is_empty()
                && (quiet
                    || (!stopping
                        && self
                            .last_removals
                            .is_none_or(|t| t.elapsed() >= REMOVALS_AT_LEAST_EVERY)))
            {
                self.remove_retired(REMOVALS_QUIET);
            }
        }
        self.shutdown();
        Ok(())
    }

    /// At the end of a turn: the workers whose exit was handled are reaped (their exits
    /// answered first) unless a stop of their site waits for more exits, the site has no
    /// `pids_max` (a zombie counts in it) and the first of them exited less than
    /// `REAP_AT_LEAST_EVERY` ago; then the look for other zombies put off meanwhile.
    fn reap_after_turn(&mut self) {
        if !self.signals_to_send.is_empty() {
            return;
        }
        if !self.zombies.is_empty() {
            let late = self
                .zombies_since
                .is_some_and(|t| t.elapsed() >= REAP_AT_LEAST_EVERY);
            // Few: the sites that are stopping.
            let held: Vec<SiteName> = if late {
                Vec::new()
            } else {
                self.sites
                    .iter()
                    .filter(|(_, s)| {
                        s.machine.is_stopping() && s.config().limits.pids_max.is_none()
                    })
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            if self.zombies.keys().any(|site| !held.contains(site)) {
                self.flush_history(false);
                self.flush_pending();
                self.reap_where(|site| !held.contains(site));
            }
        }
        if self.scan_owed && self.zombies.is_empty() {
            // The workers whose exits it finds are restarted together, as in a turn.
            self.deferred_spawns = Some(Vec::new());
            self.reap();
            self.start_deferred();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.sites
            .values()
            .filter_map(|s| s.machine.next_deadline(now))
            .chain(self.shutdown_deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.zygote_deadline())
            .chain(fold::LogFold::agent().next_deadline())
            .chain(self.history.next_deadline())
            .chain(self.watch_deadline())
            .chain(self.systemd.next_deadline())
            .chain(
                self.metrics
                    .as_ref()
                    .and_then(metrics::MetricsServer::next_deadline),
            )
            .min()
    }

    /// Connections that sent nothing in time are closed; sites with something due (a
    /// deadline, a `tcp` probe, a deploy to move on) get a tick.
    fn fire_deadlines(&mut self) {
        if !self.missed_changes.is_empty() {
            self.apply_missed_changes();
        }
        let now = Instant::now();
        fold::LogFold::agent().flush(now);
        self.history_deadlines(now);
        self.expire_connections(now);
        self.send_watches(now);
        self.expire_metrics(now);
        self.zygote_deadlines(now);
        let due: Vec<SiteName> = self
            .sites
            .iter()
            .filter(|(_, s)| {
                s.machine.deploy().is_some()
                    || s.machine
                        .next_deadline(now)
                        .is_some_and(|d| d <= now + TCP_PROBE_INTERVAL)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.feed(&name, Input::Tick);
        }
    }

    /// Removes up to `max` retired cgroup leaves (`cgroup::CgroupTree::retire`).
    fn remove_retired(&mut self, max: usize) {
        self.last_removals = Some(Instant::now());
        let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) else {
            return;
        };
        if !graveyard.has_deferred() {
            return;
        }
        for e in tree.remove_deferred(graveyard, max) {
            warn!("failed to kill what a worker left behind: {e}");
        }
        self.graveyard_changed();
    }

    /// Cgroups were removed: a stop-then-start deploy may wait for what a generation
    /// left behind.
    fn graveyard_changed(&mut self) {
        let waiting: Vec<SiteName> = self
            .sites
            .iter()
            .filter(|(_, s)| s.machine.deploy().is_some_and(|d| d.exclusive.is_some()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in waiting {
            self.feed(&name, Input::Tick);
        }
    }

    fn dispatch(&mut self, token: u64, source: Source) {
        match source {
            Source::Signals => self.on_signals(),
            Source::Control => self.on_accept(),
            Source::Notify => self.on_notify(),
            Source::Pidfd(site, w) => self.on_pidfd(&site, w.generation, w.slot, token),
            Source::Pipe => self.on_pipe(token),
            Source::Output(site, stream) => self.on_output(&site, stream),
            Source::ConnRead(c) => self.on_conn_read(c),
            Source::Exec(pid) => self.exec_exited(pid),
            Source::ZygoteExit(id) => self.zygote_exited(id),
            Source::ZygoteLink(id) => self.on_zygote_link(id),
            Source::Pressure(site) => self.on_pressure(&site, token),
            Source::Metrics => self.on_metrics_accept(),
            Source::MetricsConn(id) => self.on_metrics_conn(id),
            Source::Graveyard => {
                if let Some(g) = &mut self.graveyard {
                    g.sweep();
                }
                self.rearm(Source::Graveyard);
                self.graveyard_changed();
            }
            Source::ListenersShut => {
                self.on_listeners_shut();
                self.rearm(Source::ListenersShut);
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
            Source::ListenersShut => match &self.shut_watch {
                Some(w) => w.fd(),
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
        self.handle_pending_signals();
        self.rearm(Source::Signals);
    }

    /// Reads and acts on every signal pending in the signalfd.
    fn handle_pending_signals(&mut self) {
        loop {
            match signals::read_signal_info(self.signalfd.as_fd()).map(|r| r.map(|r| (r.signal, r)))
            {
                Ok(Some((libc::SIGCHLD, _))) => self.reap(),
                // Not a reload: the kernel sends SIGHUP at a terminal's hang-up, and to a
                // process group left orphaned with a stopped process in it, which a worker
                // (in the agent's session) can bring about by joining the agent's group.
                Ok(Some((libc::SIGHUP, from))) if from.sent_by_kernel() => {
                    self.kernel_hangups += 1;
                    if self.kernel_hangups.is_power_of_two() {
                        warn!(
                            count = self.kernel_hangups,
                            "SIGHUP from the kernel ignored (a terminal's hang-up, or a process group left orphaned with a stopped process): only a SIGHUP a process sends (kill -HUP, systemctl reload) reloads"
                        );
                    }
                }
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
    }

    // ------------------------------------------------------------ shutdown

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        notify_systemd("STOPPING=1");
        self.hang_up_execs(None);
        let names: Vec<SiteName> = self.sites.keys().cloned().collect();
        for name in names {
            let input = Input::Stop {
                client: None,
                why: CancelReason::AgentStopping,
            };
            self.feed(&name, input);
        }
    }

    fn kill_everything(&mut self) {
        self.kill_zygotes();
        for site in self.sites.values_mut() {
            for w in site
                .io
                .gens
                .values_mut()
                .flat_map(|g| g.workers.values_mut())
            {
                w.leaf_reusable = false;
                let _ = match (&self.cgroups, &w.cgroup) {
                    (Some(tree), Some(dir)) => {
                        tree.kill(dir).map_err(|e| io::Error::other(e.to_string()))
                    }
                    // Its group, and the worker itself should it lead none.
                    _ => {
                        let group = w.pidref.signal_group(libc::SIGKILL);
                        let _ = w.pidref.signal(libc::SIGKILL);
                        group
                    }
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
        self.flush_pending();
        // What the workers left behind was killed with their leaves and reaped in the
        // loop; anything still in the tree now did not die within SHUTDOWN_GRACE.
        self.kill_zygotes();
        self.reap_held();
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
            .flat_map(|s| s.io.gens.values())
            .flat_map(|g| &g.listeners)
        {
            l.unlink();
        }
        // The holder lives in the agent's own cgroup: gone before the tree is removed.
        self.stop_holder();
        if let Some(tree) = &self.cgroups {
            tree.teardown();
        }
        let _ = std::fs::remove_file(&self.config.control_socket);
        let _ = std::fs::remove_file(&self.notify.path);
        // Every site is stopped: no worker is left to record.
        let _ = std::fs::remove_file(recovery::workers_file(&self.config.state_dir));
        fold::LogFold::agent().flush_all();
        self.flush_history(true);
        info!("agent stopped");
    }
}

/// The order in which a batch of events is handled: exits of workers and zygotes (0), then
/// signals (1, `SIGCHLD` among them), then the rest (2).
fn rank(source: &Source) -> u8 {
    match source {
        Source::Pidfd(..) | Source::ZygoteExit(_) => 0,
        Source::Signals => 1,
        _ => 2,
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

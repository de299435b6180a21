//! Sites as the event loop holds them: the site machine (all policy, pure) beside the
//! kernel objects it speaks of ([`SiteIo`]: listeners, worker processes, steering, the
//! log). [`Agent::feed`] gives a site's machine one input and carries out the actions it
//! returns; the results some actions have (a spawn's pid, listeners bound, the steering
//! flipped, a probe accepted) are fed back, in order, before anything else happens.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::{debug, error, info, warn};

use super::generations::Probed;
use super::recovery::Unsaved;
use super::{Agent, AgentError, generations, render, setup_err};
use crate::cgroup::CgroupTree;
use crate::config::{self, SiteConfig, SiteName};
use crate::control::{Done, Reply};
use crate::logs::SiteLog;
use crate::net::Listener;
use crate::process::PidRef;
use crate::steering::SteeringSupport;
use crate::supervisor::ids::{ClientId, GenId, Slot};
use crate::supervisor::machine::{Action, Event, Input, Observe, SiteMachine};
use crate::supervisor::slots;
use crate::sys::spawn::SandboxPlan;

/// A worker process.
#[derive(Debug)]
pub(super) struct Worker {
    pub pidref: PidRef,
    /// Adopted after an agent restart: not our child (its exit is seen through its pidfd
    /// alone, and cannot be waited for).
    pub adopted: bool,
    /// Its pidfd's registration.
    pub token: u64,
    /// Its own cgroup leaf: fresh for this process, or that of the slot's last process when
    /// it crashed and left it empty (`Agent::reusable_leaves`).
    pub cgroup: Option<PathBuf>,
    /// Whether its leaf may hold the slot's next process once this one has crashed: a leaf
    /// this agent made, and whose tree it did not kill (`cgroup.kill` on 6.18 kills every
    /// process later cloned into the cgroup). Not for an adopted worker: what an earlier
    /// agent did to its leaf is not known.
    pub leaf_reusable: bool,
    pub started_wall: SystemTime,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`), for the record of
    /// live workers; `None` if it could not be read (it exited at once).
    pub start_time: Option<u64>,
}

/// A signal a site's machine asked for, not sent yet (`Agent::send_signals`).
#[derive(Debug)]
pub(super) struct SignalToSend {
    site: SiteName,
    generation: GenId,
    slot: Slot,
    /// The worker's pid and start when it was asked for: the same process (a slot's next
    /// process may have the same pid, not also the same start).
    process: (i32, SystemTime),
    signal: config::Signal,
}

/// A generation's kernel side.
#[derive(Debug)]
pub(super) struct GenIo {
    /// The agent's copies of the listeners passed to this generation's workers.
    pub listeners: Vec<Listener>,
    pub workers: HashMap<Slot, Worker>,
    /// The ready probe under way (`tcp`, `http`).
    pub probe: Option<generations::Probe>,
    /// The warm-up under way.
    pub warmup: Option<super::warmup::Run>,
    /// The Landlock ruleset of its workers, built by the agent at the first start and
    /// enforced by every later start of the generation, restarts after a crash included
    /// (`Agent::generation_ruleset`).
    pub ruleset: Option<KeptRuleset>,
}

/// A generation's Landlock ruleset, with what it was built from: another plan (a reload
/// replaced it) or another root (the site's root replaced) builds another.
#[derive(Debug)]
pub(super) struct KeptRuleset {
    pub plan: Arc<SandboxPlan>,
    pub root: Option<crate::sandbox::RootId>,
    pub ruleset: Arc<OwnedFd>,
}

/// A site's kernel side.
#[derive(Debug)]
pub(super) struct SiteIo {
    pub gens: BTreeMap<GenId, GenIo>,
    /// Per listener (by index): the eBPF program steering its reuseport group, if any.
    pub steering: Vec<Option<crate::steering::Steering>>,
    pub log: SiteLog,
    /// `logs -f` connections.
    pub followers: Vec<u64>,
    /// `remove` connections, answered when the site is dropped.
    pub removers: Vec<u64>,
    /// Configured limits this host cannot enforce.
    pub not_enforced: Vec<&'static str>,
    /// The sandbox, prepared at the first spawn (see `exec.rs`).
    pub sandbox: Option<crate::sandbox::Prepared>,
    /// The health check under way.
    pub health: Option<super::generations::Probe>,
    /// The text of the site's file its machine was configured from (for the record: a
    /// new agent that adopts the workers tells from it whether the file changed since).
    pub config_text: Option<String>,
    /// The socket its workers write their output to (`output.rs`), from the first spawn.
    pub output: Option<super::output::SiteOutput>,
}

/// A running site.
#[derive(Debug)]
pub(super) struct Site {
    pub machine: SiteMachine,
    pub io: SiteIo,
}

impl Site {
    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        self.machine.config()
    }

    /// The serving generation's kernel side.
    pub fn cur_io(&self) -> &GenIo {
        self.io
            .gens
            .get(&self.machine.serving())
            .expect("the serving generation exists while the site does")
    }
}

/// What a site machine may look at: the kernel and the file system.
struct World<'a> {
    io: &'a SiteIo,
    serving: GenId,
    steering: &'a SteeringSupport,
    /// Cgroups not yet removed (the graveyard), and the site's cgroup.
    graveyard: Option<&'a crate::cgroup::Graveyard>,
    site_dir: Option<PathBuf>,
    /// The cgroup leaves of the site's zygotes, by generation.
    zygote_leaves: Vec<(GenId, PathBuf)>,
    /// Whether the workers' leaves have the memory controller.
    memory: bool,
}

impl Observe for World<'_> {
    fn resolve_release(
        &self,
        site: &SiteConfig,
        asked: Option<&std::path::Path>,
    ) -> Result<Option<PathBuf>, String> {
        match (asked, &site.release) {
            (Some(dir), _) => config::resolve_release(dir).map(Some),
            (None, Some(link)) => config::resolve_release(link).map(Some),
            (None, None) => Ok(None),
        }
    }

    fn memory_measurable(&self) -> bool {
        self.memory
    }

    fn measured_memory(&self, generation: GenId, slots: &[Slot]) -> Option<u64> {
        let g = self.io.gens.get(&generation)?;
        slots
            .iter()
            .filter_map(|s| g.workers.get(s))
            .filter_map(|w| w.cgroup.as_deref())
            .filter_map(crate::cgroup::measured_memory)
            .max()
    }

    fn zygote_memory(&self, generation: GenId) -> Option<u64> {
        let (_, leaf) = self.zygote_leaves.iter().find(|(g, _)| *g == generation)?;
        crate::cgroup::memory_current(leaf)
    }

    fn queues_empty(&self, old: GenId, new: GenId) -> bool {
        generations::queues_empty(self.io, old, new)
    }

    fn load(&self, generation: GenId) -> crate::supervisor::load::Counters {
        let queued = self.io.gens.get(&generation).and_then(|g| {
            g.listeners
                .iter()
                .filter_map(Listener::queued)
                .reduce(u32::saturating_add)
        });
        let (cpu_usec, cpu_stall_usec, memory_events) = match &self.site_dir {
            Some(site) => crate::cgroup::load_counters(&site.join(format!("gen-{}", generation.0))),
            None => (None, None, None),
        };
        crate::supervisor::load::Counters {
            queued,
            cpu_usec,
            cpu_stall_usec,
            memory_events,
        }
    }

    fn probe_alone(&self) -> Result<(), String> {
        generations::probe_alone(self.io, self.serving, self.steering)
    }

    fn leftovers(&self, generation: GenId) -> bool {
        let Some(site) = &self.site_dir else {
            return false;
        };
        let dir = site.join(format!("gen-{}", generation.0));
        self.graveyard.is_some_and(|g| g.holds_below(&dir))
    }
}

impl Agent {
    /// A stopped site from its configuration: its listeners bound, its log open, its
    /// limits written, its release resolved.
    pub(super) fn make_site(&mut self, config: SiteConfig) -> Result<Site, AgentError> {
        let mut listeners = Vec::new();
        for spec in config.agent_listeners() {
            let l = Listener::bind(spec, config.uid, config.gid).map_err(|e| {
                setup_err(format!("set up the listeners of site {}", config.name), e)
            })?;
            listeners.push(l);
        }
        let mut log = SiteLog::open(
            &self.config.state_dir.join("logs"),
            config.name.as_str(),
            config.logs,
            Some(config.gid),
        )
        .map_err(|e| setup_err(format!("open the log of site {}", config.name), e))?;
        self.repair_log(&config.name, &mut log);
        let not_enforced = self.apply_site_limits(&config);
        let release = match &config.release {
            Some(link) => Some(config::resolve_release(link).map_err(|e| {
                setup_err(
                    format!("resolve the release of site {}", config.name),
                    std::io::Error::new(std::io::ErrorKind::NotFound, e),
                )
            })?),
            None => None,
        };
        let previous = generations::read_previous_release(&self.config.state_dir, &config.name);
        let steering =
            generations::attach_steering(&self.steering_support, &config.name, &listeners);
        let name = config.name.clone();
        let config_file = config.file.clone();
        let (machine, actions) = SiteMachine::new(config, release, previous, Instant::now());
        for a in actions {
            if let Action::Log(e) = a {
                render::log(&name, &e);
            }
        }
        let first = machine.serving();
        Ok(Site {
            machine,
            io: SiteIo {
                gens: BTreeMap::from([(first, generations::new_generation(listeners))]),
                steering,
                log,
                followers: Vec::new(),
                removers: Vec::new(),
                not_enforced,
                sandbox: None,
                health: None,
                output: None,
                config_text: std::fs::read_to_string(&config_file).ok(),
            },
        })
    }

    /// A site whose workers an earlier agent left running (`recovery.rs`): its machine
    /// built from the record, its listeners taken back from its workers, steering attached
    /// to them again, each adopted worker's pidfd watched. The machine's first actions are
    /// carried out once the agent runs. Fails only where a fresh site would (its log);
    /// the adopted workers are stopped then.
    pub(super) fn adopt_site(
        &mut self,
        config: &SiteConfig,
        adoption: super::recovery::Adoption,
    ) -> Result<Site, AgentError> {
        let super::recovery::Adoption {
            machine,
            actions,
            listeners,
            workers,
            changed,
            config_text,
            steering: steering_ids,
        } = adoption;
        let name = config.name.clone();
        let mut log = match SiteLog::open(
            &self.config.state_dir.join("logs"),
            name.as_str(),
            machine.config().logs,
            Some(machine.config().gid),
        ) {
            Ok(l) => l,
            Err(e) => {
                super::recovery::stop_adopted(config, workers, self.cgroups.as_ref());
                return Err(setup_err(format!("open the log of site {name}"), e));
            }
        };
        self.repair_log(&name, &mut log);
        let opened = log.opened();
        let not_enforced = self.apply_site_limits(machine.config());
        let steering =
            generations::recover_steering(&self.steering_support, &name, &listeners, &steering_ids);
        let serving = machine.serving();
        let mut gens: BTreeMap<GenId, GenIo> = machine
            .generations()
            .map(|g| (g.id, generations::new_generation(Vec::new())))
            .collect();
        if let Some(cur) = gens.get_mut(&serving) {
            cur.listeners = listeners;
        }
        for (g, alive) in workers {
            for a in alive {
                let adopted = machine
                    .generation(g)
                    .and_then(|x| x.slots.slots.get(&a.slot))
                    .is_some_and(|s| s.pid == Some(a.pidref.pid()));
                let Some(gen_io) = gens.get_mut(&g).filter(|_| adopted) else {
                    // Recorded but not in the machine's record: nobody would watch it.
                    warn!(site = %name, gen = g.0, worker = %a.slot, pid = a.pidref.pid(), "a previous agent's worker is not in its site's record: killing it");
                    let _ = a.pidref.signal(libc::SIGKILL);
                    continue;
                };
                let id = crate::supervisor::ids::WorkerId {
                    generation: g,
                    slot: a.slot,
                };
                let token = match self.reg.arm(
                    a.pidref.as_fd(),
                    super::reactor::Interest::Readable,
                    super::Source::Pidfd(name.clone(), id),
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        error!(site = %name, gen = g.0, worker = %a.slot, pid = a.pidref.pid(), "failed to watch an adopted worker's pidfd ({e}): killing it");
                        let _ = a.pidref.signal(libc::SIGKILL);
                        continue;
                    }
                };
                self.pids.insert(a.pidref.pid(), (name.clone(), id));
                let pipe = super::holder::pipe_name(&name, g, a.slot, a.pidref.pid());
                match self.take_held_pipe(&pipe) {
                    Some(fd) => {
                        self.settle_pipe(&name, &pipe, fd.as_fd(), opened);
                        self.read_pipe(
                            &name,
                            crate::logs::Writer::Worker(a.slot.0),
                            a.pidref.pid(),
                            crate::logs::StdStream::Stdout,
                            fd,
                            Some(pipe),
                        );
                    }
                    // The holder lets a pipe go once its worker has exited: that exit is
                    // what the log says next.
                    None if a.pidref.has_exited() => {}
                    None => {
                        warn!(site = %name, gen = g.0, worker = %a.slot, pid = a.pidref.pid(), "the output of an adopted worker is lost (the fd holder did not hold its pipe): it dies of SIGPIPE at its next write, and is restarted")
                    }
                }
                // Its stderr pipe, if it has one of its own (a zygote's workers, and those
                // of an agent from before the streams were told apart, have not).
                let errors = super::holder::err_pipe_name(&name, g, a.slot, a.pidref.pid());
                if let Some(fd) = self.take_held_pipe(&errors) {
                    self.settle_pipe(&name, &errors, fd.as_fd(), opened);
                    self.read_pipe(
                        &name,
                        crate::logs::Writer::Worker(a.slot.0),
                        a.pidref.pid(),
                        crate::logs::StdStream::Stderr,
                        fd,
                        Some(errors),
                    );
                }
                // After `hatchery upgrade` (same pid) the workers are still our children:
                // their exits are reaped, and their status known.
                let child = u32::try_from(a.parent).is_ok_and(|p| p == std::process::id());
                gen_io.workers.insert(
                    a.slot,
                    Worker {
                        adopted: !child,
                        token,
                        cgroup: a.record.cgroup.clone(),
                        leaf_reusable: false,
                        started_wall: super::recovery::started_wall(a.record.start_time),
                        start_time: Some(a.record.start_time),
                        pidref: a.pidref,
                    },
                );
            }
        }
        self.adopted.insert(name.clone(), (actions, changed));
        self.unsaved(Unsaved::Changes);
        Ok(Site {
            machine,
            io: SiteIo {
                gens,
                steering,
                log,
                followers: Vec::new(),
                removers: Vec::new(),
                not_enforced,
                sandbox: None,
                health: None,
                output: None,
                config_text,
            },
        })
    }

    /// Writes the site's cgroup limits; returns (and logs) those not enforced here.
    pub(super) fn apply_site_limits(&self, config: &SiteConfig) -> Vec<&'static str> {
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
                    error!(site = %config.name, "failed to apply cgroup limits: {e}: {}", super::error_chain(&e));
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

    /// Watches the listeners of `name`'s generation `g` (every generation's, without one)
    /// for a shutdown (`shut_watch`).
    pub(super) fn watch_listeners(&mut self, name: &SiteName, g: Option<GenId>) {
        let (Some(watch), Some(site)) = (&mut self.shut_watch, self.sites.get(name)) else {
            return;
        };
        for (id, io) in site
            .io
            .gens
            .iter()
            .filter(|(id, _)| g.is_none_or(|g| g == **id))
        {
            for l in &io.listeners {
                let watched = rustix::net::sockopt::socket_cookie(&l.fd)
                    .map_err(std::io::Error::from)
                    .and_then(|cookie| {
                        let what = super::shut_watch::Watched {
                            site: name.clone(),
                            generation: *id,
                            listener: format!("{} ({})", l.spec.name, l.spec.addr),
                            cookie,
                        };
                        watch.watch(l.fd.as_fd(), what)
                    });
                if let Err(e) = watched {
                    warn!(site = %name, gen = id.0, "failed to watch listener {} for a shutdown: {e}", l.spec.name);
                }
            }
        }
    }

    /// Stops watching the listeners of `name`'s generation `g` (every generation's,
    /// without one), before they are closed.
    pub(super) fn forget_listeners(&mut self, name: &SiteName, g: Option<GenId>) {
        let (Some(watch), Some(site)) = (&mut self.shut_watch, self.sites.get(name)) else {
            return;
        };
        let fds = site
            .io
            .gens
            .iter()
            .filter(|(id, _)| g.is_none_or(|g| g == **id))
            .flat_map(|(_, io)| io.listeners.iter().map(|l| l.fd.as_fd()));
        watch.forget(fds);
    }

    /// Listeners were shut down (`shut_watch`): each is told to its site's machine, if it
    /// is still one of the generation's.
    pub(super) fn on_listeners_shut(&mut self) {
        let shut = self
            .shut_watch
            .as_mut()
            .map(super::shut_watch::ShutWatch::shut)
            .unwrap_or_default();
        for w in shut {
            let still = self
                .sites
                .get(&w.site)
                .and_then(|s| s.io.gens.get(&w.generation))
                .is_some_and(|io| {
                    io.listeners.iter().any(|l| {
                        rustix::net::sockopt::socket_cookie(&l.fd).is_ok_and(|c| c == w.cookie)
                            && l.shut_down()
                    })
                });
            if still {
                self.feed(
                    &w.site,
                    Input::ListenerShut {
                        generation: w.generation,
                        listener: w.listener,
                    },
                );
            }
        }
    }

    /// Gives site `name`'s machine `input` and carries out what it says, in the order it
    /// says it. A result the machine waits for (a spawn's pid, listeners bound, the
    /// steering flipped, a probe accepted) is fed back at once, and the actions it brings
    /// are carried out after the rest (first in, first out: the order the simulation in
    /// `supervisor::machine::sim` checks the machine's invariants in).
    pub(super) fn feed(&mut self, name: &SiteName, input: Input) {
        self.feed_as(name, input, Unsaved::Changes);
    }

    /// [`Agent::feed`] of an input that changes the record of live workers by `change`
    /// (beyond what its actions change: a worker started is a change of its own).
    pub(super) fn feed_as(&mut self, name: &SiteName, input: Input, change: Unsaved) {
        let actions = self.handle(name, input);
        self.carry_out_as(name, actions, change);
    }

    /// Carries out actions of site `name`'s machine, in order, feeding back the results
    /// some have (see [`Agent::feed`]).
    pub(super) fn carry_out(&mut self, name: &SiteName, actions: Vec<Action>) {
        self.carry_out_as(name, actions, Unsaved::Changes);
    }

    fn carry_out_as(&mut self, name: &SiteName, actions: Vec<Action>, change: Unsaved) {
        self.unsaved(change);
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            if let Action::Spawn { generation, slot } = action {
                if !self.forks_from_zygote(name, generation) {
                    // This start and those right after it are made together, and their
                    // answers given in order: as if one by one, since a start does not
                    // feed the machine, and what the answers bring comes after them.
                    let mut asked = vec![(name.clone(), generation, slot)];
                    while let Some(&Action::Spawn { generation, slot }) = queue.front() {
                        if self.forks_from_zygote(name, generation) {
                            break;
                        }
                        asked.push((name.clone(), generation, slot));
                        queue.pop_front();
                    }
                    if let Some(deferred) = &mut self.deferred_spawns {
                        deferred.extend(asked);
                        continue;
                    }
                    let inputs = self.spawn_all(&asked);
                    for ((_, generation, _), input) in asked.iter().zip(inputs) {
                        let generation = *generation;
                        queue.extend(self.handle(name, Input::Worker { generation, input }));
                    }
                    continue;
                }
            }
            if let Some(result) = self.execute(name, action) {
                queue.extend(self.handle(name, result));
            }
        }
        self.watch_pressure(name);
        if !self.spares.is_empty() {
            self.rehome_spares(name);
        }
    }

    /// Sends up to `max` of the signals the machines asked for, first asked first sent;
    /// one meant for a worker that exited meanwhile is dropped (its slot may hold another
    /// process by now).
    pub(super) fn send_signals(&mut self, max: usize) {
        for _ in 0..max {
            let Some(p) = self.signals_to_send.pop_front() else {
                return;
            };
            let Some(w) = self
                .worker(&p.site, p.generation, p.slot)
                .filter(|w| (w.pidref.pid(), w.started_wall) == p.process)
            else {
                continue;
            };
            if let Err(e) = w.pidref.signal(p.signal.0) {
                error!(site = %p.site, worker = %p.slot, pid = w.pidref.pid(), "failed to send {}: {e}", p.signal.name());
            }
        }
    }

    /// Starts the workers whose start was put off (`Agent::deferred_spawns`) together,
    /// gives each site's machine its answers, and puts no more off. A start asked for in a
    /// generation that is gone meanwhile is answered as failed (it may be tried again).
    pub(super) fn start_deferred(&mut self) {
        self.start_deferred_spawns();
        // The exits of the turn that no start and no event told yet.
        self.tell_exits();
    }

    /// [`Agent::start_deferred`] but for the exits still to tell.
    fn start_deferred_spawns(&mut self) {
        let Some(asked) = self.deferred_spawns.take() else {
            return;
        };
        let (asked, gone): (Vec<_>, Vec<_>) = asked.into_iter().partition(|(name, g, _)| {
            self.sites
                .get(name)
                .is_some_and(|s| s.machine.generation(*g).is_some() && s.io.gens.contains_key(g))
        });
        for (name, generation, id) in gone {
            self.tell_exits();
            warn!(site = %name, gen = generation.0, worker = %id, "not started: its generation is gone");
            let error = "its generation is gone".to_string();
            let input = slots::Input::SpawnFailed {
                id,
                error,
                permanent: false,
            };
            self.feed(&name, Input::Worker { generation, input });
        }
        if asked.is_empty() {
            return;
        }
        let inputs = self.spawn_all(&asked);
        for ((name, generation, _), input) in asked.iter().zip(inputs) {
            let generation = *generation;
            self.feed(name, Input::Worker { generation, input });
        }
    }

    /// One input to site `name`'s machine (none once the site is gone).
    fn handle(&mut self, name: &SiteName, input: Input) -> Vec<Action> {
        let zygote_leaves = self.zygote_leaves(name);
        let Some(site) = self.sites.get_mut(name) else {
            return Vec::new();
        };
        let world = World {
            io: &site.io,
            serving: site.machine.serving(),
            steering: &self.steering_support,
            graveyard: self.graveyard.as_ref(),
            site_dir: self.cgroups.as_ref().map(|t| t.site_dir(name.as_str())),
            zygote_leaves,
            memory: self.cgroups.as_ref().is_some_and(CgroupTree::has_memory),
        };
        site.machine.handle(input, &world, Instant::now())
    }

    /// Feeds a client's request; a client left without its answer now waits for it (its
    /// connection is held, reads only notice a hang-up).
    pub(super) fn feed_request(&mut self, name: &SiteName, conn: u64, input: Input) {
        self.feed(name, input);
        let waiting = self.conns.get(&conn).is_some_and(|c| !c.done);
        if waiting {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.held = true;
            }
            self.arm_conn_read(conn);
        }
    }

    fn execute(&mut self, name: &SiteName, action: Action) -> Option<Input> {
        match action {
            Action::Spawn { generation, slot } => {
                // Only a zygote-mode generation's (`carry_out` starts the others itself,
                // several together); the answer comes on the zygote's link (`zygote.rs`).
                let input = self.fork_worker(name, generation, slot)?;
                Some(Input::Worker { generation, input })
            }
            Action::Signal {
                generation,
                slot,
                signal,
            } => {
                let w = self.worker(name, generation, slot)?;
                let process = (w.pidref.pid(), w.started_wall);
                self.signals_to_send.push_back(SignalToSend {
                    site: name.clone(),
                    generation,
                    slot,
                    process,
                    signal,
                });
                None
            }
            Action::KillTree { generation, slot } => {
                if let Some(w) = self
                    .sites
                    .get_mut(name)
                    .and_then(|s| s.io.gens.get_mut(&generation))
                    .and_then(|g| g.workers.get_mut(&slot))
                {
                    w.leaf_reusable = false;
                }
                let w = self.worker(name, generation, slot)?;
                warn!(site = %name, worker = %slot, pid = w.pidref.pid(), "stop timeout: killing the worker's process tree");
                let result = match (&self.cgroups, &w.cgroup) {
                    (Some(tree), Some(dir)) => tree.kill(dir).map_err(|e| e.to_string()),
                    _ => {
                        // Its group, and the worker itself, should it lead none (a
                        // zygote's fork need not: the group is then not found).
                        let group = w.pidref.signal_group(libc::SIGKILL);
                        let _ = w.pidref.signal(libc::SIGKILL);
                        group.map_err(|e| e.to_string())
                    }
                };
                if let Err(e) = result {
                    error!(site = %name, worker = %slot, "failed to kill: {e}; sending SIGKILL to the worker itself");
                    let _ = w.pidref.signal(libc::SIGKILL);
                }
                None
            }
            Action::BindListeners(generation) => {
                let site = self.sites.get_mut(name)?;
                let (uid, gid) = (site.config().uid, site.config().gid);
                let share_all = site.config().exclusive_deploys();
                let serving = site.machine.serving();
                let support = &self.steering_support;
                let result = generations::bind_beside(&site.io, serving, uid, gid, share_all).map(
                    |(listeners, anew)| {
                        // Those bound anew for listeners shut down left their group and its
                        // steering: they get steering of their own (none for unix ones, or
                        // where the kernel has none), which sends everything to them (no
                        // other socket is in their group).
                        for i in anew {
                            if let (Some(slot), Some(fresh)) =
                                (site.io.steering.get_mut(i), listeners.get(i))
                            {
                                let again = generations::attach_steering(
                                    support,
                                    name,
                                    std::slice::from_ref(fresh),
                                );
                                *slot = again.into_iter().next().flatten();
                            }
                        }
                        site.io
                            .gens
                            .insert(generation, generations::new_generation(listeners));
                    },
                );
                if result.is_ok() {
                    self.watch_listeners(name, Some(generation));
                }
                Some(Input::ListenersBound { generation, result })
            }
            Action::Steer(generation) => {
                let site = self.sites.get_mut(name)?;
                // A flip to the deploy's new generation is all or nothing (it is rolled
                // back if it fails); a steer back or an adopted site's steering, as much
                // as it can.
                let flip = site.machine.deploy().is_some_and(|d| d.to == generation);
                let (result, window) = generations::steer(&mut site.io, name, generation, flip);
                Some(Input::Steered {
                    generation,
                    result,
                    window: Some(window),
                })
            }
            Action::Probe(generation) => {
                let site = self.sites.get_mut(name)?;
                let serving = site.machine.serving();
                let http = site
                    .machine
                    .generation(generation)
                    .and_then(|g| g.config.ready_http.clone());
                let own = site.config().own_ports().first().copied();
                match generations::probe(
                    &mut site.io,
                    name,
                    generation,
                    serving,
                    http.as_ref(),
                    own,
                ) {
                    Probed::Waiting => None,
                    Probed::Accepted => Some(Input::ProbeAccepted(generation)),
                    Probed::Refused(answer) => Some(Input::ProbeRefused { generation, answer }),
                }
            }
            Action::Canary { generation, share } => {
                let site = self.sites.get_mut(name)?;
                let result = generations::canary(&mut site.io, name, generation, share);
                share.map(|_| Input::CanarySteered { generation, result })
            }
            Action::Health {
                generation,
                give_up,
            } => {
                let site = self.sites.get_mut(name)?;
                let policy = site.config().health.clone()?;
                super::health::check(&mut site.io, name, generation, &policy, give_up)
                    .map(Input::HealthChecked)
            }
            Action::WarmUp {
                generation,
                give_up,
            } => {
                let site = self.sites.get_mut(name)?;
                let requests = site.machine.generation(generation)?.config.warmup.clone();
                super::warmup::step(&mut site.io, name, generation, &requests, give_up)
                    .map(|report| Input::WarmedUp { generation, report })
            }
            Action::EndProbe(generation) => {
                let site = self.sites.get_mut(name)?;
                generations::end_probe(&mut site.io, name, generation);
                None
            }
            Action::Retire(generation) => {
                self.retire_generation(name, generation);
                None
            }
            Action::StartZygote(generation) => self.start_zygote(name, generation),
            Action::StopZygote(generation) => {
                self.stop_zygote(name, generation);
                None
            }
            Action::RecordPreviousRelease(release) => {
                generations::write_previous_release(&self.config.state_dir, name, &release);
                None
            }
            Action::ApplyLimits => {
                self.apply_limits(name);
                None
            }
            Action::Progress { clients, event } => {
                let line = Reply::Event(render::event(name, &event));
                for c in clients {
                    self.send(c.0, &line);
                }
                None
            }
            Action::Reply { client, outcome } => {
                self.finish(client.0, &render::outcome(name, &outcome));
                None
            }
            Action::Log(event) => {
                // Its line after the exits handled before it.
                if render::logs_a_line(&event) {
                    self.tell_exits();
                }
                render::log(name, &event);
                match event {
                    Event::Deployed { .. } => self.counters.site(name.as_str()).deploys += 1,
                    Event::RolledBack { .. } => self.counters.site(name.as_str()).rollbacks += 1,
                    _ => {}
                }
                // In the site's log too, beside its workers' output, and in the history.
                self.emit_event(name, &event);
                None
            }
            Action::Dropped => {
                self.drop_site(name);
                None
            }
        }
    }

    fn worker(&self, name: &SiteName, g: GenId, slot: Slot) -> Option<&Worker> {
        self.sites.get(name)?.io.gens.get(&g)?.workers.get(&slot)
    }

    /// The site's limits changed: written to its cgroup and to every worker's leaf.
    fn apply_limits(&mut self, name: &SiteName) {
        let Some(config) = self.sites.get(name).map(|s| s.config().clone()) else {
            return;
        };
        let missing = self.apply_site_limits(&config);
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        site.io.not_enforced = missing;
        for w in site.io.gens.values().flat_map(|g| g.workers.values()) {
            if let Some(dir) = &w.cgroup {
                if let Err(e) = CgroupTree::apply_worker_limits(dir, &config.limits) {
                    warn!(site = %name, "failed to update worker limits: {e}");
                }
            }
        }
    }

    /// Forgets a generation whose last worker is gone: its listeners (the agent's
    /// copies) close and its cgroup is removed.
    fn retire_generation(&mut self, name: &SiteName, g: GenId) {
        self.detach_zygotes(name, Some(g));
        self.forget_listeners(name, Some(g));
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(gen_) = site.io.gens.remove(&g) else {
            return;
        };
        for w in gen_.workers.values() {
            self.reg.tokens.remove(&w.token);
        }
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            graveyard.bury(tree.site_dir(name.as_str()).join(format!("gen-{g}")));
        }
        debug!(site = %name, gen = g.0, "gen-{g} retired");
    }

    /// A removed site is stopped: its listeners and cgroups go, its `logs -f` clients are
    /// told.
    fn drop_site(&mut self, name: &SiteName) {
        self.detach_zygotes(name, None);
        self.forget_listeners(name, None);
        self.drop_output(name);
        let Some(site) = self.sites.remove(name) else {
            return;
        };
        self.not_loading.remove(name.as_str());
        for l in site.io.gens.values().flat_map(|g| &g.listeners) {
            l.unlink();
        }
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            let dir = tree.site_dir(name.as_str());
            for g in site.io.gens.keys() {
                graveyard.bury(dir.join(format!("gen-{g}")));
            }
            graveyard.bury(dir);
        }
        for c in site.io.followers {
            self.finish(c, &Reply::ok(&Done::new(name, "site removed")));
        }
        for c in site.io.removers {
            self.finish(c, &Reply::ok(&Done::new(name, "site removed")));
        }
        info!(site = %name, "site removed");
    }

    /// A connection is answered or gone: no site waits to tell it anything.
    pub(super) fn forget_conn(&mut self, conn: u64) {
        self.history.forget(conn);
        for site in self.sites.values_mut() {
            site.io.followers.retain(|c| *c != conn);
            site.io.removers.retain(|c| *c != conn);
            site.machine.forget_client(ClientId(conn));
        }
    }

    /// Whether a slot's worker was asked to stop (its exit is no crash).
    pub(super) fn stopping(&self, name: &SiteName, g: GenId, slot: Slot) -> bool {
        self.sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .and_then(|x| x.slots.slots.get(&slot))
            .is_some_and(|s| matches!(s.phase, slots::Phase::Stopping { .. }))
    }
}

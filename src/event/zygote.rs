//! Zygote mode in the event loop: a generation's zygote process (started, watched,
//! stopped), and its workers, forked on request and made the agent's own. The policy
//! (when a zygote starts, stops, or is replaced; which spawns wait for it) is the site
//! machine's (`supervisor::machine::zygote`); the protocol is `crate::zygote`'s.
//!
//! - **Start** ([`Action::StartZygote`]): the site's `command` is launched like a worker
//!   (same sandbox, listeners at fds 3.., `NOTIFY_SOCKET`, two output pipes, stdout's and
//!   stderr's, whose lines are logged as `zygote[pid]`) in its own cgroup leaf `gen-<N>/zygote` (counted in the
//!   site's budget, with no per-worker limit), with its end of a new link at the next fd,
//!   named by `HATCHERY_ZYGOTE_FD`. Its `READY 2` (or `READY 1`) on the link is
//!   [`Input::ZygoteReady`]; its exit (pidfd), or a failure to start it, is
//!   [`Input::ZygoteExited`].
//! - **Spawn** of a zygote-mode generation ([`Action::Spawn`]): a `FORK` is sent with the
//!   write ends of the worker's new output pipes, stdout's and stderr's (one for both to
//!   a zygote that said `READY 1`), and the loop goes on; the answer comes on
//!   the link. A `FORKED` worker (checked to be the agent's own child) gets a fresh leaf
//!   `gen-<N>/w-<K>` with the per-worker limits, is moved into it, and only then told to
//!   proceed: no application code runs outside its leaf. A worker the zygote forked
//!   ahead and named in a `SPARE` (version 3) is moved ahead, when the `SPARE` comes,
//!   into the leaf of the slot it is expected to get ([`Agent::take_spare`]): the oldest
//!   unanswered `FORK`'s, else the lowest slot the generation does not use. A `FORKED`
//!   naming it for that slot then only lets it go; for another slot it is moved again
//!   and its first leaf retired. A move writes `cgroup.procs`, which on a cgroup2 mount
//!   without `favordynmods` waits for an RCU grace period (5 to 20 ms): the spare's move
//!   takes that wait off the path from the request to the ready worker. From there it is a worker like
//!   an exec one (pidfd, output, notifications, exit, OOM). `FAILED`, or no answer within
//!   the generation's `ready.timeout`, fails the spawn (as a crash); a zygote that does
//!   not answer in time is killed (it is replaced as one that died).
//! - **Stop** ([`Action::StopZygote`]): its stop signal (`stop.signal`), and `SIGKILL`
//!   (its leaf's `cgroup.kill`) after `stop.timeout`. A zygote outlives its generation
//!   (retired, or its site removed) until it has exited; only then is its leaf removed.
//! - A zygote that breaks the protocol is killed. Its workers are not its children and
//!   live on whatever happens to it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::reactor::Interest;
use super::{Agent, Source};
use crate::cgroup::CgroupTree;
use crate::config::SiteName;
use crate::logs::{StdStream, Writer};
use crate::process::PidRef;
use crate::sandbox::SandboxError;
use crate::spawn::SpawnFailure;
use crate::supervisor::ids::{GenId, Slot, WorkerId};
use crate::supervisor::machine::Input;
use crate::supervisor::slots::{ExitReason, Input as SlotInput};
use crate::zygote::{Answer, Forked, Reply, ZygoteError, ZygoteLink};

/// A zygote process.
#[derive(Debug)]
pub(super) struct Zygote {
    pub site: SiteName,
    pub generation: GenId,
    pub pidref: PidRef,
    /// Its pidfd's registration.
    pid_token: u64,
    link: ZygoteLink,
    /// The link's registration; `None` once the link reached its end.
    link_token: Option<u64>,
    /// Its cgroup leaf.
    pub cgroup: Option<PathBuf>,
    /// It said `READY`.
    ready: bool,
    /// The protocol version it said (2 and later take a `FORK`'s stderr as a second fd).
    version: u32,
    /// `FORK`s not answered yet, by request id.
    pending: BTreeMap<u64, PendingFork>,
    /// Asked to stop: the next signal of its stop sequence (or `SIGKILL` after the last)
    /// at this time if it still runs.
    kill_at: Option<Instant>,
    /// Asked to stop: its stop sequence, and the step sent last (0: the first signal).
    stop_step: Option<(crate::config::StopPolicy, usize)>,
    /// Its generation is gone (retired, or its site removed): only its exit is awaited.
    detached: bool,
    /// Killed: only its exit is awaited (no deadline applies any more).
    killed: bool,
}

/// The read ends of a worker's own output pipes: stdout's, and stderr's unless both
/// streams share the first.
type WorkerPipes = (OwnedFd, Option<OwnedFd>);

/// A `FORK` sent, waiting for its answer.
#[derive(Debug)]
struct PendingFork {
    slot: Slot,
    /// The read ends of the worker's output pipes (stdout's, and stderr's if the zygote
    /// takes one), if it has pipes of its own.
    output: Option<WorkerPipes>,
    /// When it was asked for.
    asked: Instant,
    /// When the zygote is given up on if it has not answered.
    deadline: Instant,
}

/// A worker a zygote forked ahead and named in a `SPARE`, moved ahead into a leaf.
#[derive(Debug)]
pub(super) struct SpareLeaf {
    /// The zygote that named it (its number in `Agent::zygotes`).
    pub zygote: u64,
    /// The slot its leaf is for.
    pub slot: Slot,
    /// Its leaf, `gen-<N>/w-<slot>`, with `limits` written.
    pub leaf: PathBuf,
    limits: crate::config::Limits,
    /// A move to another slot's leaf failed: it is not tried again (a `FORKED` for
    /// another slot still moves it).
    stuck: bool,
    /// Its pidfd: a spare may be reaped by someone else (an intermediate child its zygote
    /// keeps), so its pid is only trusted while this says it runs.
    pidfd: OwnedFd,
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).map_or(true, |n| n > 0)
}

/// Spares a zygote may have in leaves at once; a `SPARE` beyond is not moved ahead (its
/// worker is moved when a `FORKED` names it), so a zygote cannot make the agent create
/// leaves without end.
const MOST_SPARES: usize = 4;

/// What was read on a ready zygote's link, in order.
enum Got {
    /// An answer to a `FORK` (for `slot`), with the output pipes the `FORK` sent.
    Answer(Slot, Answer, Option<WorkerPipes>),
    /// A `SPARE`, and the slot of the oldest `FORK` not answered when it came.
    Spare(i32, Option<Slot>),
}

/// How long a zygote asked to stop has, when its configuration cannot be found any more.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Agent {
    /// The live zygote of generation `g` of site `name`, by its number.
    fn zygote_of(&self, name: &SiteName, g: GenId) -> Option<u64> {
        self.zygotes
            .iter()
            .find(|(_, z)| !z.detached && z.generation == g && &z.site == name)
            .map(|(id, _)| *id)
    }

    /// The zygote of generation `g` of site `name`, for `status`.
    pub(super) fn zygote_process(&self, name: &SiteName, g: GenId) -> Option<&Zygote> {
        self.zygote_of(name, g).and_then(|id| self.zygotes.get(&id))
    }

    /// The cgroup leaves of site `name`'s zygotes, by generation.
    pub(super) fn zygote_leaves(&self, name: &SiteName) -> Vec<(GenId, PathBuf)> {
        self.zygotes
            .values()
            .filter(|z| !z.detached && &z.site == name)
            .filter_map(|z| Some((z.generation, z.cgroup.clone()?)))
            .collect()
    }

    /// Whether spawns of generation `g` of site `name` are forks from its zygote.
    pub(super) fn forks_from_zygote(&self, name: &SiteName, g: GenId) -> bool {
        self.sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .is_some_and(|x| x.zygote.is_some() && x.config.mode == crate::config::SiteMode::Zygote)
    }

    /// Starts generation `g`'s zygote; on failure, the input saying it ended.
    pub(super) fn start_zygote(&mut self, name: &SiteName, g: GenId) -> Option<Input> {
        self.reap_held();
        if let Some(old) = self.zygote_of(name, g) {
            // The machine starts at most one per generation; a process it forgot about
            // (it was told the zygote ended) must not serve the new one's forks.
            warn!(site = %name, gen = g.0, "a zygote of gen-{g} is still running: detached, and killed");
            self.detach_zygote(old, true);
        }
        match self.try_start_zygote(name, g) {
            Ok(pid) => {
                info!(site = %name, gen = g.0, pid, "zygote started");
                None
            }
            Err(failure) => {
                let reason = format!("failed to start: {}", failure.describe());
                error!(site = %name, gen = g.0, "zygote {reason}");
                Some(Input::ZygoteExited {
                    generation: g,
                    reason,
                })
            }
        }
    }

    fn try_start_zygote(&mut self, name: &SiteName, g: GenId) -> Result<i32, SpawnFailure> {
        let notify_path = self.notify.path.clone();
        let plan = self.site_sandbox(name)?;
        let site = self
            .sites
            .get(name)
            .expect("a zygote is started in a site that exists");
        let config = &site
            .machine
            .generation(g)
            .expect("a zygote is started in a generation that exists")
            .config;
        let listeners = &site
            .io
            .gens
            .get(&g)
            .expect("a generation's listeners are bound before it starts")
            .listeners;
        if let Some(root) = &config.sandbox.root {
            crate::sandbox::check_root_path(root).map_err(SandboxError::Root)?;
        }
        let link_fd = 3 + listeners.len();
        let mut image = crate::spawn::zygote_image(config, listeners, &notify_path, g.0, link_fd)?;
        image.set_sandbox(plan);
        let (link, theirs) = ZygoteLink::pair().map_err(SpawnFailure::Pipe)?;
        let (pipe_r, pipe_w) = super::workers::output_pipe()?;
        let (err_r, err_w) = super::workers::output_pipe()?;
        let mut fds: Vec<BorrowedFd<'_>> =
            vec![self.devnull.as_fd(), pipe_w.as_fd(), err_w.as_fd()];
        fds.extend(listeners.iter().map(|l| l.fd.as_fd()));
        fds.push(theirs.as_fd());
        let leaf = match (&self.cgroups, &mut self.graveyard) {
            (Some(tree), Some(graveyard)) => Some(crate::spawn::Leaf {
                tree,
                graveyard,
                site: name.as_str(),
                generation: g.0,
                name: "zygote".to_string(),
                limits: None,
            }),
            _ => None,
        };
        let spawned = crate::spawn::launch(&mut image, &fds, leaf, &mut self.fd_block);
        drop(fds);
        drop(pipe_w);
        drop(err_w);
        drop(theirs);
        let spawned = spawned?;
        let pid = spawned.pid;
        let pidref = PidRef::new(pid, spawned.pidfd);
        self.next_zygote += 1;
        let id = self.next_zygote;
        let armed = self
            .reg
            .arm(pidref.as_fd(), Interest::Readable, Source::ZygoteExit(id))
            .and_then(|pid_token| {
                self.reg
                    .arm(link.fd(), Interest::Readable, Source::ZygoteLink(id))
                    .map(|link_token| (pid_token, link_token))
            });
        let (pid_token, link_token) = match armed {
            Ok(t) => t,
            Err(e) => {
                // Its exit is reaped as an orphan's; its leaf goes with the generation.
                let _ = pidref.signal(libc::SIGKILL);
                return Err(SpawnFailure::Watch(e));
            }
        };
        self.read_pipe(name, Writer::Zygote, pid, StdStream::Stdout, pipe_r, None);
        self.read_pipe(name, Writer::Zygote, pid, StdStream::Stderr, err_r, None);
        self.zygote_pids.insert(pid, id);
        self.zygotes.insert(
            id,
            Zygote {
                site: name.clone(),
                generation: g,
                pidref,
                pid_token,
                link,
                link_token: Some(link_token),
                cgroup: spawned.leaf,
                ready: false,
                version: 0,
                pending: BTreeMap::new(),
                kill_at: None,
                stop_step: None,
                detached: false,
                killed: false,
            },
        );
        Ok(pid)
    }

    /// Asks generation `g`'s zygote for the worker of `slot`. The answer comes later on
    /// the link ([`Agent::on_zygote_link`]); a request that cannot even be made fails the
    /// spawn now.
    pub(super) fn fork_worker(
        &mut self,
        name: &SiteName,
        g: GenId,
        slot: Slot,
    ) -> Option<SlotInput> {
        self.reap_held();
        let failed = |error: String| {
            error!(site = %name, gen = g.0, worker = %slot, "failed to spawn: {error}");
            Some(SlotInput::SpawnFailed {
                id: slot,
                error,
                permanent: false,
            })
        };
        let timeout = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .map_or(DEFAULT_STOP_TIMEOUT, |x| x.config.ready.timeout);
        let socket = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .is_some_and(|x| x.config.output == crate::config::OutputMode::Socket);
        if socket {
            if let Err(e) = self.ensure_output(name) {
                return failed(format!("failed to create the site's output socket: {e}"));
            }
        }
        // A zygote of protocol version 2 takes the worker's stderr apart from its stdout.
        let apart = self
            .zygote_of(name, g)
            .and_then(|id| self.zygotes.get(&id))
            .is_some_and(|z| z.version >= 2);
        // The site's output sockets, or pipes of the worker's own.
        let pipes = if socket {
            None
        } else {
            let out = super::workers::output_pipe();
            let err = if apart {
                super::workers::output_pipe().map(Some)
            } else {
                Ok(None)
            };
            match (out, err) {
                (Ok(o), Ok(e)) => Some((o, e)),
                (Err(e), _) | (_, Err(e)) => {
                    return failed(format!("failed to create the output pipe: {e}"));
                }
            }
        };
        let Some(z) = self
            .zygote_of(name, g)
            .and_then(|id| self.zygotes.get_mut(&id))
            .filter(|z| z.ready)
        else {
            return failed("the generation's zygote is not ready".into());
        };
        let ends = match &pipes {
            Some(((_, out), err)) => Some((out.as_fd(), err.as_ref().map(|(_, w)| w.as_fd()))),
            None => self
                .sites
                .get(name)
                .and_then(|s| s.io.output.as_ref())
                .map(|o| (o.socket.sender(), apart.then(|| o.stderr_sender()))),
        };
        let Some((output, errors)) = ends else {
            return failed("the site has no output socket".into());
        };
        match z.link.request_fork(slot.0, output, errors) {
            Ok(request) => {
                let now = Instant::now();
                z.pending.insert(
                    request,
                    PendingFork {
                        slot,
                        output: pipes.map(|((out, _), err)| (out, err.map(|(r, _)| r))),
                        asked: now,
                        deadline: now + timeout,
                    },
                );
                None
            }
            Err(e) => failed(format!("the zygote cannot be asked to fork: {e}")),
        }
    }

    /// The zygote's link is readable: its `READY`, answers to `FORK`s, or its end.
    pub(super) fn on_zygote_link(&mut self, id: u64) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        z.link_token = None;
        let (site, g) = (z.site.clone(), z.generation);
        if !z.ready {
            match z.link.read_ready() {
                Ok(Some(version)) => {
                    z.ready = true;
                    z.version = version;
                    debug!(site = %site, gen = g.0, pid = z.pidref.pid(), "zygote ready");
                    let detached = z.detached;
                    self.rearm_link(id);
                    if !detached {
                        self.feed(&site, Input::ZygoteReady(g));
                    }
                }
                Ok(None) => self.rearm_link(id),
                Err(ZygoteError::Closed) => {
                    debug!(site = %site, gen = g.0, "the zygote closed its link before READY");
                }
                Err(e) => self.zygote_broke(id, &e),
            }
            return;
        }
        let zpid = self.zygotes.get(&id).map_or(0, |z| z.pidref.pid());
        let (answers, end) = self.drain_answers(id);
        if let Some(e) = &end {
            if !matches!(e, ZygoteError::Closed) {
                self.zygote_broke(id, e);
            }
        } else {
            self.rearm_link(id);
        }
        for got in answers {
            match got {
                Got::Answer(slot, answer, output) => {
                    self.take_forked(id, zpid, &site, g, slot, answer, output);
                }
                Got::Spare(pid, expected) => self.take_spare(id, zpid, &site, g, pid, expected),
            }
        }
    }

    /// Reads every message waiting on zygote `id`'s link, in order: answers with the
    /// pending fork each answers (answers to forks already given up on are dropped: their
    /// workers exit without running application code), and spares; and why reading
    /// stopped, if not because nothing more is there.
    fn drain_answers(&mut self, id: u64) -> (Vec<Got>, Option<ZygoteError>) {
        let mut answers = Vec::new();
        let Some(z) = self.zygotes.get_mut(&id) else {
            return (answers, None);
        };
        loop {
            match z.link.read_answer() {
                Ok(Some(Reply::Spare { pid })) => {
                    // The zygote answers in order: its spare goes to the oldest FORK it
                    // has not answered yet, if any.
                    let expected = z.pending.values().next().map(|p| p.slot);
                    answers.push(Got::Spare(pid, expected));
                }
                Ok(Some(Reply::Answer(answer))) => match z.pending.remove(&answer.request) {
                    Some(p) => {
                        debug!(site = %z.site, gen = z.generation.0, worker = %p.slot, "fork answered in {} µs", p.asked.elapsed().as_micros());
                        answers.push(Got::Answer(p.slot, answer, p.output));
                    }
                    None => {
                        debug!(site = %z.site, request = answer.request, "a late fork answer dropped");
                    }
                },
                Ok(None) => return (answers, None),
                Err(e) => return (answers, Some(e)),
            }
        }
    }

    /// A worker the zygote forked (or failed to): moved into its own leaf and let go, then
    /// reported to the site's machine as a spawn.
    /// `zygote` is the pid of the zygote that answered, `id` its number.
    #[allow(clippy::too_many_arguments)]
    fn take_forked(
        &mut self,
        id: u64,
        zygote: i32,
        name: &SiteName,
        g: GenId,
        slot: Slot,
        answer: Answer,
        output: Option<WorkerPipes>,
    ) {
        let input = match self.let_forked_go(id, zygote, name, g, slot, answer, output) {
            Ok(pid) => SlotInput::Spawned { id: slot, pid },
            Err(error) => {
                error!(site = %name, gen = g.0, worker = %slot, "failed to spawn: {error}");
                SlotInput::SpawnFailed {
                    id: slot,
                    error,
                    permanent: false,
                }
            }
        };
        self.feed(
            name,
            Input::Worker {
                generation: g,
                input,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn let_forked_go(
        &mut self,
        id: u64,
        zygote: i32,
        name: &SiteName,
        g: GenId,
        slot: Slot,
        answer: Answer,
        output: Option<WorkerPipes>,
    ) -> Result<i32, String> {
        let Forked { pid, pidfd, go } = answer.into_forked(slot.0, Some(zygote)).map_err(|e| {
            let chain = super::error_chain(&e);
            if chain.is_empty() {
                e.to_string()
            } else {
                format!("{e}: {chain}")
            }
        })?;
        let pidref = PidRef::new(pid, pidfd);
        // A zygote is trusted less than the agent. `into_forked` checked that the process
        // waits on the go pipe the zygote sent (only its own fork can); a process the agent
        // already knows (a worker of any site, a zygote, another zygote's spare) is not
        // taken either, nor touched: it is someone else's.
        let own_spare = self.spares.get(&pid).is_some_and(|s| s.zygote == id);
        let known = self.pids.contains_key(&pid)
            || self.execs.contains_key(&pid)
            || self.zygote_pids.contains_key(&pid)
            || (self.spares.contains_key(&pid) && !own_spare);
        if known {
            return Err(format!(
                "the zygote named pid {pid}, which is not a process it forked"
            ));
        }
        // Whatever fails from here, the worker must not run: its go pipe closes unwritten
        // (it exits 1 before any application code) and it is killed to be sure.
        let refuse = |pidref: &PidRef, why: String| {
            let _ = pidref.signal(libc::SIGKILL);
            why
        };
        let limits = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .map(|x| x.config.limits);
        let Some(limits) = limits else {
            return Err(refuse(&pidref, "its generation is gone".into()));
        };
        // A spare this zygote named, moved ahead into this slot's leaf, stays there: the
        // move is done. Any other spare record of this pid is moved again (below), and the
        // leaf it leaves retired.
        let spare = self.spares.remove(&pid);
        let leaf = match (&self.cgroups, &mut self.graveyard) {
            (Some(tree), Some(graveyard)) => match spare {
                // Its record's own process (not a reused pid): the leaf holds this one.
                Some(s) if s.slot == slot && s.zygote == id && !has_exited(&s.pidfd) => {
                    if s.limits != limits {
                        if let Err(e) = CgroupTree::apply_worker_limits(&s.leaf, &limits) {
                            let why = refuse(&pidref, format!("{e}: {}", super::error_chain(&e)));
                            tree.retire(&s.leaf, graveyard);
                            return Err(why);
                        }
                    }
                    debug!(site = %name, gen = g.0, worker = %slot, pid, "the spare, already in its leaf");
                    Some(s.leaf)
                }
                other => {
                    let moved = match tree.new_leaf(name.as_str(), g.0, &format!("w-{slot}")) {
                        Ok((dir, _fd)) => match CgroupTree::apply_worker_limits(&dir, &limits)
                            .and_then(|()| CgroupTree::move_into(&dir, pid))
                        {
                            Ok(()) => Ok(dir),
                            Err(e) => {
                                tree.retire(&dir, graveyard);
                                Err(e)
                            }
                        },
                        Err(e) => Err(e),
                    };
                    if let Some(s) = other {
                        // Moved ahead for another slot: that leaf is left behind (empty,
                        // or holding a worker refused and killed below), whatever happened.
                        debug!(site = %name, gen = g.0, worker = %slot, pid, "the spare, moved ahead for worker {}, moved again", s.slot);
                        tree.retire(&s.leaf, graveyard);
                    }
                    match moved {
                        Ok(dir) => Some(dir),
                        Err(e) => {
                            return Err(refuse(
                                &pidref,
                                format!("{e}: {}", super::error_chain(&e)),
                            ));
                        }
                    }
                }
            },
            _ => None,
        };
        if let Err(e) = crate::zygote::let_go(go) {
            let why = refuse(&pidref, format!("failed to tell the worker to go: {e}"));
            if let (Some(tree), Some(dir), Some(graveyard)) =
                (&self.cgroups, &leaf, &mut self.graveyard)
            {
                tree.retire(dir, graveyard);
            }
            return Err(why);
        }
        // Its generation was looked up above, in this same turn: it still exists.
        let worker = WorkerId {
            generation: g,
            slot,
        };
        // A zygote of protocol version 1 gave it one pipe for both streams: its lines
        // read as stdout's.
        self.track_worker(name, worker, pidref, output, leaf, None)
            .map_err(|e| format!("failed to watch the worker: {e}"))?;
        debug!(site = %name, gen = g.0, worker = %slot, pid, "forked by the zygote");
        Ok(pid)
    }

    /// A `SPARE` from zygote `id` (pid `zygote`) of generation `g`: the worker `pid`,
    /// checked like a `FORKED`'s, is moved now into a fresh leaf for the slot it is
    /// expected to get (`expected`, the oldest unanswered `FORK`'s, else the lowest slot
    /// the generation does not use), with the per-worker limits. Anything that stands in
    /// the way (no cgroups, a generation leaving, too many spares, a pid that is not ours,
    /// a failed move) leaves it where it is, to be moved when a `FORKED` names it: a spare
    /// is a hint, never a failure.
    ///
    /// A zygote is trusted less than the agent, and a `SPARE` needs no go pipe: only a
    /// process that is still in the zygote's own leaf (so forked by it, and moved by no
    /// one since) and is not already known (a worker, a zygote, an `exec`, a spare) is
    /// moved; a zygote naming itself, or another site's worker, moves nothing.
    fn take_spare(
        &mut self,
        id: u64,
        zygote: i32,
        name: &SiteName,
        g: GenId,
        pid: i32,
        expected: Option<Slot>,
    ) {
        let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) else {
            return;
        };
        let Some(generation) = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .filter(|x| !x.leaving)
        else {
            return;
        };
        let held = self.spares.values().filter(|s| s.zygote == id).count();
        if held >= MOST_SPARES {
            debug!(site = %name, gen = g.0, pid, "a spare not moved ahead: {held} already are");
            return;
        }
        let known = self.spares.contains_key(&pid)
            || self.pids.contains_key(&pid)
            || self.execs.contains_key(&pid)
            || self.zygote_pids.contains_key(&pid);
        let detached = self.zygotes.get(&id).is_none_or(|z| z.detached);
        if known || detached {
            warn!(site = %name, gen = g.0, pid, "a spare not moved ahead: pid {pid} is not a spare of this zygote");
            return;
        }
        // Kept with the record: the pid is this process's while it runs.
        let pidfd = match crate::zygote::check_spare(pid, Some(zygote)) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(site = %name, gen = g.0, pid, "a spare not moved ahead: {e}");
                return;
            }
        };
        let theirs = crate::cgroup::cgroup_of(zygote);
        if theirs.is_none() || crate::cgroup::cgroup_of(pid) != theirs {
            warn!(site = %name, gen = g.0, pid, "a spare not moved ahead: pid {pid} is not in the zygote's cgroup");
            return;
        }
        let slot = expected.unwrap_or_else(|| generation.slots.lowest_unused_slot());
        let limits = generation.config.limits;
        let started = Instant::now();
        let made = tree.new_leaf(name.as_str(), g.0, &format!("w-{slot}"));
        let leaf = match made {
            Ok((leaf, _fd)) => leaf,
            Err(e) => {
                warn!(site = %name, gen = g.0, pid, "a spare not moved ahead: {e}: {}", super::error_chain(&e));
                return;
            }
        };
        let moved = CgroupTree::apply_worker_limits(&leaf, &limits)
            .and_then(|()| CgroupTree::move_into(&leaf, pid));
        if let Err(e) = moved {
            // It may have exited meanwhile (its zygote died): its leaf goes.
            debug!(site = %name, gen = g.0, pid, "a spare not moved ahead: {e}: {}", super::error_chain(&e));
            tree.retire(&leaf, graveyard);
            return;
        }
        debug!(site = %name, gen = g.0, worker = %slot, pid, "a spare moved ahead into {} in {} µs", leaf.display(), started.elapsed().as_micros());
        self.spares.insert(
            pid,
            SpareLeaf {
                zygote: id,
                slot,
                leaf,
                limits,
                stuck: false,
                pidfd,
            },
        );
    }

    /// Moves the spares of site `name`'s zygotes that wait in the leaf of a slot the next
    /// spawn will not be for (the slot was taken meanwhile, or one below it was freed by a
    /// `scale` down) into a leaf of the slot it will be: the lowest unused one. Not while
    /// a `FORK` is unanswered (the spare goes to that one: moving it now would cost what
    /// moving it after the answer does). A move here is off any request's path.
    pub(super) fn rehome_spares(&mut self, name: &SiteName) {
        let mut moves = Vec::new();
        let mut gone = Vec::new();
        for (pid, spare) in &self.spares {
            let Some(z) = self.zygotes.get(&spare.zygote) else {
                continue;
            };
            if spare.stuck || &z.site != name || z.detached || !z.pending.is_empty() {
                continue;
            }
            if has_exited(&spare.pidfd) {
                // Reaped by someone else, or a zombie not reaped yet: its pid may be
                // another process's soon.
                gone.push(*pid);
                continue;
            }
            let next = self
                .sites
                .get(name)
                .and_then(|s| s.machine.generation(z.generation))
                .filter(|x| !x.leaving)
                .map(|x| x.slots.lowest_unused_slot());
            if next.is_some_and(|n| n != spare.slot) {
                moves.push((*pid, z.generation, next.expect("checked")));
            }
        }
        for pid in gone {
            if let (Some(s), Some(tree), Some(graveyard)) =
                (self.spares.remove(&pid), &self.cgroups, &mut self.graveyard)
            {
                tree.retire(&s.leaf, graveyard);
            }
        }
        for (pid, g, slot) in moves {
            let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) else {
                return;
            };
            let Some(spare) = self.spares.get_mut(&pid) else {
                continue;
            };
            let started = Instant::now();
            let moved = tree
                .new_leaf(name.as_str(), g.0, &format!("w-{slot}"))
                .and_then(|(leaf, _fd)| {
                    let done = CgroupTree::apply_worker_limits(&leaf, &spare.limits)
                        .and_then(|()| CgroupTree::move_into(&leaf, pid));
                    if done.is_err() {
                        tree.retire(&leaf, graveyard);
                    }
                    done.map(|()| leaf)
                });
            match moved {
                Ok(leaf) => {
                    debug!(site = %name, gen = g.0, worker = %slot, pid, "a spare moved ahead for worker {} moved into {} in {} µs", spare.slot, leaf.display(), started.elapsed().as_micros());
                    tree.retire(&spare.leaf, graveyard);
                    spare.leaf = leaf;
                    spare.slot = slot;
                }
                Err(e) => {
                    // Left where it is (a FORKED for another slot moves it then); it may
                    // have exited.
                    debug!(site = %name, gen = g.0, pid, "a spare not moved again: {e}: {}", super::error_chain(&e));
                    spare.stuck = true;
                }
            }
        }
    }

    /// Spare `pid` was reaped without becoming a worker (its zygote ended, or it failed):
    /// its leaf is retired. Whether it was one.
    pub(super) fn spare_reaped(&mut self, pid: i32) -> bool {
        let Some(spare) = self.spares.remove(&pid) else {
            return false;
        };
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            tree.retire(&spare.leaf, graveyard);
        }
        true
    }

    /// The spares of generation `g`'s zygote of site `name` that are in leaves, for
    /// `status`.
    pub(super) fn spares_of(&self, name: &SiteName, g: GenId) -> Vec<(i32, &SpareLeaf)> {
        let Some(id) = self.zygote_of(name, g) else {
            return Vec::new();
        };
        let mut spares: Vec<(i32, &SpareLeaf)> = self
            .spares
            .iter()
            .filter(|(_, s)| s.zygote == id)
            .map(|(pid, s)| (*pid, s))
            .collect();
        spares.sort_by_key(|(pid, s)| (s.slot, *pid));
        spares
    }

    fn rearm_link(&mut self, id: u64) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        match self
            .reg
            .arm(z.link.fd(), Interest::Readable, Source::ZygoteLink(id))
        {
            Ok(t) => z.link_token = Some(t),
            Err(e) => {
                error!(site = %z.site, gen = z.generation.0, "failed to watch the zygote's link ({e}): killing it");
                let _ = z.pidref.signal(libc::SIGKILL);
            }
        }
    }

    /// The zygote broke the protocol, or its link failed: killed (its exit follows).
    fn zygote_broke(&mut self, id: u64, e: &ZygoteError) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        error!(site = %z.site, gen = z.generation.0, pid = z.pidref.pid(), "the zygote's link failed ({e}: {}): killing it", super::error_chain(e));
        self.kill_zygote(id);
    }

    /// Kills a zygote and whatever is still in its leaf (forks not yet let go).
    fn kill_zygote(&mut self, id: u64) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        z.killed = true;
        let killed = match (&self.cgroups, &z.cgroup) {
            (Some(tree), Some(dir)) => tree.kill(dir).map_err(|e| e.to_string()),
            _ => z.pidref.signal(libc::SIGKILL).map_err(|e| e.to_string()),
        };
        if let Err(e) = killed {
            warn!(site = %z.site, gen = z.generation.0, "failed to kill the zygote: {e}");
            let _ = z.pidref.signal(libc::SIGKILL);
        }
    }

    /// Sends generation `g`'s zygote the first signal of its stop sequence; each next one
    /// follows `stop.timeout` after the one before while it runs, and it is killed
    /// `stop.timeout` after the last.
    pub(super) fn stop_zygote(&mut self, name: &SiteName, g: GenId) {
        let Some(id) = self.zygote_of(name, g) else {
            return;
        };
        let stop = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .map(|x| x.config.stop);
        self.ask_zygote_to_stop(id, stop);
    }

    fn ask_zygote_to_stop(&mut self, id: u64, stop: Option<crate::config::StopPolicy>) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        if z.kill_at.is_some() || z.killed {
            return;
        }
        let stop = stop.unwrap_or(crate::config::StopPolicy::single(
            crate::config::Signal(libc::SIGTERM),
            DEFAULT_STOP_TIMEOUT,
        ));
        if let Err(e) = z.pidref.signal(stop.signal.0) {
            debug!(site = %z.site, gen = z.generation.0, "failed to signal the zygote: {e}");
        }
        z.kill_at = Some(Instant::now() + stop.timeout);
        z.stop_step = Some((stop, 0));
    }

    /// A zygote asked to stop still runs at its deadline: the next signal of its stop
    /// sequence, if there is one (true), else nothing (false: it is to be killed).
    fn next_stop_signal(&mut self, id: u64, now: Instant) -> bool {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return false;
        };
        let Some((stop, step)) = z.stop_step else {
            return false;
        };
        let Some(signal) = stop.step(step + 1) else {
            return false;
        };
        info!(site = %z.site, gen = z.generation.0, pid = z.pidref.pid(), signal = %signal.name(), "the zygote still runs: next signal of its stop sequence");
        if let Err(e) = z.pidref.signal(signal.0) {
            debug!(site = %z.site, gen = z.generation.0, "failed to signal the zygote: {e}");
        }
        z.stop_step = Some((stop, step + 1));
        z.kill_at = Some(now + stop.timeout);
        true
    }

    /// Generation `g` of site `name` is gone (retired, or the site removed): its zygote, if
    /// one still runs, is asked to stop (or killed) and forgotten by the site; its exit is
    /// still awaited, to reap it and remove its leaf.
    pub(super) fn detach_zygotes(&mut self, name: &SiteName, g: Option<GenId>) {
        let ids: Vec<u64> = self
            .zygotes
            .iter()
            .filter(|(_, z)| !z.detached && &z.site == name && g.is_none_or(|g| z.generation == g))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.detach_zygote(id, false);
        }
    }

    fn detach_zygote(&mut self, id: u64, kill: bool) {
        let Some(z) = self.zygotes.get_mut(&id) else {
            return;
        };
        z.detached = true;
        // Forks asked for by a generation that is gone: their workers never run.
        z.pending.clear();
        if kill {
            self.kill_zygote(id);
        } else {
            self.ask_zygote_to_stop(id, None);
        }
    }

    /// A zygote exited (its pidfd, or found by `reap`): the answers it sent before are
    /// taken, the forks it did not answer fail, its leaf goes, and its generation's
    /// machine is told.
    pub(super) fn zygote_exited(&mut self, id: u64) {
        let exited = match self.zygotes.get(&id).map(|z| z.pidref.try_wait()) {
            None => return,
            Some(Ok(Some(reason))) => reason,
            // Not exited after all (spurious wake-up): watch again.
            Some(Ok(None)) => {
                let z = self.zygotes.get_mut(&id).expect("looked up above");
                match self
                    .reg
                    .arm(z.pidref.as_fd(), Interest::Readable, Source::ZygoteExit(id))
                {
                    Ok(t) => z.pid_token = t,
                    Err(e) => error!(site = %z.site, "failed to watch the zygote's pidfd: {e}"),
                }
                return;
            }
            Some(Err(e)) => {
                error!("waitid on a zygote failed: {e}");
                ExitReason::Exited { code: -1 }
            }
        };
        // Workers it forked and reported before it ended are real and waiting for their
        // go: let them go before failing the rest.
        let (answers, _) = if self.zygotes.get(&id).is_some_and(|z| z.ready) {
            self.drain_answers(id)
        } else {
            (Vec::new(), None)
        };
        let z = self.zygotes.remove(&id).expect("looked up above");
        let (site, g) = (z.site.clone(), z.generation);
        for got in answers {
            // A spare named now exits with its zygote.
            if let (Got::Answer(slot, answer, output), false) = (got, z.detached) {
                self.take_forked(id, z.pidref.pid(), &site, g, slot, answer, output);
            }
        }
        // Its spares that no FORKED let go: their leaves are retired, which kills what is
        // still in them (a spare outlives no zygote; the helper's exit at the end of its
        // channel anyway, but one of another zygote might not).
        let left: Vec<i32> = self
            .spares
            .iter()
            .filter(|(_, s)| s.zygote == id)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in left {
            if let (Some(s), Some(tree), Some(graveyard)) =
                (self.spares.remove(&pid), &self.cgroups, &mut self.graveyard)
            {
                tree.retire(&s.leaf, graveyard);
            }
        }
        self.reg.tokens.remove(&z.pid_token);
        if let Some(t) = z.link_token {
            self.reg.tokens.remove(&t);
            let _ = self.reg.reactor.disarm(z.link.fd(), t);
        }
        self.zygote_pids.remove(&z.pidref.pid());
        let reason = match (&exited, z.cgroup.as_deref()) {
            (
                ExitReason::Signaled {
                    signal: libc::SIGKILL,
                },
                Some(dir),
            ) if crate::cgroup::oom_kills(dir).is_some_and(|n| n > 0) => ExitReason::OomKilled,
            _ => exited,
        };
        if let (Some(tree), Some(dir), Some(graveyard)) =
            (&self.cgroups, &z.cgroup, &mut self.graveyard)
        {
            tree.retire(dir, graveyard);
        }
        let asked = z.kill_at.is_some() || z.killed || z.detached || self.shutting_down;
        if asked {
            debug!(site = %site, gen = g.0, pid = z.pidref.pid(), "zygote {reason}");
        } else {
            warn!(site = %site, gen = g.0, pid = z.pidref.pid(), "zygote {reason}");
        }
        if z.detached {
            return;
        }
        for p in z.pending.into_values() {
            let input = SlotInput::SpawnFailed {
                id: p.slot,
                error: format!("the zygote ended before it forked the worker: {reason}"),
                permanent: false,
            };
            self.feed(
                &site,
                Input::Worker {
                    generation: g,
                    input,
                },
            );
        }
        self.feed(
            &site,
            Input::ZygoteExited {
                generation: g,
                reason: reason.to_string(),
            },
        );
    }

    /// The earliest time a zygote needs looking at (a kill due, a fork unanswered).
    pub(super) fn zygote_deadline(&self) -> Option<Instant> {
        self.zygotes
            .values()
            .filter(|z| !z.killed)
            .flat_map(|z| {
                z.kill_at
                    .into_iter()
                    .chain(z.pending.values().map(|p| p.deadline))
            })
            .min()
    }

    /// Zygotes that did not stop in time are killed; those that did not answer a fork in
    /// time are killed too (they are replaced as zygotes that died), and the fork fails.
    pub(super) fn zygote_deadlines(&mut self, now: Instant) {
        let due: Vec<(u64, bool)> = self
            .zygotes
            .iter()
            .filter(|(_, z)| !z.killed)
            .filter_map(|(id, z)| {
                let stop = z.kill_at.is_some_and(|t| t <= now);
                let hung = z.pending.values().any(|p| p.deadline <= now);
                (stop || hung).then_some((*id, hung))
            })
            .collect();
        for (id, hung) in due {
            if !hung && self.next_stop_signal(id, now) {
                continue;
            }
            if let Some(z) = self.zygotes.get(&id) {
                if hung {
                    error!(site = %z.site, gen = z.generation.0, pid = z.pidref.pid(), "the zygote did not answer a fork in time: killing it");
                } else {
                    warn!(site = %z.site, gen = z.generation.0, pid = z.pidref.pid(), "stop timeout: killing the zygote");
                }
            }
            self.kill_zygote(id);
        }
    }

    /// At the agent's exit: zygotes still running are killed.
    pub(super) fn kill_zygotes(&mut self) {
        let ids: Vec<u64> = self.zygotes.keys().copied().collect();
        for id in ids {
            self.kill_zygote(id);
        }
    }
}

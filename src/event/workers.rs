//! Worker plumbing: starting a slot's process (its image, output pipe, cgroup leaf and
//! pidfd), its exit (told through the pidfd, told apart from an OOM kill, reaped once
//! answered), its output
//! (lines into the site's log and to `logs -f` clients) and its notifications
//! (`READY=1`, `BUSY=`).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, error, warn};

use super::history::{Entry, Kind};
use super::reactor::Interest;
use super::recovery::Unsaved;
use super::sites::Worker;
use super::{Agent, MAX_FOLLOW_BUFFER, Pipe, Source};
use crate::cgroup::CgroupTree;
use crate::config::{OutputMode, SiteName};
use crate::control::{ErrorKind, Reply};
use crate::logs::{self, LineSplitter, StdStream, Writer};
use crate::process::PidRef;
use crate::sandbox::{RootId, SandboxError};
use crate::spawn::{Launched, LeafSpec, NotLaunched, SpawnFailure, Start, start_all};
use crate::supervisor::ids::{GenId, Slot, WorkerId};
use crate::supervisor::machine::Input as SiteInput;
use crate::supervisor::slots::{ExitReason, Input};
use crate::sys::spawn::SandboxPlan;

impl Agent {
    /// Reaps zombies: tracked workers through their pidfd, orphans by pid. Put off while
    /// workers whose exit was handled wait to be reaped (`Agent::reap_held`): the look
    /// for zombies would find those first.
    pub(super) fn reap(&mut self) {
        if !self.zombies.is_empty() {
            self.scan_owed = true;
            return;
        }
        self.scan_owed = false;
        self.reap_zombies();
        // An orphan that was killed with its worker's leaf may have been the last
        // process in it.
        if let Some(g) = &mut self.graveyard {
            g.sweep();
        }
    }

    pub(super) fn reap_zombies(&mut self) {
        for _ in 0..100_000 {
            let pid = match crate::sys::wait::peek_zombie() {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(e) => {
                    error!("waitid failed: {e}");
                    return;
                }
            };
            if let Some((site, w)) = self.pids.get(&pid).cloned() {
                let (g, id) = (w.generation, w.slot);
                self.worker_exited(&site, g, id);
                // Reaped now: the next look would find it first again.
                self.reap_held();
            } else if self.execs.contains_key(&pid) {
                self.exec_exited(pid);
            } else if let Some(id) = self.zygote_pids.get(&pid).copied() {
                self.zygote_exited(id);
            } else if let Some(p) = rustix::process::Pid::from_raw(pid) {
                // A zygote's spare that never became a worker: its leaf goes.
                let spare = self.spare_reaped(pid);
                match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                    Ok(_) if spare => debug!(pid, "reaped a zygote's spare"),
                    Ok(_) => debug!(pid, "reaped an orphaned descendant"),
                    Err(e) => {
                        error!(pid, "failed to reap: {e}");
                        return;
                    }
                }
            }
        }
    }

    /// Reaps the workers whose exit was handled (`Agent::worker_gone`). Their exits are
    /// handled, and answered (a stop's reply), first: the kernel's part of reaping (freeing
    /// the process and its `/proc` entries, `release_task`) is most of an exit's cost to the
    /// agent, and a stop of thousands of workers otherwise answers only once each is freed.
    /// Done before a zygote, an `exec` session or the next agent is started, before
    /// workers are (some of them: `Agent::reap_before_starting`), before the look for
    /// other zombies, and at the end of a turn of the loop for the sites that are not
    /// stopping or that have a `pids_max` (the workers of those that are, once they are
    /// not: see `Agent::reap_after_turn`). Feeds no machine:
    /// the look for other zombies it put off (`scan_owed`) is the loop's to make.
    pub(super) fn reap_held(&mut self) {
        self.reap_where(|_| true);
    }

    /// At the end of a turn: retires the leaves of crashed workers that no start of the
    /// turn took (`Agent::reusable_leaves`): their slot starts later (after a backoff), or
    /// not at all.
    pub(super) fn retire_unused_leaves(&mut self) {
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            for (_, dir) in self.reusable_leaves.drain() {
                tree.retire(&dir, graveyard);
            }
        }
        // A mass crash fills it by the thousand: the room goes with it.
        if self.reusable_leaves.capacity() > REUSABLE_LEAVES_KEPT {
            self.reusable_leaves = HashMap::new();
        } else {
            self.reusable_leaves.clear();
        }
    }

    /// Before the workers `asked` for are started: reaps every held worker when a zombie
    /// could make a start fail, that is when more than [`ZOMBIES_PAST_A_START`] are held (a
    /// systemd unit's `TasksMax` counts them), when one is of a site with a `pids_max` (it
    /// counts in its cgroups' `pids.current`) or gone from the configuration, or when a site
    /// started has an `nproc` rlimit (its user's zombies count in it, of whichever site:
    /// the new worker's `execve` fails with `EAGAIN`). Otherwise (a crashed worker whose
    /// replacement is started now, the common case) they are reaped after the starts, at
    /// the end of the turn or once their site's stop is over (`Agent::reap_after_turn`):
    /// the kernel's release of the process replaced is no longer before its replacement.
    fn reap_before_starting(&mut self, asked: &[(SiteName, GenId, Slot)]) {
        if self.zombies.is_empty() {
            return;
        }
        let held: usize = self.zombies.values().map(Vec::len).sum();
        let config = |name: &SiteName| self.sites.get(name).map(|s| s.config());
        let counted = |c: &crate::config::SiteConfig| c.limits.pids_max.is_some();
        let nproc = |c: &crate::config::SiteConfig| {
            c.sandbox.rlimits.iter().any(|(name, _, _)| name == "nproc")
        };
        let first = held > ZOMBIES_PAST_A_START
            || self
                .zombies
                .keys()
                .any(|name| config(name).is_none_or(counted))
            || asked
                .iter()
                .any(|(name, _, _)| config(name).is_some_and(nproc));
        if first {
            self.reap_held();
        }
    }

    /// Reaps the held workers of the sites `now` says, keeps the others.
    pub(super) fn reap_where(&mut self, now: impl Fn(&SiteName) -> bool) {
        let sites: Vec<SiteName> = self.zombies.keys().filter(|s| now(s)).cloned().collect();
        for site in sites {
            for z in self.zombies.remove(&site).unwrap_or_default() {
                if let Err(e) = z.try_wait() {
                    warn!(pid = z.pid(), "failed to reap a worker: {e}");
                }
            }
        }
        if self.zombies.is_empty() {
            self.zombies_since = None;
        }
    }

    /// Reads, once per site, the output of the sites with exits among `ready` (the
    /// reactor's batch), before the exits are handled: each of those workers had exited
    /// before the batch was returned, so all it wrote is in its site's socket by now, and
    /// one drain does for every exit of the batch (a graceful stop of 10,000 workers
    /// otherwise reads each site's two sockets to `EAGAIN` 10,000 times).
    pub(super) fn drain_before_exits(&mut self, ready: &[u64]) {
        self.drained_before_exits.clear();
        for token in ready {
            if let Some(Source::Pidfd(site, _)) = self.reg.tokens.get(token) {
                if !self.drained_before_exits.contains(site) {
                    self.drained_before_exits.push(site.clone());
                }
            }
        }
        for site in std::mem::take(&mut self.drained_before_exits) {
            self.drain_output(&site);
            self.drained_before_exits.push(site);
        }
    }

    pub(super) fn on_pidfd(&mut self, site: &SiteName, g: GenId, id: Slot, token: u64) {
        let current = self
            .sites
            .get(site)
            .and_then(|s| s.io.gens.get(&g))
            .and_then(|x| x.workers.get(&id))
            .is_some_and(|w| w.token == token);
        if current {
            if self.drained_before_exits.contains(site) {
                self.worker_gone(site, g, id);
            } else {
                self.worker_exited(site, g, id);
            }
        }
    }

    pub(super) fn worker_exited(&mut self, name: &SiteName, g: GenId, id: Slot) {
        // What it wrote is attributed by its pid: read while the pid is still known.
        self.drain_output(name);
        self.worker_gone(name, g, id);
    }

    /// Worker `id` exited and what it wrote was read: how it ended is read (it stays a
    /// zombie until [`Agent::reap_held`]), it is forgotten and told to its site's machine.
    fn worker_gone(&mut self, name: &SiteName, g: GenId, id: Slot) {
        let asked = self.stopping(name, g, id);
        // A crash's leaf may hold the slot's next process (`Agent::reusable_leaves`); a
        // zygote's workers are forked into a leaf of their own, and a leaf with a limit of
        // its own would count what its last process left charged (tmpfs pages) against
        // the next.
        let generation = self.sites.get(name).and_then(|s| s.machine.generation(g));
        let own_limits = generation.is_some_and(|x| {
            let l = &x.config.limits;
            l.worker_memory_max.is_some() || l.worker_memory_high.is_some()
        });
        // How long it ran, as its site's machine counts it (from the start it asked for,
        // what `status` shows as its uptime), not from when its start was made.
        let ran = generation
            .and_then(|x| x.slots.slots.get(&id))
            .and_then(|s| s.started)
            .map(|t| t.elapsed());
        let crashed =
            !asked && !self.shutting_down && !own_limits && !self.forks_from_zygote(name, g);
        let tree = self.cgroups.as_ref();
        let graveyard = &mut self.graveyard;
        let reusable_leaves = &mut self.reusable_leaves;
        let Some(site) = self.sites.get_mut(name).and_then(|s| s.io.gens.get_mut(&g)) else {
            return;
        };
        let Some(worker) = site.workers.get(&id) else {
            return;
        };
        // The exited leader still holds its pid as process group id until reaped: take its
        // group with it. An adopted worker is reaped by another process: only while it is
        // not yet is the group id certain to be its.
        if tree.is_none() && (!worker.adopted || worker.pidref.is_unreaped()) {
            let _ = worker.pidref.signal_group(libc::SIGKILL);
        }
        // A worker adopted after an agent restart is not our child: its pidfd polls
        // readable at its exit, but only the kernel (6.15) can say how it ended.
        let mut zombie = false;
        let waited = if worker.adopted {
            Ok(worker
                .pidref
                .has_exited()
                .then(|| worker.pidref.foreign_exit().unwrap_or(ExitReason::Unknown)))
        } else {
            // Reaped later (`Agent::reap_held`): not before this exit is answered.
            match worker.pidref.exit_status() {
                // Forked by a zygote and dead before the zygote's intermediate child
                // exited: not yet re-parented to us (it is once the intermediate is gone,
                // and reaped then as an orphan).
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(Some(
                    worker.pidref.foreign_exit().unwrap_or(ExitReason::Unknown),
                )),
                waited => {
                    zombie = matches!(waited, Ok(Some(_)));
                    waited
                }
            }
        };
        let reason = match waited {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Not exited after all (spurious wake-up): watch again.
                match self.reg.arm(
                    worker.pidref.as_fd(),
                    Interest::Readable,
                    Source::Pidfd(
                        name.clone(),
                        WorkerId {
                            generation: g,
                            slot: id,
                        },
                    ),
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
        // A worker told to stop that left: the record may list it a while longer (fed
        // below as such).
        let change = if asked {
            Unsaved::Departures
        } else {
            Unsaved::Changes
        };
        // An OOM kill shows as SIGKILL; the leaf's memory.events tells them apart (the
        // leaf is this process's own, or held before only processes of its slot that were
        // not OOM-killed: any count is its). Without the memory controller there is no
        // such file, and no OOM kill of a leaf: not looked for. A leaf to reuse must have
        // none either.
        let memory = tree.is_some_and(CgroupTree::has_memory);
        let killed = matches!(
            reason,
            ExitReason::Signaled {
                signal: libc::SIGKILL
            }
        );
        // A process killed as it was born is not replaced in its leaf: a cgroup killed
        // from outside the agent (`cgroup.kill` of an ancestor) kills every process later
        // cloned into it on 6.18.
        let reuse = crashed
            && worker.leaf_reusable
            && ran
                .or_else(|| worker.started_wall.elapsed().ok())
                .is_some_and(|ran| ran >= REUSE_LEAF_AFTER);
        let oom_kills = worker
            .cgroup
            .as_deref()
            .filter(|_| memory && (killed || reuse))
            .and_then(crate::cgroup::oom_kills);
        let reason = if killed && oom_kills.is_some_and(|n| n > 0) {
            ExitReason::OomKilled
        } else {
            reason
        };
        if let (Some(tree), Some(dir), Some(graveyard)) = (tree, &worker.cgroup, graveyard) {
            // Empty once the worker exited (a zombie is not counted): nothing it started is
            // left in it, so the next process of the slot is alone there.
            let empty = reuse && (!memory || oom_kills == Some(0)) && CgroupTree::is_empty(dir);
            if crashed && !empty {
                debug!(site = %name, worker = %id, ?ran, reusable = worker.leaf_reusable, ?oom_kills, "its leaf is not reused");
            }
            if empty {
                if let Some(old) = reusable_leaves.insert((name.clone(), g, id), dir.clone()) {
                    if old != *dir {
                        tree.retire(&old, graveyard);
                    }
                }
            } else {
                tree.retire(dir, graveyard);
            }
        }
        self.worker_output_done(name, worker.pidref.pid(), Writer::Worker(id.0));
        let crash = !asked && !self.shutting_down;
        if crash {
            self.counters.crashed(name.as_str(), &reason);
        }
        self.exits_to_tell.push(ExitToTell {
            site: name.clone(),
            generation: g,
            slot: id,
            pid: worker.pidref.pid(),
            reason: reason.clone(),
            asked,
            crash,
            at: SystemTime::now(),
        });
        if zombie {
            self.zombies_since.get_or_insert_with(Instant::now);
            match self.zombies.get_mut(name) {
                Some(held) => held.push(worker.pidref),
                None => {
                    self.zombies.insert(name.clone(), vec![worker.pidref]);
                }
            }
        }
        let input = SiteInput::Worker {
            generation: g,
            input: Input::Exited { id, reason },
        };
        self.feed_as(name, input, change);
    }

    /// Tells the exits handled and not yet told, in order: each one's log line (a warning
    /// for a crash) and history entry (with the time the exit was handled). An exit is told
    /// after the start of its replacement in the same turn (`spawn_chunk`), or before
    /// anything else is told (`Agent::emit`, and a site's logged event), or at the turn's
    /// end (`Agent::start_deferred`, `Agent::flush_history`): formatting and writing the two
    /// took 50 µs of a crashed worker's restart when they came before its `clone3`.
    pub(super) fn tell_exits(&mut self) {
        for exit in std::mem::take(&mut self.exits_to_tell) {
            let ExitToTell {
                site,
                generation: g,
                slot: id,
                pid,
                reason,
                asked,
                crash,
                at,
            } = exit;
            if crash {
                warn!(site = %site, gen = g.0, worker = %id, pid, kind = "exited", "worker {reason}");
            } else {
                debug!(site = %site, gen = g.0, worker = %id, pid, kind = "exited", "worker {reason}");
            }
            let words = if asked {
                format!("{reason} (asked to stop)")
            } else {
                reason.to_string()
            };
            let mut entry =
                Entry::worker(&site, g, id, Some(pid), Kind::Exited, words).exited(&reason, !asked);
            entry.time = crate::logs::utc_timestamp(at);
            self.emit(entry);
        }
    }

    /// Starts the workers `asked` for (each a slot of a generation of a site) together
    /// (`crate::spawn::start_all`: two at a time when there are several) and says how each
    /// start went, in order: the input its site's machine waits for.
    pub(super) fn spawn_all(&mut self, asked: &[(SiteName, GenId, Slot)]) -> Vec<Input> {
        self.reap_before_starting(asked);
        // A few at a time: images made for 10,000 starts at once (1 KB or more each) left
        // the heap that much larger for good, and each start in pipe mode holds four pipe
        // fds until its chunk is done.
        asked
            .chunks(START_CHUNK)
            .flat_map(|chunk| self.spawn_chunk(chunk))
            .collect()
    }

    /// [`Agent::spawn_all`] of at most [`START_CHUNK`] workers.
    fn spawn_chunk(&mut self, asked: &[(SiteName, GenId, Slot)]) -> Vec<Input> {
        // What each start needs that only this thread can make: the image, the site's
        // output sockets or the worker's pipes.
        let mut prepared: Vec<Result<Prepared, SpawnFailure>> = asked
            .iter()
            .map(|(name, g, id)| self.prepare_spawn(name, *g, *id))
            .collect();
        let mut images: Vec<Option<crate::sys::spawn::ExecImage>> = prepared
            .iter_mut()
            .map(|p| p.as_mut().ok().and_then(|p| p.image.take()))
            .collect();
        let mut results: Vec<Option<Result<Launched, NotLaunched>>> =
            asked.iter().map(|_| None).collect();
        {
            let mut starts = Vec::with_capacity(asked.len());
            let mut which = Vec::with_capacity(asked.len());
            for (i, ((name, g, id), p)) in asked.iter().zip(&prepared).enumerate() {
                let (Ok(p), Some(image)) = (p, images[i].take()) else {
                    continue;
                };
                let site = self
                    .sites
                    .get(name)
                    .expect("prepared for a site that exists");
                let gen_io = site
                    .io
                    .gens
                    .get(g)
                    .expect("prepared for a bound generation");
                let (output, errors) = match &p.pipes {
                    Some(pipes) => (pipes.out_w.as_fd(), pipes.err_w.as_fd()),
                    None => {
                        let o = site.io.output.as_ref().expect("made by prepare_spawn");
                        (o.socket.sender(), o.stderr_sender())
                    }
                };
                let mut fds: Vec<BorrowedFd<'_>> = vec![self.devnull.as_fd(), output, errors];
                fds.extend(gen_io.listeners.iter().map(|l| l.fd.as_fd()));
                let leaf = self.cgroups.as_ref().map(|tree| LeafSpec {
                    tree,
                    site: name.as_str(),
                    generation: g.0,
                    name: format!("w-{id}"),
                    limits: site.machine.generation(*g).map(|x| &x.config.limits),
                    reuse: if self.reusable_leaves.is_empty() {
                        None
                    } else {
                        self.reusable_leaves.remove(&(name.clone(), *g, *id))
                    },
                });
                starts.push(Start { image, fds, leaf });
                which.push(i);
            }
            let started = start_all(starts, &mut self.fd_block, self.helpers.as_ref());
            // The exits these starts replace, told now that the starts are made.
            self.tell_exits();
            for (i, r) in which.into_iter().zip(started) {
                results[i] = Some(r);
            }
        }
        asked
            .iter()
            .zip(prepared)
            .zip(results)
            .map(|(((name, g, id), p), r)| {
                let started = match (p, r) {
                    (Err(failure), _) => Err(failure),
                    (Ok(p), Some(r)) => self.track_started(name, *g, *id, p, r),
                    (Ok(_), None) => unreachable!("every prepared start is started"),
                };
                self.spawn_result(name, *g, *id, started)
            })
            .collect()
    }

    /// The input a spawn's result is to the site's machine, with its log line.
    fn spawn_result(
        &mut self,
        name: &SiteName,
        g: GenId,
        id: Slot,
        started: Result<i32, SpawnFailure>,
    ) -> Input {
        match started {
            Ok(pid) => {
                debug!(site = %name, gen = g.0, worker = %id, pid, "spawned");
                Input::Spawned { id, pid }
            }
            Err(failure) => {
                let workdir = self
                    .sites
                    .get(name)
                    .and_then(|s| s.machine.generation(g))
                    .map_or("/", |x| crate::spawn::workdir(&x.config));
                let error = failure.describe_in(workdir);
                error!(site = %name, gen = g.0, worker = %id, "failed to spawn: {error}");
                self.counters
                    .count(name.as_str(), crate::metrics::Cause::SpawnFailed);
                Input::SpawnFailed {
                    id,
                    error,
                    permanent: failure.permanent(),
                }
            }
        }
    }

    /// What the start of slot `id` of generation `g` of site `name` needs, made before
    /// any thread starts it.
    fn prepare_spawn(
        &mut self,
        name: &SiteName,
        g: GenId,
        id: Slot,
    ) -> Result<Prepared, SpawnFailure> {
        let notify_path = self.notify.path.clone();
        let plan = self.site_sandbox(name)?;
        let socket = self
            .sites
            .get(name)
            .and_then(|s| s.machine.generation(g))
            .is_some_and(|x| x.config.output == OutputMode::Socket);
        if socket {
            self.ensure_output(name).map_err(SpawnFailure::Pipe)?;
        }
        let site = self
            .sites
            .get(name)
            .expect("a slot is spawned only in a site that exists");
        let config = &site
            .machine
            .generation(g)
            .expect("a slot is spawned only in a generation that exists")
            .config;
        let site = site
            .io
            .gens
            .get(&g)
            .expect("a generation's listeners are bound before it spawns");
        // `chroot` follows the path again at every spawn: whoever could change a directory
        // on the way since it was prepared could now point it elsewhere.
        let root = match &config.sandbox.root {
            Some(root) => Some(crate::sandbox::check_root_path(root).map_err(SandboxError::Root)?),
            None => None,
        };
        let mut image =
            crate::spawn::worker_image(config, &site.listeners, &notify_path, id.0, g.0)?;
        let ruleset = self.generation_ruleset(name, g, &plan, root);
        image.set_sandbox(plan);
        if let Some(ruleset) = ruleset {
            image.set_ruleset(ruleset);
        }
        // The site's output sockets (one per stream), or two pipes of its own.
        let pipes = if socket {
            None
        } else {
            let (out_r, out_w) = output_pipe()?;
            let (err_r, err_w) = output_pipe()?;
            Some(Pipes {
                out_r,
                out_w,
                err_r,
                err_w,
            })
        };
        Ok(Prepared {
            image: Some(image),
            pipes,
        })
    }

    /// The Landlock ruleset of generation `g`'s workers under `plan`, in the site's root
    /// `root` (as [`crate::sandbox::check_root_path`] found it just now): built at the
    /// first start (its paths resolved then, as the site's user, inside the root) and kept
    /// for every later start of the generation, restarts after a crash included, so that
    /// a restart's child only enforces it; built again when the plan or the root is
    /// another (a reload, a root replaced: rules for the old root's directories would
    /// refuse everything in the new one) and after [`Agent::forget_rulesets`]. `None` when
    /// the agent cannot build it (each child then builds its own, and says why it failed
    /// if it does). Called before the starts of a batch go to the helper threads
    /// (`sys::spawn::SandboxPlan::build_ruleset`).
    fn generation_ruleset(
        &mut self,
        name: &SiteName,
        g: GenId,
        plan: &Arc<SandboxPlan>,
        root: Option<RootId>,
    ) -> Option<Arc<OwnedFd>> {
        let gen_io = self.sites.get_mut(name)?.io.gens.get_mut(&g)?;
        if let Some(kept) = &gen_io.ruleset {
            if Arc::ptr_eq(&kept.plan, plan) && kept.root == root {
                return Some(kept.ruleset.clone());
            }
        }
        let ruleset = Arc::new(plan.build_ruleset()?);
        gen_io.ruleset = Some(super::sites::KeptRuleset {
            plan: plan.clone(),
            root,
            ruleset: ruleset.clone(),
        });
        Some(ruleset)
    }

    /// Forgets the Landlock rulesets built for the site's generations, so that the workers
    /// started next resolve its paths again: at `hatchery start` and `restart`, with which
    /// an operator who made or replaced a directory gets it covered without a deploy.
    pub(super) fn forget_rulesets(&mut self, name: &SiteName) {
        if let Some(site) = self.sites.get_mut(name) {
            for gen_io in site.io.gens.values_mut() {
                gen_io.ruleset = None;
            }
        }
    }

    /// A started worker tracked (its pipes' read ends kept, their write ends closed), or
    /// the failure of its start (its leaf retired).
    fn track_started(
        &mut self,
        name: &SiteName,
        g: GenId,
        id: Slot,
        prepared: Prepared,
        result: Result<Launched, NotLaunched>,
    ) -> Result<i32, SpawnFailure> {
        let pipes_r = prepared.pipes.map(|p| (p.out_r, Some(p.err_r)));
        let launched = match result {
            Ok(l) => l,
            Err(not) => {
                if let (Some(dir), Some(tree), Some(graveyard)) =
                    (&not.leaf, &self.cgroups, &mut self.graveyard)
                {
                    tree.retire(dir, graveyard);
                }
                return Err(not.failure);
            }
        };
        let pid = launched.pid;
        self.track_worker(
            name,
            WorkerId {
                generation: g,
                slot: id,
            },
            PidRef::new(pid, launched.pidfd),
            pipes_r,
            launched.leaf,
            launched.start_time,
        )
        .map_err(SpawnFailure::Watch)?;
        Ok(pid)
    }

    /// A new worker of ours (spawned, or forked by a zygote and let go): its pidfd watched,
    /// known by its pid (which attributes what it writes to the site's output socket), and
    /// its own output pipes, if it has them (stdout's, and stderr's unless both streams
    /// share the first, as a zygote's workers do), read and held by the fd holder. Its start
    /// time (for the record of workers) is `start_time` when the spawn knew it, or read
    /// from `/proc`. Fails, the worker killed, only if its pidfd cannot be watched.
    pub(super) fn track_worker(
        &mut self,
        name: &SiteName,
        worker: WorkerId,
        pidref: PidRef,
        output: Option<(OwnedFd, Option<OwnedFd>)>,
        cgroup: Option<std::path::PathBuf>,
        start_time: Option<u64>,
    ) -> std::io::Result<()> {
        let WorkerId {
            generation: g,
            slot: id,
        } = worker;
        let pid = pidref.pid();
        let armed = self.reg.arm(
            pidref.as_fd(),
            Interest::Readable,
            Source::Pidfd(name.clone(), worker),
        );
        let token = match armed {
            Ok(t) => t,
            Err(e) => {
                let _ = pidref.signal(libc::SIGKILL);
                if let (Some(tree), Some(dir), Some(graveyard)) =
                    (&self.cgroups, &cgroup, &mut self.graveyard)
                {
                    tree.retire(dir, graveyard);
                }
                return Err(e);
            }
        };
        if let Some((output, errors)) = output {
            let held_as = super::holder::pipe_name(name, g, id, pid);
            self.hold_pipe(&held_as, output.as_fd());
            let writer = Writer::Worker(id.0);
            self.read_pipe(name, writer, pid, StdStream::Stdout, output, Some(held_as));
            if let Some(errors) = errors {
                let held_as = super::holder::err_pipe_name(name, g, id, pid);
                self.hold_pipe(&held_as, errors.as_fd());
                self.read_pipe(name, writer, pid, StdStream::Stderr, errors, Some(held_as));
            }
        }
        self.pids.insert(pid, (name.clone(), worker));
        if let Some(gen_io) = self.sites.get_mut(name).and_then(|s| s.io.gens.get_mut(&g)) {
            gen_io.workers.insert(
                id,
                Worker {
                    pidref,
                    adopted: false,
                    token,
                    leaf_reusable: cgroup.is_some(),
                    cgroup,
                    started_wall: SystemTime::now(),
                    // Our child, not yet reaped: the pid is still its own.
                    start_time: start_time
                        .or_else(|| crate::process::read_stat(pid).ok().map(|s| s.start_time)),
                },
            );
        }
        self.unsaved(Unsaved::Changes);
        Ok(())
    }

    /// Reads a worker's output pipe (its `stream`) from now on; `held_as`: the name the
    /// fd holder keeps it under, if it does.
    pub(super) fn read_pipe(
        &mut self,
        name: &SiteName,
        writer: Writer,
        pid: i32,
        stream: StdStream,
        fd: OwnedFd,
        held_as: Option<String>,
    ) {
        match self.reg.arm(fd.as_fd(), Interest::Readable, Source::Pipe) {
            Ok(t) => {
                self.pipes.insert(
                    t,
                    Pipe {
                        site: name.clone(),
                        writer,
                        pid,
                        stream,
                        fd,
                        held_as,
                        splitter: LineSplitter::default(),
                        hinted: false,
                    },
                );
            }
            Err(e) => warn!(site = %name, "the output of {writer} is not captured: {e}"),
        }
    }

    /// A worker's pipe is readable: its complete lines go to the site's log. A pipe the
    /// fd holder keeps is read through the cursor (`cursor.rs`): each chunk is looked at,
    /// recorded, written, and only then taken off, so that an agent that dies loses none
    /// of it and logs none of it twice.
    pub(super) fn on_pipe(&mut self, token: u64) {
        let Some(mut pipe) = self.pipes.remove(&token) else {
            return;
        };
        let careful = pipe.held_as.is_some() && self.reads_through_cursor();
        let mut buf = [0u8; 65536];
        let mut eof = false;
        let mut records = Vec::new();
        let now = SystemTime::now();
        for _ in 0..16 {
            let got = if careful {
                let limit = self
                    .sites
                    .get(&pipe.site)
                    .map_or(buf.len(), |s| s.io.log.read_limit())
                    .min(buf.len());
                self.look_at_pipe(pipe.fd.as_fd(), &mut buf[..limit])
            } else {
                rustix::io::read(&pipe.fd, &mut buf)
            };
            match got {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    let hint = |line: &[u8]| {
                        let Writer::Worker(id) = pipe.writer else {
                            return None;
                        };
                        self.sites
                            .get(&pipe.site)
                            .and_then(|s| s.io.sandbox.as_ref())
                            .and_then(|p| p.bind_refusal_hint(id, line))
                    };
                    let hinted = &mut pipe.hinted;
                    pipe.splitter.feed(&buf[..n], |line| {
                        records.push(logs::record(pipe.writer, pipe.pid, pipe.stream, line, now));
                        // Once per process, right after the line it explains.
                        if !*hinted {
                            if let Some(h) = hint(line) {
                                *hinted = true;
                                records.push(
                                    format!("{} hatchery: {h}\n", logs::utc_timestamp(now))
                                        .into_bytes(),
                                );
                            }
                        }
                    });
                    if careful {
                        // Recorded and written, then taken off.
                        if !records.is_empty() {
                            super::cursor::test_crash(super::cursor::CrashPoint::Peeked);
                            let held_as = pipe.held_as.as_deref().unwrap_or_default();
                            self.write_recorded(&pipe.site, held_as, n as u64, &records);
                            super::cursor::test_crash(super::cursor::CrashPoint::Logged);
                        }
                        records.clear();
                        if let Err(e) = self.take_from_pipe(pipe.fd.as_fd(), n) {
                            warn!(site = %pipe.site, "failed to take the output of {} off its pipe: {e}", pipe.writer);
                            eof = true;
                            break;
                        }
                        self.read_done();
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(site = %pipe.site, "failed to read the output of {}: {e}", pipe.writer);
                    eof = true;
                    break;
                }
            }
        }
        if eof {
            pipe.splitter.feed(b"", |_| {});
            pipe.splitter.finish(|line| {
                records.push(logs::record(pipe.writer, pipe.pid, pipe.stream, line, now))
            });
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
                    warn!(site = %pipe.site, "stopped capturing the output of {}: {e}", pipe.writer)
                }
            }
        }
    }

    pub(super) fn write_records(&mut self, name: &SiteName, records: &[Vec<u8>]) {
        self.write_records_as(name, records, false);
    }

    /// [`Agent::write_records`] in one write (a read recorded in the output cursor).
    pub(super) fn write_records_whole(&mut self, name: &SiteName, records: &[Vec<u8>]) {
        self.write_records_as(name, records, true);
    }

    fn write_records_as(&mut self, name: &SiteName, records: &[Vec<u8>], whole: bool) {
        if records.is_empty() {
            return;
        }
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        // Few writes for the lot (the lines of a turn of the loop).
        let written = if whole {
            site.io.log.append_whole(records)
        } else {
            site.io.log.append_all(records)
        };
        if let Err(e) = written {
            warn!(site = %name, "failed to write {}: {e}", site.io.log.path().display());
        }
        let path = site.io.log.path().display().to_string();
        let followers = site.io.followers.clone();
        for conn in followers {
            let behind = self
                .conns
                .get(&conn)
                .is_some_and(|c| c.outbuf.len() > MAX_FOLLOW_BUFFER);
            if behind {
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

    pub(super) fn on_notify(&mut self) {
        loop {
            match self.notify.recv() {
                Ok(Some(n)) => {
                    let Some((
                        site,
                        WorkerId {
                            generation: g,
                            slot: id,
                        },
                    )) = self.pids.get(&n.pid).cloned()
                    else {
                        self.foreign_notification(&n);
                        continue;
                    };
                    if n.ready {
                        let input = Input::ReadyNotified { id };
                        self.feed(
                            &site,
                            SiteInput::Worker {
                                generation: g,
                                input,
                            },
                        );
                    }
                    if let Some(busy) = n.busy {
                        let input = Input::BusyReported { id, busy };
                        self.feed(
                            &site,
                            SiteInput::Worker {
                                generation: g,
                                input,
                            },
                        );
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
    pub(super) fn foreign_notification(&mut self, n: &crate::net::Notification) {
        let parent = n
            .ready
            .then(|| crate::process::parent_pid(n.pid))
            .flatten()
            .and_then(|ppid| self.pids.get(&ppid).cloned());
        let Some((
            site,
            WorkerId {
                generation: g,
                slot: id,
            },
        )) = parent
        else {
            debug!(pid = n.pid, "notification from an unknown pid, ignored");
            return;
        };
        let msg = format!(
            "READY=1 from pid {} (a child of gen-{g} w-{id}) ignored: only the worker itself may report; a helper such as systemd-notify speaks for its parent only with CAP_SYS_ADMIN (use ready.check = \"tcp\", or send READY=1 from the worker)",
            n.pid
        );
        warn!(site = %site, "{msg}");
        if let Some(s) = self.sites.get_mut(&site).map(|s| &mut s.io) {
            let record = format!(
                "{} hatchery: {msg}\n",
                logs::utc_timestamp(SystemTime::now())
            );
            let _ = s.log.append(record.as_bytes());
        }
    }
}

/// A new output pipe for a worker: its read end (the agent's, non-blocking) and its write
/// end (the worker's).
pub(super) fn output_pipe() -> Result<(OwnedFd, OwnedFd), SpawnFailure> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnFailure::Pipe(e.into()))?;
    rustix::io::ioctl_fionbio(&r, true).map_err(|e| SpawnFailure::Pipe(e.into()))?;
    Ok((r, w))
}

/// Most workers whose starts are prepared at once (`Agent::spawn_all`).
const START_CHUNK: usize = 64;

/// How long a crashed worker must have run for its leaf to hold the slot's next process
/// (`Agent::reusable_leaves`): one killed as it was born (in a cgroup killed from outside
/// the agent) is replaced in a fresh leaf.
const REUSE_LEAF_AFTER: Duration = Duration::from_secs(1);
/// Room kept in `Agent::reusable_leaves` between turns (a crash or a few at a time).
const REUSABLE_LEAVES_KEPT: usize = 256;
/// Workers whose exit was handled that may stay zombies past the start of their
/// replacements, to the end of the turn (`Agent::reap_before_starting`): a few, since each
/// still counts in its unit's `TasksMax`.
const ZOMBIES_PAST_A_START: usize = 64;

/// A worker's start, prepared ([`Agent::spawn_all`]).
struct Prepared {
    /// Taken by the start.
    image: Option<crate::sys::spawn::ExecImage>,
    /// Its own output pipes, when its site has no output sockets.
    pipes: Option<Pipes>,
}

/// A worker's stdout and stderr pipes: the write ends are its, the read ends the agent's.
struct Pipes {
    out_r: OwnedFd,
    out_w: OwnedFd,
    err_r: OwnedFd,
    err_w: OwnedFd,
}

/// An exit handled and not yet told ([`Agent::tell_exits`]).
#[derive(Debug)]
pub(super) struct ExitToTell {
    site: SiteName,
    generation: GenId,
    slot: Slot,
    pid: i32,
    reason: ExitReason,
    /// It was asked to stop.
    asked: bool,
    /// Neither asked nor the agent's shutdown: a crash (a warning).
    crash: bool,
    /// When it was handled: its history entry's time.
    at: SystemTime,
}

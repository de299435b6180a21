//! Crash recovery of the agent: what the state file keeps of a site machine
//! ([`SiteMachine::record`]), and the machine a new agent builds from it
//! ([`SiteMachine::adopt`]) to take over the workers the earlier agent left running
//! (orphaned, not stopped) instead of starting new ones.
//!
//! The event loop writes the record of each site after its changes, and at startup reads it
//! back, keeps only the workers still alive (each checked by pidfd and start time), and
//! hands the rest here. Everything below is policy, pure: it does no I/O.
//!
//! What the record keeps: the serving generation, the highest generation number used, the
//! workers asked for (configuration or a runtime `scale`), whether the site runs by request,
//! and every generation with a process (the serving one even without): its release, and of
//! each worker whose pid is known its slot, pid, phase (ready, or asked to stop) and
//! restart count. A spawn not yet reported has no pid, and is not recorded.
//!
//! How a site is adopted:
//! 1. The generation kept, K: the serving one if it has a worker in the record (or if no
//!    generation has one); otherwise the newest generation that has workers. (A
//!    stop-then-start deploy of an app that binds its own port may have the new generation
//!    running while the serving one was stopped: that deploy is thereby finished.)
//! 2. K serves, with the configuration filled in for its release as a new site's first
//!    generation is. When it did not serve, new connections are steered to it
//!    ([`Action::Steer`]) and the release it replaces is recorded as the previous one.
//!    Its workers keep their slot, pid and restart count: a ready one is `Ready` and
//!    settled; one not yet ready is `Starting` with a fresh `ready.timeout` (the ready
//!    check goes on: `READY=1`, or the loop's `tcp`/`http` probe; without a check a process
//!    that runs is ready); one asked to stop is `Stopping` (then removed) with its stop
//!    signal sent again, as the earlier agent may have died between deciding and
//!    signalling. Crash histories start afresh: the new agent's first crash of a worker
//!    backs off from `restart.backoff_initial`.
//! 3. The count wanted is derived from the recorded `requested` as a new site's is from
//!    `workers` (for an automatic site `auto.min`, or the workers it kept if more, up to
//!    `auto.max`; within the memory cap), and `requested`
//!    stays the recorded one (a runtime `scale` outlives the crash). Within a memory cap,
//!    the processes of the other generations (stopping) hold memory until they are gone:
//!    K wants no more than the cap leaves beside them, as after a rollback, and the
//!    capacity check gives back the rest once they are gone. (A deploy keeps both
//!    generations within the cap, so this stops none of K's workers unless the cap fell:
//!    a smaller budget, or an estimate below what the earlier agent had measured.)
//!    A site with a budget but no per-worker figure has no cap until its workers are
//!    measured: until then it wants no more than its configured `workers`, or the workers
//!    it kept if more (a runtime `scale` that the earlier agent's measured cap allowed is
//!    not started blind; the capacity check grows the site once it has measured).
//!    - The site runs: K runs. Its workers beyond the count are stopped at once (highest
//!      slots first) and removed; missing slots (workers that died while no agent ran)
//!      are started as any start does, so a site whose app binds its own port waits until
//!      the other generations' processes are gone.
//!    - The site was stopped (or stopping) by request: nothing starts, and every worker of
//!      K is stopped.
//! 4. Every other generation leaves: each of its workers is stopped (signalled again if
//!    it was stopping already) and its slot removed, and the generation is retired
//!    ([`Action::Retire`]) once its last worker is gone (at once if it has none). A deploy
//!    in flight is thereby rolled back if it had not flipped, finished if it had; a canary
//!    is rolled back.
//! 5. No deploy is under way and none queued, no client waits (a crash disconnected them),
//!    health checks start afresh, and the generation numbers go on from the highest the
//!    record names. An [`Event::Adopted`] says what was taken over, started and stopped.
//!
//! A zygote-mode generation's zygote did not outlive the agent (it ends when its socket to
//! the agent closes): the workers forked from it are adopted as any, and a new zygote is
//! started when a spawn needs one (a missing slot at once; the spawn waits for it).
//!
//! What it does not keep: a site marked failed (flapping) runs again, as after
//! `hatchery start`; crash histories and backoffs (a slot backing off is a missing slot);
//! which workers said they were busy; the last deploy's outcome. A worker that sent
//! `READY=1` to the agent that died does not send it again: with a `notify` check, one
//! recorded as starting is stopped at its fresh ready deadline and started again (a `tcp`
//! or `http` probe finds it ready). A spawn whose pid the earlier agent had not seen is
//! not in the record: its slot counts as missing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Action, Event, Generation, SiteMachine, initial_count, policies};
use crate::config::SiteConfig;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::slots::{self, Adopted, AdoptedPhase, Phase, RunState, SiteCore};

/// What the state file keeps of a site machine: enough for a new agent to adopt its
/// workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// The generation new connections go to.
    pub serving: u32,
    /// The highest generation number used so far.
    pub last_gen: u32,
    /// Workers asked for (configuration, or a runtime `scale`).
    pub requested: u32,
    /// `scale N` pinned the count of a site that follows its load.
    #[serde(default)]
    pub pinned: bool,
    /// `false`: stopped (or stopping) by request.
    pub running: bool,
    /// Every generation with a process (the serving one even without).
    pub gens: Vec<GenRecord>,
}

/// A generation in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRecord {
    /// Its number.
    pub id: u32,
    /// Its release directory (sites with `release`).
    pub release: Option<PathBuf>,
    /// Its workers with a process.
    pub workers: Vec<WorkerState>,
    /// Deployed because a listener of the generation before was shut down
    /// (`Generation::replaces_shut`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaces_shut: bool,
}

/// A worker in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Its slot.
    pub slot: u32,
    /// Its process.
    pub pid: i32,
    /// Ready (else starting).
    pub ready: bool,
    /// Asked to stop.
    pub stopping: bool,
    /// How many times its slot was restarted after a crash.
    pub restarts: u32,
}

impl WorkerState {
    fn adopted(&self, stop: bool) -> Adopted {
        let phase = if stop || self.stopping {
            AdoptedPhase::Stopping
        } else if self.ready {
            AdoptedPhase::Ready
        } else {
            AdoptedPhase::Starting
        };
        Adopted {
            id: Slot(self.slot),
            pid: self.pid,
            restarts: self.restarts,
            phase,
        }
    }
}

impl SiteMachine {
    /// The record of this machine: every slot with a process whose pid is known.
    pub fn record(&self) -> MachineRecord {
        let gens = self
            .gens
            .values()
            .filter_map(|g| {
                let workers: Vec<WorkerState> = g
                    .slots
                    .slots
                    .values()
                    .filter(|s| s.phase.has_process())
                    .filter_map(|s| {
                        Some(WorkerState {
                            slot: s.id.0,
                            pid: s.pid?,
                            ready: s.phase == Phase::Ready,
                            stopping: matches!(s.phase, Phase::Stopping { .. }),
                            restarts: s.restarts,
                        })
                    })
                    .collect();
                (g.id == self.serving || !workers.is_empty()).then(|| GenRecord {
                    id: g.id.0,
                    release: g.release.clone(),
                    workers,
                    replaces_shut: g.replaces_shut,
                })
            })
            .collect();
        MachineRecord {
            serving: self.serving.0,
            last_gen: self.last_gen.0,
            requested: self.requested,
            pinned: self.pinned,
            running: self.runs(),
            gens,
        }
    }

    /// Whether the site runs by request: its serving generation runs, or is held stopped
    /// by a stop-then-start deploy, or waits to start until another generation is gone.
    fn runs(&self) -> bool {
        let held = self
            .deploy
            .as_ref()
            .is_some_and(|d| d.exclusive.is_some_and(|x| x.old_stopped));
        !self.removing
            && (matches!(
                self.current().slots.run,
                RunState::Running | RunState::Failed
            ) || held
                || self.start_deferred)
    }

    /// A machine for a site whose workers an earlier agent left running: `record` lists
    /// only the workers still alive (the caller verified each). Returns the machine and the
    /// actions to carry out (spawns of missing workers, stop signals for workers of
    /// generations not kept, Log events). The policy is the module doc's.
    pub fn adopt(
        config: SiteConfig,
        record: MachineRecord,
        previous_release: Option<PathBuf>,
        now: Instant,
    ) -> (SiteMachine, Vec<Action>) {
        let mut out = Vec::new();
        let has_workers = |g: &&GenRecord| !g.workers.is_empty();
        let serving_has = record
            .gens
            .iter()
            .filter(has_workers)
            .any(|g| g.id == record.serving);
        let kept = if serving_has {
            record.serving
        } else {
            record
                .gens
                .iter()
                .filter(has_workers)
                .map(|g| g.id)
                .max()
                .unwrap_or(record.serving)
        };
        let kept_record = record.gens.iter().find(|g| g.id == kept);
        let release = kept_record.and_then(|g| g.release.clone());
        // As a `scale` could ask for (a damaged record could say more).
        let requested = record.requested.min(crate::config::MAX_WORKERS);
        let (cap, initial) = initial_count(&config, requested, &mut out);
        // A budget without a per-worker figure has no cap until workers are measured: a
        // count the earlier agent's measured cap allowed is not started blind.
        let initial = if config.limits.memory.is_some() && cap.is_none() {
            let kept = kept_record.map_or(0, |g| g.workers.iter().filter(|w| !w.stopping).count());
            initial.min(config.workers.max(u32::try_from(kept).unwrap_or(u32::MAX)))
        } else {
            initial
        };
        // An `auto` site that had grown keeps the workers it has (within its maximum and the
        // cap): stopping healthy workers to grow back one capacity check at a time would
        // only cost capacity.
        let initial = match (config.auto, cap) {
            (Some(a), Some(c)) => {
                let live =
                    kept_record.map_or(0, |g| g.workers.iter().filter(|w| !w.stopping).count());
                let live = u32::try_from(live).unwrap_or(u32::MAX);
                initial.max(live.min(a.max).min(c.workers))
            }
            _ => initial,
        };
        // Processes of the other generations still hold memory until they are gone.
        let others = record
            .gens
            .iter()
            .filter(|g| g.id != kept)
            .map(|g| g.workers.len())
            .sum::<usize>();
        let others = u32::try_from(others).unwrap_or(u32::MAX);
        let desired = match cap {
            Some(c) => initial.min(c.workers.saturating_sub(others)),
            None => initial,
        };

        let for_release = |release: &Option<PathBuf>| match release {
            Some(r) => config.for_release(r),
            None => config.clone(),
        };
        let mut gens = BTreeMap::new();
        let mut carried: Vec<(GenId, Vec<slots::Action>)> = Vec::new();
        let kept_workers: Vec<Adopted> = kept_record
            .map(|g| g.workers.iter().map(|w| w.adopted(false)).collect())
            .unwrap_or_default();
        let mut k = Generation::new(GenId(kept), release.clone(), for_release(&release), desired);
        let (core, actions) = SiteCore::adopted(
            desired,
            k.slots.policies,
            &kept_workers,
            record.running,
            now,
        );
        k.slots = core;
        k.replaces_shut = kept_record.is_some_and(|g| g.replaces_shut);
        carried.push((k.id, actions));
        let adopted = u32::try_from(k.slots.slots.len()).unwrap_or(u32::MAX);
        gens.insert(k.id, k);
        for g in &record.gens {
            let id = GenId(g.id);
            if gens.contains_key(&id) {
                continue;
            }
            let config = for_release(&g.release);
            let stopping: Vec<Adopted> = g.workers.iter().map(|w| w.adopted(true)).collect();
            let (core, actions) = SiteCore::adopted(0, policies(&config), &stopping, false, now);
            let mut leaving = Generation::new(id, g.release.clone(), config, 0);
            leaving.slots = core;
            leaving.leaving = true;
            carried.push((id, actions));
            gens.insert(id, leaving);
        }
        let last_gen = record
            .gens
            .iter()
            .map(|g| g.id)
            .chain([record.last_gen, kept])
            .max()
            .unwrap_or(kept);

        let config_follows_load = config.auto.is_some_and(|a| a.by_load());
        let m = SiteMachine::assemble(
            config,
            gens,
            GenId(kept),
            GenId(last_gen),
            previous_release,
            now,
        );
        let mut m = SiteMachine {
            requested,
            capacity: cap,
            pinned: record.pinned && config_follows_load,
            ..m
        };
        let mut acts = Vec::new();
        for (g, actions) in carried {
            m.carry(g, actions, now, &mut acts);
        }
        // The serving generation had no worker left: the one kept serves instead, as at a
        // flip.
        if kept != record.serving {
            acts.push(Action::Steer(m.serving));
            let replaced = record
                .gens
                .iter()
                .find(|g| g.id == record.serving)
                .and_then(|g| g.release.clone());
            if let Some(prev) = replaced {
                m.previous_release = Some(prev.clone());
                acts.push(Action::RecordPreviousRelease(prev));
            }
        }
        if record.running {
            m.start_serving(now, &mut acts);
        }
        m.retire_gone(&mut acts);
        m.start_zygotes(now, &mut acts);
        m.health_arm(now);
        let count = |f: fn(&Action) -> bool| {
            u32::try_from(acts.iter().filter(|a| f(a)).count()).unwrap_or(u32::MAX)
        };
        out.push(Action::Log(Event::Adopted {
            generation: m.serving,
            workers: adopted,
            // A zygote-mode generation's spawns wait for its zygote.
            starting: count(|a| matches!(a, Action::Spawn { .. }))
                + m.gens
                    .values()
                    .filter_map(|g| g.zygote.as_ref())
                    .map(|z| u32::try_from(z.held.len()).unwrap_or(u32::MAX))
                    .sum::<u32>(),
            stopped: count(|a| matches!(a, Action::Signal { .. })),
        }));
        out.extend(acts);
        (m, out)
    }
}

#[cfg(test)]
mod tests;

//! `status`: the typed report ([`crate::status::Status`]) assembled from the site
//! machines' state and the kernel's (pids, cgroups, listeners, usage).

use std::time::{Instant, SystemTime};

use super::{Agent, generations};
use crate::config::SiteName;
use crate::logs;
use crate::status::{
    AgentStatus, AutoRange, CapacityStatus, DeployStatus, GenerationStatus, LimitsStatus,
    ScaleDecision, ScaleStatus, SiteState, SiteStatus, Status, WorkerStatus, ZygoteStatus,
};

impl Agent {
    pub(super) fn status(&self, only: Option<&SiteName>, uid: u32, admin: bool) -> Status {
        self.status_of(only, uid, admin, true, true, true)
    }

    /// Every site's status as root sees it, for metrics: the usage of each worker's and
    /// zygote's leaf is read only where the site's own cgroup lacks a figure (the site's
    /// is then their sum), else left `null`. The site-level figures are those of `status`,
    /// at the cost of a few files per site rather than a few per worker (at 1000 workers
    /// with cgroups, 44 ms of the agent's CPU per scrape against 1.5 ms).
    pub(super) fn status_of_sites(&self) -> Status {
        self.status_of(None, 0, true, true, false, false)
    }

    /// [`Agent::status`], with each site's `workers` left out unless `with_workers`
    /// (`watch`'s overview), and their leaves' usage read only where the site's cgroup
    /// lacks a figure unless `every_leaf`; what is read of a worker is read anew if
    /// `fresh`, else may be a few seconds old ([`crate::usage::UsageCache`]).
    pub(super) fn status_of(
        &self,
        only: Option<&SiteName>,
        uid: u32,
        admin: bool,
        with_workers: bool,
        every_leaf: bool,
        fresh: bool,
    ) -> Status {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut sites: Vec<SiteStatus> = self
            .sites
            .iter()
            .filter(|(n, s)| only.is_none_or(|o| o == *n) && (admin || s.config().uid == uid))
            .map(|(name, s)| {
                let m = &s.machine;
                // The site's cgroup first: its leaves are read for what it has.
                let site_usage = self
                    .cgroups
                    .as_ref()
                    .map(|t| crate::cgroup::read_usage(&t.site_dir(name.as_str())));
                let complete = site_usage.is_some_and(|u| {
                    u.memory_current.is_some() && u.pids.is_some() && u.cpu_usec.is_some()
                });
                let read_leaves = every_leaf || !complete;
                let leaf_usage = |leaf: Option<&std::path::Path>, pid: i32| {
                    self.usage_cache.worker(pid, fresh, || {
                        let mut u = leaf
                            .map(|l| crate::cgroup::read_usage_below(l, site_usage.as_ref()))
                            .unwrap_or_default();
                        crate::usage::complete(&mut u, pid, leaf);
                        u
                    })
                };
                let workers = m
                    .generations()
                    .filter(|_| with_workers)
                    .flat_map(|g| g.slots.slots.values().map(move |slot| (g, slot)))
                    .map(|(g, slot)| {
                        let worker = s.io.gens.get(&g.id).and_then(|x| x.workers.get(&slot.id));
                        let started_at = worker.map(|w| w.started_wall).or_else(|| {
                            slot.started
                                .map(|t| wall - now.saturating_duration_since(t))
                        });
                        WorkerStatus {
                            id: slot.id.0,
                            generation: g.id.0,
                            pid: slot.pid,
                            state: slot.phase.name().to_string(),
                            busy: slot.busy(),
                            restarts: slot.restarts,
                            started_at: started_at.map(logs::utc_timestamp),
                            uptime_ms: slot.pid.and(slot.started).map(|t| {
                                u64::try_from(now.saturating_duration_since(t).as_millis())
                                    .unwrap_or(u64::MAX)
                            }),
                            last_exit: slot.last_exit.as_ref().map(|r| r.to_string()),
                            cgroup: worker.and_then(|w| w.cgroup.clone()),
                            usage: worker
                                .filter(|_| read_leaves)
                                .map(|w| leaf_usage(w.cgroup.as_deref(), w.pidref.pid())),
                        }
                    })
                    .collect();
                let cur = m.current();
                let config = m.config();
                let mut site = SiteStatus {
                    name: name.to_string(),
                    state: cur.slots.run.state(),
                    // Running as recorded: its file does not load (`Agent::not_loading`).
                    error: self.not_loading.get(name.as_str()).map(|b| {
                        format!(
                            "its file does not load, so its workers run on with the configuration they were started with (reload once it is mended): {}",
                            b.reason
                        )
                    }),
                    file: self.not_loading.get(name.as_str()).map(|b| b.file.clone()),
                    generation: Some(m.serving().0),
                    release: cur.release.clone(),
                    previous_release: m.previous_release().map(|p| p.to_path_buf()),
                    generations: m
                        .generations()
                        .map(|g| GenerationStatus {
                            id: g.id.0,
                            state: m.generation_state(g).to_string(),
                            release: g.release.clone(),
                            desired: g.slots.desired,
                            ready: count(g.slots.ready()),
                            live: count(g.slots.live()),
                            crashes: g.crashes,
                            share: m.connection_share(g.id).map(|s| s.to_string()),
                            zygote: g.zygote.as_ref().map(|z| {
                                let process = self.zygote_process(name, g.id);
                                let cgroup = process.and_then(|p| p.cgroup.clone());
                                ZygoteStatus {
                                    state: z.phase.name().to_string(),
                                    degraded: z.degraded,
                                    restarts: z.restarts,
                                    pid: process.map(|p| p.pidref.pid()),
                                    usage: process
                                        .filter(|_| read_leaves)
                                        .map(|p| leaf_usage(cgroup.as_deref(), p.pidref.pid())),
                                    cgroup,
                                    spares: self
                                        .spares_of(name, g.id)
                                        .into_iter()
                                        .map(|(pid, s)| crate::status::SpareStatus {
                                            pid,
                                            slot: s.slot.0,
                                            cgroup: s.leaf.clone(),
                                        })
                                        .collect(),
                                }
                            }),
                        })
                        .collect(),
                    deploy: m.deploy().map(|d| DeployStatus {
                        from: d.from.0,
                        to: d.to.0,
                        stage: d.stage.name().to_string(),
                        release: d.release.clone(),
                        target: d.target,
                        cap: d.cap,
                        rollback: d.rollback,
                        canary: d.canary.map(|c| c.share.to_string()),
                        promoted: d.canary.is_some_and(|c| c.promoted),
                        started_at: logs::utc_timestamp(
                            wall - now.saturating_duration_since(d.started),
                        ),
                    }),
                    queued_deploys: m.queued_deploys(),
                    last_deploy: m
                        .last_deploy()
                        .map(|e| super::render::deploy_record(e, now, wall)),
                    steering: Some(generations::steering_mode(&s.io).to_string()),
                    desired: cur.slots.desired,
                    requested: m.requested(),
                    auto: config.auto.map(|a| AutoRange {
                        min: a.min,
                        max: a.max,
                    }),
                    capacity: m.capacity().map(|c| CapacityStatus {
                        workers: c.workers,
                        per_worker: c.per_worker,
                        basis: c.basis,
                        budget: c.budget,
                        zygote: c.zygote,
                        derivation: c.describe(),
                    }),
                    scale: scale_status(s, self.pressure_armed(name), now, wall),
                    ready: count(cur.slots.ready()),
                    restarting: cur.slots.is_restarting(),
                    listen: listen_list(config),
                    log: Some(s.io.log.path().to_path_buf()),
                    limits: Some(LimitsStatus {
                        memory: config.limits.memory,
                        pids_max: config.limits.pids_max,
                        cpu_weight: config.limits.cpu_weight,
                        memory_max: config.limits.worker_memory_max,
                        memory_high: config.limits.worker_memory_high,
                        not_enforced: s.io.not_enforced.iter().map(|x| x.to_string()).collect(),
                    }),
                    usage: site_usage,
                    sandbox: s.io.sandbox.as_ref().map(crate::sandbox::Prepared::status),
                    workers,
                    deploys: stop_then_start(config),
                };
                if with_workers {
                    site_usage_from_workers(&mut site, Vec::new());
                } else if site.usage.is_none_or(|u| u.memory_current.is_none()) {
                    // The overview has no workers, but the site's figures are theirs.
                    let parts =
                        s.io.gens
                            .values()
                            .flat_map(|g| g.workers.values())
                            .map(|w| leaf_usage(w.cgroup.as_deref(), w.pidref.pid()))
                            .collect();
                    site_usage_from_workers(&mut site, parts);
                }
                site
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
                scale: None,
                ready: 0,
                restarting: false,
                listen: b.config.as_ref().map(listen_list).unwrap_or_default(),
                log: None,
                limits: None,
                usage: None,
                sandbox: None,
                workers: Vec::new(),
                deploys: b.config.as_ref().and_then(stop_then_start),
            });
        }
        Status {
            agent: AgentStatus {
                pid: std::process::id(),
                version: crate::version().to_string(),
                protocol: crate::control::PROTOCOL_VERSION,
                started_at: logs::utc_timestamp(self.started),
                upgraded_from: self.upgraded_from.clone(),
                log_bytes_dropped: logs::AGENT_LOG_DROPPED
                    .load(std::sync::atomic::Ordering::Relaxed),
                config: self.config.file.clone(),
                features: self.features(),
            },
            sites,
        }
    }
}

/// A count of slots, as `status` shows it.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A site's listeners as `status` shows them: the ports the app binds itself marked.
fn listen_list(config: &crate::config::SiteConfig) -> Vec<String> {
    config
        .listen
        .iter()
        .map(|l| match l.mode {
            crate::config::ListenMode::Agent => l.addr.to_string(),
            crate::config::ListenMode::Own => format!("{} (own)", l.addr),
        })
        .collect()
}

/// How a site whose app binds its own port deploys, in words.
fn stop_then_start(config: &crate::config::SiteConfig) -> Option<String> {
    let own = config.own_ports();
    if own.is_empty() {
        return None;
    }
    let list: Vec<String> = own.iter().map(ToString::to_string).collect();
    Some(format!(
        "stop-then-start: {} binds its own port{} {} (the serving generation stops before a new one starts)",
        config.name,
        if own.len() == 1 { "" } else { "s" },
        list.join(", ")
    ))
}

/// Load scaling of a site that follows its load: the signals it has (and those it has
/// not, with the reason), what they asked for, the last decision.
fn scale_status(
    s: &super::Site,
    pressure_trigger: bool,
    now: Instant,
    wall: SystemTime,
) -> Option<ScaleStatus> {
    let m = &s.machine;
    let load = m.load()?;
    let config = m.config();
    let policy = config.auto?.scale;
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let idle_reason = if m.load_sampling() {
        None
    } else if m.pinned() {
        Some(format!(
            "pinned at {} workers by scale: `hatchery scale {} auto` follows the load again",
            m.requested(),
            config.name
        ))
    } else if m.deploy().is_some() || m.generations().count() > 1 {
        Some("a deploy is under way (the new generation starts at the current count)".into())
    } else if m.current().slots.run != crate::supervisor::slots::RunState::Running {
        Some(format!("the site is {}", m.current().slots.run.name()))
    } else {
        Some(
            "at workers_min with no TCP listener and no BUSY report yet: nothing to sample (the first BUSY report starts sampling)"
                .into(),
        )
    };
    let mut unavailable = Vec::new();
    if let Some(sig) = &load.signals {
        if sig.busy.is_none() {
            unavailable.push("busy: the app sends no BUSY=1/BUSY=0 reports".to_string());
        }
        if sig.queued.is_none() {
            unavailable.push("accept queue: no TCP listener bound by the agent".to_string());
        }
        let no_cgroup = sig.cpu.is_none() && sig.cpu_stall.is_none() && sig.memory_events.is_none();
        if no_cgroup {
            unavailable.push(
                "cpu, cpu pressure, memory events: no cgroup v2 directory for the site (cgroup_base)"
                    .to_string(),
            );
        } else if sig.cpu.is_none() {
            unavailable.push("cpu: no cpu.stat for the site".to_string());
        }
        if sig.cpu_stall.is_none() && !no_cgroup {
            unavailable.push(
                "cpu pressure: no full line in cpu.pressure (PSI off, booted without psi=1, or a kernel before 5.13)"
                    .to_string(),
            );
        }
        if sig.memory_events.is_none() && !no_cgroup {
            unavailable.push("memory events: no memory controller for the site".to_string());
        }
    }
    Some(ScaleStatus {
        pinned: m.pinned(),
        target_percent: policy.target_percent,
        interval_ms: ms(policy.interval),
        grow_cooldown_ms: ms(policy.grow_cooldown),
        shrink_cooldown_ms: ms(policy.shrink_cooldown),
        sampling: m.load_sampling(),
        pressure_trigger,
        idle_reason,
        signals: load.signals,
        unavailable,
        held: load.held.map(|h| h.describe().to_string()),
        last_decision: load.decision.map(|(at, d)| ScaleDecision {
            from: d.from,
            to: d.to,
            reason: d.reason.describe(policy.target_percent),
            at: logs::utc_timestamp(wall - now.saturating_duration_since(at)),
        }),
    })
}

/// Completes a site's usage where its cgroup lacks figures (no memory or pids
/// controller, or no cgroups at all) with the sum of its workers' and zygotes' (read from
/// `/proc`, [`crate::usage`]), and `more` (those of workers not listed).
fn site_usage_from_workers(site: &mut SiteStatus, more: Vec<crate::cgroup::Usage>) {
    let parts: Vec<crate::cgroup::Usage> = site
        .workers
        .iter()
        .filter_map(|w| w.usage)
        .chain(
            site.generations
                .iter()
                .filter_map(|g| g.zygote.as_ref().and_then(|z| z.usage)),
        )
        .chain(more)
        .collect();
    if parts.is_empty() {
        return;
    }
    let mut usage = site.usage.unwrap_or_default();
    crate::usage::fill(&mut usage, &crate::usage::sum(&parts));
    site.usage = Some(usage);
}

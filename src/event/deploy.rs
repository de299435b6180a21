//! Deploys by generations: the event loop's side of [`crate::supervisor::deploy`].
//!
//! `hatchery deploy SITE` resolves the site's `release` symlink and starts generation
//! N+1 beside the serving generation N: its own cgroup `gen-<N+1>/`, its own workers,
//! and its listeners (a new `SO_REUSEPORT` socket per TCP address where eBPF steering
//! is attached, else the serving generation's sockets shared). After every change the
//! plan is asked what to do next (scale either generation, begin probation, flip, stop
//! the old generation, finish, or roll back), and the client sees each step as a
//! progress line. The final answer is an `ok`, or a `rolled_back` error.
//!
//! Deploys of one site never interleave: a deploy asked for while one runs waits for it
//! (FIFO) and then deploys what the symlink points to at that moment. A deploy runs to
//! its end even if its client goes away.
//!
//! `hatchery rollback SITE`: a deploy still starting or in probation is rolled back; a
//! generation still draining (not yet told to stop) is steered back to and serves again;
//! otherwise the previous release (recorded in `<state_dir>/releases/<site>`) is deployed.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::{Agent, Gen, GenId, Site, error_chain, policies};
use crate::config::{self, ListenAddr, ReadyCheck, SiteName};
use crate::control::{Done, ErrorKind, Reply};
use crate::logs;
use crate::net::Listener;
use crate::status::{DeployRecord, DeployResult, DeployStatus};
use crate::steering::{Steering, SteeringSupport};
use crate::supervisor::deploy::{Failure, GenView, Stage, Step, View, decide};
use crate::supervisor::slots::{Input, RunState, SiteCore};

/// How often a draining generation's accept queues are looked at.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// A deploy under way.
#[derive(Debug)]
pub(super) struct Deploy {
    pub from: GenId,
    pub to: GenId,
    pub stage: Stage,
    pub release: Option<PathBuf>,
    pub started: Instant,
    pub started_wall: SystemTime,
    pub ready_deadline: Instant,
    /// Workers the new generation ends up with.
    pub target: u32,
    /// Most workers of both generations together.
    pub cap: Option<u32>,
    /// Clients waiting for the outcome.
    pub conns: Vec<u64>,
    /// Whether this deploy is a rollback to the previous release.
    pub rollback: bool,
    /// Set while the plan is being carried out (feeding inputs re-enters it).
    busy: bool,
    /// `CLOCK_MONOTONIC` (ns) just before and just after the steering was flipped: a
    /// connection the kernel placed before the first went to the old generation, one
    /// placed after the second to the new one (for tests and tracing).
    flip_window: Option<(u64, u64)>,
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock Rust's `Instant` reads on Linux).
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

impl Deploy {
    /// For `status`.
    pub fn describe(&self) -> DeployStatus {
        DeployStatus {
            from: self.from,
            to: self.to,
            stage: self.stage.name().to_string(),
            release: self.release.clone(),
            target: self.target,
            cap: self.cap,
            rollback: self.rollback,
            started_at: logs::utc_timestamp(self.started_wall),
        }
    }

    /// How it ended, for `status`'s `last_deploy`.
    fn record(
        &self,
        result: DeployResult,
        reason: Option<String>,
        flip: Option<[u64; 2]>,
    ) -> DeployRecord {
        DeployRecord {
            result,
            from: self.from,
            to: self.to,
            release: self.release.clone(),
            reason,
            duration_ms: (result != DeployResult::RolledBack)
                .then(|| u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            finished_at: logs::utc_timestamp(SystemTime::now()),
            flip_monotonic_ns: flip,
        }
    }
}

/// A deploy waiting for the one under way.
#[derive(Debug)]
pub(super) struct Queued {
    conn: u64,
    release: Option<PathBuf>,
    rollback: bool,
}

/// The release directory `dir` a site's owner asked to deploy (its `release` symlink, or
/// a directory it named), resolved with the permissions of the site's user (never the
/// agent's) and, for a named one (`contained`), required to be inside the directory that
/// holds the site's `release` symlink. Every refusal reads the same, so the answer tells
/// nothing about paths the user may not see.
pub(super) fn release_for_owner(
    site: &config::SiteConfig,
    dir: &Path,
    contained: bool,
) -> Result<PathBuf, String> {
    let Some(parent) = site.release.as_deref().and_then(Path::parent) else {
        return Err(format!(
            "site {} has no release symlink: only root may deploy a directory of its choice",
            site.name
        ));
    };
    let refused = || {
        if contained {
            format!(
                "release {}: not a directory inside {} that uid {} can reach",
                dir.display(),
                parent.display(),
                site.uid
            )
        } else {
            format!(
                "release {}: does not resolve to a directory that uid {} can reach",
                dir.display(),
                site.uid
            )
        }
    };
    let allowed = std::fs::canonicalize(parent).map_err(|_| refused())?;
    let resolved = {
        let _as_user = crate::sys::creds::become_fs(site.uid, site.gid, &site.sandbox.groups)
            .map_err(|e| format!("failed to take the identity of uid {}: {e}", site.uid))?;
        std::fs::canonicalize(dir).and_then(|r| {
            std::fs::metadata(&r).and_then(|m| {
                if m.is_dir() {
                    Ok(r)
                } else {
                    Err(std::io::ErrorKind::NotADirectory.into())
                }
            })
        })
    };
    match resolved {
        Ok(r) if !contained || (r.starts_with(&allowed) && r != allowed) => Ok(r),
        _ => Err(refused()),
    }
}

/// Where the previous release of `site` is recorded.
fn previous_release_file(state_dir: &Path, site: &SiteName) -> PathBuf {
    state_dir.join("releases").join(site.as_str())
}

/// The recorded previous release of `site`, if any.
pub(super) fn read_previous_release(state_dir: &Path, site: &SiteName) -> Option<PathBuf> {
    let text = std::fs::read_to_string(previous_release_file(state_dir, site)).ok()?;
    let path = PathBuf::from(text.trim_end_matches('\n'));
    path.is_absolute().then_some(path)
}

fn write_previous_release(state_dir: &Path, site: &SiteName, release: &Path) {
    let file = previous_release_file(state_dir, site);
    let result = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, format!("{}\n", release.display()))?;
            std::fs::rename(&tmp, &file)
        });
    if let Err(e) = result {
        warn!(site = %site, "failed to record the previous release in {}: {e}", file.display());
    }
}

impl Agent {
    /// When the deploy of `s` needs looking at again without any other event.
    pub(super) fn deploy_deadline(&self, s: &Site) -> Option<Instant> {
        let d = s.deploy.as_ref()?;
        match d.stage {
            Stage::Starting => Some(d.ready_deadline),
            Stage::Probation { until } => Some(until),
            Stage::Draining {
                until,
                stopping: false,
            } => Some(until.min(Instant::now() + DRAIN_POLL)),
            Stage::Draining { stopping: true, .. } => None,
        }
    }

    /// How connections reach the serving generation, for `status`.
    pub(super) fn steering_mode(&self, s: &Site) -> &'static str {
        if s.steering.iter().any(Option::is_some) {
            "ebpf"
        } else {
            "shared listener"
        }
    }

    /// A generation's state for `status`.
    pub(super) fn generation_state(&self, s: &Site, g: &Gen) -> &'static str {
        match &s.deploy {
            Some(d) if d.to == g.id && g.id != s.serving => d.stage.name(),
            Some(d) if d.from == g.id && g.id != s.serving => "draining",
            _ if g.id == s.serving => "serving",
            _ if g.leaving => "retiring",
            _ => "draining",
        }
    }

    /// A refusal for operations that would fight a deploy under way.
    pub(super) fn deploy_busy(&self, name: &SiteName) -> Option<Reply> {
        let d = self.sites.get(name)?.deploy.as_ref()?;
        Some(Reply::error(
            ErrorKind::Refused,
            format!(
                "a deploy of site {name} is under way (gen-{} {}): try again once it is done",
                d.to,
                d.stage.name()
            ),
        ))
    }

    /// `deploy`: start one now, or queue it behind the one under way.
    pub(super) fn request_deploy(
        &mut self,
        conn: u64,
        name: &SiteName,
        release: Option<PathBuf>,
        rollback: bool,
    ) {
        let Some(site) = self.sites.get(name) else {
            return;
        };
        if site.config.ready.check == ReadyCheck::Tcp && !probe_steered(site) {
            return self.finish(
                conn,
                &Reply::error(
                    ErrorKind::BadRequest,
                    format!(
                        "site {name} uses ready.check = \"tcp\", which needs eBPF connection steering on its first TCP listener to probe a new generation alone ({}); use \"notify\" or \"none\"",
                        match &self.steering_support {
                            SteeringSupport::Unavailable(why) => format!("unavailable: {why}"),
                            _ => "it could not be attached to that listener, see the agent's log".into(),
                        }
                    ),
                ),
            );
        }
        if site.removing || site.cur().core.run == RunState::Stopped {
            return self.finish(
                conn,
                &Reply::error(
                    ErrorKind::Refused,
                    format!("site {name} is stopped: start it before deploying"),
                ),
            );
        }
        let running = site
            .deploy
            .as_ref()
            .map(|d| (d.to, site.queued_deploys.len() + 1));
        self.hold_conn(conn);
        if let Some((to, ahead)) = running {
            let msg = format!(
                "waiting for the deploy of gen-{} ({} ahead)",
                to,
                if ahead == 1 {
                    "1 deploy".to_string()
                } else {
                    format!("{ahead} deploys")
                }
            );
            if let Some(site) = self.sites.get_mut(name) {
                site.queued_deploys.push_back(Queued {
                    conn,
                    release,
                    rollback,
                });
            }
            self.send(conn, &Reply::Event(msg));
            return;
        }
        self.start_deploy(name, conn, release, rollback);
    }

    /// `rollback`: undo the deploy under way, steer back to a draining generation, or
    /// deploy the previous release.
    pub(super) fn request_rollback(&mut self, conn: u64, name: &SiteName) {
        let Some(site) = self.sites.get(name) else {
            return;
        };
        match site.deploy.as_ref().map(|d| (d.stage, d.from, d.to)) {
            Some((Stage::Starting | Stage::Probation { .. }, from, to)) => {
                self.roll_back(name, format!("gen-{to} rolled back on request"));
                self.finish(
                    conn,
                    &Reply::ok(&Done {
                        generation: Some(from),
                        ..Done::new(name, format!("gen-{to} rolled back; gen-{from} serves"))
                    }),
                );
            }
            Some((
                Stage::Draining {
                    stopping: false, ..
                },
                from,
                to,
            )) => {
                self.steer_back(name, "rolled back on request");
                self.finish(
                    conn,
                    &Reply::ok(&Done {
                        generation: Some(from),
                        ..Done::new(
                            name,
                            format!("steered back to gen-{from}; gen-{to} is stopping"),
                        )
                    }),
                );
            }
            _ => {
                let previous = site.previous_release.clone();
                match previous {
                    Some(p) => self.request_deploy(conn, name, Some(p), true),
                    None => self.finish(
                        conn,
                        &Reply::error(
                            ErrorKind::Failed,
                            format!("no previous release of site {name} is recorded"),
                        ),
                    ),
                }
            }
        }
    }

    fn hold_conn(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.held = true;
        }
        self.arm_conn_read(conn);
    }

    /// Binds (or shares) the listeners of a new generation beside `cur`'s.
    fn generation_listeners(&self, site: &Site) -> Result<Vec<Listener>, String> {
        let cur = site.cur();
        let mut out = Vec::new();
        for (i, l) in cur.listeners.iter().enumerate() {
            let steered = matches!(l.spec.addr, ListenAddr::Tcp(_))
                && site.steering.get(i).is_some_and(Option::is_some);
            let fresh = if steered {
                Listener::bind_beside(&l.spec, site.config.uid, site.config.gid)
                    .map_err(|e| format!("{e}: {}", error_chain(&e)))?
            } else {
                Listener {
                    spec: l.spec.clone(),
                    fd: l
                        .fd
                        .try_clone()
                        .map_err(|e| format!("failed to share {}: {e}", l.spec.addr))?,
                }
            };
            out.push(fresh);
        }
        Ok(out)
    }

    fn start_deploy(
        &mut self,
        name: &SiteName,
        conn: u64,
        release: Option<PathBuf>,
        rollback: bool,
    ) {
        let Some(site) = self.sites.get(name) else {
            return;
        };
        let resolved = match (&release, &site.config.release) {
            (Some(dir), _) => config::resolve_release(dir).map(Some),
            (None, Some(link)) => config::resolve_release(link).map(Some),
            (None, None) => Ok(None),
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => {
                return self.end_with(
                    name,
                    vec![conn],
                    Reply::error(ErrorKind::Failed, format!("cannot deploy site {name}: {e}")),
                );
            }
        };
        let target = site.cur().core.desired;
        if target == 0 {
            return self.end_with(
                name,
                vec![conn],
                Reply::error(
                    ErrorKind::Refused,
                    format!("site {name} runs no workers: scale it up before deploying"),
                ),
            );
        }
        let cap = site
            .capacity
            .map(|c| c.workers)
            .or(site.config.auto.map(|a| a.max));
        if let Some(c) = cap.filter(|c| *c < 2) {
            return self.end_with(
                name,
                vec![conn],
                Reply::error(
                    ErrorKind::Refused,
                    format!(
                        "site {name} has room for {c} worker: a deploy needs room for one more beside the serving generation"
                    ),
                ),
            );
        }
        let listeners = match self.generation_listeners(site) {
            Ok(l) => l,
            Err(e) => {
                return self.end_with(
                    name,
                    vec![conn],
                    Reply::error(ErrorKind::Failed, format!("cannot deploy site {name}: {e}")),
                );
            }
        };
        let from = site.serving;
        let to = site.last_gen + 1;
        let config = match &resolved {
            Some(r) => site.config.for_release(r),
            None => site.config.clone(),
        };
        let now = Instant::now();
        let ready_deadline = now + config.ready.timeout;
        let core = SiteCore::new(0, policies(&config));
        let what = match &resolved {
            Some(r) => format!("{} as gen-{to}", r.display()),
            None => format!("gen-{to}"),
        };
        info!(site = %name, gen = to, "deploying {what} beside gen-{from}");
        let site = self.sites.get_mut(name).expect("looked up above");
        site.last_gen = to;
        site.gens.insert(
            to,
            Gen {
                id: to,
                release: resolved.clone(),
                config,
                core,
                listeners,
                workers: Default::default(),
                tcp_probe: None,
                crashes: 0,
                leaving: false,
            },
        );
        site.deploy = Some(Deploy {
            from,
            to,
            stage: Stage::Starting,
            release: resolved,
            started: now,
            started_wall: SystemTime::now(),
            ready_deadline,
            target,
            cap,
            conns: vec![conn],
            rollback,
            busy: false,
            flip_window: None,
        });
        let capped = cap
            .map(|c| format!(", at most {c} workers in all"))
            .unwrap_or_default();
        self.send(
            conn,
            &Reply::Event(format!(
                "deploying {what} beside gen-{from} ({target} workers{capped})"
            )),
        );
        self.feed(name, to, Input::StartRequested);
    }

    /// Tells every client of the deploy of `name`.
    fn deploy_event(&mut self, name: &SiteName, text: String) {
        let conns: Vec<u64> = self
            .sites
            .get(name)
            .and_then(|s| s.deploy.as_ref())
            .map(|d| d.conns.clone())
            .unwrap_or_default();
        for c in conns {
            self.send(c, &Reply::Event(text.clone()));
        }
    }

    fn deploy_view(&self, name: &SiteName) -> Option<View> {
        let site = self.sites.get(name)?;
        let d = site.deploy.as_ref()?;
        let gen_view = |g: GenId| {
            site.gens
                .get(&g)
                .map(|x| GenView {
                    desired: x.core.desired,
                    slots: u32::try_from(x.core.slots.len()).unwrap_or(u32::MAX),
                    ready: u32::try_from(x.core.ready()).unwrap_or(u32::MAX),
                    live: u32::try_from(x.core.live()).unwrap_or(u32::MAX),
                    crashes: x.crashes,
                })
                .unwrap_or_default()
        };
        // Only listeners of their own (steered away from) can drain; shared ones are
        // served by the new generation as soon as the old one stops accepting.
        let old_queues_empty = match (site.gens.get(&d.from), site.gens.get(&d.to)) {
            (Some(old), Some(new)) => old
                .listeners
                .iter()
                .zip(&new.listeners)
                .all(|(o, n)| same_socket(o, n) || o.queued().is_none_or(|q| q == 0)),
            _ => true,
        };
        Some(View {
            stage: d.stage,
            now: Instant::now(),
            ready_deadline: d.ready_deadline,
            target: d.target,
            cap: d.cap,
            old: gen_view(d.from),
            new: gen_view(d.to),
            old_queues_empty,
        })
    }

    /// Asks the plan what to do until it says wait.
    pub(super) fn advance_deploy(&mut self, name: &SiteName) {
        match self.sites.get_mut(name).and_then(|s| s.deploy.as_mut()) {
            Some(d) if !d.busy => d.busy = true,
            _ => return,
        }
        for _ in 0..64 {
            let Some(view) = self.deploy_view(name) else {
                return;
            };
            let (from, to) = {
                let d = self.sites[name].deploy.as_ref().expect("viewed above");
                (d.from, d.to)
            };
            let step = decide(&view);
            match step {
                Step::Wait => break,
                Step::ScaleNew(n) => {
                    self.deploy_event(
                        name,
                        format!("gen-{to}: starting {n} of {} workers", view.target),
                    );
                    self.feed(name, to, Input::ScaleRequested(n));
                }
                Step::ScaleOld(n) => {
                    self.deploy_event(
                        name,
                        format!("gen-{from}: down to {n} workers to make room for gen-{to}"),
                    );
                    self.feed(name, from, Input::ScaleRequested(n));
                }
                Step::BeginProbation => {
                    let probation = self.sites[name].config.deploy.probation;
                    if let Some(d) = self.sites.get_mut(name).and_then(|s| s.deploy.as_mut()) {
                        d.stage = Stage::Probation {
                            until: Instant::now() + probation,
                        };
                    }
                    self.deploy_event(
                        name,
                        format!(
                            "gen-{to}: {} workers ready; probation {}",
                            view.new.ready,
                            config::format_duration(probation)
                        ),
                    );
                }
                Step::Flip => self.flip(name),
                Step::StopOld => {
                    let drained = view.old_queues_empty;
                    if let Some(site) = self.sites.get_mut(name) {
                        if let Some(d) = site.deploy.as_mut() {
                            if let Stage::Draining { until, .. } = d.stage {
                                d.stage = Stage::Draining {
                                    until,
                                    stopping: true,
                                };
                            }
                        }
                        if let Some(old) = site.gens.get_mut(&from) {
                            old.leaving = true;
                        }
                    }
                    self.deploy_event(
                        name,
                        if drained {
                            format!("gen-{from}: queue drained, stopping its workers")
                        } else {
                            format!("gen-{from}: still holding connections at the stop timeout, stopping its workers")
                        },
                    );
                    self.feed(name, from, Input::StopRequested);
                }
                Step::Done => {
                    self.finish_deploy(name);
                    return;
                }
                Step::RollBack(why) => {
                    let reason = self.failure_text(name, to, why);
                    self.roll_back(name, reason);
                    return;
                }
                Step::SteerBack(why) => {
                    let reason = self.failure_text(name, to, why);
                    self.steer_back(name, &reason);
                    return;
                }
            }
        }
        if let Some(d) = self.sites.get_mut(name).and_then(|s| s.deploy.as_mut()) {
            d.busy = false;
        }
    }

    fn failure_text(&self, name: &SiteName, to: GenId, why: Failure) -> String {
        let Some(site) = self.sites.get(name) else {
            return String::new();
        };
        let Some(g) = site.gens.get(&to) else {
            return format!("gen-{to} failed");
        };
        match why {
            Failure::Crashed => {
                let exit = g
                    .core
                    .slots
                    .values()
                    .find_map(|s| s.last_exit.as_ref().map(|r| format!("w-{} {r}", s.id)));
                let when = match site.deploy.as_ref().map(|d| d.stage) {
                    Some(Stage::Draining { .. }) => "after",
                    _ => "before",
                };
                format!(
                    "a worker of gen-{to} exited {when} the flip: {}",
                    exit.unwrap_or_else(|| "it could not be started".into())
                )
            }
            Failure::NotReady => format!(
                "gen-{to} was not ready within ready.timeout ({}): {} of {} workers ready",
                config::format_duration(g.config.ready.timeout),
                g.core.ready(),
                g.core.desired
            ),
        }
    }

    /// New connections go to the new generation from now on.
    fn flip(&mut self, name: &SiteName) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(d) = site.deploy.as_mut() else {
            return;
        };
        let (from, to) = (d.from, d.to);
        d.stage = Stage::Draining {
            until: Instant::now() + site.config.stop.timeout,
            stopping: false,
        };
        let before = monotonic_ns();
        let steered = steer(site, to);
        let window = (before, monotonic_ns());
        if let Some(d) = site.deploy.as_mut() {
            d.flip_window = Some(window);
        }
        site.serving = to;
        if let Some(prev) = site.gens.get(&from).and_then(|g| g.release.clone()) {
            site.previous_release = Some(prev.clone());
            let state_dir = self.config.state_dir.clone();
            write_previous_release(&state_dir, name, &prev);
        }
        info!(site = %name, gen = to, "gen-{to} serves; gen-{from} drains");
        self.deploy_event(
            name,
            format!("gen-{to} serves: new connections go to it ({steered}); gen-{from} drains"),
        );
    }

    /// Back to the old generation while it drains (on `rollback`, or because a new
    /// worker died after the flip): it serves again, with the workers it had, and the new
    /// one stops.
    fn steer_back(&mut self, name: &SiteName, why: &str) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(d) = site.deploy.take() else {
            return;
        };
        let before = monotonic_ns();
        steer(site, d.from);
        let window = [before, monotonic_ns()];
        site.serving = d.from;
        if let Some(g) = site.gens.get_mut(&d.to) {
            g.leaving = true;
        }
        let msg = format!("{why}; gen-{} serves again", d.from);
        let old_desired = site.gens.get(&d.from).map(|g| g.core.desired);
        site.last_deploy =
            Some(d.record(DeployResult::RolledBack, Some(msg.clone()), Some(window)));
        warn!(site = %name, gen = d.to, "{msg}");
        for c in d.conns {
            self.finish(c, &Reply::error(ErrorKind::RolledBack, msg.clone()));
        }
        self.feed(name, d.to, Input::StopRequested);
        if old_desired.is_some_and(|n| n < d.target) {
            self.feed(name, d.from, Input::ScaleRequested(d.target));
        }
        self.next_queued(name);
    }

    /// Stops the new generation; the serving one stays as it is (and gets back the
    /// workers it gave up).
    pub(super) fn roll_back(&mut self, name: &SiteName, reason: String) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(d) = site.deploy.take() else {
            return;
        };
        error!(site = %name, gen = d.to, "deploy rolled back: {reason}");
        // Stopped like any worker (stop signal, SIGKILL at the stop timeout): where
        // generations share a listener, the rolled-back workers may be in the middle of
        // requests they accepted.
        if let Some(g) = site.gens.get_mut(&d.to) {
            g.leaving = true;
            if g.tcp_probe.take().is_some() {
                clear_probes(site);
            }
        }
        site.last_deploy = Some(d.record(DeployResult::RolledBack, Some(reason.clone()), None));
        let old_desired = site.gens.get(&d.from).map(|g| g.core.desired);
        let msg = format!("deploy rolled back: {reason}; gen-{} keeps serving", d.from);
        for c in d.conns {
            self.finish(c, &Reply::error(ErrorKind::RolledBack, msg.clone()));
        }
        self.feed(name, d.to, Input::StopRequested);
        if old_desired.is_some_and(|n| n < d.target) {
            self.feed(name, d.from, Input::ScaleRequested(d.target));
        }
        self.next_queued(name);
    }

    fn finish_deploy(&mut self, name: &SiteName) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let Some(d) = site.deploy.take() else {
            return;
        };
        let took = d.started.elapsed();
        // A new worker that died once the old generation was told to stop cannot be rolled
        // back from: the deploy is over, but not a success.
        let crashed = site.gens.get(&d.to).filter(|g| g.crashes > 0).map(|g| {
            g.core
                .slots
                .values()
                .find_map(|s| s.last_exit.as_ref().map(|r| format!("w-{} {r}", s.id)))
                .unwrap_or_else(|| "a worker could not be started".into())
        });
        site.last_deploy = Some(d.record(
            if crashed.is_some() {
                DeployResult::DoneWithCrashes
            } else {
                DeployResult::Done
            },
            None,
            d.flip_window.map(|(a, b)| [a, b]),
        ));
        let short = site
            .gens
            .get(&d.to)
            .is_some_and(|g| g.core.desired < d.target);
        info!(site = %name, gen = d.to, "deploy done in {} ms", took.as_millis());
        let reply = match &crashed {
            Some(exit) => Reply::error(
                ErrorKind::Failed,
                format!(
                    "gen-{} serves and gen-{} is retired, but a new worker died after the old generation was stopped: {exit} (see `hatchery logs {name}`)",
                    d.to, d.from
                ),
            ),
            None => Reply::ok(&Done {
                generation: Some(d.to),
                release: d.release.clone(),
                retired: Some(d.from),
                duration_ms: Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
                ..Done::new(name, format!("gen-{} serves; gen-{} retired", d.to, d.from))
            }),
        };
        for c in d.conns {
            self.finish(c, &reply);
        }
        if short {
            self.feed(name, d.to, Input::ScaleRequested(d.target));
        }
        self.next_queued(name);
    }

    /// Answers `conns` and starts the next queued deploy (used when a deploy cannot start).
    fn end_with(&mut self, name: &SiteName, conns: Vec<u64>, reply: Reply) {
        for c in conns {
            self.finish(c, &reply);
        }
        self.next_queued(name);
    }

    fn next_queued(&mut self, name: &SiteName) {
        let next = match self.sites.get_mut(name) {
            Some(s) if s.deploy.is_none() => s.queued_deploys.pop_front(),
            _ => None,
        };
        if let Some(q) = next {
            if !self.conns.contains_key(&q.conn) {
                info!(site = %name, "running a queued deploy whose client has gone");
            }
            self.start_deploy(name, q.conn, q.release, q.rollback);
        }
    }

    /// Ends the deploy under way and every queued one (the site is stopping or going).
    pub(super) fn cancel_deploys(&mut self, name: &SiteName, why: &str) {
        let queued: VecDeque<Queued> = match self.sites.get_mut(name) {
            Some(s) => std::mem::take(&mut s.queued_deploys),
            None => return,
        };
        for q in queued {
            self.finish(
                q.conn,
                &Reply::error(ErrorKind::Failed, format!("deploy cancelled: {why}")),
            );
        }
        if self.sites.get(name).is_some_and(|s| s.deploy.is_some()) {
            self.roll_back(name, format!("cancelled: {why}"));
        }
    }

    /// Forgets a generation whose last worker is gone: its listeners (the agent's
    /// copies) close and its cgroup is removed.
    pub(super) fn remove_generation(&mut self, name: &SiteName, g: GenId) {
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        if g == site.serving {
            return;
        }
        let Some(gen_) = site.gens.remove(&g) else {
            return;
        };
        for w in gen_.workers.values() {
            self.reg.tokens.remove(&w.token);
        }
        if let (Some(tree), Some(graveyard)) = (&self.cgroups, &mut self.graveyard) {
            graveyard.bury(tree.site_dir(name.as_str()).join(format!("gen-{g}")));
        }
        info!(site = %name, gen = g, "gen-{g} retired");
        self.deploy_event(name, format!("gen-{g} retired"));
    }
}

/// Attaches eBPF steering to each TCP listener's reuseport group where the kernel allows
/// it, steering it to that listener; `None` entries use the shared-listener fallback.
pub(super) fn attach_steering(
    support: &SteeringSupport,
    site: &SiteName,
    listeners: &[Listener],
) -> Vec<Option<Steering>> {
    listeners
        .iter()
        .map(|l| {
            if matches!(support, SteeringSupport::Unavailable(_))
                || !matches!(l.spec.addr, ListenAddr::Tcp(_))
            {
                return None;
            }
            let attached = Steering::attach(l.fd.as_fd()).and_then(|mut s| {
                s.steer_to(l.fd.as_fd())?;
                Ok(s)
            });
            match attached {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(site = %site, "no eBPF steering for {} (generations share its listener): {e}", l.spec.addr);
                    None
                }
            }
        })
        .collect()
}

/// Whether the site's first TCP listener is steered, so that a `tcp` ready check can
/// reach a new generation alone.
fn probe_steered(site: &Site) -> bool {
    site.cur()
        .listeners
        .iter()
        .position(|l| matches!(l.spec.addr, ListenAddr::Tcp(_)))
        .is_some_and(|i| site.steering.get(i).is_some_and(Option::is_some))
}

/// Ends any steering probe of the site (its generation is going).
fn clear_probes(site: &mut Site) {
    for st in site.steering.iter_mut().flatten() {
        if let Err(e) = st.clear_probe() {
            warn!(site = %site.config.name, "failed to clear the steering probe: {e}");
        }
    }
}

/// Whether two listeners are one socket (shared between generations).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    let (Ok(x), Ok(y)) = (
        rustix::fs::fstat(a.fd.as_fd()),
        rustix::fs::fstat(b.fd.as_fd()),
    ) else {
        return false;
    };
    x.st_ino == y.st_ino && x.st_dev == y.st_dev
}

/// Points every steered address of `site` at generation `to`'s listeners; returns how.
fn steer(site: &mut Site, to: GenId) -> &'static str {
    let Some(g) = site.gens.get(&to) else {
        return "no such generation";
    };
    let mut any = false;
    for (i, steering) in site.steering.iter_mut().enumerate() {
        let (Some(st), Some(l)) = (steering.as_mut(), g.listeners.get(i)) else {
            continue;
        };
        if let Err(e) = st.steer_to(l.fd.as_fd()) {
            error!(site = %site.config.name, gen = to, "failed to steer {}: {e}", l.spec.addr);
        } else {
            any = true;
        }
    }
    if any {
        "eBPF steering"
    } else {
        "shared listener"
    }
}

//! Words for what the site machines say: their [`Event`]s become progress lines and log
//! messages, their [`Outcome`]s the final reply of a control request.

use crate::config::{self, SiteName};
use crate::control::{Done as DoneReply, ErrorKind, Reply};
use crate::supervisor::ids::Slot;
use crate::supervisor::machine::{
    CancelReason, DeployEnd, Done, Event, Failure, HealthAnswer, Outcome, ProbeAnswer,
    RollbackReason, ShutAnswer, Steering,
};
use crate::supervisor::slots::{ExitReason, Note};

/// A note of a site's slots.
pub fn note(site: &SiteName, note: &Note) -> String {
    match note {
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
        Note::Failed(id) => format!("w-{id} failed: not restarted until `hatchery start {site}`"),
        Note::AllStopped => "all workers stopped".to_string(),
        Note::RestartDone => "restart done".to_string(),
        Note::Settled => "all workers ready".to_string(),
    }
}

/// An event, as a progress line for the clients that wait.
pub fn event(site: &SiteName, e: &Event) -> String {
    match e {
        Event::ListenerShut {
            generation,
            listener,
            answer,
        } => format!(
            "gen-{generation}: its listener {listener} was shut down by a process holding it and accepts no connection; {}",
            match answer {
                ShutAnswer::Redeploy(to) =>
                    format!("deploying its release again as gen-{to}, with new listeners"),
                ShutAnswer::Again => format!(
                    "not deployed again (gen-{generation} was deployed to replace a generation whose listener was shut down): `hatchery deploy {site}` a release that does not shut it"
                ),
                ShutAnswer::DeployUnderWay(to) => format!(
                    "the deploy under way to gen-{to} goes on (its new listeners replace it; where gen-{to} shares this one, or the deploy is rolled back, the release then serving is deployed again after it)"
                ),
                ShutAnswer::AfterDeploy =>
                    "its release is deployed again once the deploy under way is over".to_string(),
                ShutAnswer::AfterOlder =>
                    "its release is deployed again once the processes of other generations are gone"
                        .to_string(),
                ShutAnswer::Stopped =>
                    "its release is deployed again, with new listeners, when the site starts"
                        .to_string(),
                ShutAnswer::Refused(f) => format!(
                    "its release cannot be deployed again now ({}); it is once that passes, or `hatchery deploy {site}` binds a new one",
                    failure(site, f).1
                ),
                ShutAnswer::NotRedeployed(f) => format!(
                    "its release could not be deployed again ({}): `hatchery deploy {site}` binds a new one",
                    failure(site, f).1
                ),
                ShutAnswer::Tried => format!(
                    "not deployed again (its release was already, for a listener shut down before): `hatchery deploy {site}` binds a new one"
                ),
                ShutAnswer::NotServing => format!(
                    "gen-{generation} does not serve (if it comes to, its release is deployed again then)"
                ),
            }
        ),
        Event::Worker {
            generation,
            serving,
            note: n,
        } => {
            if *serving {
                note(site, n)
            } else {
                format!("gen-{generation}: {}", note(site, n))
            }
        }
        Event::Capped(c) => format!("capped at {} workers: {}", c.workers, c.describe()),
        Event::Resized { from, to, capacity } => {
            format!("workers {from} -> {to} ({})", capacity.describe())
        }
        Event::LoadScaled {
            decision,
            target_percent,
        } => format!(
            "workers {} -> {} (load: {})",
            decision.from,
            decision.to,
            decision.reason.describe(*target_percent)
        ),
        Event::DoesNotFit {
            requested,
            capacity,
        } => format!(
            "{requested} workers do not fit the memory budget: capped at {}",
            capacity.describe()
        ),
        Event::DeployBegins {
            to,
            from,
            release,
            target,
            cap,
        } => {
            let capped = cap
                .map(|c| format!(", at most {c} workers in all"))
                .unwrap_or_default();
            format!(
                "deploying {} beside gen-{from} ({target} workers{capped})",
                deployed_what(release.as_deref(), *to)
            )
        }
        Event::DeployQueued { behind, ahead } => format!(
            "waiting for the deploy of gen-{behind} ({} ahead)",
            if *ahead == 1 {
                "1 deploy".to_string()
            } else {
                format!("{ahead} deploys")
            }
        ),
        Event::NewGrows {
            generation,
            workers,
            target,
        } => format!("gen-{generation}: starting {workers} of {target} workers"),
        Event::OldShrinks {
            generation,
            workers,
            for_generation,
        } => format!(
            "gen-{generation}: down to {workers} workers to make room for gen-{for_generation}"
        ),
        Event::ProbationBegins {
            generation,
            ready,
            period,
        } => format!(
            "gen-{generation}: {ready} workers ready; probation {}",
            config::format_duration(*period)
        ),
        Event::Flipped {
            to,
            steering: Steering::Alone,
            ..
        } => format!("gen-{to} serves (stop-then-start: the only generation)"),
        Event::Flipped { from, to, steering } => format!(
            "gen-{to} serves: new connections go to it ({}); gen-{from} drains",
            match steering {
                Steering::Ebpf => "eBPF steering",
                Steering::Shared | Steering::Alone => "shared listener",
            }
        ),
        Event::StopThenStart {
            to,
            from,
            release,
            own,
        } => format!(
            "stop-then-start: {site} binds its own port{} {}: gen-{from} stops before {} starts",
            if own.len() == 1 { "" } else { "s" },
            own.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            deployed_what(release.as_deref(), *to)
        ),
        Event::OldStopsFirst {
            generation,
            for_generation,
        } => format!(
            "gen-{generation}: stopping all its workers; gen-{for_generation} starts once they are gone (the port is free)"
        ),
        Event::NewStopsFirst {
            generation,
            reason,
            then,
        } => format!(
            "{}: stopping gen-{generation}; gen-{then} starts again once it is gone",
            rollback_reason(reason, false)
        ),
        Event::OldRestarts(g) => format!("gen-{g} starting again (stop-then-start rollback)"),
        Event::OldStops {
            generation,
            drained,
        } => {
            if *drained {
                format!("gen-{generation}: queue drained, stopping its workers")
            } else {
                format!(
                    "gen-{generation}: still holding connections at the stop timeout, stopping its workers"
                )
            }
        }
        Event::CanaryServes {
            generation,
            from,
            share,
            workers,
        } => format!(
            "canary gen-{generation} serves {share} of new connections ({workers} {}) beside gen-{from}: `hatchery promote {site}` or `hatchery rollback {site}`",
            if *workers == 1 { "worker" } else { "workers" }
        ),
        Event::Promoting { generation, target } => format!(
            "promoting canary gen-{generation}: growing it to {target} workers, then the flip"
        ),
        Event::WarmedUp {
            generation,
            report,
            requests,
            took,
        } => {
            let what = if *requests == 1 {
                "the warm-up request".to_string()
            } else {
                format!("all {requests} warm-up requests")
            };
            if report.warmed == report.of {
                format!(
                    "gen-{generation}: warmed up: each of its {} workers answered {what} ({} answers in {} ms)",
                    report.of,
                    report.answered,
                    took.as_millis()
                )
            } else {
                format!(
                    "gen-{generation}: warm-up given up at ready.timeout: {} of {} workers answered {what} ({} answers)",
                    report.warmed, report.of, report.answered
                )
            }
        }
        Event::HealthFailed {
            generation,
            worker,
            answer,
            failures,
            of,
        } => match worker {
            Some(w) => format!(
                "health check of gen-{generation}: w-{w} {} ({failures} of {of} before it is restarted)",
                health_answer(answer)
            ),
            None => format!(
                "health check of gen-{generation}: {} (no worker had accepted it: every worker busy, or none accepting)",
                health_answer(answer)
            ),
        },
        Event::Unhealthy {
            generation,
            worker,
            pid,
            failures,
        } => format!(
            "gen-{generation} w-{worker} (pid {pid}) failed {failures} health checks: restarting it"
        ),
        Event::Adopted {
            generation,
            workers,
            starting,
            stopped,
        } => format!(
            "adopted {workers} workers of gen-{generation} left running by an earlier agent; {starting} started, {stopped} told to stop"
        ),
        Event::Retired(g) => format!("gen-{g} retired"),
        Event::ZygoteStarting(g) => format!("gen-{g}: starting its zygote"),
        Event::ZygoteReady {
            generation,
            spawns,
            restored,
        } => format!(
            "gen-{generation}: zygote ready{}; {spawns} workers forked",
            if *restored {
                " again (no longer degraded)"
            } else {
                ""
            }
        ),
        Event::ZygoteNotReady {
            generation,
            why,
            failed,
            retry_in,
        } => format!(
            "gen-{generation}: the zygote did not become ready: {why}; {failed} workers could not start; started again in {} ms at the earliest",
            retry_in.as_millis()
        ),
        Event::ZygoteLost {
            generation,
            reason,
            retry_in,
        } => format!(
            "gen-{generation}: the zygote {reason}; its workers run on, degraded (no new worker) until a new zygote is ready, started in {} ms",
            retry_in.as_millis()
        ),
        Event::ZygoteStopped { generation, reason } => {
            format!("gen-{generation}: zygote stopped ({reason})")
        }
        Event::Deployed { took, .. } => format!("deploy done in {} ms", took.as_millis()),
        Event::RolledBack {
            reason,
            steered_back,
            ..
        } => {
            if *steered_back {
                rollback_reason(reason, true)
            } else {
                format!("deploy rolled back: {}", rollback_reason(reason, false))
            }
        }
    }
}

/// Whether [`log`] writes a line for `e`: for every event but a worker's note, which the
/// history says, unless its site failed.
pub fn logs_a_line(e: &Event) -> bool {
    match e {
        Event::Worker { note, .. } => matches!(note, Note::Failed(_)),
        _ => true,
    }
}

/// An event for the agent's log, when it is one (and how loud).
pub fn log(site: &SiteName, e: &Event) {
    use tracing::{error, info, warn};
    match e {
        Event::DoesNotFit { .. } => warn!(site = %site, "{}", event(site, e)),
        Event::Resized { .. }
        | Event::Deployed { .. }
        | Event::Retired(_)
        | Event::CanaryServes { .. }
        | Event::Promoting { .. } => {
            info!(site = %site, "{}", event(site, e));
        }
        Event::DeployBegins {
            to, from, release, ..
        } => info!(
            site = %site,
            gen = to.0,
            "deploying {} beside gen-{from}",
            deployed_what(release.as_deref(), *to)
        ),
        Event::Flipped { from, to, .. } => {
            info!(site = %site, gen = to.0, "gen-{to} serves; gen-{from} drains");
        }
        Event::NewStopsFirst { generation, .. } => {
            error!(site = %site, gen = generation.0, "{}", event(site, e));
        }
        Event::RolledBack {
            generation,
            steered_back: true,
            ..
        } => warn!(site = %site, gen = generation.0, "{}", event(site, e)),
        Event::RolledBack { generation, .. } => {
            error!(site = %site, gen = generation.0, "{}", event(site, e));
        }
        Event::Worker {
            note: Note::Failed(id),
            ..
        } => error!(site = %site, worker = %id, "site failed: worker flapping or unstartable"),
        // The other notes of workers are said by the history (`history.rs`).
        Event::Worker { .. } => {}
        Event::HealthFailed { generation, .. } => {
            warn!(site = %site, gen = generation.0, "{}", event(site, e));
        }
        Event::Unhealthy {
            generation, worker, ..
        } => warn!(site = %site, gen = generation.0, worker = %worker, "{}", event(site, e)),
        Event::ZygoteNotReady { generation, .. } | Event::ZygoteLost { generation, .. } => {
            error!(site = %site, gen = generation.0, "{}", event(site, e));
        }
        Event::ListenerShut {
            generation,
            answer: ShutAnswer::NotServing,
            ..
        } => info!(site = %site, gen = generation.0, "{}", event(site, e)),
        Event::ListenerShut { generation, .. } => {
            error!(site = %site, gen = generation.0, "{}", event(site, e));
        }
        _ => info!(site = %site, "{}", event(site, e)),
    }
}

/// How a failed health check was answered, after "w-N".
fn health_answer(a: &HealthAnswer) -> String {
    match a {
        HealthAnswer::TimedOut => "did not answer in time".into(),
        HealthAnswer::Status(code) => format!("answered {code}"),
        HealthAnswer::NotHttp => "did not answer with HTTP".into(),
        HealthAnswer::Refused(why) => format!("could not be reached: {why}"),
    }
}

fn deployed_what(release: Option<&std::path::Path>, to: crate::supervisor::ids::GenId) -> String {
    match release {
        Some(r) => format!("{} as gen-{to}", r.display()),
        None => format!("gen-{to}"),
    }
}

fn exit_text(exit: Option<&(Slot, ExitReason)>, none: &str) -> String {
    exit.map_or_else(|| none.to_string(), |(id, r)| format!("w-{id} {r}"))
}

/// Why a deploy was rolled back; `steered_back` for the words of a steer-back.
pub fn rollback_reason(r: &RollbackReason, steered_back: bool) -> String {
    match r {
        RollbackReason::Crashed {
            generation,
            exit,
            after_flip,
        } => format!(
            "a worker of gen-{generation} exited {} the flip: {}",
            if *after_flip { "after" } else { "before" },
            exit_text(exit.as_ref(), "it could not be started")
        ),
        RollbackReason::Unhealthy {
            generation,
            worker,
            after_flip,
        } => format!(
            "w-{worker} of gen-{generation} failed its health checks {} the flip",
            if *after_flip { "after" } else { "before" }
        ),
        RollbackReason::NotReady {
            generation,
            timeout,
            ready,
            desired,
            last_probe,
        } => format!(
            "gen-{generation} was not ready within ready.timeout ({}): {ready} of {desired} workers ready{}",
            config::format_duration(*timeout),
            match last_probe {
                Some(ProbeAnswer::Status(code)) => {
                    format!("; its ready probe was answered {code}")
                }
                Some(ProbeAnswer::NotHttp) => {
                    "; its ready probe was not answered with HTTP".to_string()
                }
                None => String::new(),
            }
        ),
        RollbackReason::OnRequest(g) => {
            if steered_back {
                "rolled back on request".to_string()
            } else {
                format!("gen-{g} rolled back on request")
            }
        }
        RollbackReason::Cancelled(why) => format!("cancelled: {}", cancel_reason(*why)),
        RollbackReason::CanaryNotSteered(why) => {
            format!("the canary's share could not be steered to it: {why}")
        }
        RollbackReason::NotSteered { generation, why } => {
            format!("new connections could not be steered to gen-{generation}: {why}")
        }
    }
}

fn cancel_reason(why: CancelReason) -> &'static str {
    match why {
        CancelReason::SiteStopped => "the site was stopped",
        CancelReason::SiteRemoved => "the site was removed from the configuration",
        CancelReason::AgentStopping => "the agent is shutting down",
    }
}

/// `last_deploy` of `status`.
pub fn deploy_record(
    end: &DeployEnd,
    now: std::time::Instant,
    wall: std::time::SystemTime,
) -> crate::status::DeployRecord {
    let reason = end.reason.as_ref().map(|r| {
        if end.steered_back {
            format!(
                "{}; gen-{} serves again",
                rollback_reason(r, true),
                end.from
            )
        } else {
            rollback_reason(r, false)
        }
    });
    crate::status::DeployRecord {
        result: end.result,
        from: end.from.0,
        to: end.to.0,
        release: end.release.clone(),
        reason,
        duration_ms: end
            .took
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        finished_at: crate::logs::utc_timestamp(wall - now.saturating_duration_since(end.finished)),
        flip_monotonic_ns: end.flip_window,
    }
}

/// The final reply for an outcome.
pub fn outcome(site: &SiteName, o: &Outcome) -> Reply {
    match o {
        Outcome::Done(d) => Reply::ok(&done(site, d)),
        Outcome::Failed(f) => {
            let (kind, message) = failure(site, f);
            Reply::error(kind, message)
        }
    }
}

fn done(site: &SiteName, d: &Done) -> DoneReply {
    match d {
        Done::Settled => DoneReply::new(site, "all workers ready"),
        Done::Stopped => DoneReply::new(site, "all workers stopped"),
        Done::AlreadyStopped => DoneReply::new(site, "already stopped"),
        Done::Restarted => DoneReply::new(site, "restart done"),
        Done::WhenStarted(n) => DoneReply::new(site, format!("{n} workers when started")),
        Done::Automatic { by_load, workers } => DoneReply::new(
            site,
            if *by_load {
                format!("follows its load again ({workers} workers now)")
            } else {
                format!("sized by its memory budget again ({workers} workers now)")
            },
        ),
        Done::Deployed {
            to,
            from,
            release,
            took,
        } => DoneReply {
            generation: Some(to.0),
            release: release.clone(),
            retired: Some(from.0),
            duration_ms: Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
            ..DoneReply::new(site, format!("gen-{to} serves; gen-{from} retired"))
        },
        Done::RolledBack { from, to } => DoneReply {
            generation: Some(from.0),
            ..DoneReply::new(site, format!("gen-{to} rolled back; gen-{from} serves"))
        },
        Done::SteeredBack { from, to } => DoneReply {
            generation: Some(from.0),
            ..DoneReply::new(
                site,
                format!("steered back to gen-{from}; gen-{to} is stopping"),
            )
        },
        Done::Canary {
            from,
            to,
            share,
            release,
        } => DoneReply {
            generation: Some(from.0),
            release: release.clone(),
            canary: Some(to.0),
            ..DoneReply::new(
                site,
                format!(
                    "canary gen-{to} serves {share} of new connections beside gen-{from}; finish with `hatchery promote {site}` or abort with `hatchery rollback {site}`"
                ),
            )
        },
        Done::Removed => DoneReply::new(site, "site removed"),
    }
}

fn failure(site: &SiteName, f: &Failure) -> (ErrorKind, String) {
    match f {
        Failure::SiteFailed(n) => (
            ErrorKind::Failed,
            format!("site {site} failed: {}", note(site, n)),
        ),
        Failure::WorkerDied(n) | Failure::RestartStopped(n) => (
            ErrorKind::Failed,
            format!(
                "site {site}: {} (see `hatchery logs {site}`)",
                note(site, n)
            ),
        ),
        Failure::DeployUnderWay {
            to,
            stage: "canary",
        } => (
            ErrorKind::Refused,
            format!(
                "site {site} runs a canary (gen-{to}): `hatchery promote {site}` or `hatchery rollback {site}` first"
            ),
        ),
        Failure::DeployUnderWay { to, stage } => (
            ErrorKind::Refused,
            format!(
                "a deploy of site {site} is under way (gen-{to} {stage}): try again once it is done"
            ),
        ),
        Failure::CanaryNeedsSteering(why) => (
            ErrorKind::BadRequest,
            format!(
                "a canary of site {site} needs eBPF connection steering on its first TCP listener ({why}); deploy without --canary"
            ),
        ),
        Failure::WarmupNeedsSteering(why) => (
            ErrorKind::BadRequest,
            format!(
                "site {site} has deploy.warmup, which needs eBPF connection steering on its first TCP listener to reach a new generation alone ({why}); remove deploy.warmup to deploy without it"
            ),
        ),
        Failure::NoCanary { stage } => (
            ErrorKind::Refused,
            match stage {
                Some(stage) => {
                    format!("site {site} has no canary to promote: its deploy is {stage}")
                }
                None => format!(
                    "site {site} has no canary to promote: start one with `hatchery deploy {site} --canary 10%`"
                ),
            },
        ),
        Failure::NotAutomatic => (
            ErrorKind::BadRequest,
            format!(
                "site {site} has a fixed count: `scale {site} auto` needs workers = \"auto\" in its file"
            ),
        ),
        Failure::TooManyWorkers(n) => (
            ErrorKind::BadRequest,
            format!("{n} workers is too many: use 0 to {}", config::MAX_WORKERS),
        ),
        Failure::BeyondOwnersLimit { uid, allowed, auto } => (
            ErrorKind::Refused,
            format!(
                "uid {uid} may scale site {site} to at most {allowed} workers (its {}); more needs root",
                if *auto {
                    "workers_max"
                } else {
                    "configured workers"
                }
            ),
        ),
        Failure::ProbeNeedsSteering { check, why } => (
            ErrorKind::BadRequest,
            format!(
                "site {site} uses ready.check = \"{check}\", which needs eBPF connection steering on its first TCP listener to probe a new generation alone ({why}); use \"notify\" or \"none\"",
                check = if *check == crate::config::ReadyCheck::Http {
                    "http"
                } else {
                    "tcp"
                }
            ),
        ),
        Failure::Stopped => (
            ErrorKind::Refused,
            format!("site {site} is stopped: start it before deploying"),
        ),
        Failure::NoWorkers => (
            ErrorKind::Refused,
            format!("site {site} runs no workers: scale it up before deploying"),
        ),
        Failure::NoRoom(c) => (
            ErrorKind::Refused,
            format!(
                "site {site} has room for {c} worker: a deploy needs room for one more beside the serving generation"
            ),
        ),
        Failure::CannotDeploy(e) => (ErrorKind::Failed, format!("cannot deploy site {site}: {e}")),
        Failure::RolledBack { reason, from } => (
            ErrorKind::RolledBack,
            format!(
                "deploy rolled back: {}; gen-{from} keeps serving",
                rollback_reason(reason, false)
            ),
        ),
        Failure::RestartedPrevious { reason, from } => (
            ErrorKind::RolledBack,
            format!(
                "deploy rolled back: {}; gen-{from} was started again (stop-then-start)",
                rollback_reason(reason, false)
            ),
        ),
        Failure::SteeredBack { reason, from } => (
            ErrorKind::RolledBack,
            format!("{}; gen-{from} serves again", rollback_reason(reason, true)),
        ),
        Failure::DoneWithCrashes { to, from, exit } => (
            ErrorKind::Failed,
            format!(
                "gen-{to} serves and gen-{from} is retired, but a new worker died after the old generation was stopped: {} (see `hatchery logs {site}`)",
                exit_text(exit.as_ref(), "a worker could not be started")
            ),
        ),
        Failure::Cancelled(why) => (
            ErrorKind::Failed,
            format!("deploy cancelled: {}", cancel_reason(*why)),
        ),
        Failure::NoPreviousRelease => (
            ErrorKind::Failed,
            format!("no previous release of site {site} is recorded"),
        ),
        Failure::StartedAgain => (
            ErrorKind::Failed,
            format!("site {site} was started again before all its workers had stopped"),
        ),
    }
}

//! Deploys as the site machine runs them, input by input.

use std::path::Path;

use super::super::tests::{FULL_BUDGET, Quiet, exited, replies, send, site, spawned};
use super::*;
use crate::config::SiteConfig;
use crate::supervisor::machine::{Input, Outcome, WarmupReport};
use crate::supervisor::slots::Slot;

/// Old generations' accept queues never empty: they drain until the stop timeout.
struct Queued;

impl Observe for Queued {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        None
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        false
    }
    fn probe_alone(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A site of `text`, started by client 1, with a deploy asked for by client 2 (as `obs`
/// sees the world).
fn deploying(text: &str, obs: &dyn Observe, t: Instant) -> SiteMachine {
    let (mut m, _) = SiteMachine::new(site(text), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), obs, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    send(&mut m, deploy, obs, t);
    m
}

#[test]
fn nothing_moves_before_the_new_listeners_are_bound() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    let a = m.handle(deploy, &Quiet, t);
    assert_eq!(a, vec![Action::BindListeners(GenId(2))]);
    let bound = Input::ListenersBound {
        generation: GenId(2),
        result: Err("127.0.0.1:8000: Address already in use".into()),
    };
    m.handle(bound, &Quiet, t);
    assert_eq!(
        m.current().slots.desired,
        4,
        "the old generation gave up nothing"
    );
    assert_eq!(m.generations().count(), 1);
}

#[test]
fn an_old_generation_left_without_a_process_is_retired_when_it_stops() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 1\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    // The old worker dies and cannot be spawned again: the site is failed, with no
    // process; a deploy replaces it.
    let t = t + Duration::from_secs(1);
    let a = send(&mut m, exited(1, 0), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 0)]);
    let failed = Input::Worker {
        generation: GenId(1),
        input: slots::Input::SpawnFailed {
            id: Slot(0),
            error: "ENOENT".into(),
            permanent: true,
        },
    };
    send(&mut m, failed, &Quiet, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    send(&mut m, deploy, &Quiet, t);
    let later = t + Duration::from_secs(1);
    let a = send(&mut m, Input::Tick, &Quiet, later);
    assert!(a.contains(&Action::Retire(GenId(1))), "{a:?}");
    assert_eq!(
        m.generations().map(|g| g.id).collect::<Vec<_>>(),
        vec![GenId(2)]
    );
}

#[test]
fn nothing_moves_before_the_flip_is_reported() {
    let t = Instant::now();
    let mut m = deploying("workers = 1\n", &Quiet, t);
    let later = t + Duration::from_secs(1);
    let a = m.handle(Input::Tick, &Quiet, later);
    assert_eq!(a.last(), Some(&Action::Steer(GenId(2))));
    // Before the loop reports the flip, it feeds back something else: the old worker
    // died and its restart could not be spawned, so the old generation has no process.
    let a = m.handle(exited(1, 0), &Quiet, later);
    assert_eq!(spawned(&a), vec![(1, 0)]);
    let failed = Input::Worker {
        generation: GenId(1),
        input: slots::Input::SpawnFailed {
            id: Slot(0),
            error: "EAGAIN".into(),
            permanent: false,
        },
    };
    let a = [a, m.handle(failed, &Quiet, later)].concat();
    // It still serves: it is not stopped, and the deploy is not done.
    assert!(m.deploy().is_some(), "{a:?}");
    assert!(!m.generation(GenId(1)).expect("old").leaving, "{a:?}");
    assert_eq!(replies(&a), vec![]);
    let steered = Input::Steered {
        generation: GenId(2),
        result: Ok(Steering::Shared),
        window: None,
    };
    let a = send(&mut m, steered, &Quiet, later);
    assert_eq!(m.serving(), GenId(2));
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(2), Outcome::Done(Done::Deployed { .. }))]
        ),
        "{a:?}"
    );
}

#[test]
fn a_flip_that_fails_rolls_the_deploy_back_and_the_old_generation_serves_on() {
    let t = Instant::now();
    let mut m = deploying("workers = 2\n", &Quiet, t);
    let later = t + Duration::from_secs(1);
    let a = m.handle(Input::Tick, &Quiet, later);
    assert_eq!(a.last(), Some(&Action::Steer(GenId(2))));
    // The loop could not steer to the new listeners (a new worker shut its listener
    // down): connections still go to the old generation.
    let why = "tcp 127.0.0.1:8000: failed to insert the listener in steering slot 1 (it must be a listening SO_REUSEPORT socket of the group): Invalid argument (os error 22)";
    let failed = Input::Steered {
        generation: GenId(2),
        result: Err(why.into()),
        window: Some([1, 2]),
    };
    let a = send(&mut m, failed, &Quiet, later);
    assert_eq!(m.serving(), GenId(1), "{a:?}");
    assert!(m.deploy().is_none(), "{a:?}");
    let reason = RollbackReason::NotSteered {
        generation: GenId(2),
        why: why.into(),
    };
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(2),
            Outcome::Failed(Failure::RolledBack {
                reason: reason.clone(),
                from: GenId(1),
            })
        )],
        "{a:?}"
    );
    assert!(
        a.contains(&Action::Log(Event::RolledBack {
            generation: GenId(2),
            reason,
            steered_back: false,
        })),
        "{a:?}"
    );
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Log(Event::Flipped { .. }))),
        "{a:?}"
    );
    // The new generation stops; the old one is not told to.
    assert!(m.generation(GenId(2)).expect("new").leaving, "{a:?}");
    assert!(!m.generation(GenId(1)).expect("old").leaving, "{a:?}");
    let signalled: Vec<GenId> = a
        .iter()
        .filter_map(|x| match x {
            Action::Signal { generation, .. } | Action::KillTree { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        })
        .collect();
    assert!(
        !signalled.is_empty() && signalled.iter().all(|g| *g == GenId(2)),
        "{a:?}"
    );
    assert_eq!(m.current().slots.desired, 2, "{a:?}");
}

#[test]
fn a_deploy_cancelled_after_the_flip_is_done_and_the_old_generation_goes() {
    let t = Instant::now();
    let mut m = deploying("workers = 1\n", &Queued, t);
    let later = t + Duration::from_secs(1);
    send(&mut m, Input::Tick, &Queued, later);
    assert_eq!(m.serving(), GenId(2), "flipped; the old one drains");
    let stop = Input::Stop {
        client: Some(ClientId(3)),
        why: CancelReason::SiteStopped,
    };
    let a = send(&mut m, stop, &Queued, later);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(2), Outcome::Done(Done::Deployed { .. }))]
        ),
        "the new generation serves: {a:?}"
    );
    assert_eq!(m.serving(), GenId(2));
    assert!(!m.current().leaving);
    send(&mut m, exited(1, 0), &Queued, later);
    let a = send(&mut m, exited(2, 0), &Queued, later);
    assert_eq!(
        replies(&a),
        vec![(ClientId(3), Outcome::Done(Done::Stopped))]
    );
    assert_eq!(
        m.generations().map(|g| g.id).collect::<Vec<_>>(),
        vec![GenId(2)],
        "the old generation was retired"
    );
}

#[test]
fn a_rollback_gives_workers_back_as_the_rolled_back_ones_leave() {
    let t = Instant::now();
    let mut m = deploying(FULL_BUDGET, &Quiet, t);
    // Slot 3 of the old generation makes room for the first new worker, slot 2 for
    // the next.
    let a = send(&mut m, exited(1, 3), &Quiet, t);
    assert_eq!(spawned(&a), vec![(2, 0)]);
    assert_eq!(m.current().slots.desired, 2);
    let a = send(&mut m, Input::Rollback(ClientId(3)), &Quiet, t);
    // The new worker is still stopping: the old generation has 3 of the 4, not more.
    assert_eq!(spawned(&a), vec![], "{a:?}");
    assert_eq!(m.current().slots.desired, 3);
    // So does a scale beside it.
    let scale = Input::Scale {
        client: ClientId(4),
        workers: 4,
        owner: None,
    };
    let a = send(&mut m, scale, &Quiet, t);
    assert_eq!(spawned(&a), vec![], "{a:?}");
    // Once it is gone, the capacity check gives back the last one.
    send(&mut m, exited(2, 0), &Quiet, t);
    let a = send(&mut m, exited(1, 2), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 2)]);
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(2));
    assert_eq!(spawned(&a), vec![(1, 3)]);
    assert_eq!(m.current().slots.desired, 4);
}

#[test]
fn a_deploy_counts_the_workers_of_a_generation_rolled_back_before_it() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = |client| Input::Deploy {
        client: ClientId(client),
        release: None,
        canary: None,
    };
    send(&mut m, deploy(2), &Quiet, t);
    send(&mut m, exited(1, 3), &Quiet, t);
    send(&mut m, Input::Rollback(ClientId(3)), &Quiet, t);
    // Generation 2's worker is still stopping: 3 old ones and it fill the cap of 4.
    let a = send(&mut m, deploy(4), &Quiet, t);
    assert_eq!(spawned(&a), vec![], "{a:?}");
    let a = send(&mut m, exited(2, 0), &Quiet, t);
    assert_eq!(spawned(&a), vec![(3, 0)], "{a:?}");
}

/// A site of ten workers started, and a 20 % canary of it serving (two workers).
fn canary_serving(t: Instant) -> (SiteMachine, Share) {
    let (mut m, _) = SiteMachine::new(site("workers = 10\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let share: Share = "20%".parse().expect("share");
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: Some(share),
    };
    let a = send(&mut m, deploy, &Quiet, t);
    assert_eq!(replies(&a), vec![], "not before the canary serves");
    assert_eq!(m.generation(GenId(2)).map(|g| g.slots.desired), Some(2));
    // Probation passes: the canary takes its share, and its client hears so.
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(1));
    assert!(
        a.contains(&Action::Canary {
            generation: GenId(2),
            share: Some(share)
        }),
        "{a:?}"
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::Steer(_))),
        "no flip: {a:?}"
    );
    let to_deployer: Vec<_> = replies(&a)
        .into_iter()
        .filter(|(c, _)| *c != ClientId(1))
        .collect();
    assert_eq!(
        to_deployer,
        vec![(
            ClientId(2),
            Outcome::Done(Done::Canary {
                from: GenId(1),
                to: GenId(2),
                share,
                release: None
            })
        )]
    );
    assert_eq!(m.serving(), GenId(1));
    assert_eq!(
        m.current().slots.desired,
        10,
        "the old generation keeps its workers"
    );
    (m, share)
}

#[test]
fn a_canary_serves_beside_the_old_generation_until_it_is_promoted() {
    let t = Instant::now();
    let (mut m, _) = canary_serving(t);
    // An hour later it is still a canary.
    let t = t + Duration::from_secs(3600);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert_eq!(replies(&a), vec![]);
    assert_eq!(m.deploy().map(|d| d.stage), Some(Stage::Canary));
    assert_eq!(
        replies(&send(
            &mut m,
            Input::Scale {
                client: ClientId(9),
                workers: 3,
                owner: None
            },
            &Quiet,
            t
        )),
        vec![(
            ClientId(9),
            Outcome::Failed(Failure::DeployUnderWay {
                to: GenId(2),
                stage: "canary"
            })
        )]
    );
    // Promoted: it grows to ten workers, passes probation, and is flipped to.
    let a = send(&mut m, Input::Promote(ClientId(3)), &Quiet, t);
    assert_eq!(
        m.generation(GenId(2)).map(|g| g.slots.desired),
        Some(10),
        "{a:?}"
    );
    assert_eq!(replies(&a), vec![]);
    let t = t + Duration::from_secs(1);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert!(a.contains(&Action::Steer(GenId(2))), "{a:?}");
    assert_eq!(m.serving(), GenId(2));
    let mut a = Vec::new();
    for slot in 0..10 {
        a.extend(send(&mut m, exited(1, slot), &Quiet, t));
    }
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(
                ClientId(3),
                Outcome::Done(Done::Deployed {
                    to: GenId(2),
                    from: GenId(1),
                    ..
                })
            )]
        ),
        "{a:?}"
    );
}

#[test]
fn a_canary_whose_worker_crashes_is_rolled_back_by_itself() {
    let t = Instant::now();
    let (mut m, _) = canary_serving(t);
    let t = t + Duration::from_secs(5);
    let a = send(&mut m, exited(2, 1), &Quiet, t);
    assert!(
        a.contains(&Action::Canary {
            generation: GenId(2),
            share: None
        }),
        "the canary's share ends: {a:?}"
    );
    assert!(m.deploy().is_none());
    assert_eq!(m.serving(), GenId(1));
    let end = m.last_deploy().expect("recorded");
    assert_eq!(end.result, crate::status::DeployResult::RolledBack);
    assert!(
        matches!(
            end.reason,
            Some(RollbackReason::Crashed {
                generation: GenId(2),
                after_flip: false,
                ..
            })
        ),
        "{end:?}"
    );
    // Nothing left to promote.
    let a = send(&mut m, Input::Promote(ClientId(4)), &Quiet, t);
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(4),
            Outcome::Failed(Failure::NoCanary { stage: None })
        )]
    );
}

#[test]
fn rollback_ends_a_canary_and_the_old_generation_keeps_everything() {
    let t = Instant::now();
    let (mut m, _) = canary_serving(t);
    let a = send(&mut m, Input::Rollback(ClientId(3)), &Quiet, t);
    assert!(
        a.contains(&Action::Canary {
            generation: GenId(2),
            share: None
        }),
        "{a:?}"
    );
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(3),
            Outcome::Done(Done::RolledBack {
                from: GenId(1),
                to: GenId(2)
            })
        )]
    );
    assert_eq!(m.serving(), GenId(1));
    assert_eq!(m.current().slots.desired, 10);
}

#[test]
fn a_canary_needs_steering_and_promote_needs_a_canary() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: "10%".parse().ok(),
    };
    let a = send(&mut m, deploy, &NoSteering, t);
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(2),
            Outcome::Failed(Failure::CanaryNeedsSteering(
                "unavailable: no CAP_BPF".into()
            ))
        )]
    );
    assert!(m.deploy().is_none());
    // A plain deploy under way has no canary to promote.
    let deploy = Input::Deploy {
        client: ClientId(3),
        release: None,
        canary: None,
    };
    send(&mut m, deploy, &Quiet, t);
    let a = send(&mut m, Input::Promote(ClientId(4)), &Quiet, t);
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(4),
            Outcome::Failed(Failure::NoCanary {
                stage: Some("probation")
            })
        )]
    );
}

#[test]
fn nothing_is_flipped_to_a_generation_before_its_warmup_ends() {
    let t = Instant::now();
    let extra =
        "workers = 2\n[[listen]]\ntcp = \"127.0.0.1:1\"\n[deploy]\nwarmup = [\"/\", \"/search\"]\n";
    let (mut m, _) = SiteMachine::new(site(extra), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    let a = send(&mut m, deploy, &Quiet, t);
    let warm = Action::WarmUp {
        generation: GenId(2),
        give_up: false,
    };
    assert!(a.contains(&warm), "it begins with the probation: {a:?}");
    // Probation is over, the warm-up is not: looked at, no flip.
    let t = t + Duration::from_secs(2);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert!(a.contains(&warm), "{a:?}");
    assert!(
        !a.iter().any(|x| matches!(x, Action::Steer(_))),
        "no flip yet: {a:?}"
    );
    assert!(
        m.next_deadline(t).is_some_and(|d| d > t),
        "no spin while it runs"
    );
    let report = WarmupReport {
        warmed: 2,
        of: 2,
        answered: 4,
    };
    let a = send(
        &mut m,
        Input::WarmedUp {
            generation: GenId(2),
            report,
        },
        &Quiet,
        t,
    );
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Progress {
                event: Event::WarmedUp {
                    requests: 2,
                    report: WarmupReport { warmed: 2, .. },
                    ..
                },
                ..
            }
        )),
        "{a:?}"
    );
    assert!(a.contains(&Action::Steer(GenId(2))), "then the flip: {a:?}");
}

#[test]
fn a_warmup_needs_steering_and_a_rollback_ends_it() {
    let t = Instant::now();
    let extra = "workers = 2\n[[listen]]\ntcp = \"127.0.0.1:1\"\n[deploy]\nwarmup = 1\n";
    let (mut m, _) = SiteMachine::new(site(extra), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = |client| Input::Deploy {
        client,
        release: None,
        canary: None,
    };
    let a = send(&mut m, deploy(ClientId(2)), &NoSteering, t);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(
                ClientId(2),
                Outcome::Failed(Failure::WarmupNeedsSteering(_))
            )]
        ),
        "{a:?}"
    );
    send(&mut m, deploy(ClientId(3)), &Quiet, t);
    let a = send(&mut m, Input::Rollback(ClientId(4)), &Quiet, t);
    assert!(
        a.contains(&Action::WarmUp {
            generation: GenId(2),
            give_up: true
        }),
        "{a:?}"
    );
}

/// A world without eBPF steering: probes cannot reach a new generation alone.
struct NoSteering;

impl Observe for NoSteering {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        None
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        true
    }
    fn probe_alone(&self) -> Result<(), String> {
        Err("unavailable: no CAP_BPF".into())
    }
}

const OWN_PORT: &str =
    "workers = 2\n[[listen]]\ntcp = \"127.0.0.1:8000\"\nmode = \"own\"\n[ready]\ncheck = \"tcp\"\n";

/// Feeds `input` (and what follows), then checks that no two generations have a process.
fn step(m: &mut SiteMachine, input: Input, t: Instant) -> Vec<Action> {
    let a = send(m, input, &NoSteering, t);
    let live: Vec<GenId> = m
        .generations()
        .filter(|g| g.slots.live() > 0)
        .map(|g| g.id)
        .collect();
    assert!(
        live.len() <= 1,
        "two generations live: {live:?} after {a:?}"
    );
    a
}

/// Every process of generation `g` exits, one at a time; returns what followed.
fn exit_all(m: &mut SiteMachine, g: u32, t: Instant) -> Vec<Action> {
    let slots: Vec<u32> = m
        .generation(GenId(g))
        .map(|x| {
            x.slots
                .slots
                .values()
                .filter(|s| s.phase.has_process())
                .map(|s| s.id.0)
                .collect()
        })
        .unwrap_or_default();
    let mut all = Vec::new();
    for s in slots {
        all.extend(step(m, exited(g, s), t));
    }
    all
}

/// An own-port site, started, both workers ready, and a deploy asked for by client 2.
fn own_port_deploy(t: Instant) -> (SiteMachine, Vec<Action>) {
    let (mut m, _) = SiteMachine::new(site(OWN_PORT), None, None, t);
    step(&mut m, Input::Start(None), t);
    step(&mut m, Input::ProbeAccepted(GenId(1)), t);
    assert_eq!(m.current().slots.ready(), 2);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    let a = step(&mut m, deploy, t);
    (m, a)
}

#[test]
fn an_own_port_site_stops_its_serving_generation_before_the_new_one_starts() {
    let t = Instant::now();
    let (mut m, a) = own_port_deploy(t);
    // Accepted without steering: the probe has only one generation to reach.
    assert_eq!(replies(&a), vec![], "{a:?}");
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Progress {
                event: Event::StopThenStart { own, .. },
                ..
            } if own == &vec!["127.0.0.1:8000".parse::<std::net::SocketAddr>().expect("addr")]
        )),
        "{a:?}"
    );
    let stops = a
        .iter()
        .filter(|x| {
            matches!(
                x,
                Action::Signal {
                    generation: GenId(1),
                    ..
                }
            )
        })
        .count();
    assert_eq!(stops, 2, "the serving generation is told to stop: {a:?}");
    assert_eq!(spawned(&a), vec![]);
    assert_eq!(m.generation_state(m.current()), "stopping");
    // A start now would bind the port beside the new generation: refused.
    let a = step(&mut m, Input::Start(Some(ClientId(3))), t);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(3), Outcome::Failed(Failure::DeployUnderWay { .. }))]
        ),
        "{a:?}"
    );
    assert_eq!(spawned(&a), vec![]);
    let a = step(&mut m, exited(1, 0), t);
    assert_eq!(spawned(&a), vec![], "one old worker still runs");
    let a = step(&mut m, exited(1, 1), t);
    assert_eq!(spawned(&a), vec![(2, 0), (2, 1)], "the port is free: {a:?}");
    // Ready by the probe of the app's own port, then probation, then it serves alone.
    let a = step(&mut m, Input::ProbeAccepted(GenId(2)), t);
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Progress {
                event: Event::ProbationBegins { .. },
                ..
            }
        )),
        "{a:?}"
    );
    let later = t + m.config().deploy.probation;
    let a = step(&mut m, Input::Tick, later);
    assert!(a.contains(&Action::Retire(GenId(1))), "{a:?}");
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Progress {
                event: Event::Flipped {
                    steering: Steering::Alone,
                    ..
                },
                ..
            }
        )),
        "{a:?}"
    );
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(2), Outcome::Done(Done::Deployed { .. }))]
        ),
        "{a:?}"
    );
    assert_eq!(m.serving(), GenId(2));
    assert!(m.deploy().is_none());
}

#[test]
fn a_failed_stop_then_start_deploy_starts_the_old_generation_once_the_new_one_is_gone() {
    let t = Instant::now();
    let (mut m, _) = own_port_deploy(t);
    exit_all(&mut m, 1, t);
    assert_eq!(m.generation(GenId(2)).expect("new").slots.live(), 2);
    // A new worker crashes: the new generation is stopped first.
    let a = step(&mut m, exited(2, 0), t);
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Progress {
                event: Event::NewStopsFirst {
                    generation: GenId(2),
                    then: GenId(1),
                    ..
                },
                ..
            }
        )),
        "{a:?}"
    );
    assert!(
        spawned(&a).iter().all(|(g, _)| *g == 2),
        "not the old one yet: {a:?}"
    );
    assert_eq!(replies(&a), vec![]);
    let a = exit_all(&mut m, 2, t);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)], "{a:?}");
    match replies(&a).as_slice() {
        [(ClientId(2), Outcome::Failed(Failure::RestartedPrevious { reason, from }))] => {
            assert_eq!(*from, GenId(1));
            assert!(
                matches!(
                    reason,
                    RollbackReason::Crashed {
                        generation: GenId(2),
                        exit: Some(_),
                        ..
                    }
                ),
                "{reason:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.serving(), GenId(1));
    assert!(m.deploy().is_none());
    assert_eq!(m.generations().count(), 1, "the new generation is retired");
}

#[test]
fn a_stop_then_start_deploy_whose_flip_fails_starts_the_old_generation_again() {
    let t = Instant::now();
    let (mut m, _) = own_port_deploy(t);
    exit_all(&mut m, 1, t);
    step(&mut m, Input::ProbeAccepted(GenId(2)), t);
    let later = t + m.config().deploy.probation;
    let a = m.handle(Input::Tick, &NoSteering, later);
    assert_eq!(a.last(), Some(&Action::Steer(GenId(2))), "{a:?}");
    let why = "tcp 127.0.0.1:8000: failed to switch steering to slot 1: Cannot allocate memory (os error 12)";
    let failed = Input::Steered {
        generation: GenId(2),
        result: Err(why.into()),
        window: None,
    };
    let a = step(&mut m, failed, later);
    let reason = RollbackReason::NotSteered {
        generation: GenId(2),
        why: why.into(),
    };
    assert!(
        a.contains(&Action::Log(Event::NewStopsFirst {
            generation: GenId(2),
            reason: reason.clone(),
            then: GenId(1),
        })),
        "{a:?}"
    );
    assert_eq!(m.serving(), GenId(1), "{a:?}");
    assert_eq!(replies(&a), vec![], "{a:?}");
    assert_eq!(spawned(&a), vec![], "not beside the new generation: {a:?}");
    let a = exit_all(&mut m, 2, later);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)], "{a:?}");
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(2),
            Outcome::Failed(Failure::RestartedPrevious {
                reason,
                from: GenId(1),
            })
        )],
        "{a:?}"
    );
    assert!(m.deploy().is_none());
    assert_eq!(m.generations().count(), 1, "the new generation is retired");
}

#[test]
fn a_stop_then_start_deploy_not_ready_in_time_or_rolled_back_on_request_waits_for_the_new_generation()
 {
    let t = Instant::now();
    let (mut m, _) = own_port_deploy(t);
    // The old generation takes a while to stop: the timeout counts from the new start.
    let t1 = t + m.config().ready.timeout + Duration::from_secs(5);
    let a = exit_all(&mut m, 1, t1);
    assert_eq!(spawned(&a), vec![(2, 0), (2, 1)]);
    let a = step(&mut m, Input::Tick, t1 + Duration::from_secs(1));
    assert!(
        m.deploy().is_some_and(|d| d.exclusive_failure.is_none()),
        "{a:?}"
    );
    let t2 = t1 + m.config().ready.timeout;
    let a = step(&mut m, Input::Tick, t2);
    assert_eq!(spawned(&a), vec![]);
    let a = exit_all(&mut m, 2, t2);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(
                ClientId(2),
                Outcome::Failed(Failure::RestartedPrevious {
                    reason: RollbackReason::NotReady { .. },
                    ..
                })
            )]
        ),
        "{a:?}"
    );
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)]);

    // `rollback` while the new generation starts: answered, and the old one starts
    // once the new one is gone.
    let (mut m, _) = own_port_deploy(t);
    exit_all(&mut m, 1, t);
    let a = step(&mut m, Input::Rollback(ClientId(4)), t);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(4), Outcome::Done(Done::RolledBack { .. }))]
        ),
        "{a:?}"
    );
    assert_eq!(spawned(&a), vec![]);
    let a = exit_all(&mut m, 2, t);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)]);
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(
                ClientId(2),
                Outcome::Failed(Failure::RestartedPrevious {
                    reason: RollbackReason::OnRequest(GenId(2)),
                    ..
                })
            )]
        ),
        "{a:?}"
    );

    // A stop cancels it: nothing starts again.
    let (mut m, _) = own_port_deploy(t);
    exit_all(&mut m, 1, t);
    let stop = Input::Stop {
        client: Some(ClientId(5)),
        why: CancelReason::SiteStopped,
    };
    step(&mut m, stop, t);
    let a = exit_all(&mut m, 2, t);
    assert_eq!(spawned(&a), vec![]);
    assert!(m.is_stopped());
}

/// No steering, and what generation 1's workers left behind is still there until told.
struct LeftBehind(std::cell::Cell<bool>);

impl Observe for LeftBehind {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        None
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        true
    }
    fn probe_alone(&self) -> Result<(), String> {
        Err("unavailable".into())
    }
    fn leftovers(&self, g: GenId) -> bool {
        g == GenId(1) && self.0.get()
    }
}

#[test]
fn stop_then_start_waits_for_what_the_old_workers_left_behind() {
    let t = Instant::now();
    let (mut m, _) = own_port_deploy(t);
    let obs = LeftBehind(std::cell::Cell::new(true));
    let a = [
        send(&mut m, exited(1, 0), &obs, t),
        send(&mut m, exited(1, 1), &obs, t),
    ]
    .concat();
    assert_eq!(
        spawned(&a),
        vec![],
        "a killed grandchild may still hold the port"
    );
    obs.0.set(false);
    let a = send(&mut m, Input::Tick, &obs, t);
    assert_eq!(spawned(&a), vec![(2, 0), (2, 1)]);
}

#[test]
fn a_canary_worker_that_fails_its_health_checks_rolls_the_canary_back() {
    let t = Instant::now();
    let extra = "workers = 10\n[[listen]]\ntcp = \"127.0.0.1:1\"\n[health]\nfailures = 1\n";
    let (mut m, _) = SiteMachine::new(site(extra), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: "20%".parse().ok(),
    };
    send(&mut m, deploy, &Quiet, t);
    let t = t + Duration::from_secs(1);
    send(&mut m, Input::Tick, &Quiet, t);
    assert_eq!(m.deploy().map(|d| d.stage), Some(Stage::Canary));
    // A check that landed on the canary's w-1 (pid 2001) was not answered.
    let failed = Input::HealthChecked(crate::supervisor::machine::HealthResult::Failed {
        answer: crate::supervisor::machine::HealthAnswer::TimedOut,
        worker: Some((GenId(2), Slot(1), 2001)),
    });
    let a = send(&mut m, failed, &Quiet, t);
    assert!(
        a.contains(&Action::Canary {
            generation: GenId(2),
            share: None
        }),
        "{a:?}"
    );
    assert!(m.deploy().is_none());
    assert_eq!(m.serving(), GenId(1));
    let end = m.last_deploy().expect("recorded");
    assert_eq!(
        end.reason,
        Some(RollbackReason::Unhealthy {
            generation: GenId(2),
            worker: Slot(1),
            after_flip: false
        })
    );
}

#[test]
fn a_listener_shut_down_in_the_serving_generation_is_replaced_by_a_deploy_of_its_release_once() {
    let t = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("r1")).expect("r1");
    std::os::unix::fs::symlink("r1", dir.path().join("current")).expect("current");
    let text = format!(
        "workers = 1\nrelease = \"{}\"\n",
        dir.path().join("current").display()
    );
    let (mut m, _) = SiteMachine::new(site(&text), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    // gen-2 runs a release an operator named, not the one `current` points to.
    let r2 = PathBuf::from("/srv/web/releases/r2");
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: Some(r2.clone()),
        canary: None,
    };
    send(&mut m, deploy, &Quiet, t);
    let t = t + Duration::from_secs(1);
    send(&mut m, Input::Tick, &Quiet, t);
    send(&mut m, exited(1, 0), &Quiet, t);
    assert_eq!((m.serving(), m.deploy().is_none()), (GenId(2), true));
    // Said, then its release deployed again as gen-3, with listeners of its own.
    let a = send(&mut m, shut(2), &Quiet, t);
    let log = a
        .iter()
        .position(|x| *x == said(2, ShutAnswer::Redeploy(GenId(3))));
    let bind = a.iter().position(|x| *x == Action::BindListeners(GenId(3)));
    assert!(log.is_some() && log < bind, "{a:?}");
    let d = m.deploy().expect("a deploy");
    assert_eq!((d.to, d.release.as_ref()), (GenId(3), Some(&r2)), "{a:?}");
    assert!(m.generation(GenId(3)).expect("gen-3").replaces_shut);
    // While it is under way, another listener of gen-2's shut down is left to it; one of
    // gen-3's (shared with gen-2: bound before the shutdown) is not answered with another
    // deploy once it serves, the release shuts its listeners down.
    let a = send(&mut m, shut(2), &Quiet, t);
    assert_eq!(a, vec![said(2, ShutAnswer::DeployUnderWay(GenId(3)))]);
    let a = send(&mut m, shut(3), &Quiet, t);
    assert_eq!(a, vec![said(3, ShutAnswer::Again)]);
    let t = t + Duration::from_secs(1);
    let a = [
        send(&mut m, Input::Tick, &Quiet, t),
        send(&mut m, exited(2, 0), &Quiet, t),
    ]
    .concat();
    assert_eq!((m.serving(), m.deploy().is_none()), (GenId(3), true));
    assert!(
        !a.iter().any(|x| matches!(x, Action::BindListeners(_))),
        "{a:?}"
    );
    // The release deployed again is not the one before it for a `rollback` (gen-1 had
    // none recorded).
    assert_eq!(m.previous_release(), None);
}

fn shut(g: u32) -> Input {
    Input::ListenerShut {
        generation: GenId(g),
        listener: "http (tcp 127.0.0.1:8000)".into(),
    }
}

/// What the machine logs of a listener shut down.
fn said(g: u32, answer: ShutAnswer) -> Action {
    Action::Log(Event::ListenerShut {
        generation: GenId(g),
        listener: "http (tcp 127.0.0.1:8000)".into(),
        answer,
    })
}

#[test]
fn a_listener_shut_down_while_its_generation_cannot_be_replaced_is_replaced_once_it_can() {
    let t = Instant::now();
    // Shut down while the deploy that made its generation serve drains the old one: the
    // release is deployed again once that deploy is over.
    let mut m = deploying("workers = 1\n", &Queued, t);
    let t = t + Duration::from_secs(1);
    send(&mut m, Input::Tick, &Queued, t);
    assert_eq!(m.serving(), GenId(2), "flipped; the old one drains");
    let a = send(&mut m, shut(2), &Queued, t);
    assert_eq!(a, vec![said(2, ShutAnswer::AfterDeploy)]);
    let stop = Input::Stop {
        client: Some(ClientId(3)),
        why: CancelReason::SiteStopped,
    };
    // A stop ends the deploy: not deployed while the site stops.
    let a = send(&mut m, stop, &Queued, t);
    assert!(m.deploy().is_none(), "{a:?}");
    assert!(!a.contains(&Action::BindListeners(GenId(3))), "{a:?}");
    let a = [
        send(&mut m, exited(1, 0), &Queued, t),
        send(&mut m, exited(2, 0), &Queued, t),
    ]
    .concat();
    assert!(!a.contains(&Action::BindListeners(GenId(3))), "{a:?}");
    let a = send(&mut m, shut(2), &Queued, t);
    assert_eq!(a, vec![said(2, ShutAnswer::Stopped)]);
    // Started again: deployed again at once, said first.
    let a = send(&mut m, Input::Start(Some(ClientId(4))), &Queued, t);
    let log = a
        .iter()
        .position(|x| *x == said(2, ShutAnswer::Redeploy(GenId(3))));
    let bind = a.iter().position(|x| *x == Action::BindListeners(GenId(3)));
    assert!(log.is_some() && log < bind, "{a:?}");
    assert!(m.generation(GenId(3)).expect("gen-3").replaces_shut);
}

#[test]
fn a_listener_shut_down_while_its_release_cannot_be_deployed_is_replaced_once_it_can() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 1\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let scale = |workers| Input::Scale {
        client: ClientId(2),
        workers,
        owner: None,
    };
    send(&mut m, scale(0), &Quiet, t);
    send(&mut m, exited(1, 0), &Quiet, t);
    // Scaled to 0: nothing to deploy. Said, and not said again at every step.
    let a = send(&mut m, shut(1), &Quiet, t);
    assert_eq!(a, vec![said(1, ShutAnswer::Refused(Failure::NoWorkers))]);
    let t = t + Duration::from_secs(1);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Log(Event::ListenerShut { .. }))),
        "{a:?}"
    );
    // Another of its listeners shut down: said again.
    let a = send(&mut m, shut(1), &Quiet, t);
    assert_eq!(a, vec![said(1, ShutAnswer::Refused(Failure::NoWorkers))]);
    // Stopped, then started: what was said between (`stopped`) no longer holds, so the
    // refusal is said again.
    let stop = Input::Stop {
        client: Some(ClientId(3)),
        why: CancelReason::SiteStopped,
    };
    send(&mut m, stop, &Quiet, t);
    let a = send(&mut m, shut(1), &Quiet, t);
    assert_eq!(a, vec![said(1, ShutAnswer::Stopped)]);
    let a = send(&mut m, Input::Start(Some(ClientId(4))), &Quiet, t);
    assert!(
        a.contains(&said(1, ShutAnswer::Refused(Failure::NoWorkers))),
        "{a:?}"
    );
    // Scaled up: its release is deployed again, said first, with new listeners.
    let a = send(&mut m, scale(1), &Quiet, t);
    let log = a
        .iter()
        .position(|x| *x == said(1, ShutAnswer::Redeploy(GenId(2))));
    let bind = a.iter().position(|x| *x == Action::BindListeners(GenId(2)));
    assert!(log.is_some() && log < bind, "{a:?}");
    assert!(m.generation(GenId(2)).expect("gen-2").replaces_shut);
    // That deploy rolled back (its listeners could not be bound): not tried again, and a
    // later shutdown of gen-1's says so.
    let a = send(
        &mut m,
        Input::ListenersBound {
            generation: GenId(2),
            result: Err("address in use".into()),
        },
        &Quiet,
        t,
    );
    assert_eq!(
        a,
        vec![said(
            1,
            ShutAnswer::NotRedeployed(Failure::CannotDeploy("address in use".into()))
        )]
    );
    assert!(m.deploy().is_none());
    let a = send(&mut m, shut(1), &Quiet, t);
    assert_eq!(a, vec![said(1, ShutAnswer::Tried)]);
}

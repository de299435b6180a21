//! The site machine, input by input: what it asks for and answers, and the fixes the
//! simulation found, each pinned by a test.

use super::*;

/// A world where nothing is measured, every queue is empty, releases resolve to
/// themselves and probes can reach a generation alone.
pub(super) struct Quiet;

impl Observe for Quiet {
    fn resolve_release(
        &self,
        site: &SiteConfig,
        asked: Option<&Path>,
    ) -> Result<Option<PathBuf>, String> {
        Ok(asked
            .map(Path::to_path_buf)
            .or_else(|| site.release.clone()))
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        None
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        true
    }
    fn probe_alone(&self) -> Result<(), String> {
        Ok(())
    }
}

pub(super) fn site(extra: &str) -> SiteConfig {
    let text = format!("name = \"web\"\ncommand = [\"/bin/true\"]\n{extra}");
    let raw: crate::config::RawSite = toml::from_str(&text).expect("toml");
    crate::config::validate_site(
        Path::new("/etc/hatchery/sites.d/web.toml"),
        &raw,
        crate::config::LogPolicy::default(),
    )
    .expect("valid")
}

/// Carries out `actions` as the event loop does, first in first out: spawns succeed
/// (pid `1000 × generation + slot`), listeners bind, steering flips. Returns every
/// action seen, the first ones included.
pub(super) fn drive(
    m: &mut SiteMachine,
    actions: Vec<Action>,
    obs: &dyn Observe,
    t: Instant,
) -> Vec<Action> {
    let mut queue: VecDeque<Action> = actions.into();
    let mut seen = Vec::new();
    while let Some(a) = queue.pop_front() {
        let input = match &a {
            Action::Spawn { generation, slot } => Some(Input::Worker {
                generation: *generation,
                input: slots::Input::Spawned {
                    id: *slot,
                    pid: i32::try_from(1000 * generation.0 + slot.0).expect("small"),
                },
            }),
            Action::BindListeners(g) => Some(Input::ListenersBound {
                generation: *g,
                result: Ok(()),
            }),
            Action::Steer(g) => Some(Input::Steered {
                generation: *g,
                result: Ok(Steering::Ebpf),
                window: None,
            }),
            Action::Canary {
                generation,
                share: Some(_),
            } => Some(Input::CanarySteered {
                generation: *generation,
                result: Ok(()),
            }),
            _ => None,
        };
        seen.push(a);
        if let Some(input) = input {
            queue.extend(m.handle(input, obs, t));
        }
    }
    seen
}

/// Feeds `input` and carries out what follows.
pub(super) fn send(
    m: &mut SiteMachine,
    input: Input,
    obs: &dyn Observe,
    t: Instant,
) -> Vec<Action> {
    let a = m.handle(input, obs, t);
    drive(m, a, obs, t)
}

pub(super) fn exited(g: u32, slot: u32) -> Input {
    Input::Worker {
        generation: GenId(g),
        input: slots::Input::Exited {
            id: Slot(slot),
            reason: slots::ExitReason::Exited { code: 0 },
        },
    }
}

pub(super) fn replies(actions: &[Action]) -> Vec<(ClientId, Outcome)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { client, outcome } => Some((*client, outcome.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn spawned(actions: &[Action]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { generation, slot } => Some((generation.0, slot.0)),
            _ => None,
        })
        .collect()
}

/// A budget of 400M with 100M a worker: a cap of 4, which 4 workers fill.
pub(super) const FULL_BUDGET: &str = "workers = 4\nmemory = \"400M\"\nworker_memory = \"100M\"\n";

#[test]
fn stopping_answers_the_clients_waiting_for_the_site_to_settle() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(
        site("workers = 2\n[ready]\ncheck = \"notify\"\n"),
        None,
        None,
        t,
    );
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let a = send(
        &mut m,
        Input::Stop {
            client: Some(ClientId(2)),
            why: CancelReason::SiteStopped,
        },
        &Quiet,
        t,
    );
    assert_eq!(
        replies(&a),
        vec![(
            ClientId(1),
            Outcome::Failed(Failure::Cancelled(CancelReason::SiteStopped))
        )],
        "the start never settles now: {a:?}"
    );
}

#[test]
fn a_start_during_a_stop_answers_the_client_waiting_for_the_stop() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    let stop = Input::Stop {
        client: Some(ClientId(2)),
        why: CancelReason::SiteStopped,
    };
    let a = send(&mut m, stop, &Quiet, t);
    assert!(
        replies(&a).is_empty(),
        "the workers have not exited yet: {a:?}"
    );
    let a = send(&mut m, Input::Start(Some(ClientId(3))), &Quiet, t);
    assert_eq!(
        replies(&a),
        vec![(ClientId(2), Outcome::Failed(Failure::StartedAgain))],
        "the stop never ends now: {a:?}"
    );
    // Once the old processes are gone the site runs again, and the start is answered.
    let mut a = send(&mut m, exited(1, 0), &Quiet, t);
    a.extend(send(&mut m, exited(1, 1), &Quiet, t));
    let later = t + Duration::from_secs(2);
    a.extend(send(&mut m, Input::Tick, &Quiet, later));
    assert_eq!(
        replies(&a),
        vec![(ClientId(3), Outcome::Done(Done::Settled))],
        "{a:?}"
    );
}

#[test]
fn a_stop_during_a_deploy_starts_no_worker() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    // The old generation gives up a slot; the new one takes it.
    let a = send(
        &mut m,
        Input::Deploy {
            client: ClientId(2),
            release: None,
            canary: None,
        },
        &Quiet,
        t,
    );
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Signal {
                generation: GenId(1),
                ..
            }
        )),
        "{a:?}"
    );
    let a = send(&mut m, exited(1, 3), &Quiet, t);
    assert_eq!(spawned(&a), vec![(2, 0)]);
    // Cancelled, the deploy gives the old generation its workers back, for its next start.
    let a = send(
        &mut m,
        Input::Stop {
            client: Some(ClientId(3)),
            why: CancelReason::SiteStopped,
        },
        &Quiet,
        t,
    );
    assert_eq!(spawned(&a), vec![], "{a:?}");
    for (g, slot) in [(1, 0), (1, 1), (1, 2), (2, 0)] {
        send(&mut m, exited(g, slot), &Quiet, t);
    }
    assert!(m.is_stopped());
    let a = send(&mut m, Input::Tick, &Quiet, t + capacity::SETTLE);
    assert_eq!(spawned(&a), vec![]);
    assert_eq!(m.current().slots.desired, 4, "all of them when it starts");
}

#[test]
fn a_stopping_site_is_stopped_to_deploy_scale_and_restart() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 1\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let stop = Input::Stop {
        client: Some(ClientId(2)),
        why: CancelReason::SiteStopped,
    };
    send(&mut m, stop, &Quiet, t);
    assert_eq!(m.current().slots.run, RunState::Stopping);
    let a = send(
        &mut m,
        Input::Deploy {
            client: ClientId(3),
            release: None,
            canary: None,
        },
        &Quiet,
        t,
    );
    assert_eq!(
        replies(&a),
        vec![(ClientId(3), Outcome::Failed(Failure::Stopped))]
    );
    assert!(m.deploy().is_none());
    let scale = Input::Scale {
        client: ClientId(4),
        workers: 2,
        owner: None,
    };
    let a = send(&mut m, scale, &Quiet, t);
    assert_eq!(
        replies(&a),
        vec![(ClientId(4), Outcome::Done(Done::WhenStarted(2)))]
    );
    // A restart starts it again: the client waits for it to settle (no rolling restart
    // follows a start).
    send(&mut m, Input::Restart(ClientId(5)), &Quiet, t);
    send(&mut m, exited(1, 0), &Quiet, t);
    let later = t + Duration::from_secs(2);
    let a = send(&mut m, Input::Tick, &Quiet, later);
    assert!(
        replies(&a).contains(&(ClientId(5), Outcome::Done(Done::Settled))),
        "{a:?}"
    );
}

/// Measured memory of every worker, as given.
pub(super) struct Measured(pub(super) u64);

impl Observe for Measured {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        Some(self.0)
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        true
    }
    fn probe_alone(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A host without the memory controller: nothing is measured, ever.
struct Unmeasurable;

impl Observe for Unmeasurable {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, _: GenId, _: &[Slot]) -> Option<u64> {
        None
    }
    fn memory_measurable(&self) -> bool {
        false
    }
    fn queues_empty(&self, _: GenId, _: GenId) -> bool {
        true
    }
    fn probe_alone(&self) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn an_auto_site_grows_on_its_estimate_where_memory_cannot_be_measured() {
    // Cap 5 (512M / 100M), auto between 1 and 16.
    let auto = "workers = \"auto\"\nworkers_min = 1\nworkers_max = 16\nmemory = \"512M\"\nworker_memory = \"100M\"\n";
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(auto), None, None, t);
    let a = send(&mut m, Input::Start(Some(ClientId(1))), &Unmeasurable, t);
    assert_eq!(spawned(&a), vec![(1, 0)]);
    assert_eq!(m.capacity().map(|c| c.workers), Some(5));
    // One more each time the workers have settled, up to the cap, and no further.
    let mut now = t;
    for grown in 2..=5 {
        now += capacity::SETTLE;
        send(&mut m, Input::Tick, &Unmeasurable, now);
        assert_eq!(m.current().slots.desired, grown, "at {:?}", now - t);
    }
    for _ in 0..5 {
        now += capacity::SETTLE * 5;
        send(&mut m, Input::Tick, &Unmeasurable, now);
    }
    assert_eq!(m.current().slots.desired, 5);
    // Where memory can be measured and was not (yet), nothing grows on the estimate.
    let (mut m, _) = SiteMachine::new(site(auto), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    for k in 1..=3 {
        send(&mut m, Input::Tick, &Quiet, t + capacity::SETTLE * k);
    }
    assert_eq!(m.current().slots.desired, 1);
    // Where memory is measured, growth waits for a peak that holds, as before: a first
    // measurement alone grows nothing.
    let (mut m, _) = SiteMachine::new(site(auto), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    send(
        &mut m,
        Input::Tick,
        &Measured(10 << 20),
        t + capacity::SETTLE,
    );
    assert_eq!(m.current().slots.desired, 1);
    send(
        &mut m,
        Input::Tick,
        &Measured(10 << 20),
        t + capacity::SETTLE * 2,
    );
    assert_eq!(m.current().slots.desired, 2);
}

#[test]
fn a_fall_of_the_cap_applies_before_restarts_that_are_due() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(FULL_BUDGET), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    // Slot 1 dies at once: it restarts after the backoff floor.
    let a = send(&mut m, exited(1, 1), &Quiet, t + Duration::from_millis(1));
    assert_eq!(spawned(&a), vec![]);
    // Measured at 150M (172.5M with the margin), the budget holds 2: the slot waiting
    // for its restart is the first to go, and nothing starts above the new cap.
    let later = t + capacity::SETTLE;
    let a = send(&mut m, Input::Tick, &Measured(150 << 20), later);
    assert_eq!(m.capacity().map(|c| c.workers), Some(2));
    assert_eq!(spawned(&a), vec![], "{a:?}");
    assert!(!m.current().slots.slots.contains_key(&Slot(1)));
}

#[test]
fn a_flip_to_a_settled_generation_answers_the_clients_waiting_for_the_site_to_settle() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(
        site("workers = 1\n[ready]\ncheck = \"notify\"\n"),
        None,
        None,
        t,
    );
    // The old worker never says it is ready: the start waits.
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let a = send(
        &mut m,
        Input::Deploy {
            client: ClientId(2),
            release: None,
            canary: None,
        },
        &Quiet,
        t,
    );
    assert_eq!(spawned(&a), vec![(2, 0)]);
    let ready = Input::Worker {
        generation: GenId(2),
        input: slots::Input::ReadyNotified { id: Slot(0) },
    };
    send(&mut m, ready, &Quiet, t);
    // Probation and settle both end a second later: it settles, then serves.
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(1));
    assert_eq!(m.serving(), GenId(2));
    assert!(
        replies(&a).contains(&(ClientId(1), Outcome::Done(Done::Settled))),
        "{a:?}"
    );
}

#[test]
fn start_waits_for_every_worker_to_settle() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
    let a = m.handle(Input::Start(Some(ClientId(7))), &Quiet, t);
    let spawns: Vec<&Action> = a
        .iter()
        .filter(|x| matches!(x, Action::Spawn { .. }))
        .collect();
    assert_eq!(spawns.len(), 2);
    for slot in [Slot(0), Slot(1)] {
        let a = m.handle(
            Input::Worker {
                generation: GenId(1),
                input: slots::Input::Spawned {
                    id: slot,
                    pid: 10 + i32::from(slot.0 == 1),
                },
            },
            &Quiet,
            t,
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::Reply { .. })),
            "{a:?}"
        );
    }
    let later = t + Duration::from_secs(1);
    let a = m.handle(Input::Tick, &Quiet, later);
    assert!(
        a.contains(&Action::Reply {
            client: ClientId(7),
            outcome: Outcome::Done(Done::Settled)
        }),
        "{a:?}"
    );
}

#[test]
fn with_an_http_check_only_an_answer_makes_a_worker_ready() {
    let t = Instant::now();
    let text = "workers = 1\n[[listen]]\ntcp = \"127.0.0.1:1\"\n[ready]\ncheck = \"http\"\n";
    let (mut m, _) = SiteMachine::new(site(text), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    let slot = |m: &SiteMachine| m.current().slots.slots[&Slot(0)].phase;
    assert!(matches!(slot(&m), Phase::Starting { .. }), "{:?}", slot(&m));
    // READY=1 (gunicorn sends it before its app is loaded) is not an answer.
    let ready = Input::Worker {
        generation: GenId(1),
        input: slots::Input::ReadyNotified { id: Slot(0) },
    };
    send(&mut m, ready, &Quiet, t);
    assert!(matches!(slot(&m), Phase::Starting { .. }), "{:?}", slot(&m));
    // The loop probes it, and the probe's answer is.
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert!(a.contains(&Action::Probe(GenId(1))), "{a:?}");
    send(&mut m, Input::ProbeAccepted(GenId(1)), &Quiet, t);
    assert_eq!(slot(&m), Phase::Ready);
}

/// A site of two workers with health checks every second, two failures before a restart.
fn healthy_site(t: Instant) -> SiteMachine {
    let extra = "workers = 2\n[[listen]]\ntcp = \"127.0.0.1:1\"\n[health]\ninterval = \"1s\"\ntimeout = \"500ms\"\nfailures = 2\n";
    let (mut m, _) = SiteMachine::new(site(extra), None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    m
}

fn timed_out(g: u32, slot: u32, pid: i32) -> Input {
    Input::HealthChecked(HealthResult::Failed {
        answer: HealthAnswer::TimedOut,
        worker: Some((GenId(g), Slot(slot), pid)),
    })
}

fn health_checks(a: &[Action]) -> Vec<(u32, bool)> {
    a.iter()
        .filter_map(|x| match x {
            Action::Health {
                generation,
                give_up,
            } => Some((generation.0, *give_up)),
            _ => None,
        })
        .collect()
}

#[test]
fn health_checks_run_every_interval_and_give_up_at_the_timeout() {
    let t = Instant::now();
    let mut m = healthy_site(t);
    assert!(
        m.next_deadline(t)
            .is_some_and(|d| d <= t + Duration::from_secs(1))
    );
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_millis(500));
    assert_eq!(health_checks(&a), vec![], "not before an interval");
    let t1 = t + Duration::from_secs(1);
    let a = send(&mut m, Input::Tick, &Quiet, t1);
    assert_eq!(health_checks(&a), vec![(1, false)]);
    // Looked at every probe interval until its timeout, then given up.
    assert_eq!(m.next_deadline(t1), Some(t1 + TCP_PROBE_INTERVAL));
    let a = send(&mut m, Input::Tick, &Quiet, t1 + TCP_PROBE_INTERVAL);
    assert_eq!(health_checks(&a), vec![(1, false)]);
    let a = send(&mut m, Input::Tick, &Quiet, t1 + Duration::from_millis(500));
    assert_eq!(health_checks(&a), vec![(1, true)]);
    send(
        &mut m,
        Input::HealthChecked(HealthResult::Healthy),
        &Quiet,
        t1 + Duration::from_millis(500),
    );
    assert_eq!(
        m.next_deadline(t1 + Duration::from_millis(500)),
        Some(t1 + Duration::from_secs(1)),
        "the next one an interval after this one began"
    );
}

#[test]
fn a_worker_that_fails_its_health_checks_is_restarted_and_said_so() {
    let t = Instant::now();
    let mut m = healthy_site(t);
    // w-1 (pid 1001) fails once: said, not restarted.
    let a = send(&mut m, timed_out(1, 1, 1001), &Quiet, t);
    assert!(
        a.contains(&Action::Log(Event::HealthFailed {
            generation: GenId(1),
            worker: Some(Slot(1)),
            answer: HealthAnswer::TimedOut,
            failures: 1,
            of: 2
        })),
        "{a:?}"
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::Signal { .. })),
        "{a:?}"
    );
    // A check no worker had accepted says so, and counts against nobody.
    let unattributed = Input::HealthChecked(HealthResult::Failed {
        answer: HealthAnswer::TimedOut,
        worker: None,
    });
    let a = send(&mut m, unattributed, &Quiet, t);
    assert!(
        matches!(
            a.as_slice(),
            [Action::Log(Event::HealthFailed { worker: None, .. })]
        ),
        "{a:?}"
    );
    // A failure of a process the slot no longer runs counts for nothing.
    let a = send(&mut m, timed_out(1, 1, 999), &Quiet, t);
    assert_eq!(a, vec![]);
    // The second failure restarts it: the stop signal, then a new process at once.
    let a = send(&mut m, timed_out(1, 1, 1001), &Quiet, t);
    assert!(
        a.contains(&Action::Log(Event::Unhealthy {
            generation: GenId(1),
            worker: Slot(1),
            pid: 1001,
            failures: 2
        })),
        "{a:?}"
    );
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Signal {
                generation: GenId(1),
                slot: Slot(1),
                ..
            }
        )),
        "{a:?}"
    );
    let a = send(&mut m, exited(1, 1), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 1)], "started again at once");
    // w-0 was never touched.
    assert!(
        m.current()
            .slots
            .slots
            .get(&Slot(0))
            .is_some_and(|s| s.pid == Some(1000))
    );
}

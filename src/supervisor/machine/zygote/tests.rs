//! Zygote-mode generations, input by input.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::super::tests::{Quiet, exited, replies, send, site, spawned};
use super::*;
use crate::supervisor::ids::ClientId;
use crate::supervisor::machine::WorkerState;
use crate::supervisor::machine::{CancelReason, Done, Failure, Input, Outcome, RollbackReason};

const ZYGOTE: &str = "mode = \"zygote\"\n";

/// A zygote-mode site: `extra` keys, then a `notify` check with a 10 s timeout, a backoff
/// from 1 s, and 5 exits within 60 s for flapping.
fn zsite(extra: &str) -> SiteConfig {
    site(&format!(
        "{ZYGOTE}{extra}[ready]\ncheck = \"notify\"\ntimeout = \"10s\"\n[restart]\nbackoff_initial = \"1s\"\nflapping = {{ exits = 5, within = \"60s\" }}\n"
    ))
}

fn ready(g: u32, slot: u32) -> Input {
    Input::Worker {
        generation: GenId(g),
        input: slots::Input::ReadyNotified { id: Slot(slot) },
    }
}

fn zexit(g: u32, reason: &str) -> Input {
    Input::ZygoteExited {
        generation: GenId(g),
        reason: reason.into(),
    }
}

fn zygote_actions(a: &[Action]) -> Vec<Action> {
    a.iter()
        .filter(|a| matches!(a, Action::StartZygote(_) | Action::StopZygote(_)))
        .cloned()
        .collect()
}

fn phase(m: &SiteMachine, g: u32) -> Option<ZygotePhase> {
    m.generation(GenId(g))?.zygote.as_ref().map(|z| z.phase)
}

/// Sends `input` and plays the world: spawns succeed and every new worker says
/// `READY=1`, workers and zygotes stop when asked, and zygotes become ready (unless
/// `zygotes_ready` is false).
fn world(m: &mut SiteMachine, input: Input, t: Instant, zygotes_ready: bool) -> Vec<Action> {
    let mut seen = Vec::new();
    let mut inputs = VecDeque::from([input]);
    while let Some(input) = inputs.pop_front() {
        let a = send(m, input, &Quiet, t);
        for x in &a {
            match x {
                Action::StartZygote(g) if zygotes_ready => inputs.push_back(Input::ZygoteReady(*g)),
                Action::StopZygote(g) => inputs.push_back(zexit(g.0, "exited with status 0")),
                Action::Spawn { generation, slot } => inputs.push_back(ready(generation.0, slot.0)),
                Action::Signal {
                    generation, slot, ..
                }
                | Action::KillTree { generation, slot } => {
                    inputs.push_back(exited(generation.0, slot.0))
                }
                _ => {}
            }
        }
        seen.extend(a);
    }
    seen
}

/// Ticks at each deadline until `done` or 200 ticks; returns every action and the time.
fn run_until(
    m: &mut SiteMachine,
    mut t: Instant,
    zygotes_ready: bool,
    done: impl Fn(&SiteMachine) -> bool,
) -> (Vec<Action>, Instant) {
    let mut seen = Vec::new();
    for _ in 0..200 {
        if done(m) {
            break;
        }
        let Some(d) = m.next_deadline(t) else {
            break;
        };
        t = d.max(t);
        seen.extend(world(m, Input::Tick, t, zygotes_ready));
    }
    (seen, t)
}

#[test]
fn a_zygote_site_spawns_nothing_until_its_zygote_is_ready() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 3\n"), None, None, t);
    let a = send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    assert_eq!(spawned(&a), vec![], "{a:?}");
    assert!(matches!(phase(&m, 1), Some(ZygotePhase::Starting { .. })));
    assert_eq!(m.next_deadline(t), Some(t + Duration::from_secs(10)));
    // Loading the app takes 9 s: the workers' ready deadline counts from their fork.
    let t = t + Duration::from_secs(9);
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1), (1, 2)]);
    assert_eq!(zygote_actions(&a), vec![]);
    let t = t + Duration::from_secs(5);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![]);
    assert!(
        m.current()
            .slots
            .slots
            .values()
            .all(|s| matches!(s.phase, Phase::Starting { .. })),
        "a worker timed out on the zygote's time: {a:?}"
    );
    let mut a = Vec::new();
    for slot in 0..3 {
        a.extend(send(&mut m, ready(1, slot), &Quiet, t));
    }
    let t = t + Duration::from_secs(1);
    a.extend(send(&mut m, Input::Tick, &Quiet, t));
    assert_eq!(
        replies(&a),
        vec![(ClientId(1), Outcome::Done(Done::Settled))]
    );
    // A worker that crashes now is forked again at once: the zygote is ready.
    let a = send(&mut m, exited(1, 2), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 2)]);
    assert_eq!(zygote_actions(&a), vec![]);
}

#[test]
fn a_zygote_that_never_becomes_ready_fails_the_spawns_and_then_the_site() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    send(&mut m, Input::Start(Some(ClientId(1))), &Quiet, t);
    // Its deadline passes: it is stopped, and the spawns fail as crashes (the first one
    // of a slot that started long enough ago restarts at once: held again).
    let t = t + Duration::from_secs(10);
    let a = send(&mut m, Input::Tick, &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert_eq!(m.current().crashes, 2);
    assert!(
        m.current()
            .slots
            .slots
            .values()
            .all(|s| s.last_exit.as_ref().is_some_and(|e| e
                .to_string()
                .contains("the zygote did not become ready: not ready within 10000 ms"))),
        "{:?}",
        m.current().slots.slots
    );
    assert_eq!(spawned(&a), vec![]);
    // As for a worker that cannot start: the start fails.
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(1), Outcome::Failed(Failure::WorkerDied(_)))]
        ),
        "{:?}",
        replies(&a)
    );
    assert!(matches!(
        phase(&m, 1),
        Some(ZygotePhase::Stopping { retry: Some(_) })
    ));
    // No second zygote before the first has ended.
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(5));
    assert_eq!(zygote_actions(&a), vec![]);
    // Every later zygote fails too (it exits while loading): the site fails as one whose
    // workers cannot start, and no worker was ever spawned.
    let mut a = send(&mut m, zexit(1, "exited with status 1"), &Quiet, t);
    let mut t = t + Duration::from_secs(5);
    for _ in 0..100 {
        if m.current().slots.run == RunState::Failed {
            break;
        }
        let d = m.next_deadline(t).expect("something is due");
        t = d.max(t);
        let step = send(&mut m, Input::Tick, &Quiet, t);
        let started = step.contains(&Action::StartZygote(GenId(1)));
        a.extend(step);
        if started {
            a.extend(send(&mut m, zexit(1, "exited with status 1"), &Quiet, t));
        }
    }
    assert_eq!(m.current().slots.run, RunState::Failed);
    assert_eq!(spawned(&a), vec![]);
    assert!(
        m.current()
            .slots
            .slots
            .values()
            .any(|s| s.phase == Phase::Failed),
        "{:?}",
        m.current().slots.slots
    );
    let starts = a
        .iter()
        .filter(|x| **x == Action::StartZygote(GenId(1)))
        .count();
    assert!(starts >= 2, "the zygote is started again: {starts}");
}

#[test]
fn a_deploy_whose_zygote_never_becomes_ready_rolls_back() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    assert!(m.current().slots.is_settled());
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    let a = world(&mut m, deploy, t, false);
    assert!(a.contains(&Action::StartZygote(GenId(2))), "{a:?}");
    assert_eq!(spawned(&a), vec![], "{a:?}");
    let a = world(&mut m, zexit(2, "exited with status 1"), t, false);
    assert_eq!(m.serving(), GenId(1));
    assert!(m.deploy().is_none(), "{a:?}");
    assert!(
        matches!(
            m.last_deploy().and_then(|d| d.reason.clone()),
            Some(RollbackReason::Crashed {
                generation: GenId(2),
                ..
            })
        ),
        "{:?}",
        m.last_deploy()
    );
    assert!(
        matches!(
            replies(&a).as_slice(),
            [(ClientId(2), Outcome::Failed(Failure::RolledBack { .. }))]
        ),
        "{:?}",
        replies(&a)
    );
    assert_eq!(phase(&m, 1), Some(ZygotePhase::Ready));
    assert!(m.current().slots.is_settled());
}

#[test]
fn a_zygote_that_dies_while_ready_leaves_its_workers_and_is_started_again() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    let a = send(&mut m, zexit(1, "was killed by SIGKILL"), &Quiet, t);
    assert!(
        a.iter().all(|x| !matches!(
            x,
            Action::Spawn { .. } | Action::Signal { .. } | Action::KillTree { .. }
        )),
        "its workers are not its children: {a:?}"
    );
    assert!(m.current().zygote_degraded());
    assert_eq!(m.current().slots.ready(), 2);
    let z = m.current().zygote.clone().expect("zygote mode");
    assert_eq!(z.restarts, 1);
    let until = t + Duration::from_secs(1);
    assert_eq!(z.phase, ZygotePhase::Backoff { until });
    assert_eq!(m.next_deadline(t), Some(until));
    // A worker crashes meanwhile: its respawn waits for the new zygote.
    let a = send(&mut m, exited(1, 1), &Quiet, t);
    assert_eq!(spawned(&a), vec![]);
    assert_eq!(zygote_actions(&a), vec![]);
    let a = send(&mut m, Input::Tick, &Quiet, until);
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    assert!(m.current().zygote_degraded());
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, until);
    assert_eq!(spawned(&a), vec![(1, 1)]);
    assert!(!m.current().zygote_degraded());
}

#[test]
fn a_site_stop_stops_the_zygote_and_a_start_starts_it_again() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    let stop = Input::Stop {
        client: Some(ClientId(3)),
        why: CancelReason::SiteStopped,
    };
    let a = send(&mut m, stop, &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![], "workers first");
    send(&mut m, exited(1, 0), &Quiet, t);
    let a = send(&mut m, exited(1, 1), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert_eq!(
        replies(&a),
        vec![(ClientId(3), Outcome::Done(Done::Stopped))]
    );
    // Started again before the zygote has ended: the new one starts once it has.
    let a = send(&mut m, Input::Start(None), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![]);
    assert_eq!(spawned(&a), vec![]);
    let a = send(&mut m, zexit(1, "exited with status 0"), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)]);
}

#[test]
fn a_stop_while_the_zygote_loads_ends_the_held_spawns_and_the_zygote() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    let stop = Input::Stop {
        client: Some(ClientId(3)),
        why: CancelReason::SiteStopped,
    };
    let a = send(&mut m, stop, &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert_eq!(
        replies(&a),
        vec![(ClientId(3), Outcome::Done(Done::Stopped))]
    );
    assert_eq!(m.current().crashes, 0, "stopped as asked");
    assert!(
        m.current()
            .zygote
            .as_ref()
            .is_some_and(|z| z.held.is_empty())
    );
    // Its late READY serves nothing.
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, t);
    assert_eq!(spawned(&a), vec![]);
}

#[test]
fn a_retired_generation_stops_its_zygote_first() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    let mut a = world(&mut m, deploy, t, true);
    let (more, _) = run_until(&mut m, t, true, |m| m.generation(GenId(1)).is_none());
    a.extend(more);
    // The old workers drain (the world does not end them by itself).
    let mut t = t;
    for _ in 0..20 {
        if m.generation(GenId(1)).is_none() {
            break;
        }
        for slot in 0..2 {
            a.extend(world(&mut m, exited(1, slot), t, true));
        }
        t += Duration::from_secs(1);
        a.extend(world(&mut m, Input::Tick, t, true));
    }
    assert_eq!(m.serving(), GenId(2));
    let stop = a.iter().position(|x| *x == Action::StopZygote(GenId(1)));
    let retire = a.iter().position(|x| *x == Action::Retire(GenId(1)));
    assert!(
        matches!((stop, retire), (Some(s), Some(r)) if s < r),
        "{stop:?} {retire:?}: {a:?}"
    );
    assert_eq!(phase(&m, 2), Some(ZygotePhase::Ready));
    assert!(m.current().slots.is_settled());
}

#[test]
fn an_exec_site_has_no_zygote() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
    let mut a = world(&mut m, Input::Start(None), t, true);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)]);
    a.extend(world(&mut m, exited(1, 0), t, true));
    let deploy = Input::Deploy {
        client: ClientId(2),
        release: None,
        canary: None,
    };
    a.extend(world(&mut m, deploy, t, true));
    let (more, _) = run_until(&mut m, t, true, |m| m.deploy().is_none());
    a.extend(more);
    assert_eq!(zygote_actions(&a), vec![]);
    assert!(m.generations().all(|g| g.zygote.is_none()));
}

#[test]
fn a_reload_to_zygote_mode_and_back() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(
        site("workers = 2\n[ready]\ncheck = \"notify\"\n"),
        None,
        None,
        t,
    );
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    let mut zy = m.config().clone();
    zy.mode = SiteMode::Zygote;
    let a = send(&mut m, Input::Reconfigure(Box::new(zy)), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![]);
    assert_eq!(phase(&m, 1), Some(ZygotePhase::Stopped));
    // The rolling restart stops w-0; its respawn starts the zygote.
    let a = send(&mut m, exited(1, 0), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    assert_eq!(spawned(&a), vec![]);
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 0)]);
    send(&mut m, ready(1, 0), &Quiet, t);
    let (_, t) = run_until(&mut m, t, true, |m| {
        m.current().slots.is_settled() && !m.current().slots.is_restarting()
    });
    assert!(m.current().slots.is_settled());
    // Back to exec: the zygote is stopped, workers are exec'd again.
    let mut ex = m.config().clone();
    ex.mode = SiteMode::Exec;
    let a = send(&mut m, Input::Reconfigure(Box::new(ex)), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert!(matches!(phase(&m, 1), Some(ZygotePhase::Stopping { .. })));
    send(&mut m, zexit(1, "exited with status 0"), &Quiet, t);
    assert!(m.current().zygote.is_none());
    let a = send(&mut m, exited(1, 0), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 0)]);
    assert_eq!(zygote_actions(&a), vec![]);
}

#[test]
fn a_reload_that_changes_a_zygote_site_replaces_its_zygote() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    assert_eq!(phase(&m, 1), Some(ZygotePhase::Ready));
    // Only the count: the zygote stays.
    let mut more = m.config().clone();
    more.workers = 3;
    let a = send(&mut m, Input::Reconfigure(Box::new(more)), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![]);
    assert_eq!(spawned(&a), vec![(1, 2)]);
    send(&mut m, ready(1, 2), &Quiet, t);
    // Anything else: the zygote is replaced before a worker is forked again.
    let mut changed = m.config().clone();
    changed.env.insert("FLAVOUR".into(), "spicy".into());
    let a = send(&mut m, Input::Reconfigure(Box::new(changed)), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert!(matches!(phase(&m, 1), Some(ZygotePhase::Stopping { .. })));
    let b = world(&mut m, zexit(1, "exited with status 0"), t, true);
    let (c, _) = run_until(&mut m, t, true, |m| {
        m.current().slots.is_settled() && !m.current().slots.is_restarting()
    });
    let all: Vec<Action> = a.into_iter().chain(b).chain(c).collect();
    let at = |f: &dyn Fn(&Action) -> bool| all.iter().position(f);
    let start = at(&|x| matches!(x, Action::StartZygote(_))).expect("a new zygote");
    let first_spawn = at(&|x| matches!(x, Action::Spawn { .. })).expect("spawns");
    assert!(start < first_spawn, "{all:?}");
    assert_eq!(spawned(&all).len(), 3, "every worker restarted: {all:?}");
    assert_eq!(zygote_actions(&all).len(), 2, "{all:?}");
}

#[test]
fn a_reload_to_exec_mode_carries_out_the_spawns_the_zygote_held() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 2\n"), None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    let mut ex = m.config().clone();
    ex.mode = SiteMode::Exec;
    let a = send(&mut m, Input::Reconfigure(Box::new(ex)), &Quiet, t);
    assert_eq!(zygote_actions(&a), vec![Action::StopZygote(GenId(1))]);
    assert_eq!(spawned(&a), vec![(1, 0), (1, 1)]);
}

#[test]
fn an_adopted_zygote_site_keeps_its_workers_and_starts_a_zygote_for_a_missing_one() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(zsite("workers = 3\n"), None, None, t);
    world(&mut m, Input::Start(None), t, true);
    let (_, t) = run_until(&mut m, t, true, |m| m.current().slots.is_settled());
    // The agent dies with its zygote; w-2 dies too while no agent runs.
    let mut record = m.record();
    record.gens[0].workers.retain(|w| w.slot != 2);
    let (mut m, a) = SiteMachine::adopt(m.config().clone(), record.clone(), None, t);
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    assert_eq!(spawned(&a), vec![], "{a:?}");
    assert!(
        a.contains(&Action::Log(Event::Adopted {
            generation: GenId(1),
            workers: 2,
            starting: 1,
            stopped: 0,
        })),
        "{a:?}"
    );
    assert_eq!(m.current().slots.ready(), 2);
    let a = send(&mut m, Input::ZygoteReady(GenId(1)), &Quiet, t);
    assert_eq!(spawned(&a), vec![(1, 2)]);
    // Every worker alive: no zygote until a spawn needs one.
    record.gens[0].workers.push(WorkerState {
        slot: 2,
        pid: 1002,
        ready: true,
        stopping: false,
        restarts: 0,
    });
    let (mut m, a) = SiteMachine::adopt(m.config().clone(), record, None, t);
    assert_eq!(zygote_actions(&a), vec![]);
    assert_eq!(phase(&m, 1), Some(ZygotePhase::Stopped));
    let mut a = send(&mut m, exited(1, 0), &Quiet, t);
    let due = m.next_deadline(t).expect("its restart is due");
    a.extend(send(&mut m, Input::Tick, &Quiet, due));
    assert_eq!(zygote_actions(&a), vec![Action::StartZygote(GenId(1))]);
    assert_eq!(spawned(&a), vec![]);
}

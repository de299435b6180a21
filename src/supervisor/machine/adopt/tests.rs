//! Adoption: the record of a machine, and the machine a new agent builds from it.

use std::time::Duration;

use super::super::tests::{FULL_BUDGET, Quiet, drive, exited, replies, send, site, spawned};
use super::*;
use crate::supervisor::ids::ClientId;
use crate::supervisor::machine::{Done, Input, Outcome};

fn worker(slot: u32, ready: bool) -> WorkerState {
    WorkerState {
        slot,
        pid: i32::try_from(500 + slot).expect("small"),
        ready,
        stopping: false,
        restarts: 0,
    }
}

fn stopping(slot: u32) -> WorkerState {
    WorkerState {
        stopping: true,
        ..worker(slot, true)
    }
}

fn generation(id: u32, workers: Vec<WorkerState>) -> GenRecord {
    GenRecord {
        id,
        release: None,
        workers,
        replaces_shut: false,
    }
}

fn record(serving: u32, requested: u32, gens: Vec<GenRecord>) -> MachineRecord {
    MachineRecord {
        serving,
        last_gen: gens.iter().map(|g| g.id).max().unwrap_or(serving),
        requested,
        pinned: false,
        running: true,
        gens,
    }
}

/// (generation, slot) of every stop signal.
fn signalled(actions: &[Action]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal {
                generation, slot, ..
            } => Some((generation.0, slot.0)),
            _ => None,
        })
        .collect()
}

fn retired(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Retire(g) => Some(g.0),
            _ => None,
        })
        .collect()
}

fn adopted_event(actions: &[Action]) -> Option<&Event> {
    actions.iter().find_map(|a| match a {
        Action::Log(e @ Event::Adopted { .. }) => Some(e),
        _ => None,
    })
}

/// A site of `workers` started and settled.
fn settled(config: SiteConfig, t: Instant) -> SiteMachine {
    let (mut m, _) = SiteMachine::new(config, None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(10));
    assert!(m.current().slots.is_settled());
    m
}

#[test]
fn a_steady_site_is_adopted_as_it_runs() {
    let t = Instant::now();
    let m = settled(site("workers = 3\n"), t);
    let rec = m.record();
    assert_eq!(rec.gens.len(), 1);
    assert_eq!(rec.gens[0].workers.len(), 3);
    assert!(rec.running);
    let later = t + Duration::from_secs(20);
    let (m2, a) = SiteMachine::adopt(site("workers = 3\n"), rec.clone(), None, later);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert!(signalled(&a).is_empty(), "{a:?}");
    assert!(m2.current().slots.is_settled());
    assert_eq!(m2.record(), rec);
    assert_eq!(
        adopted_event(&a),
        Some(&Event::Adopted {
            generation: GenId(1),
            workers: 3,
            starting: 0,
            stopped: 0,
        })
    );
    // The record survives the state file.
    let text = serde_json::to_string(&rec).expect("serializes");
    let back: MachineRecord = serde_json::from_str(&text).expect("deserializes");
    assert_eq!(back, rec);
}

#[test]
fn a_worker_that_died_while_no_agent_ran_is_started_again() {
    let t = Instant::now();
    let rec = record(
        1,
        3,
        vec![generation(1, vec![worker(0, true), worker(2, true)])],
    );
    let (mut m, a) = SiteMachine::adopt(site("workers = 3\n"), rec, None, t);
    assert_eq!(spawned(&a), vec![(1, 1)]);
    assert!(signalled(&a).is_empty(), "{a:?}");
    drive(&mut m, a, &Quiet, t);
    let pids: Vec<Option<i32>> = m.current().slots.slots.values().map(|s| s.pid).collect();
    assert_eq!(pids, vec![Some(500), Some(1001), Some(502)]);
}

#[test]
fn a_worker_not_yet_ready_goes_on_with_its_ready_check() {
    let t = Instant::now();
    let config = site("workers = 1\n[ready]\ncheck = \"notify\"\ntimeout = \"5s\"\n");
    let rec = record(1, 1, vec![generation(1, vec![worker(0, false)])]);
    let (mut m, a) = SiteMachine::adopt(config.clone(), rec.clone(), None, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(
        m.current().slots.slots[&Slot(0)].phase,
        Phase::Starting {
            deadline: Some(t + Duration::from_secs(5))
        }
    );
    let ready = Input::Worker {
        generation: GenId(1),
        input: slots::Input::ReadyNotified { id: Slot(0) },
    };
    send(&mut m, ready, &Quiet, t + Duration::from_secs(1));
    assert_eq!(m.current().slots.slots[&Slot(0)].phase, Phase::Ready);
    // Never ready: stopped at the fresh deadline, as any starting worker.
    let (mut m, _) = SiteMachine::adopt(config, rec, None, t);
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(5));
    assert_eq!(signalled(&a), vec![(1, 0)]);
}

#[test]
fn a_deploy_that_had_not_flipped_is_rolled_back() {
    let t = Instant::now();
    let rec = record(
        1,
        2,
        vec![
            generation(1, vec![worker(0, true), worker(1, true)]),
            generation(2, vec![worker(0, true), worker(1, false)]),
        ],
    );
    let (mut m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    assert_eq!(m.serving(), GenId(1));
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(signalled(&a), vec![(2, 0), (2, 1)]);
    assert!(retired(&a).is_empty());
    assert!(!a.iter().any(|x| matches!(x, Action::Steer(_))), "{a:?}");
    assert!(m.generation(GenId(2)).is_some_and(|g| g.leaving));
    let a = send(&mut m, exited(2, 0), &Quiet, t);
    assert!(retired(&a).is_empty(), "{a:?}");
    let a = send(&mut m, exited(2, 1), &Quiet, t);
    assert_eq!(retired(&a), vec![2]);
    assert!(m.generation(GenId(2)).is_none());
    assert_eq!(m.current().slots.ready(), 2);
    // The generation numbers go on.
    let a = send(
        &mut m,
        Input::Deploy {
            client: ClientId(1),
            release: None,
            canary: None,
        },
        &Quiet,
        t,
    );
    assert!(spawned(&a).iter().all(|(g, _)| *g == 3), "{a:?}");
    assert!(!spawned(&a).is_empty(), "{a:?}");
}

#[test]
fn a_deploy_that_had_flipped_is_finished() {
    let t = Instant::now();
    let rec = record(
        2,
        2,
        vec![
            generation(1, vec![worker(0, true), stopping(1)]),
            generation(2, vec![worker(0, true), worker(1, true)]),
        ],
    );
    let (mut m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    assert_eq!(m.serving(), GenId(2));
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(signalled(&a), vec![(1, 0), (1, 1)]);
    send(&mut m, exited(1, 1), &Quiet, t);
    let a = send(&mut m, exited(1, 0), &Quiet, t);
    assert_eq!(retired(&a), vec![1]);
    assert_eq!(m.generations().count(), 1);
}

#[test]
fn a_stop_then_start_deploy_whose_new_generation_runs_is_finished() {
    let t = Instant::now();
    let mut rec = record(
        1,
        2,
        vec![
            generation(1, vec![]),
            generation(2, vec![worker(0, true), worker(1, true)]),
        ],
    );
    rec.gens[0].release = Some(PathBuf::from("/srv/web/releases/r1"));
    let (m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    assert_eq!(m.serving(), GenId(2));
    assert!(a.contains(&Action::Steer(GenId(2))), "{a:?}");
    assert!(
        a.contains(&Action::RecordPreviousRelease(PathBuf::from(
            "/srv/web/releases/r1"
        ))),
        "{a:?}"
    );
    assert_eq!(retired(&a), vec![1]);
    assert!(spawned(&a).is_empty() && signalled(&a).is_empty(), "{a:?}");
}

#[test]
fn a_stopped_site_starts_nothing_and_stops_what_runs() {
    let t = Instant::now();
    let mut rec = record(1, 3, vec![generation(1, vec![worker(1, true)])]);
    rec.running = false;
    let (mut m, a) = SiteMachine::adopt(site("workers = 3\n"), rec, None, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(signalled(&a), vec![(1, 1)]);
    let a = send(&mut m, exited(1, 1), &Quiet, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert!(m.is_stopped());
    assert!(!m.record().running);
    // Started later, it runs the count asked for.
    let a = send(&mut m, Input::Start(None), &Quiet, t);
    assert_eq!(spawned(&a).len(), 3, "{a:?}");
}

#[test]
fn a_runtime_scale_outlives_the_crash() {
    let t = Instant::now();
    let workers = (0..4).map(|s| worker(s, true)).collect();
    let rec = record(1, 4, vec![generation(1, workers)]);
    let (m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    assert!(spawned(&a).is_empty() && signalled(&a).is_empty(), "{a:?}");
    assert_eq!(m.requested(), 4);
    assert_eq!(m.current().slots.desired, 4);
    let rec = record(1, 1, vec![generation(1, vec![worker(0, true)])]);
    let (m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    assert!(spawned(&a).is_empty() && signalled(&a).is_empty(), "{a:?}");
    assert_eq!(m.current().slots.desired, 1);
}

/// A damaged record's count is taken as a `scale` could ask: at most `MAX_WORKERS` (without
/// the bound, the slots' room for 2^32 workers aborts the agent).
#[test]
fn a_recorded_count_beyond_the_most_a_site_can_have_is_capped() {
    let t = Instant::now();
    let rec = record(1, u32::MAX, vec![generation(1, vec![worker(0, true)])]);
    let (m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    let max = crate::config::MAX_WORKERS;
    assert_eq!(m.current().slots.desired, max);
    assert_eq!(spawned(&a).len(), max as usize - 1);
}

#[test]
fn workers_beyond_the_memory_cap_are_stopped_highest_first() {
    let t = Instant::now();
    let workers = (0..6).map(|s| worker(s, true)).collect();
    let rec = record(1, 6, vec![generation(1, workers)]);
    let (mut m, a) = SiteMachine::adopt(site(FULL_BUDGET), rec, None, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(signalled(&a), vec![(1, 5), (1, 4)]);
    assert_eq!(m.current().slots.desired, 4);
    send(&mut m, exited(1, 5), &Quiet, t);
    let a = send(&mut m, exited(1, 4), &Quiet, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    let slots: Vec<u32> = m.current().slots.slots.keys().map(|s| s.0).collect();
    assert_eq!(slots, vec![0, 1, 2, 3]);
    assert_eq!(m.current().crashes, 0);
}

#[test]
fn within_a_cap_the_other_generations_processes_take_room() {
    let t = Instant::now();
    // Cap 4: two old workers still stopping, one new worker alive of four.
    let rec = record(
        2,
        4,
        vec![
            generation(1, vec![stopping(0), stopping(1)]),
            generation(2, vec![worker(0, true)]),
        ],
    );
    let (mut m, a) = SiteMachine::adopt(site(FULL_BUDGET), rec, None, t);
    assert_eq!(spawned(&a), vec![(2, 1)]);
    drive(&mut m, a, &Quiet, t);
    send(&mut m, exited(1, 0), &Quiet, t);
    let a = send(&mut m, exited(1, 1), &Quiet, t);
    assert_eq!(retired(&a), vec![1]);
    // The capacity check gives the room back.
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(600));
    assert_eq!(spawned(&a), vec![(2, 2), (2, 3)]);
}

#[test]
fn an_adopted_worker_that_exits_is_restarted_as_after_a_crash() {
    let t = Instant::now();
    let rec = record(
        1,
        2,
        vec![generation(1, vec![worker(0, true), worker(1, true)])],
    );
    let (mut m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    drive(&mut m, a, &Quiet, t);
    let soon = t + Duration::from_millis(5);
    let a = send(&mut m, exited(1, 0), &Quiet, soon);
    assert!(spawned(&a).is_empty(), "restarted without a backoff: {a:?}");
    assert!(matches!(
        m.current().slots.slots[&Slot(0)].phase,
        Phase::Backoff { .. }
    ));
    assert_eq!(m.current().crashes, 1);
    let a = send(&mut m, Input::Tick, &Quiet, t + Duration::from_secs(60));
    assert_eq!(spawned(&a), vec![(1, 0)]);
    assert_eq!(m.current().slots.slots[&Slot(0)].restarts, 1);
}

#[test]
fn an_adopted_site_stops_scales_and_starts() {
    let t = Instant::now();
    let rec = record(
        1,
        2,
        vec![generation(1, vec![worker(0, true), worker(1, true)])],
    );
    let (mut m, a) = SiteMachine::adopt(site("workers = 2\n"), rec, None, t);
    drive(&mut m, a, &Quiet, t);
    let a = send(
        &mut m,
        Input::Scale {
            client: ClientId(1),
            workers: 3,
            owner: None,
        },
        &Quiet,
        t,
    );
    assert_eq!(spawned(&a), vec![(1, 2)]);
    let a = send(
        &mut m,
        Input::Stop {
            client: Some(ClientId(2)),
            why: crate::supervisor::machine::CancelReason::SiteStopped,
        },
        &Quiet,
        t,
    );
    assert_eq!(signalled(&a), vec![(1, 0), (1, 1), (1, 2)]);
    send(&mut m, exited(1, 0), &Quiet, t);
    send(&mut m, exited(1, 1), &Quiet, t);
    let a = send(&mut m, exited(1, 2), &Quiet, t);
    assert!(
        replies(&a).contains(&(ClientId(2), Outcome::Done(Done::Stopped))),
        "{a:?}"
    );
    let a = send(&mut m, Input::Start(None), &Quiet, t);
    assert_eq!(spawned(&a).len(), 3);
}

/// A site whose app binds its own port: never two generations' processes at once.
const OWN_PORT: &str = "workers = 2\n[[listen]]\ntcp = \"127.0.0.1:8000\"\nmode = \"own\"\n";

#[test]
fn an_own_port_site_starts_missing_workers_once_the_other_generation_is_gone() {
    let t = Instant::now();
    // Three of the serving generation (one beyond the count), a canary's still running.
    let rec = record(
        1,
        2,
        vec![
            generation(1, vec![worker(0, true), worker(1, true), worker(2, true)]),
            generation(2, vec![worker(0, true)]),
        ],
    );
    let (mut m, a) = SiteMachine::adopt(site(OWN_PORT), rec.clone(), None, t);
    // The excess is stopped at once, though the start waits.
    assert_eq!(signalled(&a), vec![(1, 2), (2, 0)]);
    assert!(spawned(&a).is_empty(), "{a:?}");
    // One dead while no agent ran: started once generation 2 is gone, not before.
    let mut rec = rec;
    rec.gens[0].workers.truncate(1);
    let (mut m2, a) = SiteMachine::adopt(site(OWN_PORT), rec, None, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert!(m2.start_deferred());
    let a = send(&mut m2, exited(2, 0), &Quiet, t);
    assert_eq!(retired(&a), vec![2]);
    assert_eq!(spawned(&a), vec![(1, 1)]);
    send(&mut m, exited(1, 2), &Quiet, t);
    let a = send(&mut m, exited(2, 0), &Quiet, t);
    assert!(spawned(&a).is_empty(), "{a:?}");
}

#[test]
fn a_scale_that_only_a_measured_cap_allowed_is_not_started_blind() {
    let t = Instant::now();
    // A budget without `worker_memory`: no cap until workers are measured.
    let config = site("workers = 2\nmemory = \"400M\"\n");
    let rec = record(1, 4096, vec![generation(1, vec![worker(0, true)])]);
    let (m, a) = SiteMachine::adopt(config.clone(), rec, None, t);
    assert_eq!(spawned(&a), vec![(1, 1)]);
    assert_eq!(m.requested(), 4096);
    let workers = (0..3).map(|s| worker(s, true)).collect();
    let rec = record(1, 4096, vec![generation(1, workers)]);
    let (m, a) = SiteMachine::adopt(config, rec, None, t);
    assert!(spawned(&a).is_empty() && signalled(&a).is_empty(), "{a:?}");
    assert_eq!(m.current().slots.desired, 3);
}

#[test]
fn an_auto_site_that_had_grown_keeps_its_workers_within_its_maximum_and_the_cap() {
    let t = Instant::now();
    // Cap 4 (400M / 100M), auto between 1 and 3.
    let auto = "workers = \"auto\"\nworkers_min = 1\nworkers_max = 3\nmemory = \"400M\"\nworker_memory = \"100M\"\n";
    let workers = (0..3).map(|s| worker(s, true)).collect();
    let rec = record(1, 3, vec![generation(1, workers)]);
    let (m, a) = SiteMachine::adopt(site(auto), rec, None, t);
    assert!(spawned(&a).is_empty() && signalled(&a).is_empty(), "{a:?}");
    assert_eq!(m.current().slots.desired, 3);
    // Beyond its maximum (the configuration changed): back to it.
    let workers = (0..4).map(|s| worker(s, true)).collect();
    let rec = record(1, 4, vec![generation(1, workers)]);
    let (m, a) = SiteMachine::adopt(site(auto), rec, None, t);
    assert_eq!(signalled(&a), vec![(1, 3)]);
    assert_eq!(m.current().slots.desired, 3);
}

//! The slots' state machine, by tables of inputs and by properties over random
//! sequences.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use proptest::prelude::*;

use crate::config::{ReadyPolicy, RestartPolicy, Signal, StopPolicy};

use super::*;

fn policies(check: ReadyCheck) -> Policies {
    Policies {
        restart: RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(2),
            flapping_exits: 5,
            flapping_within: Duration::from_secs(10),
        },
        stop: StopPolicy {
            signal: Signal(libc::SIGTERM),
            then: Default::default(),
            timeout: Duration::from_secs(3),
        },
        ready: ReadyPolicy {
            check,
            timeout: Duration::from_secs(4),
            settle: Duration::from_millis(500),
        },
    }
}

fn spawns(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn(id) => Some(id.0),
            _ => None,
        })
        .collect()
}

/// A started site of `n` workers whose processes all exist (pids 100 + id), and are
/// ready when `check` says they are ready at once.
fn running(n: u32, check: ReadyCheck, t: Instant) -> SiteCore {
    let mut s = SiteCore::new(n, policies(check));
    s.handle(Input::StartRequested, t);
    for id in 0..n {
        let pid = 100 + i32::try_from(id).unwrap();
        s.handle(Input::Spawned { id: Slot(id), pid }, t);
    }
    s
}

#[test]
fn start_spawns_the_desired_count() {
    let t = Instant::now();
    let mut s = SiteCore::new(3, policies(ReadyCheck::None));
    let a = s.handle(Input::StartRequested, t);
    assert_eq!(spawns(&a), vec![0, 1, 2]);
    for id in 0..3 {
        s.handle(
            Input::Spawned {
                id: Slot(id),
                pid: 100 + i32::try_from(id).unwrap(),
            },
            t,
        );
    }
    assert_eq!(s.ready(), 3);
}

#[test]
fn a_crash_restarts_and_a_crash_loop_ends_in_failed() {
    let t0 = Instant::now();
    let mut s = SiteCore::new(1, policies(ReadyCheck::None));
    s.handle(Input::StartRequested, t0);
    s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 1,
        },
        t0,
    );
    let mut t = t0 + Duration::from_secs(3);
    // A worker that ran longer than healthy_after restarts at once.
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Exited { code: 1 },
        },
        t,
    );
    assert_eq!(spawns(&a), vec![0]);
    // Then it crashes instantly, again and again: backoff, then failed.
    let mut failed = false;
    for _ in 0..10 {
        s.handle(
            Input::Spawned {
                id: Slot(0),
                pid: 2,
            },
            t,
        );
        t += Duration::from_millis(1);
        let a = s.handle(
            Input::Exited {
                id: Slot(0),
                reason: ExitReason::Signaled { signal: 11 },
            },
            t,
        );
        if a.contains(&Action::Note(Note::Failed(Slot(0)))) {
            failed = true;
            break;
        }
        let until = match s.slots[&Slot(0)].phase {
            Phase::Backoff { until } => until,
            Phase::Starting { .. } => t,
            p => panic!("unexpected phase {p:?}"),
        };
        t = until;
        let a = s.handle(Input::DeadlineReached, t);
        assert!(spawns(&a).len() <= 1);
    }
    assert!(failed, "a crash loop must end in failed");
    assert_eq!(s.run, RunState::Failed);
    assert_eq!(s.slots[&Slot(0)].phase, Phase::Failed);
    // Starting the site again clears it.
    let a = s.handle(Input::StartRequested, t);
    assert_eq!(spawns(&a), vec![0]);
    assert_eq!(s.run, RunState::Running);
}

/// Slot `id` of a running site flaps until it is held down; returns the time then.
fn flap(s: &mut SiteCore, id: u32, mut t: Instant) -> Instant {
    for k in 0..10 {
        t += Duration::from_millis(1);
        let a = s.handle(
            Input::Exited {
                id: Slot(id),
                reason: ExitReason::Signaled { signal: 11 },
            },
            t,
        );
        if a.contains(&Action::Note(Note::Failed(Slot(id)))) {
            return t;
        }
        if let Phase::Backoff { until } = s.slots[&Slot(id)].phase {
            t = until;
            s.handle(Input::DeadlineReached, t);
        }
        s.handle(
            Input::Spawned {
                id: Slot(id),
                pid: 200 + k,
            },
            t,
        );
    }
    panic!("slot {id} never failed");
}

#[test]
fn a_failed_site_runs_again_once_no_worker_is_held_down() {
    // A rolling restart (what a reload that changed the site asks for) starts the worker
    // held down: the site is running again, and settles.
    let t0 = Instant::now();
    let mut s = running(2, ReadyCheck::None, t0);
    let mut t = flap(&mut s, 1, t0 + Duration::from_secs(3));
    assert_eq!(s.run, RunState::Failed);
    let a = s.handle(Input::RestartRequested, t);
    assert_eq!(spawns(&a), vec![1], "the worker held down first");
    assert_eq!(s.run, RunState::Running, "none is held down now");
    assert!(!a.contains(&Action::Note(Note::RestartDone)), "{a:?}");
    // Its crashes were forgotten: one more is a restart, not failed again; and the
    // restart it was started by failed with it.
    s.handle(
        Input::Spawned {
            id: Slot(1),
            pid: 300,
        },
        t,
    );
    t += Duration::from_millis(1);
    let a = s.handle(
        Input::Exited {
            id: Slot(1),
            reason: ExitReason::Signaled { signal: 11 },
        },
        t,
    );
    assert!(!a.contains(&Action::Note(Note::Failed(Slot(1)))), "{a:?}");
    assert!(
        a.contains(&Action::Note(Note::RestartFailed(Slot(1)))),
        "{a:?}"
    );
    assert_eq!(s.run, RunState::Running);

    // A site of one worker, held down: the restart is done once that worker has settled,
    // not when it is started.
    let mut s = running(1, ReadyCheck::None, t0);
    let t = flap(&mut s, 0, t0 + Duration::from_secs(3));
    assert_eq!(s.run, RunState::Failed);
    let a = s.handle(Input::RestartRequested, t);
    assert_eq!(spawns(&a), vec![0]);
    assert!(!a.contains(&Action::Note(Note::RestartDone)), "{a:?}");
    let a = s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 500,
        },
        t,
    );
    assert!(
        !a.contains(&Action::Note(Note::RestartDone)),
        "ready, not settled: {a:?}"
    );
    let a = s.handle(Input::DeadlineReached, t + Duration::from_millis(500));
    assert!(a.contains(&Action::Note(Note::RestartDone)), "{a:?}");

    // A scale that removes the worker held down: running too.
    let mut s = running(2, ReadyCheck::None, t0);
    let t = flap(&mut s, 1, t0 + Duration::from_secs(3));
    assert_eq!(s.run, RunState::Failed);
    s.handle(Input::ScaleRequested(1), t);
    assert!(!s.slots.contains_key(&Slot(1)));
    assert_eq!(s.run, RunState::Running);
    assert!(s.is_settled());
    // A scale that keeps it (up): failed still.
    let mut s = running(2, ReadyCheck::None, t0);
    let t = flap(&mut s, 1, t0 + Duration::from_secs(3));
    let a = s.handle(Input::ScaleRequested(3), t);
    assert_eq!(spawns(&a), vec![2]);
    assert_eq!(s.run, RunState::Failed, "slot 1 is held down still");
}

#[test]
fn stop_escalates_to_kill_at_the_deadline() {
    let t0 = Instant::now();
    let mut s = SiteCore::new(2, policies(ReadyCheck::None));
    s.handle(Input::StartRequested, t0);
    s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 1,
        },
        t0,
    );
    s.handle(
        Input::Spawned {
            id: Slot(1),
            pid: 2,
        },
        t0,
    );
    let a = s.handle(Input::StopRequested, t0);
    assert!(a.contains(&Action::Signal(Slot(0), Signal(libc::SIGTERM))));
    s.handle(
        Input::Exited {
            id: Slot(1),
            reason: ExitReason::Exited { code: 0 },
        },
        t0,
    );
    let a = s.handle(Input::DeadlineReached, t0 + Duration::from_secs(3));
    assert_eq!(a.first(), Some(&Action::Kill(Slot(0))));
    assert_eq!(
        s.next_deadline(),
        None,
        "after SIGKILL nothing more is scheduled"
    );
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Signaled { signal: 9 },
        },
        t0,
    );
    assert!(a.contains(&Action::Note(Note::AllStopped)));
    assert_eq!(s.run, RunState::Stopped);
}

#[test]
fn rolling_restart_keeps_all_but_one_ready() {
    let t = Instant::now();
    let mut s = running(3, ReadyCheck::Notify, t);
    for id in 0..3 {
        s.handle(Input::ReadyNotified { id: Slot(id) }, t);
    }
    let a = s.handle(Input::RestartRequested, t);
    assert_eq!(a, vec![Action::Signal(Slot(0), Signal(libc::SIGTERM))]);
    let settle = s.policies.ready.settle;
    let mut now = t;
    for (id, pid) in (0..3).zip(200..) {
        assert!(s.ready() >= 2);
        let a = s.handle(
            Input::Exited {
                id: Slot(id),
                reason: ExitReason::Exited { code: 0 },
            },
            now,
        );
        assert_eq!(spawns(&a), vec![id], "the stopped slot is respawned");
        s.handle(Input::Spawned { id: Slot(id), pid }, now);
        let a = s.handle(Input::ReadyNotified { id: Slot(id) }, now);
        match id {
            0 => {
                // The first restarted worker must stay up before the next one goes.
                assert!(!a.iter().any(|x| matches!(x, Action::Signal(..))), "{a:?}");
                assert_eq!(s.next_deadline(), Some(now + settle));
                now += settle;
                let a = s.handle(Input::DeadlineReached, now);
                assert_eq!(
                    a.last(),
                    Some(&Action::Signal(Slot(1), Signal(libc::SIGTERM)))
                );
            }
            1 => assert_eq!(
                a.last(),
                Some(&Action::Signal(Slot(2), Signal(libc::SIGTERM)))
            ),
            _ => {
                // Done once the last ones have stayed up too.
                assert!(!a.contains(&Action::Note(Note::RestartDone)));
                now += settle;
                let a = s.handle(Input::DeadlineReached, now);
                assert!(a.contains(&Action::Note(Note::RestartDone)), "{a:?}");
            }
        }
    }
    assert_eq!(
        s.slots[&Slot(0)].restarts,
        0,
        "operator restarts are not crash restarts"
    );
}

#[test]
fn a_rolling_restart_stops_at_a_worker_that_does_not_stay_up() {
    let t = Instant::now();
    let mut s = running(3, ReadyCheck::Notify, t);
    for id in 0..3 {
        s.handle(Input::ReadyNotified { id: Slot(id) }, t);
    }
    let old: Vec<Option<i32>> = (0..3).map(|id| s.slots[&Slot(id)].pid).collect();
    s.handle(Input::RestartRequested, t);
    s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Exited { code: 0 },
        },
        t,
    );
    s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 300,
        },
        t,
    );
    s.handle(Input::ReadyNotified { id: Slot(0) }, t);
    // The new release dies right after it said it was ready.
    let later = t + Duration::from_millis(100);
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Exited { code: 3 },
        },
        later,
    );
    assert!(
        a.contains(&Action::Note(Note::Crashed(
            Slot(0),
            ExitReason::Exited { code: 3 },
            Duration::from_millis(100)
        ))),
        "{a:?}"
    );
    assert!(
        a.contains(&Action::Note(Note::RestartFailed(Slot(0)))),
        "{a:?}"
    );
    assert!(!s.is_restarting());
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Signal(Slot(1) | Slot(2), _))),
        "no other worker is stopped: {a:?}"
    );
    assert_eq!(s.slots[&Slot(1)].pid, old[1]);
    assert_eq!(s.slots[&Slot(2)].pid, old[2]);
    assert_eq!(s.slots[&Slot(1)].phase, Phase::Ready);
}

#[test]
fn settled_means_ready_for_the_settle_time() {
    let t = Instant::now();
    let mut s = SiteCore::new(2, policies(ReadyCheck::None));
    s.handle(Input::StartRequested, t);
    s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 10,
        },
        t,
    );
    let a = s.handle(
        Input::Spawned {
            id: Slot(1),
            pid: 11,
        },
        t,
    );
    assert_eq!(s.ready(), 2);
    assert!(!a.contains(&Action::Note(Note::Settled)), "not yet: {a:?}");
    assert!(!s.is_settled());
    let settle = s.policies.ready.settle;
    assert_eq!(s.next_deadline(), Some(t + settle));
    let a = s.handle(Input::DeadlineReached, t + settle);
    assert!(a.contains(&Action::Note(Note::Settled)), "{a:?}");
    assert!(s.is_settled());
    assert_eq!(s.next_deadline(), None, "nothing more to wake for");
}

#[test]
fn ready_timeout_stops_and_counts_as_a_crash() {
    let t = Instant::now();
    let mut s = SiteCore::new(1, policies(ReadyCheck::Notify));
    s.handle(Input::StartRequested, t);
    s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 5,
        },
        t,
    );
    let a = s.handle(Input::DeadlineReached, t + Duration::from_secs(4));
    assert_eq!(a, vec![Action::Signal(Slot(0), Signal(libc::SIGTERM))]);
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Signaled { signal: 15 },
        },
        t + Duration::from_secs(4),
    );
    assert!(a.contains(&Action::Note(Note::Crashed(
        Slot(0),
        ExitReason::ReadyTimeout,
        Duration::from_secs(4)
    ))));
    assert_eq!(s.slots[&Slot(0)].last_exit, Some(ExitReason::ReadyTimeout));
}

/// What a zygote's spare is moved ahead for: the slot the next scale up spawns.
#[test]
fn the_lowest_unused_slot_is_the_one_a_scale_up_spawns() {
    let t = Instant::now();
    let mut s = running(4, ReadyCheck::None, t);
    assert_eq!(s.lowest_unused_slot(), Slot(4));
    s.handle(Input::ScaleRequested(2), t);
    assert_eq!(
        s.lowest_unused_slot(),
        Slot(4),
        "2 and 3 are stopping, still in use"
    );
    for id in [2, 3] {
        s.handle(
            Input::Exited {
                id: Slot(id),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t,
        );
    }
    assert_eq!(s.lowest_unused_slot(), Slot(2));
    let a = s.handle(Input::ScaleRequested(3), t);
    assert_eq!(spawns(&a), vec![2]);
    assert_eq!(s.lowest_unused_slot(), Slot(3));
}

#[test]
fn scale_down_removes_the_highest_slots_and_scale_up_reuses_ids() {
    let t = Instant::now();
    let mut s = running(4, ReadyCheck::None, t);
    let a = s.handle(Input::ScaleRequested(2), t);
    assert!(a.contains(&Action::Signal(Slot(3), Signal(libc::SIGTERM))));
    assert!(a.contains(&Action::Signal(Slot(2), Signal(libc::SIGTERM))));
    s.handle(
        Input::Exited {
            id: Slot(3),
            reason: ExitReason::Signaled { signal: 15 },
        },
        t,
    );
    assert!(!s.slots.contains_key(&Slot(3)));
    let a = s.handle(Input::ScaleRequested(4), t);
    assert_eq!(
        spawns(&a),
        vec![3],
        "slot 2, still stopping, is kept and respawned; 3 is new"
    );
    let a = s.handle(
        Input::Exited {
            id: Slot(2),
            reason: ExitReason::Signaled { signal: 15 },
        },
        t,
    );
    assert_eq!(spawns(&a), vec![2]);
}

#[test]
fn scale_down_stops_idle_workers_before_busy_ones() {
    let t = Instant::now();
    let mut s = running(4, ReadyCheck::None, t);
    s.handle(
        Input::BusyReported {
            id: Slot(3),
            busy: true,
        },
        t,
    );
    s.handle(
        Input::BusyReported {
            id: Slot(1),
            busy: true,
        },
        t,
    );
    s.handle(
        Input::BusyReported {
            id: Slot(1),
            busy: false,
        },
        t,
    );
    let a = s.handle(Input::ScaleRequested(2), t);
    let stopped: Vec<Slot> = a
        .iter()
        .filter_map(|x| match x {
            Action::Signal(id, _) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(
        stopped,
        vec![Slot(2), Slot(1)],
        "idle first, highest first; busy 3 stays"
    );
    // A new process of a slot starts idle.
    s.handle(
        Input::Exited {
            id: Slot(3),
            reason: ExitReason::Exited { code: 1 },
        },
        t,
    );
    assert!(!s.slots[&Slot(3)].busy());
}

#[test]
fn a_slot_stopped_before_its_spawn_is_reported_is_signalled_once_it_is() {
    let t = Instant::now();
    let mut s = SiteCore::new(2, policies(ReadyCheck::Notify));
    assert_eq!(spawns(&s.handle(Input::StartRequested, t)), vec![0, 1]);
    // Stopped before the loop reported either spawn: there is no process to signal.
    let a = s.handle(Input::StopRequested, t);
    assert_eq!(a, vec![]);
    let a = s.handle(
        Input::Spawned {
            id: Slot(0),
            pid: 10,
        },
        t,
    );
    assert!(
        a.contains(&Action::Signal(Slot(0), Signal(libc::SIGTERM))),
        "{a:?}"
    );
    // A spawn that failed has nothing left to stop: it ended as asked, not as a crash.
    let a = s.handle(
        Input::SpawnFailed {
            id: Slot(1),
            error: "ENOENT".into(),
            permanent: true,
        },
        t,
    );
    assert!(!a.contains(&Action::Note(Note::Failed(Slot(1)))), "{a:?}");
    assert_eq!(s.slots[&Slot(1)].phase, Phase::Stopped);
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Signaled { signal: 15 },
        },
        t,
    );
    assert!(a.contains(&Action::Note(Note::AllStopped)), "{a:?}");
    assert_eq!(s.run, RunState::Stopped);
}

#[test]
fn starting_again_before_a_stop_ended_runs_the_stopping_slots_again() {
    let t = Instant::now();
    let mut s = running(2, ReadyCheck::None, t);
    s.handle(Input::StopRequested, t);
    assert_eq!(
        spawns(&s.handle(Input::StartRequested, t)),
        Vec::<u32>::new()
    );
    for id in 0..2 {
        let a = s.handle(
            Input::Exited {
                id: Slot(id),
                reason: ExitReason::Signaled { signal: 15 },
            },
            t,
        );
        assert_eq!(spawns(&a), vec![id], "slot {id} runs again");
    }
    assert_eq!(s.run, RunState::Running);
}

#[test]
fn no_restart_while_a_slot_on_its_way_out_holds_its_room() {
    let t = Instant::now();
    let mut s = running(3, ReadyCheck::None, t);
    s.handle(Input::ScaleRequested(2), t);
    assert!(matches!(s.slots[&Slot(2)].phase, Phase::Stopping { .. }));
    // Slot 0 dies while slot 2 still runs, on its way out: two processes for two.
    let later = t + Duration::from_secs(3);
    let a = s.handle(
        Input::Exited {
            id: Slot(0),
            reason: ExitReason::Exited { code: 1 },
        },
        later,
    );
    assert_eq!(spawns(&a), Vec::<u32>::new());
    assert_eq!(s.live(), 2);
    let a = s.handle(
        Input::Exited {
            id: Slot(2),
            reason: ExitReason::Signaled { signal: 15 },
        },
        later,
    );
    assert_eq!(spawns(&a), vec![0], "room again");
}

#[derive(Debug, Clone)]
enum Step {
    Exit(u8),
    Ready(u8),
    Busy(u8, bool),
    Advance(u16),
    Scale(u8),
    Start,
    Stop,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u8>().prop_map(Step::Exit),
        3 => any::<u8>().prop_map(Step::Ready),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(k, b)| Step::Busy(k, b)),
        4 => (0u16..5000).prop_map(Step::Advance),
        1 => (0u8..12).prop_map(Step::Scale),
        1 => Just(Step::Start),
        1 => Just(Step::Stop),
        1 => Just(Step::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// Random crashes, readiness, clock jumps and operator requests never break the
    /// invariants in the module doc.
    #[test]
    fn invariants_hold_under_random_events(
        check in prop_oneof![Just(ReadyCheck::None), Just(ReadyCheck::Notify)],
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut s = SiteCore::new(3, policies(check));
        let mut live: BTreeSet<Slot> = BTreeSet::new();
        let mut last_start: HashMap<Slot, (Instant, u32)> = HashMap::new();
        let mut next_pid = 1;
        let mut pending = s.handle(Input::StartRequested, now);
        for st in steps {
            // Carry out actions like the event loop would.
            while !pending.is_empty() {
                let mut more = Vec::new();
                for a in pending.drain(..) {
                    match a {
                        Action::Spawn(id) => {
                            prop_assert!(!live.contains(&id), "two processes in slot {}", id);
                            let restarts = s.slots[&id].restarts;
                            if let Some((prev, prev_restarts)) = last_start.get(&id) {
                                // Crash restarts (not operator ones) respect the floor.
                                if restarts > *prev_restarts {
                                    prop_assert!(now.duration_since(*prev) >= Duration::from_millis(100),
                                        "slot {} restarted within the floor", id);
                                }
                            }
                            last_start.insert(id, (now, restarts));
                            live.insert(id);
                            next_pid += 1;
                            more.extend(s.handle(Input::Spawned { id, pid: next_pid }, now));
                        }
                        Action::Kill(id) => {
                            prop_assert!(live.remove(&id));
                            more.extend(s.handle(Input::Exited { id, reason: ExitReason::Signaled { signal: 9 } }, now));
                        }
                        Action::Signal(..) | Action::Note(_) => {}
                    }
                }
                pending = more;
            }
            let keeping = s.slots.values().filter(|x| !matches!(x.phase, Phase::Stopping { then: AfterStop::Remove, .. })).count();
            prop_assert!(keeping <= s.desired as usize, "{} slots kept for {} desired", keeping, s.desired);
            prop_assert_eq!(live.len(), s.live());
            if s.run == RunState::Stopped {
                prop_assert!(live.is_empty());
            }
            if let Some(d) = s.next_deadline() {
                prop_assert!(d >= t0);
            }
            // Next input.
            let ids: Vec<Slot> = live.iter().copied().collect();
            pending = match st {
                Step::Exit(k) if !ids.is_empty() => {
                    let id = ids[k as usize % ids.len()];
                    live.remove(&id);
                    s.handle(Input::Exited { id, reason: ExitReason::Exited { code: 1 } }, now)
                }
                Step::Ready(k) if !ids.is_empty() => {
                    s.handle(Input::ReadyNotified { id: ids[k as usize % ids.len()] }, now)
                }
                Step::Busy(k, busy) if !ids.is_empty() => {
                    s.handle(Input::BusyReported { id: ids[k as usize % ids.len()], busy }, now)
                }
                Step::Advance(ms) => {
                    now += Duration::from_millis(u64::from(ms));
                    s.handle(Input::DeadlineReached, now)
                }
                Step::Scale(n) => s.handle(Input::ScaleRequested(u32::from(n)), now),
                Step::Start => s.handle(Input::StartRequested, now),
                Step::Stop => s.handle(Input::StopRequested, now),
                Step::Restart => s.handle(Input::RestartRequested, now),
                _ => Vec::new(),
            };
        }
        // A stop always ends: stop, then let every deadline pass.
        pending.extend(s.handle(Input::StopRequested, now));
        for _ in 0..5 {
            for a in std::mem::take(&mut pending) {
                match a {
                    Action::Spawn(id) => {
                        live.insert(id);
                        next_pid += 1;
                        pending.extend(s.handle(Input::Spawned { id, pid: next_pid }, now));
                    }
                    Action::Kill(id) => {
                        live.remove(&id);
                        pending.extend(s.handle(Input::Exited { id, reason: ExitReason::Signaled { signal: 9 } }, now));
                    }
                    Action::Signal(..) | Action::Note(_) => {}
                }
            }
            now += Duration::from_secs(10);
            pending.extend(s.handle(Input::DeadlineReached, now));
        }
        prop_assert!(live.is_empty());
        prop_assert_eq!(s.run, RunState::Stopped);
    }
}

#[test]
fn busy_time_adds_up_the_busy_reports_of_every_process() {
    let t = Instant::now();
    let s_ = Duration::from_secs(1);
    let mut s = running(3, ReadyCheck::None, t);
    assert_eq!(
        s.busy_time(t),
        None,
        "no report: the app does not send them"
    );
    let busy = |id, busy| Input::BusyReported { id: Slot(id), busy };
    s.handle(busy(1, true), t);
    s.handle(busy(2, true), t + s_);
    s.handle(busy(1, true), t + s_ * 2); // already busy: no change
    s.handle(busy(1, false), t + s_ * 3);
    assert_eq!(
        s.busy_time(t + s_ * 4),
        Some(s_ * 6),
        "3 s of 1, 3 s of 2 so far"
    );
    // A process that exits busy stops counting then.
    s.handle(
        Input::Exited {
            id: Slot(2),
            reason: ExitReason::Exited { code: 1 },
        },
        t + s_ * 5,
    );
    assert_eq!(s.busy_time(t + s_ * 9), Some(s_ * 7));
}

#[test]
fn ten_thousand_workers_start_and_settle() {
    const N: u32 = 10_000;
    let t = Instant::now();
    let settle = policies(ReadyCheck::None).ready.settle;
    let mut s = SiteCore::new(N, policies(ReadyCheck::None));
    let a = s.handle(Input::StartRequested, t);
    assert_eq!(spawns(&a).len(), N as usize);
    assert_eq!(s.live(), N as usize);
    for id in 0..N {
        let pid = 100 + i32::try_from(id).unwrap();
        s.handle(Input::Spawned { id: Slot(id), pid }, t);
    }
    assert_eq!(s.ready(), N as usize);
    assert!(!s.is_settled(), "ready, not yet for ready.settle");
    assert_eq!(s.next_deadline(), Some(t + settle));
    let a = s.handle(Input::DeadlineReached, t + settle);
    assert_eq!(a, vec![Action::Note(Note::Settled)]);
    assert!(s.is_settled());
    assert_eq!(s.next_deadline(), None);
    // One exit among them: one restart, nothing else touched.
    let a = s.handle(
        Input::Exited {
            id: Slot(4321),
            reason: ExitReason::Exited { code: 1 },
        },
        t + settle * 10,
    );
    assert_eq!(spawns(&a), vec![4321]);
    assert_eq!(s.live(), N as usize);
    assert_eq!(s.ready(), N as usize - 1);
    assert!(!s.is_settled());
}

#[test]
#[should_panic(expected = "changed without a sync")]
fn check_index_catches_a_slot_changed_without_a_sync() {
    let t = Instant::now();
    let mut s = running(3, ReadyCheck::None, t);
    s.check_index();
    s.slots.get_mut(&Slot(1)).unwrap().phase = Phase::Stopped;
    s.check_index();
}

#[test]
#[should_panic(expected = "the slot index went stale")]
fn check_index_catches_a_stale_count() {
    let t = Instant::now();
    let mut s = running(3, ReadyCheck::None, t);
    s.check_index();
    s.index.live += 1;
    s.check_index();
}

#[test]
fn a_stop_sequence_sends_each_signal_after_the_wait_then_sigkill() {
    let t = Instant::now();
    let mut p = policies(ReadyCheck::None);
    p.stop = StopPolicy::sequence(
        &[Signal(libc::SIGHUP), Signal(libc::SIGTERM)],
        Duration::from_secs(2),
    )
    .expect("two signals");
    let mut s = SiteCore::new(2, p);
    s.handle(Input::StartRequested, t);
    for id in 0..2 {
        s.handle(
            Input::Spawned {
                id: Slot(id),
                pid: 100 + i32::try_from(id).unwrap(),
            },
            t,
        );
    }
    let sig = |a: &[Action]| -> Vec<(u32, i32)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Signal(id, s) => Some((id.0, s.0)),
                Action::Kill(id) => Some((id.0, libc::SIGKILL)),
                _ => None,
            })
            .collect()
    };
    let a = s.handle(Input::StopRequested, t);
    assert_eq!(sig(&a), [(0, libc::SIGHUP), (1, libc::SIGHUP)]);
    assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(2)));
    // Nothing before the wait is over.
    assert!(sig(&s.handle(Input::DeadlineReached, t + Duration::from_millis(1999))).is_empty());
    // Worker 1 exits on HUP; worker 0 gets TERM after the wait, with a wait of its own.
    s.handle(
        Input::Exited {
            id: Slot(1),
            reason: ExitReason::Exited { code: 0 },
        },
        t + Duration::from_secs(1),
    );
    let a = s.handle(Input::DeadlineReached, t + Duration::from_secs(2));
    assert_eq!(sig(&a), [(0, libc::SIGTERM)]);
    assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(4)));
    // After the last signal's wait: SIGKILL, and nothing more is scheduled.
    let a = s.handle(Input::DeadlineReached, t + Duration::from_secs(4));
    assert_eq!(sig(&a), [(0, libc::SIGKILL)]);
    assert!(a.contains(&Action::Note(Note::Killed(Slot(0)))));
    assert_eq!(s.next_deadline(), None);
}

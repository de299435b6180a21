//! Load scaling in the site machine: when it samples, what it does with a decision, how
//! `scale` pins it and `scale SITE auto` lets it go.

use std::cell::Cell;

use super::super::tests::{Quiet, drive, site};
use super::super::*;
use crate::supervisor::load::Counters;

/// A world whose accept queue holds what the test says.
struct Queue(Cell<u32>);

impl Observe for Queue {
    fn resolve_release(&self, s: &SiteConfig, a: Option<&Path>) -> Result<Option<PathBuf>, String> {
        Quiet.resolve_release(s, a)
    }
    fn measured_memory(&self, g: GenId, s: &[Slot]) -> Option<u64> {
        Quiet.measured_memory(g, s)
    }
    fn queues_empty(&self, old: GenId, new: GenId) -> bool {
        Quiet.queues_empty(old, new)
    }
    fn probe_alone(&self) -> Result<(), String> {
        Quiet.probe_alone()
    }
    fn load(&self, _: GenId) -> Counters {
        Counters {
            queued: Some(self.0.get()),
            ..Counters::default()
        }
    }
}

const LOAD: &str = "workers = \"auto\"\nworkers_max = 8\nmemory = \"1G\"\nworker_memory = \"50M\"\n[[listen]]\ntcp = \"127.0.0.1:8000\"\n[scale]\nby = \"load\"\nshrink_cooldown = \"2s\"\n";

/// Feeds `input`, carries out what follows as the loop does, and lets every worker told
/// to stop exit at once.
fn send(m: &mut SiteMachine, input: Input, obs: &dyn Observe, t: Instant) -> Vec<Action> {
    let a = m.handle(input, obs, t);
    let seen = drive(m, a, obs, t);
    let mut all = seen.clone();
    for x in &seen {
        if let Action::Signal {
            generation, slot, ..
        } = x
        {
            let exit = Input::Worker {
                generation: *generation,
                input: slots::Input::Exited {
                    id: *slot,
                    reason: slots::ExitReason::Exited { code: 0 },
                },
            };
            all.extend(send(m, exit, obs, t));
        }
    }
    all
}

/// Ticks at every deadline up to `until`; returns every action.
fn run_until(m: &mut SiteMachine, obs: &dyn Observe, from: Instant, until: Instant) -> Vec<Action> {
    let mut seen = Vec::new();
    let mut now = from;
    while let Some(d) = m.next_deadline(now).filter(|d| *d <= until) {
        now = d.max(now);
        seen.extend(send(m, Input::Tick, obs, now));
        // Workers are ready as soon as they run (no ready check).
    }
    seen
}

fn scaled(actions: &[Action]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(Event::LoadScaled { decision, .. }) => Some((decision.from, decision.to)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_queue_grows_the_site_and_idleness_shrinks_it_back() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(LOAD), None, None, t);
    let q = Queue(Cell::new(0));
    send(&mut m, Input::Start(None), &q, t);
    assert_eq!(m.current().slots.desired, 1);
    let first = m
        .next_deadline(t)
        .expect("sampled: the site has a TCP listener");
    assert!(first <= t + Duration::from_millis(250));
    // Six connections wait for the one worker (far behind: at the next sample).
    q.0.set(6);
    let a = run_until(&mut m, &q, t, t + Duration::from_millis(300));
    assert_eq!(scaled(&a), vec![(1, 7)], "{a:?}");
    q.0.set(0);
    assert_eq!(m.current().slots.desired, 7);
    let logged = a.iter().any(|x| {
        matches!(x, Action::Log(Event::LoadScaled { decision, .. })
            if decision.reason.describe(70) == "6 connections waiting for 1 ready workers")
    });
    assert!(logged, "{a:?}");
    // The queue drained: 2 s of surplus later, back to workers_min.
    let a = run_until(
        &mut m,
        &q,
        t + Duration::from_millis(300),
        t + Duration::from_secs(4),
    );
    assert_eq!(scaled(&a), vec![(7, 1)], "{a:?}");
    let load = m.load().expect("follows its load");
    assert_eq!(load.decision.map(|(_, d)| d.to), Some(1));
}

#[test]
fn a_site_with_nothing_to_sample_never_wakes_for_it() {
    let t = Instant::now();
    let quiet = "workers = \"auto\"\nworkers_max = 8\nmemory = \"1G\"\nworker_memory = \"50M\"\n[scale]\nby = \"load\"\n";
    let (mut m, _) = SiteMachine::new(site(quiet), None, None, t);
    send(&mut m, Input::Start(None), &Quiet, t);
    let later = t + Duration::from_secs(5);
    let a = run_until(&mut m, &Quiet, t, later);
    assert!(scaled(&a).is_empty());
    assert!(
        !m.load_sampling(),
        "no listener, no BUSY report, at workers_min: nothing to sample"
    );
    // What is left is the memory cap's check, every 10 s.
    assert!(
        m.next_deadline(later)
            .is_none_or(|d| d >= later + Duration::from_secs(5)),
        "{:?}",
        m.next_deadline(later).map(|d| d - later)
    );
    // The first BUSY report starts sampling.
    send(
        &mut m,
        Input::Worker {
            generation: GenId(1),
            input: slots::Input::BusyReported {
                id: Slot(0),
                busy: true,
            },
        },
        &Quiet,
        later,
    );
    assert!(m.load_sampling());
    let a = run_until(&mut m, &Quiet, later, later + Duration::from_secs(1));
    assert_eq!(scaled(&a), vec![(1, 2)], "1 busy / 70%");
}

#[test]
fn scale_pins_the_count_until_scale_auto() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(LOAD), None, None, t);
    let q = Queue(Cell::new(0));
    send(&mut m, Input::Start(None), &q, t);
    send(
        &mut m,
        Input::Scale {
            client: ClientId(1),
            workers: 3,
            owner: None,
        },
        &q,
        t,
    );
    assert_eq!(m.current().slots.desired, 3, "at once, not one at a time");
    assert!(m.pinned());
    assert!(!m.load_sampling());
    q.0.set(9);
    let a = run_until(&mut m, &q, t, t + Duration::from_secs(5));
    assert!(scaled(&a).is_empty(), "pinned: {a:?}");
    assert!(m.record().pinned, "the state file keeps the pin");
    let t2 = t + Duration::from_secs(5);
    let a = send(&mut m, Input::ScaleAuto(ClientId(2)), &q, t2);
    assert!(a.contains(&Action::Reply {
        client: ClientId(2),
        outcome: Outcome::Done(Done::Automatic {
            by_load: true,
            workers: 3
        })
    }));
    let a = run_until(&mut m, &q, t2, t2 + Duration::from_millis(600));
    assert_eq!(
        scaled(&a),
        vec![(3, 8)],
        "3 ready + 9 waiting, within workers_max"
    );
    // A fixed site has no policy to go back to.
    let (mut fixed, _) = SiteMachine::new(site("workers = 2\n"), None, None, t);
    let a = send(&mut fixed, Input::ScaleAuto(ClientId(3)), &Quiet, t);
    assert_eq!(
        a,
        vec![Action::Reply {
            client: ClientId(3),
            outcome: Outcome::Failed(Failure::NotAutomatic)
        }]
    );
}

#[test]
fn a_full_pool_is_sampled_sooner() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(LOAD), None, None, t);
    let q = Queue(Cell::new(0));
    send(&mut m, Input::Start(None), &q, t);
    let t1 = m.next_deadline(t).expect("sampled");
    send(&mut m, Input::Tick, &q, t1);
    assert_eq!(
        m.next_deadline(t1),
        Some(t1 + Duration::from_millis(250)),
        "the interval"
    );
    // The one worker says it is busy: the pool is full.
    send(
        &mut m,
        Input::Worker {
            generation: GenId(1),
            input: slots::Input::BusyReported {
                id: Slot(0),
                busy: true,
            },
        },
        &q,
        t1 + Duration::from_millis(10),
    );
    assert_eq!(
        m.next_deadline(t1),
        Some(t1 + Duration::from_millis(50)),
        "a fifth of the interval after the last sample"
    );
}

#[test]
fn a_deploy_starts_the_new_generation_at_the_current_count_and_sampling_resumes_after() {
    let t = Instant::now();
    let (mut m, _) = SiteMachine::new(site(LOAD), None, None, t);
    let q = Queue(Cell::new(0));
    send(&mut m, Input::Start(None), &q, t);
    q.0.set(4);
    let a = run_until(&mut m, &q, t, t + Duration::from_millis(300));
    assert_eq!(scaled(&a), vec![(1, 5)]);
    q.0.set(0);
    let t1 = t + Duration::from_millis(300);
    send(
        &mut m,
        Input::Deploy {
            client: ClientId(1),
            release: None,
            canary: None,
        },
        &q,
        t1,
    );
    assert!(!m.load_sampling(), "no sampling while two generations run");
    let d = m.deploy().expect("a deploy");
    assert_eq!(d.target, 5, "the new generation runs what the old one did");
    // No ready check: the new generation is ready at once and flips after its
    // probation; the old one's workers stop (at once here) and it retires.
    let mut now = t1;
    while m.generations().count() > 1 {
        now = m.next_deadline(now).expect("the deploy goes on").max(now);
        assert!(now < t1 + Duration::from_secs(5), "retired in time");
        send(&mut m, Input::Tick, &q, now);
    }
    assert_eq!(m.serving(), GenId(2));
    assert_eq!(m.current().slots.desired, 5);
    assert!(m.load_sampling(), "sampling resumed on the new generation");
    // Idle, it shrinks a cool-down later, as any site.
    let a = run_until(&mut m, &q, now, now + Duration::from_secs(3));
    assert_eq!(scaled(&a), vec![(5, 1)]);
}

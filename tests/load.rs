//! Load scaling end to end (issue 13): the real agent runs demo workers that serve one
//! request at a time (100 ms each), with `[scale] by = "load"`; a real open-loop load
//! generator on loopback steps from idle to a load needing 8 workers (80 requests a
//! second) and back. The site grows, serves every request, and shrinks back to
//! `workers_min`.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn in_vm() -> bool {
    std::env::var_os("HATCHERY_IN_VM").is_some()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Site `api`: demo workers serving one request at a time, 100 ms each.
fn site(port: u16, behaviour: &std::path::Path, busy_reports: bool) -> String {
    let busy = if busy_reports {
        ", \"--busy-reports\""
    } else {
        ""
    };
    let timeout = if in_vm() { "30s" } else { "10s" };
    format!(
        r#"name = "api"
command = ["{BIN}", "__demo-worker", "--delay-ms", "100", "--behaviour-from", "{}"{busy}]
workers = "auto"
workers_min = 1
workers_max = 16
memory = "2G"
worker_memory = "20M"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
backlog = 1024
[ready]
check = "notify"
timeout = "{timeout}"
[scale]
by = "load"
shrink_cooldown = "3s"
"#,
        behaviour.display()
    )
}

/// What an open-loop run saw.
#[derive(Debug, Default)]
struct Report {
    sent: usize,
    answered: usize,
    failed: Vec<String>,
    latencies: Vec<Duration>,
}

/// `GET /` on `port`: the whole answer, within 10 s.
fn get(port: u16) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if text.starts_with("HTTP/1.1 200") && text.contains("hello from worker") {
        Ok(())
    } else {
        Err(format!("answered {text:?}"))
    }
}

/// Sends `rate` requests a second for `duration`, each started on schedule whatever the
/// answers to the others (a pool large enough that none waits for a free sender).
fn open_loop(port: u16, rate: u32, duration: Duration) -> Report {
    let total = usize::try_from(u128::from(rate) * duration.as_millis() / 1000).expect("small");
    let report = Arc::new(Mutex::new(Report::default()));
    let (tx, rx) = mpsc::channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let senders: Vec<_> = (0..160)
        .map(|_| {
            let rx = Arc::clone(&rx);
            let report = Arc::clone(&report);
            std::thread::spawn(move || {
                loop {
                    let due = match rx.lock().expect("lock").recv() {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    let result = get(port);
                    let took = due.elapsed();
                    let mut r = report.lock().expect("lock");
                    match result {
                        Ok(()) => {
                            r.answered += 1;
                            r.latencies.push(took);
                        }
                        Err(e) => r.failed.push(e),
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for i in 0..total {
        let due = start + duration.mul_f64(i as f64 / total as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        tx.send(due).expect("send");
        report.lock().expect("lock").sent += 1;
    }
    drop(tx);
    for s in senders {
        s.join().expect("sender");
    }
    let mut r = Arc::try_unwrap(report)
        .expect("one owner")
        .into_inner()
        .expect("lock");
    r.latencies.sort();
    r
}

/// The counts load scaling chose, in order, from the agent's log lines
/// `workers A -> B (load: ...)`.
fn load_decisions(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("(load: "))
        .filter_map(|l| {
            let rest = l.split("workers ").nth(1)?;
            let (_, to) = rest.split_once(" -> ")?;
            to.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn desired(s: &serde_json::Value) -> u64 {
    s["desired"].as_u64().expect("desired")
}

/// From idle to 80 requests a second (8 workers busy all the time) for 8 s, and back to
/// idle: the site grows to at least 8 while serving every request, then shrinks back to
/// `workers_min`; each change is logged with its reason and shown in `status`.
fn step_up_and_back(reactor: &'static str, busy_reports: bool) {
    let port = free_port();
    let behaviour = tempfile::tempdir().expect("tempdir");
    std::fs::write(behaviour.path().join("behaviour"), "one-at-a-time quiet").expect("write");
    let text = site(port, behaviour.path(), busy_reports);
    let agent = TestAgent::start(
        &[("api", &text)],
        Options {
            reactor,
            cgroups: true,
        },
    );
    agent.wait_for("api", "one worker ready", Duration::from_secs(30), |s| {
        s["ready"] == 1
    });
    let idle = agent.status("api");
    assert_eq!(desired(&idle), 1, "starts at workers_min: {idle:#}");
    assert_eq!(idle["scale"]["sampling"], true, "a TCP listener: sampled");
    // With a cgroup v2 directory (here and in the VMs, as root) whose cpu.pressure has a
    // `full` line (PSI, 5.13+), the kernel takes a trigger.
    let full_psi = agent.cgroup_base.as_ref().is_some_and(|b| {
        std::fs::read_to_string(b.join("cpu.pressure")).is_ok_and(|t| t.contains("full "))
    });
    if full_psi {
        assert_eq!(idle["scale"]["pressure_trigger"], true, "{idle:#}");
    } else {
        skip("no cgroup v2 with PSI here: no pressure trigger to check");
    }

    // The load: 80 a second, 100 ms each, for 8 s, while the count is watched.
    // The load: 80 a second, 100 ms each, for 8 s.
    let report = open_loop(port, 80, Duration::from_secs(8));
    let loaded = agent.status("api");
    // Every change of the count is in the agent's log, with its reason.
    let counts = load_decisions(&agent.agent_log());
    let most = counts.iter().copied().max().unwrap_or(1);
    assert!(
        report.failed.is_empty(),
        "[{reactor}] {} of {} requests failed: {:?}\n{}",
        report.failed.len(),
        report.sent,
        &report.failed[..report.failed.len().min(5)],
        agent.agent_log()
    );
    assert_eq!(report.answered, report.sent);
    assert!(
        most >= 8,
        "[{reactor}] grew to {most} at most under a load needing 8: {loaded:#}\n{}",
        agent.agent_log()
    );
    assert!(
        counts.iter().all(|n| *n <= 16),
        "never past workers_max: {counts:?}"
    );
    let p50 = report.latencies[report.latencies.len() / 2];
    eprintln!(
        "[{reactor}, busy reports: {busy_reports}] {} requests, p50 {p50:?}, p99 {:?}, counts {counts:?}",
        report.answered,
        report.latencies[report.latencies.len() * 99 / 100]
    );
    let decision = &loaded["scale"]["last_decision"];
    assert!(decision["to"].as_u64().is_some(), "{loaded:#}");
    let log = agent.agent_log();
    assert!(
        log.contains("workers 1 -> ") && log.contains("(load: "),
        "each decision is logged with its reason: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a log that is not a terminal has no colour codes: {log}"
    );
    if busy_reports {
        assert!(
            loaded["scale"]["signals"]["busy"].as_f64().is_some(),
            "{loaded:#}"
        );
    }

    // Idle again: back to workers_min within two cool-downs and some.
    let back = agent.wait_for("api", "back at workers_min", Duration::from_secs(40), |s| {
        desired(s) == 1 && s["workers"].as_array().is_some_and(|w| w.len() == 1)
    });
    let reason = back["scale"]["last_decision"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.starts_with("at most 1 needed for"),
        "shrunk for idleness: {back:#}"
    );
    let text = agent.cli(&["status", "api"]);
    let text = stdout(&text);
    assert!(
        text.contains("load scaling: target 70%") && text.contains("last: "),
        "{text}"
    );
}

#[test]
fn a_site_grows_with_busy_reports_and_shrinks_back() {
    step_up_and_back("io_uring", true);
}

#[test]
fn a_site_grows_from_its_accept_queue_alone_and_shrinks_back() {
    step_up_and_back("epoll", false);
}

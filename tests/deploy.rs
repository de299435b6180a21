//! Deploys by generations against the real agent, with a real load client on loopback:
//! zero failed requests through back-to-back deploys and through broken releases.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn in_vm() -> bool {
    std::env::var_os("HATCHERY_IN_VM").is_some()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A release directory `name` under `root`, misbehaving as `behaviour` says.
fn release(root: &Path, name: &str, behaviour: Option<&str>) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("mkdir release");
    if let Some(b) = behaviour {
        std::fs::write(dir.join("behaviour"), b).expect("write behaviour");
    }
    dir
}

/// Points the `current` symlink at `target`, atomically (as a deploy tool would).
fn point(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename symlink");
}

fn site(link: &Path, port: u16, extra: &str) -> String {
    let timeout = if in_vm() { "20s" } else { "4s" };
    format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker", "--delay-ms", "50", "--behaviour-from", "{{release}}"]
workers = 4
release = "{}"
{extra}
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
timeout = "{timeout}"
[stop]
timeout = "10s"
[deploy]
probation = "600ms"
"#,
        link.display()
    )
}

/// One request of the load client.
#[derive(Debug)]
struct Sample {
    start: Instant,
    connected: Option<Instant>,
    /// The generation that answered, or what went wrong.
    outcome: Result<u32, String>,
}

fn one_request(addr: SocketAddr) -> Sample {
    let start = Instant::now();
    let fail = |connected, e: String| Sample {
        start,
        connected,
        outcome: Err(e),
    };
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return fail(None, format!("connect: {e}")),
    };
    let connected = Some(Instant::now());
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n") {
        return fail(connected, format!("write: {e}"));
    }
    let mut body = String::new();
    if let Err(e) = s.read_to_string(&mut body) {
        return fail(connected, format!("read: {e}"));
    }
    // HTTP/1.0 from servers that speak only it (wsgiref's, in the zygote helper).
    if !(body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200")) {
        return fail(connected, format!("bad response: {body:?}"));
    }
    let generation = body
        .split("generation ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|g| g.trim().parse().ok());
    match generation {
        Some(g) => Sample {
            start,
            connected,
            outcome: Ok(g),
        },
        None => fail(connected, format!("no generation in {body:?}")),
    }
}

/// `conns` clients, each making one request per fresh connection until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// Answers so far, by the generation that gave them.
    answers: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(port: u16, conns: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let threads = (0..conns)
            .map(|_| {
                let stop = stop.clone();
                let answers = answers.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    // Bounded: at most 10 minutes' worth even if never stopped.
                    let until = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let sample = one_request(addr);
                        if let Ok(g) = sample.outcome {
                            *answers.lock().expect("answers").entry(g).or_insert(0) += 1;
                        }
                        out.push(sample);
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            answers,
            threads,
        }
    }

    /// Waits until generation `g` has answered `n` requests of the load (at most a
    /// minute: a load that never gets there fails the test).
    fn wait_for(&self, g: u32, n: usize) {
        wait_until(
            &format!("{n} answers from gen-{g}"),
            Duration::from_secs(60),
            || {
                self.answers
                    .lock()
                    .expect("answers")
                    .get(&g)
                    .is_some_and(|k| *k >= n)
            },
        );
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect()
    }
}

/// What a `hatchery deploy` printed and when.
struct DeployRun {
    code: Option<i32>,
    lines: Vec<(Instant, String)>,
}

impl DeployRun {
    fn text(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When the client heard that generation `g` serves.
    fn flip(&self, g: u32) -> Option<Instant> {
        let needle = format!("gen-{g} serves");
        self.lines
            .iter()
            .find(|(_, l)| l.contains(&needle))
            .map(|(t, _)| *t)
    }

    /// Pids the deploy reported starting.
    fn started_pids(&self) -> Vec<i64> {
        self.lines
            .iter()
            .filter_map(|(_, l)| l.split("(pid ").nth(1))
            .filter_map(|r| r.trim_end_matches(')').parse().ok())
            .collect()
    }
}

fn deploy(agent: &TestAgent, args: &[&str]) -> DeployRun {
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .arg("deploy")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run deploy");
    let err = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(err).lines() {
        let line = line.expect("read deploy output");
        lines.push((Instant::now(), line));
    }
    let mut out = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let code = child.wait().expect("wait deploy").code();
    lines.push((Instant::now(), out));
    DeployRun { code, lines }
}

/// `hatchery deploy web` on a thread of its own; join it for the CLI's output.
fn deploy_in_background(agent: &TestAgent) -> std::thread::JoinHandle<std::process::Output> {
    let socket = agent.socket.clone();
    std::thread::spawn(move || {
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(["deploy", "web"])
            .output()
            .expect("deploy")
    })
}

fn serving(agent: &TestAgent) -> (u64, Vec<i64>) {
    let s = agent.status("web");
    let g = s["generation"].as_u64().expect("generation");
    let pids = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["generation"] == g)
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    (g, pids)
}

fn gen_dirs(agent: &TestAgent) -> Option<Vec<String>> {
    let s = agent.status("web");
    let leaf = s["workers"][0]["cgroup"].as_str()?;
    let site_dir = Path::new(leaf).parent()?.parent()?;
    let mut names: Vec<String> = std::fs::read_dir(site_dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    names.sort();
    Some(names)
}

/// When the last deploy of `web` flipped the steering: just before and just after the
/// agent updated the map, from its `CLOCK_MONOTONIC` record (the clock `Instant` reads),
/// so no allowance for how late a client hears of the flip is needed. A connection the
/// kernel placed before the first instant went to the old generation; one placed after
/// the second to the new one.
fn last_flip(agent: &TestAgent) -> (Instant, Instant) {
    let s = agent.status("web");
    let w = &s["last_deploy"]["flip_monotonic_ns"];
    let ns = |v: &serde_json::Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("no flip recorded: {s:#}"))
    };
    // The window only widens: its start read no later, its end no earlier than it was.
    (
        instants_of_monotonic(ns(&w[0])).0,
        instants_of_monotonic(ns(&w[1])).1,
    )
}

/// The earliest and the latest `Instant` that `CLOCK_MONOTONIC` reading `ns` can be (the
/// clock `Instant` reads, with no way to build one from a reading): the clock read between
/// two `Instant`s, the tightest of 20 tries, so that a preemption between two reads
/// (milliseconds on a busy machine) cannot move the result.
fn instants_of_monotonic(ns: u64) -> (Instant, Instant) {
    let read = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        u64::try_from(t.tv_sec).expect("positive") * 1_000_000_000
            + u64::try_from(t.tv_nsec).expect("positive")
    };
    let (before, reading, spread) = (0..20)
        .map(|_| {
            let before = Instant::now();
            let reading = read();
            (before, reading, before.elapsed())
        })
        .min_by_key(|&(_, _, spread)| spread)
        .expect("20 tries");
    // `reading` was taken between `before` and `before + spread`.
    let at = |base: Instant| {
        if ns >= reading {
            base + Duration::from_nanos(ns - reading)
        } else {
            base.checked_sub(Duration::from_nanos(reading - ns))
                .expect("after boot")
        }
    };
    (at(before), at(before + spread))
}

/// The agent (on `reactor`, with or without cgroups) with site `web` of `workers` ready
/// workers, and how it steers connections (`ebpf` or `shared listener`).
fn start_web(
    text: &str,
    workers: u64,
    reactor: &'static str,
    cgroups: bool,
) -> (TestAgent, String) {
    let agent = TestAgent::start_ready(
        &[("web", text)],
        Options { reactor, cgroups },
        "web",
        workers,
    );
    let steering = agent.status("web")["steering"]
        .as_str()
        .unwrap_or("")
        .to_string();
    (agent, steering)
}

#[test]
fn deploys_under_load_fail_no_request_and_broken_releases_roll_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    let text = site(&link, port, "");
    let (agent, steering) = start_web(&text, 4, "io_uring", true);
    let (deploys, conns) = if in_vm() { (5, 4) } else { (20, 16) };

    let load = Load::start(port, conns);
    std::thread::sleep(Duration::from_millis(300));
    let mut flips: Vec<(u32, (Instant, Instant))> = Vec::new();
    for i in 2..=deploys + 1 {
        point(&link, &release(root.path(), &format!("r{i}"), None));
        let (before, old_pids) = serving(&agent);
        let run = deploy(&agent, &["web"]);
        assert_eq!(run.code, Some(0), "deploy {i} failed:\n{}", run.text());
        let (now, _) = serving(&agent);
        assert_eq!(
            now,
            before + 1,
            "deploy {i} did not move on:\n{}",
            run.text()
        );
        let g = u32::try_from(now).expect("small");
        assert!(run.flip(g).is_some(), "the deploy reported its flip");
        flips.push((g, last_flip(&agent)));
        for pid in old_pids {
            assert!(!alive(pid), "gen-{before} worker {pid} outlived deploy {i}");
        }
        let s = agent.status("web");
        assert_eq!(
            s["generations"].as_array().map(Vec::len),
            Some(1),
            "old generation left after deploy {i}: {s:#}"
        );
        // The old generation's cgroups are removed off the loop's hot path, soon after
        // the deploy ends: waited for (bounded), so one never removed fails.
        let want = vec![format!("gen-{now}")];
        if let Some(mut dirs) = gen_dirs(&agent) {
            poll_until(Duration::from_secs(10), || {
                dirs = gen_dirs(&agent).expect("the site's cgroups");
                dirs == want
            });
            assert_eq!(dirs, want, "cgroups 10 s after deploy {i}");
        }
        assert!(
            s["release"]
                .as_str()
                .is_some_and(|r| r.ends_with(&format!("r{i}"))),
            "{s:#}"
        );
    }

    // Broken releases: each is rolled back and the serving generation never notices.
    let broken_from = Instant::now();
    for behaviour in ["exit", "never-ready", "crash-after-ready"] {
        point(&link, &release(root.path(), behaviour, Some(behaviour)));
        let (before, pids) = serving(&agent);
        let run = deploy(&agent, &["web"]);
        assert_eq!(
            run.code,
            Some(4),
            "a release that does {behaviour} was not rolled back:\n{}",
            run.text()
        );
        assert!(run.text().contains("rolled back"), "{}", run.text());
        let (after, pids_after) = serving(&agent);
        assert_eq!(after, before, "{behaviour}: the serving generation changed");
        assert_eq!(
            pids_after, pids,
            "{behaviour}: serving workers were disturbed"
        );
        let started = run.started_pids();
        assert!(!started.is_empty(), "{}", run.text());
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in started {
            assert!(
                !alive(p),
                "{behaviour}: rolled-back worker {p} is still running"
            );
        }
        let s = agent.status("web");
        assert_eq!(s["last_deploy"]["result"], "rolled_back", "{s:#}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.finish();

    // Without eBPF steering the generations share one listener, so a broken release
    // takes (and may fail) connections before it is rolled back: only the good deploys
    // can promise zero failures there.
    let strict = steering == "ebpf";
    let failures: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.outcome.is_err() && (strict || s.start < broken_from))
        .collect();
    let total = samples.len();
    assert!(
        total >= 100,
        "only {total} requests were made: the load did not run"
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g. {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!("{total} requests, 0 failed, steering: {steering}");
    if steering == "ebpf" {
        // Every response came from a generation that was serving when the connection
        // was made (the kernel placed it between the connect call and its return): not
        // before its flip began, not after the next flip ended.
        for s in &samples {
            let g = *s.outcome.as_ref().expect("no failures");
            let connected = s.connected.expect("connected");
            if let Some((_, (t, _))) = flips.iter().find(|(x, _)| *x == g) {
                assert!(
                    connected >= *t,
                    "gen-{g} answered a connection made {:?} before its flip",
                    t.saturating_duration_since(connected)
                );
            }
            if let Some((_, (_, t))) = flips.iter().find(|(x, _)| *x == g + 1) {
                assert!(
                    s.start <= *t,
                    "gen-{g} answered a connection started {:?} after gen-{} took over",
                    s.start.saturating_duration_since(*t),
                    g + 1
                );
            }
        }
    } else {
        assert!(
            !require_all(),
            "eBPF steering must be available as root: {steering}"
        );
        eprintln!("note: without eBPF steering generations share one listener");
    }
}

/// Whether every sample is a success; the failures otherwise.
fn failed(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.outcome.is_err()).collect()
}

/// The test site with two workers, ready by `check` (the lines of `[ready]` after
/// `check =`), and a `ready.timeout` long enough for a busy machine.
fn probed_site(link: &Path, port: u16, check: &str) -> String {
    let ready_timeout = if in_vm() { "20s" } else { "8s" };
    site(link, port, "")
        .replace("workers = 4", "workers = 2")
        .replace("check = \"notify\"", &format!("check = {check}"))
        .replace(
            "timeout = \"20s\"\n",
            &format!("timeout = \"{ready_timeout}\"\n"),
        )
        .replace(
            "timeout = \"4s\"\n",
            &format!("timeout = \"{ready_timeout}\"\n"),
        )
}

/// Without eBPF steering a probe cannot tell the generations apart: the deploy is
/// refused, and nothing changes (then the test says why it skips the rest).
fn refused_without_steering(agent: &TestAgent, root: &Path, link: &Path, steering: &str) {
    point(link, &release(root, "r2", None));
    let run = deploy(agent, &["web"]);
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(
        run.text().contains("eBPF connection steering"),
        "{}",
        run.text()
    );
    assert_eq!(agent.status("web")["generation"], 1);
    assert!(
        !require_all(),
        "eBPF steering must be available as root: {steering}"
    );
    common::skip("probing a new generation alone needs eBPF steering");
}

#[test]
fn tcp_readiness_probes_the_new_generation_alone() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    let text = probed_site(&link, port, "\"tcp\"");
    let (agent, steering) = start_web(&text, 2, "io_uring", true);
    if steering != "ebpf" {
        refused_without_steering(&agent, root.path(), &link, &steering);
        return;
    }

    let load = Load::start(port, if in_vm() { 2 } else { 8 });
    std::thread::sleep(Duration::from_millis(300));
    // Workers that accept only after 1.5 s: the flip waits for them, though gen-1
    // accepts at once on the same address. None of these releases sends READY=1 or
    // prints when it starts serving (either would wake the agent): the probe alone must
    // notice, like with a silent server.
    point(
        &link,
        &release(root.path(), "slow", Some("slow-start never-ready quiet")),
    );
    let asked = Instant::now();
    let run = deploy(&agent, &["web"]);
    // Flipped, so the probe noticed the workers accepting before `ready.timeout` (a probe
    // that is not looked at in time ends in a rollback, exit 4).
    assert_eq!(run.code, Some(0), "{}", run.text());
    let (flip, flip_end) = last_flip(&agent);
    let took = flip.duration_since(asked);
    assert!(
        took >= Duration::from_millis(1500),
        "gen-2 was flipped to {took:?} after the deploy began, before its workers accepted:\n{}",
        run.text()
    );
    eprintln!("slow-start release flipped after {took:?}");
    // Workers that never accept: the probe is never accepted, the deploy rolls back.
    point(&link, &release(root.path(), "deaf", Some("never-accepts")));
    let (_, pids) = serving(&agent);
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(4), "{}", run.text());
    assert!(run.text().contains("not ready"), "{}", run.text());
    let (g, pids_after) = serving(&agent);
    assert_eq!(g, 2);
    assert_eq!(pids_after, pids, "the serving workers were disturbed");
    // And a good release after that still deploys (the probe entry was cleared).
    point(
        &link,
        &release(root.path(), "r4", Some("never-ready quiet")),
    );
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.flip(4).is_some(), "{}", run.text());
    let (flip4, flip4_end) = last_flip(&agent);
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.finish();

    let failures = failed(&samples);
    assert!(samples.len() >= 20, "only {} requests", samples.len());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        samples.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    for s in &samples {
        let g = *s.outcome.as_ref().expect("no failures");
        let connected = s.connected.expect("connected");
        match g {
            1 => assert!(s.start <= flip_end, "gen-1 answered after gen-2 took over"),
            2 => assert!(
                connected >= flip && s.start <= flip4_end,
                "gen-2 answered outside its time"
            ),
            4 => assert!(connected >= flip4, "gen-4 answered before its flip"),
            other => panic!("gen-{other} answered: it never served"),
        }
    }
    eprintln!("{} requests, 0 failed", samples.len());
}

#[test]
fn http_readiness_rolls_back_a_release_that_answers_errors() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    let text = probed_site(&link, port, "\"http\"\npath = \"/health\"");
    let (agent, steering) = start_web(&text, 2, "io_uring", true);
    if steering != "ebpf" {
        refused_without_steering(&agent, root.path(), &link, &steering);
        return;
    }

    let load = Load::start(port, if in_vm() { 2 } else { 8 });
    load.wait_for(1, 10);
    // A release whose server starts and accepts, but answers every request with a 500 (an
    // app that failed to load behind a server that did not): never ready, rolled back,
    // and no request of the load ever reaches it (a 500 fails a request).
    point(
        &link,
        &release(root.path(), "broken", Some("http-500 never-ready quiet")),
    );
    let (_, pids) = serving(&agent);
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(4), "{}", run.text());
    assert!(
        run.text().contains("not ready") && run.text().contains("answered 500"),
        "the rollback says what the probe was answered: {}",
        run.text()
    );
    let (g, pids_after) = serving(&agent);
    assert_eq!(g, 1);
    assert_eq!(pids_after, pids, "the serving workers were disturbed");
    // A release that answers, though it never sends READY=1 nor prints a line: the
    // probe's 200 is what flips it.
    point(
        &link,
        &release(root.path(), "good", Some("never-ready quiet")),
    );
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.flip(3).is_some(), "{}", run.text());
    let (flip, _) = last_flip(&agent);
    // The load reaches the new generation (and the check below sees it answer).
    load.wait_for(3, 10);
    let samples = load.finish();

    let failures = failed(&samples);
    assert!(samples.len() >= 20, "only {} requests", samples.len());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        samples.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    for s in &samples {
        match *s.outcome.as_ref().expect("no failures") {
            1 => {}
            3 => assert!(
                s.connected.expect("connected") >= flip,
                "gen-3 answered before its flip"
            ),
            other => panic!("gen-{other} answered: it never served"),
        }
    }
    eprintln!("{} requests, 0 failed", samples.len());
}

#[test]
fn a_budget_that_cannot_hold_two_generations_moves_slots_one_at_a_time() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    // 400M / 100M per worker: room for 4 workers in all, and the site runs 4.
    let text = site(&link, port, "memory = \"400M\"\nworker_memory = \"100M\"");
    let (agent, _) = start_web(&text, 4, "epoll", false);
    point(&link, &release(root.path(), "r2", None));
    let watching = Arc::new(AtomicBool::new(true));
    let most = {
        let watching = watching.clone();
        let socket = agent.socket.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while watching.load(Ordering::Relaxed) {
                let out = Command::new(BIN)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["status", "web", "--json"])
                    .output()
                    .expect("status");
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let live = v["sites"][0]["workers"]
                    .as_array()
                    .map(|w| w.iter().filter(|x| x["pid"].is_i64()).count())
                    .unwrap_or(0);
                most = most.max(live);
            }
            most
        })
    };
    let run = deploy(&agent, &["web"]);
    watching.store(false, Ordering::Relaxed);
    let most = most.join().expect("watcher");
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(
        run.text().contains("gen-1: down to 3 workers"),
        "no slot was moved:\n{}",
        run.text()
    );
    assert!(most <= 4, "{most} workers ran at once with room for 4");
    let s = agent.wait_for(
        "web",
        "4 ready workers of gen-2",
        Duration::from_secs(20),
        |s| s["generation"] == 2 && s["ready"] == 4,
    );
    assert_eq!(s["generations"].as_array().map(Vec::len), Some(1));
}

#[test]
fn deploys_queue_rollback_returns_to_the_previous_release_and_bad_requests_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let r1 = release(root.path(), "r1", None);
    point(&link, &r1);
    let port = free_port();
    let text = site(&link, port, "");
    let (agent, _) = start_web(&text, 4, "epoll", false);
    // Slow to become ready: the first deploy is still under way when the second comes.
    point(&link, &release(root.path(), "r2", Some("slow-start")));
    // Two deploys at once: the second waits for the first, then deploys again.
    let first = deploy_in_background(&agent);
    // The second is asked for once the first is under way (not after a guessed delay).
    agent.wait_for(
        "web",
        "the first deploy under way",
        Duration::from_secs(20),
        |s| s["deploy"].is_object(),
    );
    let second = agent.cli(&["deploy", "web"]);
    let first = first.join().expect("first deploy");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("waiting for the deploy of gen-2"),
        "{}",
        stderr(&second)
    );
    assert_eq!(agent.status("web")["generation"], 3);

    // Rollback: back to the release gen-3 replaced (gen-2's, r2), then to r1? No: the
    // previous release is always the one the serving generation replaced.
    let out = agent.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.status("web");
    assert_eq!(s["generation"], 4);
    assert!(
        s["release"].as_str().is_some_and(|r| r.ends_with("r2")),
        "{s:#}"
    );

    // An explicit release directory.
    let out = agent.cli(&["deploy", "web", "--release", &r1.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.status("web");
    assert!(
        s["release"].as_str().is_some_and(|r| r.ends_with("r1")),
        "{s:#}"
    );

    // Refusals change nothing.
    let pids = agent.pids("web");
    let out = agent.cli(&["deploy", "web", "--release", "/nonexistent/release"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not resolve"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["deploy", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        agent.pids("web"),
        pids,
        "a refused deploy disturbed the site"
    );
    let out = agent.cli(&["stop", "web"]);
    assert!(out.status.success());
    let out = agent.cli(&["deploy", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is stopped"), "{}", stderr(&out));
}

#[test]
fn a_site_without_release_deploys_its_command_again() {
    let port = free_port();
    let text = format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker"]
workers = 2
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
[deploy]
probation = "100ms"
"#
    );
    let (agent, _) = start_web(&text, 2, "io_uring", false);
    let old = agent.pids("web");
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let s = agent.status("web");
    assert_eq!(s["generation"], 2);
    for p in old {
        assert!(!alive(p));
    }
}

/// An unmodified gunicorn as the worker: it takes its socket from `LISTEN_FDS`, reports
/// `READY=1` on `NOTIFY_SOCKET`, and stops gracefully on `SIGTERM`, so deploys under load
/// fail no request with no Hatchery-specific code in the app.
/// A python3 that imports gunicorn, and the `PYTHONPATH` it needs; `None` (having said
/// why) where `run-tests` or vm-tests did not install it.
fn gunicorn() -> Option<(PathBuf, std::ffi::OsString)> {
    let Some(pythonpath) = std::env::var_os("HATCHERY_TEST_PYTHONPATH") else {
        // `run-tests` and vm-tests install gunicorn beside the build and say where.
        skip("HATCHERY_TEST_PYTHONPATH does not name a gunicorn install");
        return None;
    };
    let python = std::env::var_os("HATCHERY_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/python3", "/usr/local/bin/python3"].map(PathBuf::from))
        .chain(
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join("python3")),
        )
        .find(|p| {
            Command::new(p)
                .args(["-c", "import gunicorn"])
                .env("PYTHONPATH", &pythonpath)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a python3 that imports gunicorn from HATCHERY_TEST_PYTHONPATH");
    Some((python, pythonpath))
}

#[test]
fn gunicorn_is_deployed_unchanged_without_a_failed_request() {
    let Some((python, pythonpath)) = gunicorn() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let app = |name: &str| {
        let dir = release(root.path(), name, None);
        std::fs::write(
            dir.join("app.py"),
            format!(
                "import os, time\n\ndef app(environ, start_response):\n    time.sleep(0.02)\n    body = b'generation ' + os.environ.get('HATCHERY_GENERATION', '?').encode() + b', release {name}\\n'\n    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    return [body]\n"
            ),
        )
        .expect("write app");
        dir
    };
    point(&link, &app("g1"));
    let port = free_port();
    let text = format!(
        r#"name = "web"
command = ["{}", "-m", "gunicorn", "--chdir", "{{release}}", "-w", "2", "--graceful-timeout", "10", "app:app"]
workers = 1
release = "{}"
{}[stop]
timeout = "15s"
[deploy]
probation = "1s"
"#,
        python.display(),
        link.display(),
        python_site_tables(&Path::new(&pythonpath).display().to_string(), port),
    );
    let (agent, _) = start_web(&text, 1, "io_uring", false);
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(500));
    for i in 2..=4 {
        point(&link, &app(&format!("g{i}")));
        let run = deploy(&agent, &["web"]);
        assert_eq!(
            run.code,
            Some(0),
            "deploy {i}:\n{}\n{}",
            run.text(),
            agent_log_tail(&agent)
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.finish();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(samples.len() > 20, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        samples.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    let last = samples
        .last()
        .and_then(|s| s.outcome.as_ref().ok().copied());
    assert_eq!(
        last,
        Some(4),
        "the last answer came from the last generation"
    );
}

/// gunicorn's master sends `READY=1` before its workers import the app, and keeps running
/// when the app fails on every request: with an `http` check, a release that raises at
/// import, and one whose every answer is a 500, are never flipped to; each is rolled
/// back, and no request fails.
#[test]
fn a_gunicorn_release_that_fails_is_rolled_back_by_the_http_check() {
    let Some((python, pythonpath)) = gunicorn() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    // `broken`: "import" raises at import, "request" raises in every request (gunicorn
    // answers 500 then).
    let app = |name: &str, broken: &str| {
        let dir = release(root.path(), name, None);
        let (at_import, per_request) = match broken {
            "import" => ("raise ImportError('this release is broken')\n", ""),
            "request" => ("", "    raise RuntimeError('this release is broken')\n"),
            _ => ("", ""),
        };
        std::fs::write(
            dir.join("app.py"),
            format!(
                "import os\n{at_import}\ndef app(environ, start_response):\n{per_request}    body = b'generation ' + os.environ.get('HATCHERY_GENERATION', '?').encode() + b', release {name}\\n'\n    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    return [body]\n"
            ),
        )
        .expect("write app");
        dir
    };
    point(&link, &app("g1", ""));
    let port = free_port();
    let ready_timeout = if in_vm() { "40s" } else { "10s" };
    let text = format!(
        r#"name = "web"
command = ["{}", "-m", "gunicorn", "--chdir", "{{release}}", "-w", "2", "--graceful-timeout", "10", "app:app"]
workers = 1
release = "{}"
[env]
PYTHONPATH = "{}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "http"
timeout = "{ready_timeout}"
[stop]
timeout = "15s"
[deploy]
probation = "1s"
"#,
        python.display(),
        link.display(),
        Path::new(&pythonpath).display()
    );
    let (agent, steering) = start_web(&text, 1, "io_uring", true);
    if steering != "ebpf" {
        assert!(
            !require_all(),
            "eBPF steering must be available as root: {steering}"
        );
        skip("http readiness across generations needs eBPF steering");
        return;
    }
    let load = Load::start(port, 4);
    load.wait_for(1, 10);
    let (_, pids) = serving(&agent);
    for (name, broken) in [("g2", "import"), ("g3", "request")] {
        point(&link, &app(name, broken));
        let run = deploy(&agent, &["web"]);
        assert_eq!(
            run.code,
            Some(4),
            "a release failing at {broken}:\n{}\n{}",
            run.text(),
            agent_log_tail(&agent)
        );
        let (g, pids_after) = serving(&agent);
        assert_eq!(g, 1, "{}", run.text());
        assert_eq!(pids_after, pids, "the serving gunicorn was disturbed");
    }
    // A good release after them deploys.
    point(&link, &app("g4", ""));
    let run = deploy(&agent, &["web"]);
    assert_eq!(
        run.code,
        Some(0),
        "{}\n{}",
        run.text(),
        agent_log_tail(&agent)
    );
    load.wait_for(4, 10);
    let samples = load.finish();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(samples.len() > 20, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        samples.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        samples.iter().all(|s| matches!(s.outcome, Ok(1) | Ok(4))),
        "only gen-1 and gen-4 may answer"
    );
}

/// A python3 and a `PYTHONPATH` that import the zygote helper (`hatchery_zygote`) and
/// gunicorn: the repository's `zygote/python` on the host, the copy vm-tests puts beside
/// gunicorn in a VM.
fn zygote_python() -> Option<(PathBuf, String)> {
    let (python, pythonpath) = gunicorn()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("zygote/python");
    let path = if repo.join("hatchery_zygote").is_dir() {
        format!("{}:{}", repo.display(), Path::new(&pythonpath).display())
    } else {
        Path::new(&pythonpath).display().to_string()
    };
    let imports = Command::new(&python)
        .args(["-c", "import hatchery_zygote"])
        .env("PYTHONPATH", &path)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        imports,
        "{} cannot import hatchery_zygote from {path}",
        python.display()
    );
    Some((python, path))
}

/// The tables of a site of Python workers (their `PYTHONPATH`) on `port`: its
/// environment, listener and readiness (`notify`; under TCG, beside the other deploy
/// tests, a Python start took more than 30 s).
fn python_site_tables(pythonpath: &str, port: u16) -> String {
    let ready_timeout = if in_vm() { "120s" } else { "30s" };
    format!(
        r#"[env]
PYTHONPATH = "{pythonpath}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
timeout = "{ready_timeout}"
"#
    )
}

/// Zygote mode with the Python helper: each release's app is imported once, by its
/// generation's zygote, and its 4 workers are forked from it. Under load, deploys to new
/// releases fail no request and the new code answers after each (unlike gunicorn
/// `--preload`, whose reload keeps the old code); a release whose import fails never gets
/// a ready zygote, so its deploy fails and is rolled back with the old generation
/// undisturbed.
#[test]
fn a_python_app_in_zygote_mode_deploys_under_load_without_a_failed_request() {
    let Some((python, pythonpath)) = zygote_python() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let app = |name: &str, broken: bool| {
        let dir = release(root.path(), name, None);
        let at_import = if broken {
            "raise ImportError('this release is broken')\n"
        } else {
            ""
        };
        std::fs::write(
            dir.join("app.py"),
            format!(
                "import os, time\n{at_import}\nLOADED_BY = os.getpid()\n\ndef app(environ, start_response):\n    time.sleep(0.02)\n    body = 'generation {{}}, release {name}, loaded by {{}}, served by {{}}\\n'.format(os.environ.get('HATCHERY_GENERATION', '?'), LOADED_BY, os.getpid()).encode()\n    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    return [body]\n"
            ),
        )
        .expect("write app");
        dir
    };
    point(&link, &app("g1", false));
    let port = free_port();
    let text = format!(
        r#"name = "web"
command = ["{}", "-m", "hatchery_zygote", "app:app"]
mode = "zygote"
workers = 4
release = "{}"
workdir = "{{release}}"
{}[restart]
backoff_initial = "100ms"
[stop]
timeout = "15s"
[deploy]
probation = "1s"
"#,
        python.display(),
        link.display(),
        python_site_tables(&pythonpath, port),
    );
    let (agent, _) = start_web(&text, 4, "io_uring", true);
    let body = get_body(port).expect("an answer");
    let loaded_by = |body: &str| {
        body.split("loaded by ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.trim().parse::<i64>().ok())
    };
    let zygote_pid = agent.status("web")["generations"][0]["zygote"]["pid"].as_i64();
    assert_eq!(
        loaded_by(&body),
        zygote_pid,
        "the app was loaded by the zygote: {body}"
    );
    let load = Load::start(port, 4);
    load.wait_for(1, 10);
    for i in 2..=3 {
        point(&link, &app(&format!("g{i}"), false));
        let run = deploy(&agent, &["web"]);
        assert_eq!(
            run.code,
            Some(0),
            "deploy {i}:\n{}\n{}",
            run.text(),
            agent_log_tail(&agent)
        );
        load.wait_for(i, 10);
        let body = get_body(port).expect("an answer");
        assert!(
            body.contains(&format!("release g{i},")),
            "the new code answers: {body}"
        );
    }
    // A release that fails at import: its zygote never says READY.
    let (_, pids) = serving(&agent);
    point(&link, &app("g4", true));
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(4), "{}", run.text());
    let (g, pids_after) = serving(&agent);
    assert_eq!(g, 3, "{}", run.text());
    assert_eq!(pids_after, pids, "the serving generation was disturbed");
    let samples = load.finish();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(samples.len() > 20, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        samples.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    let log =
        std::fs::read_to_string(agent.dir.path().join("state/logs/web.log")).unwrap_or_default();
    assert!(
        log.contains("this release is broken"),
        "the zygote's error is in the site's log:\n{log}"
    );
}

/// Zygote mode, protocol version 3: the Python helper names the worker it forked ahead
/// (`SPARE`), and the agent moves it at once, still running no app code, into the leaf
/// of the slot it expects it to get (the oldest unanswered fork's, else the lowest unused
/// one), so the first worker and a `scale` up only let it go: the new worker is that process, in that leaf. A `scale` down frees a lower slot:
/// the spare is moved, ahead again, into that slot's leaf. A spare given to another slot
/// (the restart of a killed worker) is moved again into a leaf of that slot, and the leaf
/// it left is removed: no leaf is left behind.
#[test]
fn a_zygotes_spare_waits_in_its_leaf_and_a_scale_up_only_lets_it_go() {
    let Some((python, pythonpath)) = zygote_python() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        root.path().join("app.py"),
        "def app(environ, start_response):\n    start_response('200 OK', [('Content-Length', '2')])\n    return [b'ok']\n",
    )
    .expect("write app");
    let port = free_port();
    let text = format!(
        r#"name = "web"
command = ["{}", "-m", "hatchery_zygote", "--threads", "1", "app:app"]
mode = "zygote"
workers = 1
workdir = "{}"
{}[restart]
backoff_initial = "100ms"
"#,
        python.display(),
        root.path().display(),
        python_site_tables(&pythonpath, port),
    );
    let (agent, _) = start_web(&text, 1, "io_uring", true);
    let Some(base) = agent.cgroup_base.clone() else {
        skip("no cgroup v2 to move spares into (not root, or no cgroup2 mount)");
        return;
    };
    let wait = Duration::from_secs(if in_vm() { 60 } else { 20 });
    // The cgroup `pid` is in, as a path under the mount, and the leaf it names.
    let cgroup_of = |pid: i64| -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line")
            .to_string()
    };
    let spare_for = |s: &serde_json::Value, slot: u64| -> Option<(i64, String)> {
        s["generations"][0]["zygote"]["spares"]
            .as_array()?
            .iter()
            .find(|x| x["slot"].as_u64() == Some(slot))
            .map(|x| {
                let pid = x["pid"].as_i64().expect("a spare's pid");
                (pid, x["cgroup"].as_str().expect("its leaf").to_string())
            })
    };
    let s = agent.wait_for("web", "a spare for worker 1", wait, |s| {
        spare_for(s, 1).is_some()
    });
    // The first spare, named after READY, when worker 0's FORK was already asked for:
    // moved into worker 0's leaf, and let go there.
    assert!(
        agent
            .agent_log()
            .lines()
            .any(|l| l.contains("the spare, already in its leaf") && l.contains("worker=0")),
        "worker 0 took the first spare without a second move:\n{}",
        agent_log_tail(&agent)
    );
    let (spare, leaf) = spare_for(&s, 1).expect("the spare");
    assert!(leaf.ends_with("/gen-1/w-1"), "{leaf}");
    let text = agent.cli(&["status", "web"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(", spare for w-1 (pid {spare})")),
        "status says where the spare waits:\n{text}"
    );
    assert!(
        leaf.ends_with(&cgroup_of(spare)),
        "the spare is in its leaf before its FORK: {} against {leaf}",
        cgroup_of(spare)
    );
    let ready_workers = |s: &serde_json::Value| -> Vec<(u64, i64, String)> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| {
                (
                    w["id"].as_u64().expect("an id"),
                    w["pid"].as_i64().expect("a pid"),
                    w["cgroup"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };

    let scale = |n: &str| {
        let out = agent.cli(&["scale", "web", n]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // `scale 2` from 1: worker 1 is `spare`, in `leaf`, let go without a move.
    let scale_up_takes = |spare: i64, leaf: &str| {
        let lets_go = || {
            agent
                .agent_log()
                .matches("the spare, already in its leaf")
                .count()
        };
        let before = lets_go();
        scale("2");
        let s = agent.status("web");
        let one = ready_workers(&s)
            .into_iter()
            .find(|w| w.0 == 1)
            .unwrap_or_else(|| panic!("no worker 1: {s:#}"));
        assert_eq!(one.1, spare, "worker 1 is the spare: {s:#}");
        assert_eq!(one.2, leaf, "in the leaf it waited in: {s:#}");
        assert!(leaf.ends_with(&cgroup_of(spare)), "{leaf}");
        assert_eq!(
            lets_go(),
            before + 1,
            "no second move: {}",
            agent_log_tail(&agent)
        );
    };
    scale_up_takes(spare, &leaf);

    // The next spare waits in worker 2's leaf; back to one worker, it is moved into a
    // leaf of worker 1's, and the next scale up only lets it go.
    let s = agent.wait_for("web", "a spare for worker 2", wait, |s| {
        spare_for(s, 2).is_some()
    });
    let (spare2, _) = spare_for(&s, 2).expect("the spare");
    scale("1");
    let s = agent.wait_for("web", "the spare moved for worker 1", wait, |s| {
        spare_for(s, 1).is_some_and(|(p, _)| p == spare2)
    });
    let (_, leaf1) = spare_for(&s, 1).expect("the spare");
    scale_up_takes(spare2, &leaf1);

    // Worker 0 is killed, and its restart gets the next spare, waiting for worker 2:
    // moved again, into a leaf of worker 0's.
    let s = agent.wait_for("web", "a spare for worker 2", wait, |s| {
        spare_for(s, 2).is_some_and(|(p, _)| p != spare2)
    });
    let (spare2, leaf2) = spare_for(&s, 2).expect("the spare");
    let zero = ready_workers(&s)
        .into_iter()
        .find(|w| w.0 == 0)
        .expect("worker 0");
    let pid = rustix::process::Pid::from_raw(i32::try_from(zero.1).expect("a pid")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill worker 0");
    let s = agent.wait_for("web", "worker 0 again, and a new spare", wait, |s| {
        ready_workers(s).iter().any(|w| w.0 == 0 && w.1 != zero.1)
            && spare_for(s, 2).is_some_and(|(p, _)| p != spare2)
    });
    let again = ready_workers(&s)
        .into_iter()
        .find(|w| w.0 == 0)
        .expect("worker 0");
    assert_eq!(again.1, spare2, "the restart took the spare: {s:#}");
    let name = again.2.rsplit('/').next().unwrap_or("").to_string();
    assert!(
        name == "w-0" || name.starts_with("w-0."),
        "moved into a leaf of worker 0's: {s:#}"
    );
    assert!(again.2.ends_with(&cgroup_of(spare2)), "{s:#}");
    assert_ne!(again.2, leaf2);
    // No leaf left behind: in gen-1, the zygote's, the two workers' and the spare's,
    // by name.
    let gen_dir = base.join("sites/web/gen-1");
    let leaves = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&gen_dir)
            .expect("gen-1's cgroup")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let expected = |s: &serde_json::Value| -> Vec<String> {
        let z = &s["generations"][0]["zygote"];
        let mut names: Vec<String> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| &w["cgroup"])
            .chain(
                z["spares"]
                    .as_array()
                    .expect("spares")
                    .iter()
                    .map(|x| &x["cgroup"]),
            )
            .chain([&z["cgroup"]])
            .map(|c| {
                let path = c.as_str().expect("a leaf");
                path.rsplit('/').next().unwrap_or(path).to_string()
            })
            .collect();
        names.sort();
        names
    };
    let s = agent.wait_for("web", "only the live leaves in gen-1", wait, |s| {
        expected(s).len() == 4 && leaves() == expected(s)
    });
    assert_eq!(leaves(), expected(&s), "{}", agent_log_tail(&agent));
}

fn agent_log_tail(agent: &TestAgent) -> String {
    let log = agent.agent_log();
    log.lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

/// With `SELECT` alone (no migration of queued connections, as before Linux 5.14), the old
/// generation keeps accepting until its queue is empty: connections queued at the flip are
/// answered by it, none reset. `rollback` then steers back to it while it drains, and
/// during a deploy that has not flipped it stops the new generation.
#[test]
fn a_draining_generation_answers_its_queue_and_rollback_steers_back_to_it() {
    if !is_root() && skip("eBPF steering needs root") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    // gen-1's one worker answers nothing until the test creates `go` in its release, so
    // the connections queued behind it are still there at the flip and gen-1 drains until
    // then, however slow the machine (not a queue sized to outlast a probation, which a
    // loaded VM outran).
    let r1 = release(root.path(), "r1", Some("one-at-a-time wait-for-go"));
    point(&link, &r1);
    let port = free_port();
    let (probation, queued) = ("1s", 8);
    let text = format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker", "--delay-ms", "100", "--behaviour-from", "{{release}}"]
workers = 1
release = "{}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
timeout = "30s"
[stop]
timeout = "60s"
[deploy]
probation = "{probation}"
"#,
        link.display()
    );
    let agent = TestAgent::start_with_env(
        &[("web", &text)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
        &[("HATCHERY_STEERING", "select")],
    );
    agent.wait_for("web", "gen-1 ready", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    let features =
        serde_json::from_slice::<serde_json::Value>(&agent.cli(&["status", "--json"]).stdout)
            .expect("json")["agent"]["features"]
            .to_string();
    assert!(features.contains("no SELECT_OR_MIGRATE"), "{features}");
    assert_eq!(agent.status("web")["steering"], "ebpf");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    // Rolled back before the flip: the new generation stops, gen-1 never did.
    point(&link, &release(root.path(), "r2", Some("slow-start")));
    let starting = deploy_in_background(&agent);
    agent.wait_for("web", "gen-2 starting", Duration::from_secs(20), |s| {
        s["deploy"]["stage"] == "starting"
    });
    let out = agent.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("gen-2 rolled back; gen-1 serves"),
        "{}",
        stdout(&out)
    );
    let out = starting.join().expect("deploy");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("rolled back on request"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.status("web")["generation"], 1);

    // Connections queued at gen-1 before the deploy (held there until `go`), then a
    // rollback while gen-1 drains them.
    let waiting: Vec<TcpStream> = (0..queued)
        .map(|_| {
            let mut s =
                TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .expect("write");
            s
        })
        .collect();
    point(&link, &release(root.path(), "r3", None));
    let deploying = deploy_in_background(&agent);
    agent.wait_for(
        "web",
        "gen-3 serving, gen-1 draining",
        Duration::from_secs(30),
        |s| s["generation"] == 3 && s["deploy"]["stage"] == "draining",
    );
    let out = agent.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("steered back to gen-1"),
        "rollback found gen-1 still draining: {}",
        stdout(&out)
    );
    std::fs::write(r1.join("go"), "").expect("go");
    let out = deploying.join().expect("deploy");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // Every queued connection was answered by gen-1; none was reset.
    for (i, mut s) in waiting.into_iter().enumerate() {
        let mut body = String::new();
        s.read_to_string(&mut body)
            .unwrap_or_else(|e| panic!("queued connection {i}: {e}"));
        assert!(
            body.starts_with("HTTP/1.1 200") && body.contains("generation 1"),
            "queued connection {i}: {body:?}"
        );
    }
    // And new connections go to gen-1 again.
    let s = one_request(addr);
    assert_eq!(s.outcome.as_ref().ok(), Some(&1), "{s:?}");
    agent.wait_for("web", "gen-3 gone", Duration::from_secs(30), |s| {
        s["generations"].as_array().map(Vec::len) == Some(1)
    });
}

/// `n` requests, each on a new connection, from `threads` clients at once: how many each
/// generation answered, and the failures.
fn burst(
    port: u16,
    n: usize,
    threads: usize,
) -> (std::collections::BTreeMap<u32, usize>, Vec<String>) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let mine = n / threads + usize::from(i < n % threads);
            std::thread::spawn(move || (0..mine).map(|_| one_request(addr)).collect::<Vec<_>>())
        })
        .collect();
    let mut by_gen = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for h in handles {
        for s in h.join().expect("burst thread") {
            match s.outcome {
                Ok(g) => *by_gen.entry(g).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    (by_gen, failures)
}

/// The generations of `web` by number: (state, desired workers, share of new connections).
fn generations(agent: &TestAgent) -> Vec<(u64, String, u64, Option<String>)> {
    let s = agent.status("web");
    s["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| {
            (
                g["id"].as_u64().expect("id"),
                g["state"].as_str().unwrap_or("").to_string(),
                g["desired"].as_u64().unwrap_or(0),
                g["share"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn a_canary_takes_its_share_promote_moves_all_rollback_none_and_a_crash_aborts_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    let text = site(&link, port, "").replace("\"--delay-ms\", \"50\"", "\"--delay-ms\", \"0\"");
    let (agent, steering) = start_web(&text, 4, "io_uring", true);
    if steering != "ebpf" {
        point(&link, &release(root.path(), "r2", None));
        let run = deploy(&agent, &["web", "--canary", "10%"]);
        assert_eq!(run.code, Some(2), "{}", run.text());
        assert!(
            run.text().contains("eBPF connection steering"),
            "{}",
            run.text()
        );
        assert!(
            !require_all(),
            "eBPF steering must be available as root: {steering}"
        );
        common::skip("a canary needs eBPF steering");
        return;
    }
    let clients = if in_vm() { 4 } else { 8 };
    let load = Load::start(port, 2);
    load.wait_for(1, 5);

    // A 10 % canary: returns once it serves, with one worker of four.
    point(&link, &release(root.path(), "r2", None));
    let run = deploy(&agent, &["web", "--canary", "10%"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(
        run.text()
            .contains("canary gen-2 serves 10% of new connections beside gen-1"),
        "{}",
        run.text()
    );
    let s = agent.status("web");
    assert_eq!(s["deploy"]["stage"], "canary", "{s:#}");
    assert_eq!(s["deploy"]["canary"], "10%", "{s:#}");
    assert_eq!(s["generation"], 1, "gen-1 still serves: {s:#}");
    assert_eq!(
        generations(&agent),
        vec![
            (1, "serving".into(), 4, Some("90%".into())),
            (2, "canary".into(), 1, Some("10%".into())),
        ]
    );
    let human = agent.cli(&["status", "web"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("canary: gen-2 takes 10% of new connections beside gen-1"),
        "{human}"
    );
    // 2,000 new connections: 10 % ± 3 % reach the canary, the rest the serving generation.
    let (by_gen, failures) = burst(port, 2000, clients);
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let canary = by_gen.get(&2).copied().unwrap_or(0);
    eprintln!("canary at 10 %: {by_gen:?}");
    assert!(
        (140..=260).contains(&canary) && by_gen.get(&1).copied().unwrap_or(0) == 2000 - canary,
        "the canary took {canary} of 2000 connections: {by_gen:?}"
    );
    // Other operations wait for the canary's end.
    let scale = agent.cli(&["scale", "web", "3"]);
    assert!(!scale.status.success());
    assert!(
        String::from_utf8_lossy(&scale.stderr).contains("promote web"),
        "{}",
        String::from_utf8_lossy(&scale.stderr)
    );

    // Promoted: it grows to four workers and takes every new connection; gen-1 retires.
    let promote = agent.cli(&["promote", "web"]);
    let said = String::from_utf8_lossy(&promote.stdout).into_owned()
        + &String::from_utf8_lossy(&promote.stderr);
    assert!(promote.status.success(), "{said}");
    assert!(said.contains("gen-2 serves; gen-1 retired"), "{said}");
    assert_eq!(generations(&agent), vec![(2, "serving".into(), 4, None)]);
    let (by_gen, failures) = burst(port, 200, clients);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_gen, [(2, 200)].into(), "after the promotion");

    // Rolled back: the canary stops, and gets nothing more.
    point(&link, &release(root.path(), "r3", None));
    let run = deploy(&agent, &["web", "--canary", "25%"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let rollback = agent.cli(&["rollback", "web"]);
    assert!(
        rollback.status.success(),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    wait_until("gen-3 to be gone", Duration::from_secs(60), || {
        generations(&agent) == vec![(2, "serving".into(), 4, None)]
    });
    let (by_gen, failures) = burst(port, 200, clients);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_gen, [(2, 200)].into(), "after the rollback");
    let samples = load.finish();
    let failures = failed(&samples);
    assert!(
        failures.is_empty(),
        "{} of {} requests of the load failed, e.g. {:?}",
        failures.len(),
        samples.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );

    // A canary whose worker dies (killed here, as a crash would) is rolled back by itself.
    point(&link, &release(root.path(), "r4", None));
    let run = deploy(&agent, &["web", "--canary", "50%"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let s = agent.status("web");
    let pid = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["generation"] == 4)
        .and_then(|w| w["pid"].as_i64())
        .unwrap_or_else(|| panic!("no canary worker: {s:#}"));
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    wait_until(
        "the canary to be rolled back",
        Duration::from_secs(60),
        || {
            let s = agent.status("web");
            s["last_deploy"]["to"] == 4 && s["last_deploy"]["result"] == "rolled_back"
        },
    );
    let s = agent.status("web");
    let reason = s["last_deploy"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("a worker of gen-4 exited"), "{s:#}");
    assert!(s["deploy"].is_null(), "{s:#}");
    let (by_gen, failures) = burst(port, 200, clients);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_gen, [(2, 200)].into(), "after the abort");
}

#[test]
fn a_canary_is_refused_with_its_reason_where_it_cannot_be_steered() {
    let sock = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker"]
workers = 2
[[listen]]
name = "http"
unix = "{}"
[ready]
check = "notify"
"#,
        sock.path().join("web.sock").display()
    );
    let (agent, _) = start_web(&text, 2, "epoll", false);
    let pids = agent.pids("web");
    // A share that is not one is the CLI's usage error; the agent refuses it too.
    let run = deploy(&agent, &["web", "--canary", "150%"]);
    assert_eq!(run.code, Some(2), "{}", run.text());
    assert!(
        run.text().contains("above 0 and below 100"),
        "{}",
        run.text()
    );
    // A site with no TCP listener has nothing to steer a share of.
    let run = deploy(&agent, &["web", "--canary", "10%"]);
    assert_eq!(run.code, Some(2), "{}", run.text());
    assert!(
        run.text().contains("needs eBPF connection steering")
            && run.text().contains("the site has no TCP listener"),
        "{}",
        run.text()
    );
    // No canary, nothing to promote.
    let promote = agent.cli(&["promote", "web"]);
    assert_eq!(promote.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&promote.stderr).contains("no canary to promote"),
        "{}",
        String::from_utf8_lossy(&promote.stderr)
    );
    assert_eq!(agent.status("web")["generation"], 1);
    assert_eq!(agent.pids("web"), pids, "nothing changed");
}

#[test]
fn a_release_that_shuts_a_listener_down_is_rolled_back_at_the_flip_and_no_request_fails() {
    if !is_root() && skip("eBPF steering needs root") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let r1 = release(root.path(), "r1", None);
    point(&link, &r1);
    let [port, admin] = free_ports();
    // Two addresses: the workers serve the first; a broken release shuts the second down.
    let text = format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker", "--delay-ms", "50", "--behaviour-from", "{{release}}"]
workers = 4
release = "{}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[[listen]]
name = "admin"
tcp = "127.0.0.1:{admin}"
[ready]
check = "notify"
timeout = "30s"
[stop]
timeout = "120s"
[deploy]
probation = "600ms"
"#,
        link.display()
    );
    let (agent, steering) = start_web(&text, 4, "io_uring", true);
    // Generations that share one listener share its shutdown too: only steering keeps
    // the new generation's listeners apart.
    assert_eq!(steering, "ebpf", "{:#}", agent.status("web"));
    let (before, pids) = serving(&agent);
    let load = Load::start(port, 4);
    load.wait_for(1, 20);
    // Each new worker shuts the new generation's `admin` listener down, then reports
    // ready, serves nothing, and once told to stop waits for `finish-stop`. At the flip
    // `http` is steered to gen-2 first; `admin`'s listener cannot be inserted in its map.
    let r2 = release(root.path(), "r2", Some("shut-listener slow-stop"));
    point(&link, &r2);
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(4), "not rolled back:\n{}", run.text());
    let why = format!("new connections could not be steered to gen-2: tcp 127.0.0.1:{admin}");
    assert!(run.text().contains(&why), "{}", run.text());
    assert!(run.flip(2).is_none(), "{}", run.text());
    let (after, pids_after) = serving(&agent);
    assert_eq!(after, before, "the serving generation changed");
    assert_eq!(pids_after, pids, "serving workers were disturbed");
    let s = agent.status("web");
    assert_eq!(s["last_deploy"]["result"], "rolled_back", "{s:#}");
    let started = run.started_pids();
    assert_eq!(started.len(), 4, "{}", run.text());
    // While gen-2's workers are still there (told to stop, waiting for `finish-stop`,
    // accepting nothing), `http` was steered back to gen-1: it answers new requests. (Left
    // steered to gen-2, they would wait in its queue until its workers went.)
    let answered = load.answers.lock().expect("answers").get(&1).copied();
    wait_until(
        "20 more answers from gen-1 while gen-2 is stopping",
        Duration::from_secs(30),
        || {
            load.answers
                .lock()
                .expect("answers")
                .get(&1)
                .is_some_and(|k| *k >= answered.unwrap_or(0) + 20)
        },
    );
    assert!(started.iter().all(|p| alive(*p)), "gen-2 left too early");
    std::fs::write(r2.join("finish-stop"), b"").expect("finish-stop");
    poll_until(Duration::from_secs(20), || {
        !started.iter().any(|p| alive(*p))
    });
    for p in started {
        assert!(!alive(p), "rolled-back worker {p} is still running");
    }
    let samples = load.finish();
    assert!(failed(&samples).is_empty(), "{:?}", failed(&samples));
    assert!(
        samples.iter().all(|s| s.outcome == Ok(1)),
        "a request reached gen-2"
    );
}

/// `pid` of worker `w-<id>` of `web`'s serving generation.
fn worker_pid(agent: &TestAgent, id: u64) -> Option<i64> {
    let s = agent.status("web");
    s["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id && w["generation"] == s["generation"])
        .and_then(|w| w["pid"].as_i64())
}

#[test]
fn a_worker_that_stops_answering_its_health_checks_is_restarted_and_said_so() {
    // Found through its cgroup leaf, and without cgroups through its process tree.
    health_restarts_a_stuck_worker("io_uring", true);
    health_restarts_a_stuck_worker("epoll", false);
}

fn health_restarts_a_stuck_worker(reactor: &'static str, cgroups: bool) {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let r1 = release(root.path(), "r1", Some("hang-when-told"));
    point(&link, &r1);
    let port = free_port();
    let health = if in_vm() {
        "[health]\ninterval = \"300ms\"\ntimeout = \"2s\"\nfailures = 2\npath = \"/health\"\n"
    } else {
        "[health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nfailures = 2\npath = \"/health\"\n"
    };
    let text = site(&link, port, "")
        .replace("workers = 4", "workers = 2")
        .replace("\"--delay-ms\", \"50\"", "\"--delay-ms\", \"0\"")
        + health;
    let (agent, _) = start_web(&text, 2, reactor, cgroups);
    let (w0, w1) = (worker_pid(&agent, 0), worker_pid(&agent, 1));
    assert!(w0.is_some() && w1.is_some());
    let site_log =
        || String::from_utf8_lossy(&agent.cli(&["logs", "web", "-n", "200"]).stdout).into_owned();
    // w-1 gets stuck: it accepts connections, answers none. Health checks land on either
    // worker; those on w-1 time out, and the second restarts it.
    std::fs::write(r1.join("hang-1"), "").expect("touch hang-1");
    wait_until("w-1 to be restarted", Duration::from_secs(120), || {
        worker_pid(&agent, 1).is_some_and(|p| Some(p) != w1)
    });
    let log = site_log();
    assert!(
        log.contains("stuck, answering nothing"),
        "the worker got stuck:\n{log}"
    );
    assert!(
        log.contains("w-1 did not answer in time (1 of 2 before it is restarted)")
            && log.contains(&format!(
                "gen-1 w-1 (pid {}) failed 2 health checks: restarting it",
                w1.expect("pid")
            )),
        "the site's log says why:\n{log}"
    );
    assert!(
        !log.contains("gen-1 w-0 (pid"),
        "w-0, which answered every check, was left alone:\n{log}"
    );
    assert_eq!(worker_pid(&agent, 0), w0, "w-0 was not restarted");
    assert!(!std::path::Path::new(&r1.join("hang-1")).exists());
    // The new w-1 answers: a burst of requests all succeed.
    wait_until("both workers ready", Duration::from_secs(60), || {
        agent.status("web")["ready"] == 2
    });
    let (by_gen, failures) = burst(port, 50, 4);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_gen, [(1, 50)].into());
}

#[test]
fn a_warmup_reaches_every_new_worker_before_the_flip() {
    // Workers that accept every connection (a thread each), and workers that serve one
    // connection before they accept the next (a synchronous server).
    warmup_reaches_every_worker("log-requests");
    warmup_reaches_every_worker("one-at-a-time log-requests");
}

fn warmup_reaches_every_worker(behaviour: &str) {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", Some(behaviour)));
    let port = free_port();
    let text = site(&link, port, "").replace(
        "probation = \"600ms\"",
        "probation = \"600ms\"\nwarmup = [\"/\", \"/warm?up=1\"]",
    );
    let (agent, steering) = start_web(&text, 4, "io_uring", true);
    if steering != "ebpf" {
        point(&link, &release(root.path(), "r2", None));
        let run = deploy(&agent, &["web"]);
        assert_eq!(run.code, Some(2), "{}", run.text());
        assert!(run.text().contains("deploy.warmup"), "{}", run.text());
        assert!(
            !require_all(),
            "eBPF steering must be available as root: {steering}"
        );
        common::skip("a warm-up needs eBPF steering");
        return;
    }
    let load = Load::start(port, if in_vm() { 2 } else { 4 });
    load.wait_for(1, 10);
    point(&link, &release(root.path(), "r2", Some(behaviour)));
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let text = run.text();
    eprintln!(
        "{behaviour}: {}",
        text.lines().find(|l| l.contains("warmed up")).unwrap_or("")
    );
    let warmed = text
        .find("gen-2: warmed up: each of its 4 workers answered all 2 warm-up requests")
        .unwrap_or_else(|| {
            let log = agent.agent_log();
            let warm: Vec<&str> = log.lines().filter(|l| l.contains("warm-up")).collect();
            panic!("no warm-up reported:\n{text}\n{}", warm.join("\n"))
        });
    let flipped = text.find("gen-2 serves").expect("flipped");
    assert!(warmed < flipped, "warmed up before the flip:\n{text}");
    let (flip, _) = last_flip(&agent);
    load.wait_for(2, 10);
    let samples = load.finish();
    let failures = failed(&samples);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        samples.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
    for s in &samples {
        if s.outcome == Ok(2) {
            assert!(
                s.connected.expect("connected") >= flip,
                "a request of the load reached gen-2 before its flip"
            );
        }
    }
    // Every new worker answered both warm-up requests (its own words, in the site's log,
    // which the agent writes as it reads the workers' output).
    let wanted: Vec<String> = (0..4)
        .flat_map(|id| {
            ["/", "/warm?up=1"].map(|path| {
                format!("demo worker {id} of generation 2: get {path} http/1.1 (hatchery-warmup)")
            })
        })
        .collect();
    let read_log = || {
        String::from_utf8_lossy(&agent.cli(&["logs", "web", "-n", "1000000"]).stdout).into_owned()
    };
    let mut log = String::new();
    wait_until(
        "the warm-up lines in the site's log",
        Duration::from_secs(30),
        || {
            log = read_log();
            wanted.iter().all(|l| log.contains(l.as_str()))
        },
    );
    assert!(
        !log.contains("of generation 1: get / http/1.1 (hatchery-warmup)"),
        "the warm-up reached the serving generation"
    );
}

/// Site `web` whose one worker binds `127.0.0.1:port` itself (`mode = "own"`), without
/// `SO_REUSEPORT`: a worker started while another still holds the port fails with
/// `EADDRINUSE` (and its deploy would roll back).
fn own_port_site(link: &Path, port: u16) -> String {
    let timeout = if in_vm() { "20s" } else { "8s" };
    format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker", "--behaviour-from", "{{release}}", "--bind", "127.0.0.1:{port}"]
workers = 1
release = "{}"
[[listen]]
tcp = "127.0.0.1:{port}"
mode = "own"
[ready]
check = "http"
timeout = "{timeout}"
[stop]
timeout = "10s"
[deploy]
probation = "300ms"
"#,
        link.display()
    )
}

#[test]
fn an_own_port_site_deploys_by_stop_then_start_and_a_failed_release_starts_the_old_one_again() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    point(&link, &release(root.path(), "r1", None));
    let port = free_port();
    let (agent, steering) = start_web(&own_port_site(&link, port), 1, "io_uring", true);
    // Nothing for eBPF to steer (the agent binds nothing), and the http check probes
    // the app's port directly: the deploy is not refused for want of steering.
    assert_ne!(steering, "ebpf");
    let s = agent.status("web");
    assert_eq!(
        s["listen"][0],
        format!("tcp 127.0.0.1:{port} (own)"),
        "{s:#}"
    );
    assert!(
        s["deploys"]
            .as_str()
            .is_some_and(|d| d.starts_with("stop-then-start: web binds its own port")),
        "{s:#}"
    );
    let (_, old_pids) = serving(&agent);

    let load = Load::start(port, if in_vm() { 2 } else { 4 });
    load.wait_for(1, 20);
    point(&link, &release(root.path(), "r2", None));
    let run = deploy(&agent, &["web"]);
    // Done: gen-2's worker bound the port (it would have failed with EADDRINUSE next to a
    // worker of gen-1, and the deploy rolled back).
    assert_eq!(run.code, Some(0), "{}", run.text());
    let text = run.text();
    let said = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("the deploy did not say {needle:?}:\n{text}"))
    };
    assert!(
        said("stop-then-start: web binds its own port") < said("gen-1: stopping all its workers")
    );
    // The agent starts gen-2 only once gen-1's last process is gone: after it told of
    // the stop, and with the old pid gone by the time gen-2's worker is reported.
    assert!(said("gen-1: stopping all its workers") < said("gen-2: w-0 started"));
    assert!(said("gen-2: w-0 started") < said("gen-2 serves"), "{text}");
    for p in &old_pids {
        assert!(!alive(*p), "gen-1's worker {p} still runs");
    }
    assert!(
        text.contains("stop-then-start: the only generation"),
        "{text}"
    );
    load.wait_for(2, 20);

    // A release that exits at start: gen-3 is stopped and gen-2 starts again.
    let before = load
        .answers
        .lock()
        .expect("answers")
        .get(&2)
        .copied()
        .unwrap_or(0);
    point(&link, &release(root.path(), "r3", Some("exit")));
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(4), "{}", run.text());
    let text = run.text();
    assert!(
        text.contains("stopping gen-3; gen-2 starts again"),
        "{text}"
    );
    assert!(text.contains("gen-2 was started again"), "{text}");
    let s = agent.status("web");
    assert_eq!(s["generation"], 2, "{s:#}");
    load.wait_for(2, before + 20);
    let samples = load.finish();

    // Never two generations bound at once, as the load saw it: every answer of gen-1
    // came on a connection made before the first answer of gen-2, and gen-3 never
    // answered. (Between them the port was closed: some connections were refused.)
    let connected = |g: u32| {
        samples
            .iter()
            .filter(|s| s.outcome.as_ref().is_ok_and(|x| *x == g))
            .filter_map(|s| s.connected)
            .collect::<Vec<_>>()
    };
    let last1 = connected(1).into_iter().max().expect("gen-1 answered");
    let first2 = connected(2).into_iter().min().expect("gen-2 answered");
    assert!(
        last1 < first2,
        "gen-1 answered a connection made after gen-2 had answered"
    );
    assert!(connected(3).is_empty(), "gen-3 answered");
    let refused = failed(&samples).len();
    eprintln!(
        "{} requests; {refused} failed while no generation was bound (stop-then-start)",
        samples.len()
    );
}

/// `GET /` on `127.0.0.1:port`: the body, if it answered 200.
fn get_body(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nhost: t\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.0 200")
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// The README's example of a server that binds its own port, for real:
/// `python3 -m http.server` serving each release's directory.
#[test]
fn python_http_server_binding_its_own_port_is_deployed_by_stop_then_start() {
    let Some((python, _)) = gunicorn() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    for r in ["r1", "r2"] {
        let dir = release(root.path(), r, None);
        std::fs::write(dir.join("index.html"), format!("release {r}\n")).expect("index");
    }
    point(&link, &root.path().join("releases/r1"));
    let port = free_port();
    let timeout = if in_vm() { "30s" } else { "10s" };
    let text = format!(
        r#"name = "web"
command = ["{}", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "{{release}}", "{port}"]
release = "{}"
[[listen]]
tcp = "127.0.0.1:{port}"
mode = "own"
[ready]
check = "http"
timeout = "{timeout}"
[deploy]
probation = "300ms"
"#,
        python.display(),
        link.display()
    );
    let (agent, _) = start_web(&text, 1, "epoll", true);
    assert_eq!(get_body(port).as_deref(), Some("release r1\n"));
    point(&link, &root.path().join("releases/r2"));
    let run = deploy(&agent, &["web"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(
        run.text().contains(&format!(
            "stop-then-start: web binds its own port 127.0.0.1:{port}"
        )),
        "{}",
        run.text()
    );
    assert_eq!(get_body(port).as_deref(), Some("release r2\n"));
    assert_eq!(agent.status("web")["generation"], 2);
}

/// An agent SIGKILLed under load is replaced by one that adopts its workers (issue 11):
/// the workers answer on their own while no agent runs, and the new agent takes them
/// back, same pids, same generation, the listeners taken from them and steering attached
/// again, without a failed request. A worker killed afterwards is seen through its pidfd
/// (it is not the new agent's child) and restarted; a deploy works on the adopted site.
#[test]
fn an_agent_killed_under_load_is_replaced_by_one_that_adopts_its_workers() {
    for cgroups in [false, true] {
        let root = tempfile::tempdir().expect("tempdir");
        let link = root.path().join("current");
        point(&link, &release(root.path(), "r1", None));
        let port = free_port();
        let text = site(&link, port, "");
        let (mut agent, steering) = start_web(&text, 4, "io_uring", cgroups);
        let (g1, mut before) = serving(&agent);
        before.sort_unstable();
        let g1 = u32::try_from(g1).expect("a generation number");
        let load = Load::start(port, 4);
        load.wait_for(g1, 20);
        // The steering maps, by id, as the record says.
        let record = agent.dir.path().join("state/workers.json");
        let maps = || -> serde_json::Value {
            let text = std::fs::read_to_string(&record).expect("the record");
            serde_json::from_str::<serde_json::Value>(&text).expect("json")["sites"][0]["steering"]
                .clone()
        };
        let maps_before = maps();
        agent.crash();
        // Served while no agent runs.
        let answered = load.answers.lock().expect("answers").get(&g1).copied();
        load.wait_for(g1, answered.unwrap_or(0) + 20);
        agent.relaunch();
        let s = agent.wait_for("web", "4 ready workers", Duration::from_secs(20), |s| {
            s["ready"] == 4
        });
        let (g, mut after) = serving(&agent);
        after.sort_unstable();
        assert_eq!(g, u64::from(g1), "{s:#}");
        assert_eq!(after, before, "the same workers, adopted: {s:#}");
        assert_eq!(s["steering"], steering.as_str(), "{s:#}");
        if steering == "ebpf" {
            assert!(maps_before[0].is_array(), "{maps_before}");
            assert_eq!(
                maps(),
                maps_before,
                "the same steering maps, recovered by id"
            );
        }
        let log = agent.agent_log();
        assert!(
            log.contains("adopting 4 workers of a previous agent"),
            "{log}"
        );
        let check = |samples: Vec<Sample>, when: &str| {
            let bad = failed(&samples);
            assert!(
                bad.is_empty(),
                "cgroups {cgroups}, {when}: {} of {} requests failed: {:?}",
                bad.len(),
                samples.len(),
                bad.iter().take(5).collect::<Vec<_>>()
            );
        };
        check(load.finish(), "through the crash and the adoption");
        // A worker killed now (without load: its requests in flight would fail) is seen
        // and restarted.
        let victim = before[0];
        let killed = Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let s = agent.wait_for(
            "web",
            "the killed worker restarted",
            Duration::from_secs(20),
            |s| {
                s["ready"] == 4
                    && s["workers"]
                        .as_array()
                        .is_some_and(|ws| ws.iter().all(|w| w["pid"] != victim))
            },
        );
        let restarts: Vec<u64> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["restarts"].as_u64())
            .collect();
        assert_eq!(restarts.iter().sum::<u64>(), 1, "counted as a crash: {s:#}");
        // A deploy under load works on the adopted site.
        let load = Load::start(port, 4);
        load.wait_for(g1, 10);
        point(&link, &release(root.path(), "r2", None));
        let run = deploy(&agent, &["web"]);
        assert_eq!(run.code, Some(0), "{}", run.text());
        load.wait_for(g1 + 1, 20);
        check(load.finish(), "through a deploy after the adoption");
        assert_eq!(agent.stop(), Some(0));
    }
}

/// An agent SIGKILLed while the old generation drains after a deploy's flip (issue 11):
/// the new agent adopts the generation that serves, the old one's workers are stopped
/// (their drain goes on: `slow-stop` holds them until the test lets them go) and its
/// generation retired, and no request fails.
#[test]
fn an_agent_killed_while_a_generation_drains_is_replaced_and_the_drain_finishes() {
    let root = tempfile::tempdir().expect("tempdir");
    let link = root.path().join("current");
    let r1 = release(root.path(), "r1", Some("slow-stop"));
    point(&link, &r1);
    let port = free_port();
    // gen-1 must still be stopping when the agent is killed, however slow the machine: its
    // stop timeout is longer than the test.
    let text =
        site(&link, port, "").replace("[stop]\ntimeout = \"10s\"", "[stop]\ntimeout = \"300s\"");
    assert!(text.contains("300s"), "{text}");
    let (mut agent, _) = start_web(&text, 4, "io_uring", true);
    let load = Load::start(port, 4);
    load.wait_for(1, 10);
    point(&link, &release(root.path(), "r2", None));
    let cli = deploy_in_background(&agent);
    wait_until(
        "gen-2 serving while gen-1 drains",
        Duration::from_secs(60),
        || {
            let gens = generations(&agent);
            agent.status("web")["generation"] == 2 && gens.iter().any(|g| g.0 == 1)
        },
    );
    let (_, mut serving_pids) = serving(&agent);
    serving_pids.sort_unstable();
    agent.crash();
    let out = cli.join().expect("deploy thread");
    assert!(
        !out.status.success(),
        "the deploy's client lost its agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.relaunch();
    let log = agent.agent_log();
    assert!(
        log.contains("adopting 8 workers of a previous agent"),
        "{log}"
    );
    // gen-1 drains on, its workers stopped again by the new agent, until they finish.
    let gens = generations(&agent);
    assert!(gens.iter().any(|g| g.0 == 1), "{gens:?}");
    std::fs::write(r1.join("finish-stop"), "").expect("let gen-1 finish");
    let s = agent.wait_for(
        "web",
        "gen-2 alone, 4 ready",
        Duration::from_secs(30),
        |s| {
            s["generation"] == 2
                && s["ready"] == 4
                && s["generations"].as_array().is_some_and(|g| g.len() == 1)
        },
    );
    let (_, mut adopted) = serving(&agent);
    adopted.sort_unstable();
    assert_eq!(adopted, serving_pids, "gen-2's workers adopted: {s:#}");
    let answered = load.answers.lock().expect("answers").get(&2).copied();
    load.wait_for(2, answered.unwrap_or(0) + 20);
    let samples = load.finish();
    let bad = failed(&samples);
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {:?}",
        bad.len(),
        samples.len(),
        bad.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(agent.stop(), Some(0));
}

/// Where a site listens, for [`answer`].
enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

/// One request to `target`: the answer's body, or why there is none.
fn answer(target: &Target) -> Result<String, String> {
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let mut text = String::new();
    let t = Some(Duration::from_secs(5));
    match target {
        Target::Tcp(port) => {
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", *port)).map_err(|e| e.to_string())?;
            s.set_read_timeout(t).map_err(|e| e.to_string())?;
            s.write_all(request).map_err(|e| e.to_string())?;
            s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        }
        Target::Unix(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
            s.set_read_timeout(t).map_err(|e| e.to_string())?;
            s.write_all(request).map_err(|e| e.to_string())?;
            s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        }
    }
    text.split("\r\n\r\n")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

#[test]
fn a_listener_a_serving_worker_shuts_down_is_replaced_by_a_deploy_of_the_same_release() {
    if !is_root() && skip("eBPF steering needs root") {
        return;
    }
    // A TCP address, steered (each generation has a socket of its own) where the host
    // steers, and a unix one, whose socket generations share.
    let sock = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("tcp", Target::Tcp(free_port())),
        ("unix", Target::Unix(sock.path().join("web.sock"))),
    ];
    for (kind, target) in cases {
        let root = tempfile::tempdir().expect("tempdir");
        let link = root.path().join("current");
        let r1 = release(root.path(), "r1", Some("shut-when-told"));
        point(&link, &r1);
        let listen = match &target {
            Target::Tcp(port) => format!("tcp = \"127.0.0.1:{port}\""),
            Target::Unix(path) => format!("unix = \"{}\"", path.display()),
        };
        let text = format!(
            r#"name = "web"
command = ["{BIN}", "__demo-worker", "--behaviour-from", "{{release}}"]
workers = 2
release = "{}"
[[listen]]
name = "http"
{listen}
[ready]
check = "notify"
timeout = "30s"
[stop]
timeout = "10s"
[deploy]
probation = "300ms"
"#,
            link.display()
        );
        let (mut agent, _) = start_web(&text, 2, "io_uring", true);
        let body = answer(&target).expect("gen-1 answers");
        assert!(body.contains("generation 1, release r1"), "[{kind}] {body}");
        // The next release is already in place: only the one that runs is deployed again.
        let r2 = release(root.path(), "r2", None);
        point(&link, &r2);
        // A worker shuts the listener down; the agent sees it at once, says so and
        // deploys r1 again as gen-2, with a listener that accepts.
        std::fs::write(r1.join("shut"), b"").expect("shut");
        wait_until(
            &format!("[{kind}] the shutdown told"),
            Duration::from_secs(20),
            || !listener_shut_events(&agent).is_empty(),
        );
        wait_until(
            &format!("[{kind}] gen-2 of r1 answering"),
            Duration::from_secs(60),
            || answer(&target).is_ok_and(|b| b.contains("generation 2, release r1")),
        );
        for _ in 0..20 {
            let body = answer(&target).expect("answered");
            assert!(body.contains("generation 2, release r1"), "[{kind}] {body}");
        }
        wait_until(
            &format!("[{kind}] the deploy done and gen-1 retired"),
            Duration::from_secs(30),
            || {
                let s = agent.status("web");
                s["generation"] == 2
                    && s["deploy"].is_null()
                    && s["workers"]
                        .as_array()
                        .is_some_and(|w| w.iter().all(|w| w["generation"] == 2))
            },
        );
        // The new listener deploys as any: steered (where TCP was), no request failed.
        let load = match &target {
            Target::Tcp(port) => {
                let load = Load::start(*port, 4);
                load.wait_for(2, 20);
                Some(load)
            }
            Target::Unix(_) => None,
        };
        let run = deploy(&agent, &["web"]);
        assert_eq!(run.code, Some(0), "[{kind}] {}", run.text());
        let body = answer(&target).expect("gen-3 answers");
        assert!(body.contains("generation 3, release r2"), "[{kind}] {body}");
        if let Some(load) = load {
            assert_eq!(
                agent.status("web")["steering"],
                "ebpf",
                "[{kind}] the new listener's steering"
            );
            assert!(run.text().contains("eBPF steering"), "{}", run.text());
            load.wait_for(3, 20);
            let samples = load.finish();
            assert!(failed(&samples).is_empty(), "{:?}", failed(&samples));
        }
        let said = listener_shut_events(&agent);
        assert_eq!(agent.stop(), Some(0), "[{kind}]");
        assert_eq!(said.len(), 1, "[{kind}] {said:#?}");
        assert_eq!(said[0]["gen"], 1, "[{kind}] {said:#?}");
        assert_eq!(said[0]["reason"], "redeploy", "[{kind}] {said:#?}");
        assert_eq!(said[0]["to"], 2, "[{kind}] {said:#?}");
        let message = said[0]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("listener http") && message.contains("shut down"),
            "[{kind}] {message}"
        );
    }
}

/// The `listener_shut` events of `web`.
fn listener_shut_events(agent: &TestAgent) -> Vec<serde_json::Value> {
    let out = agent.cli(&["events", "web", "-n", "1000", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "listener_shut")
        .collect()
}

//! The cost of cgroup v2 accounting (issue 3), measured against the real agent:
//!
//! 1. `status`: agent CPU and wall time to read and report the memory, pids and CPU of
//!    N workers (`memory.current`, `memory.peak`, `memory.events`, `pids.current`,
//!    `cpu.stat` of every leaf), N = 1000 by default (`BENCH_WORKERS`).
//! 2. Idle sampling: agent CPU over 30 s while a budgeted site of N workers is
//!    re-measured for its memory cap (every 10 s once settled).
//! 3. OOM to status: time from the kernel's OOM kill of a worker (its leaf's
//!    `memory.events` `oom_kill` count moving) to `status` showing `oom-killed`.
//!
//! Needs root and a cgroup v2 memory controller, so it runs in a VM:
//! `vm-tests/run --kernel 6.12 --bench accounting` (figures in BENCHMARKS.md). Without
//! them it says why and exits 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hatchery::control::{Client, Reply, Request};

const BIN: &str = env!("CARGO_BIN_EXE_hatchery");

fn main() {
    let workers: u32 = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let Some(mount) = hatchery::cgroup::cgroup2_mount() else {
        println!("accounting bench: skipped: no cgroup2 mount");
        return;
    };
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory")
        || !rustix::process::geteuid().is_root()
    {
        println!(
            "accounting bench: skipped: needs root and the cgroup v2 memory controller (run it in vm-tests)"
        );
        return;
    }
    println!(
        "accounting bench on Linux {}, {} CPUs",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    status_cost(&mount, workers);
    oom_to_status(&mount);
}

struct Agent {
    dir: PathBuf,
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(mount: &Path, name: &str, site: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("hatchery-bench-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sites.d")).expect("mkdir");
        std::fs::write(dir.join("sites.d/site.toml"), site).expect("site");
        let socket = dir.join("control.sock");
        std::fs::write(
            dir.join("hatchery.toml"),
            format!(
                "control_socket = \"{}\"\nstate_dir = \"{}\"\nsites_dir = \"{}\"\ncgroup_base = \"{}\"\n",
                socket.display(),
                dir.join("state").display(),
                dir.join("sites.d").display(),
                mount.join(format!("hatchery-bench-{name}")).display()
            ),
        )
        .expect("agent file");
        let mut child = Command::new(BIN)
            .args(["agent", "--config"])
            .arg(dir.join("hatchery.toml"))
            .env("HATCHERY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
            .spawn()
            .expect("spawn agent");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Client::connect(&socket).is_err() {
            let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the agent exited with {st}: {}", log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up: {}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { dir, child, socket }
    }

    fn status(&self) -> serde_json::Value {
        let mut c = Client::connect(&self.socket).expect("connect");
        match c
            .call(
                &Request::Status {
                    site: Some("site".into()),
                },
                |_| {},
            )
            .expect("status")
        {
            Reply::Ok(v) => v["sites"][0].clone(),
            other => panic!("status: {other:?}"),
        }
    }

    fn wait_ready(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.status()["ready"] != n {
            assert!(
                Instant::now() < deadline,
                "{n} workers not ready: {}",
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The agent's user + system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("agent stat");
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the state.
        let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        let hz = rustix::param::clock_ticks_per_second();
        Duration::from_micros(ticks * 1_000_000 / hz)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn status_cost(mount: &Path, workers: u32) {
    let site = format!(
        "name = \"site\"\ncommand = [\"{BIN}\", \"__probe\", \"sleep\"]\nworkers = {workers}\nmemory = \"4G\"\nworker_memory = \"4M\"\n"
    );
    let agent = Agent::start(mount, "status", &site);
    let t0 = Instant::now();
    agent.wait_ready(u64::from(workers), Duration::from_secs(600));
    println!(
        "{workers} workers ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Let the cap settle so the idle measurement sees steady sampling.
    std::thread::sleep(Duration::from_secs(12));

    let calls = 20;
    let mut wall = Vec::new();
    let cpu0 = agent.cpu();
    for _ in 0..calls {
        let t = Instant::now();
        let s = agent.status();
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            s["workers"].as_array().map(Vec::len),
            Some(workers as usize)
        );
        assert!(
            s["workers"][0]["usage"]["memory_current"].is_u64(),
            "no usage: {s}"
        );
    }
    let cpu = agent.cpu().saturating_sub(cpu0);
    println!(
        "status of {workers} workers with usage: median {:.1} ms wall, agent CPU {:.1} ms per call ({calls} calls)",
        median(&mut wall),
        cpu.as_secs_f64() * 1e3 / f64::from(calls)
    );

    let cpu0 = agent.cpu();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let cpu = agent.cpu().saturating_sub(cpu0);
    println!(
        "idle with a budgeted site of {workers} workers (re-measured every 10 s): agent CPU {:.0} ms over {:.0} s ({:.3} %)",
        cpu.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64(),
        cpu.as_secs_f64() / t.elapsed().as_secs_f64() * 100.0
    );
}

fn oom_to_status(mount: &Path) {
    let site = format!(
        "name = \"site\"\ncommand = [\"{BIN}\", \"__probe\", \"alloc\", \"64M\"]\nworkers = 1\nmemory_max = \"32M\"\n[restart]\nbackoff_initial = \"300ms\"\nbackoff_max = \"300ms\"\n[restart.flapping]\nexits = 1000\nwithin = \"1s\"\n"
    );
    let agent = Agent::start(mount, "oom", &site);
    let events = mount.join("hatchery-bench-oom/sites/site/gen-1/w-0/memory.events");
    let kills: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let kills = kills.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let n = std::fs::read_to_string(&events)
                    .ok()
                    .and_then(|t| hatchery::cgroup::keyed_value(&t, "oom_kill"))
                    .unwrap_or(last);
                if n > last {
                    last = n;
                    kills.lock().expect("lock").push(Instant::now());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let samples = 10;
    let mut seen: Vec<Instant> = Vec::new();
    let mut had_pid = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < samples && Instant::now() < deadline {
        let s = agent.status();
        let w = &s["workers"][0];
        let has_pid = w["pid"].is_i64();
        if had_pid && !has_pid && w["last_exit"] == "oom-killed" {
            seen.push(Instant::now());
        }
        had_pid = has_pid;
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let kills = kills.lock().expect("lock").clone();
    // Each observation belongs to the latest kill before it.
    let mut lat: Vec<f64> = seen
        .iter()
        .filter_map(|s| kills.iter().rev().find(|k| *k <= s).map(|k| (k, s)))
        .map(|(k, s)| s.saturating_duration_since(*k).as_secs_f64() * 1e3)
        .collect();
    if lat.is_empty() {
        println!("OOM to status: no OOM kill observed");
        return;
    }
    let n = lat.len();
    let max = lat.iter().copied().fold(0.0, f64::max);
    println!(
        "OOM kill to `oom-killed` in status: median {:.1} ms, max {:.1} ms ({n} kills; status polled every ~1 ms)",
        median(&mut lat),
        max
    );
    let _ = std::io::stdout().flush();
}

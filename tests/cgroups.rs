//! cgroup v2 limits and accounting against the real kernel: these need root and the
//! memory and pids controllers (they run in vm-tests; on a host without them they skip,
//! and fail when HATCHERY_TEST_REQUIRE=all).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Root with the memory and pids controllers available under the cgroup2 mount.
fn cgroup_controllers() -> bool {
    if !is_root() {
        return !skip("needs root");
    }
    let Some(mount) = hatchery::cgroup::cgroup2_mount() else {
        return !skip("no cgroup2 mount");
    };
    let offered = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    if !(offered.contains("memory") && offered.contains("pids")) {
        return !skip(&format!(
            "no memory and pids controllers in {} (offered: {offered:?})",
            mount.display()
        ));
    }
    true
}

fn probe_site(name: &str, workers: u32, script: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nworkers = {workers}\n{extra}"
    )
}

#[test]
fn a_worker_past_its_memory_max_is_oom_killed_reported_and_restarted_alone() {
    if !cgroup_controllers() {
        return;
    }
    let hog = probe_site(
        "hog",
        2,
        &format!(
            "if [ $HATCHERY_WORKER_ID = 0 ]; then exec {BIN} __probe alloc 200M; else exec {BIN} __probe sleep; fi"
        ),
        "memory_max = \"48M\"\n[restart]\nbackoff_initial = \"200ms\"\nflapping = { exits = 100, within = \"10s\" }\n",
    );
    let calm = probe_site(
        "calm",
        1,
        &format!("exec {BIN} __probe alloc 8M"),
        "memory = \"128M\"\n",
    );
    let agent = TestAgent::start(
        &[("hog", &hog), ("calm", &calm)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let calm_pid = agent.wait_for("calm", "calm ready", Duration::from_secs(20), |s| {
        s["ready"] == 1
    })["workers"][0]["pid"]
        .clone();
    let first = agent.wait_for("hog", "w-1 up", Duration::from_secs(20), |s| {
        s["workers"][1]["pid"].is_i64()
    });
    let sibling = first["workers"][1]["pid"].clone();
    let s = agent.wait_for("hog", "an OOM kill of w-0", Duration::from_secs(30), |s| {
        s["workers"][0]["last_exit"] == "oom-killed"
            && s["workers"][0]["restarts"].as_u64() >= Some(1)
    });
    assert_eq!(s["workers"][1]["pid"], sibling, "the sibling is untouched");
    assert_eq!(s["workers"][1]["restarts"], 0);
    assert_eq!(
        agent.status("calm")["workers"][0]["pid"],
        calm_pid,
        "the other site is untouched"
    );
    let log = agent.agent_log();
    assert!(
        log.contains("oom-killed"),
        "the agent log says oom-killed: {log}"
    );
    // The event history says it too: an exit of w-0 told as an OOM kill, then its restart.
    let out = agent.cli(&["events", "hog", "-n", "1000", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let history: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let oom = history
        .iter()
        .position(|e| e["kind"] == "exited" && e["exit"] == "oom" && e["worker"] == 0)
        .unwrap_or_else(|| panic!("no OOM-kill event: {history:#?}"));
    assert_eq!(history[oom]["crash"], true);
    assert_eq!(history[oom]["signal"], "SIGKILL");
    assert!(
        history[oom..]
            .iter()
            .any(|e| e["kind"] == "started" && e["worker"] == 0),
        "a restart follows: {history:#?}"
    );
}

/// A worker (no limit of its own: its site's budget) OOM-killed after it ran `healthy_after`
/// and a second is restarted at once, in a fresh leaf: a leaf is reused only by a crash
/// that was not an OOM kill (its `memory.events` count would say every later SIGKILL of the
/// slot was one). The next, killed by `kill -9`, is told as such, and replaced in its leaf.
#[test]
fn an_oom_killed_leaf_is_not_reused_and_a_later_kill_is_not_told_as_oom() {
    if !cgroup_controllers() {
        return;
    }
    let marker = std::env::temp_dir().join(format!("hatchery-oom-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let m = marker.display();
    let site = probe_site(
        "once",
        1,
        &format!(
            "if [ -e {m} ]; then exec {BIN} __probe sleep; else touch {m}; sleep 1.2; exec {BIN} __probe alloc 200M; fi"
        ),
        "memory = \"64M\"\n[restart]\nbackoff_initial = \"10ms\"\nhealthy_after = \"200ms\"\n",
    );
    let agent = TestAgent::start(
        &[("once", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let leaf_of = |s: &serde_json::Value| {
        use std::os::unix::fs::MetadataExt;
        let leaf = s["workers"][0]["cgroup"]
            .as_str()
            .expect("a leaf")
            .to_string();
        (std::fs::metadata(&leaf).expect("the leaf").ino(), leaf)
    };
    let first = agent.wait_for("once", "w-0 up", Duration::from_secs(20), |s| {
        s["workers"][0]["pid"].is_i64()
    });
    let (first_leaf, _) = leaf_of(&first);
    let second = agent.wait_for(
        "once",
        "w-0 OOM-killed and back",
        Duration::from_secs(30),
        |s| {
            s["workers"][0]["last_exit"] == "oom-killed"
                && s["workers"][0]["restarts"] == 1
                && s["workers"][0]["state"] == "ready"
                && s["workers"][0]["uptime_ms"]
                    .as_u64()
                    .is_some_and(|u| u >= 1200)
        },
    );
    let (second_leaf, path) = leaf_of(&second);
    assert_ne!(
        second_leaf, first_leaf,
        "a fresh leaf after an OOM kill: {second:#}"
    );
    let pid = second["workers"][0]["pid"].as_i64().expect("pid");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let third = agent.wait_for(
        "once",
        "w-0 killed and back",
        Duration::from_secs(30),
        |s| s["workers"][0]["restarts"] == 2 && s["workers"][0]["state"] == "ready",
    );
    let _ = std::fs::remove_file(&marker);
    assert_eq!(
        third["workers"][0]["last_exit"], "killed by SIGKILL",
        "not an OOM kill: {third:#}"
    );
    let (third_leaf, third_path) = leaf_of(&third);
    // What to look at first when it is not (the status is long).
    let log = agent.agent_log();
    let about_w0: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker=0") || l.contains("w-0"))
        .collect();
    assert_eq!(
        (third_leaf, &third_path),
        (second_leaf, &path),
        "replaced in its own leaf, {path} (inode {second_leaf}), not {third_path} (inode {third_leaf}): the agent's lines of w-0:\n{}\n{third:#}",
        about_w0.join("\n")
    );
}

#[test]
fn a_fork_bomb_stops_at_pids_max_while_another_site_serves() {
    if !cgroup_controllers() {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let bomb = probe_site(
        "bomb",
        1,
        &format!("exec {BIN} __probe spawn-forever"),
        "pids_max = 16\n[stop]\ntimeout = \"1s\"\n",
    );
    let web = format!(
        "name = \"web\"\ncommand = [\"{BIN}\", \"__demo-worker\"]\nworkers = 2\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\n[ready]\ncheck = \"notify\"\n"
    );
    let agent = TestAgent::start(
        &[("bomb", &bomb), ("web", &web)],
        Options {
            reactor: "epoll",
            cgroups: true,
        },
    );
    agent.wait_for("web", "web ready", Duration::from_secs(20), |s| {
        s["ready"] == 2
    });
    let s = agent.wait_for(
        "bomb",
        "the bomb at its limit",
        Duration::from_secs(20),
        |s| s["usage"]["pids"].as_u64() >= Some(14),
    );
    std::thread::sleep(Duration::from_millis(500));
    let s2 = agent.status("bomb");
    assert!(
        s2["usage"]["pids"].as_u64() <= Some(16),
        "pids.max holds: {s2:#}"
    );
    assert_eq!(s["limits"]["pids_max"], 16);
    for _ in 0..20 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        std::io::Write::write_all(&mut c, b"GET / HTTP/1.0\r\n\r\n").expect("write");
        let mut body = String::new();
        std::io::Read::read_to_string(&mut c, &mut body).expect("read");
        assert!(body.contains("hello from worker"), "{body}");
    }
    let t0 = Instant::now();
    let out = agent.cli(&["stop", "bomb"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let s = agent.status("bomb");
    assert_eq!(s["usage"]["pids"], 0, "the whole bomb is gone: {s:#}");
}

/// A site at its `pids_max` exactly (one process per worker, as many workers as the limit
/// allows): a crashed worker's replacement starts at once, every time. The crashed worker,
/// a zombie until it is reaped, still counts in `pids.current`: it is reaped before the
/// start (where a site has no `pids_max`, after).
#[test]
fn a_crash_at_pids_max_is_restarted_at_once() {
    if !cgroup_controllers() {
        return;
    }
    let site = probe_site(
        "full",
        2,
        &format!("exec {BIN} __probe sleep"),
        "pids_max = 2\n[restart]\nhealthy_after = \"0s\"\nbackoff_initial = \"1ms\"\n\
         flapping = { exits = 100, within = \"1s\" }\n",
    );
    let agent = TestAgent::start(
        &[("full", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    crash_w0_and_see_each_restart(&agent, "full", 5);
}

#[test]
fn usage_and_limits_show_in_status() {
    if !cgroup_controllers() {
        return;
    }
    let site = probe_site(
        "acct",
        2,
        &format!("exec {BIN} __probe alloc 24M"),
        "memory = \"256M\"\nmemory_max = \"64M\"\nmemory_high = \"60M\"\ncpu_weight = 50\n",
    );
    let agent = TestAgent::start(
        &[("acct", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let s = agent.wait_for("acct", "memory charged", Duration::from_secs(20), |s| {
        s["workers"].as_array().is_some_and(|w| {
            w.len() == 2
                && w.iter()
                    .all(|w| w["usage"]["memory_current"].as_u64() >= Some(24 << 20))
        })
    });
    assert_eq!(s["usage"]["memory_max"], 256u64 << 20);
    assert!(
        s["usage"]["memory_current"].as_u64() >= Some(48 << 20),
        "{s:#}"
    );
    assert_eq!(s["workers"][0]["usage"]["memory_max"], 64u64 << 20);
    assert!(
        s["limits"]["not_enforced"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{s:#}"
    );
    let leaf = s["workers"][0]["cgroup"].as_str().expect("cgroup");
    assert!(leaf.ends_with("/sites/acct/gen-1/w-0"), "{leaf}");
    assert_eq!(
        std::fs::read_to_string(format!("{leaf}/memory.high"))
            .expect("read")
            .trim(),
        (60u64 << 20).to_string()
    );
    assert_eq!(
        std::fs::read_to_string(format!("{leaf}/memory.oom.group"))
            .expect("read")
            .trim(),
        "1"
    );
    // The site's CPU weight is its cgroup's; below it no cgroup is a scheduling group of its
    // own (no cpu controller: a run queue per CPU per worker saved), and the CPU time of a
    // worker and of its generation are still read.
    let read = |p: &Path| std::fs::read_to_string(p).expect("read");
    let leaf = Path::new(leaf);
    let gen_dir = leaf.parent().expect("generation");
    let site_dir = gen_dir.parent().expect("site");
    assert_eq!(read(&site_dir.join("cpu.weight")).trim(), "50");
    for dir in [gen_dir, leaf] {
        let controllers = read(&dir.join("cgroup.controllers"));
        let controllers: Vec<&str> = controllers.split_whitespace().collect();
        assert!(
            controllers.contains(&"memory") && controllers.contains(&"pids"),
            "{}: {controllers:?}",
            dir.display()
        );
        assert!(
            !controllers.contains(&"cpu"),
            "{}: {controllers:?}",
            dir.display()
        );
        // The worker touched 24 MB: some CPU time, counted without the controller.
        let stat = read(&dir.join("cpu.stat"));
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        assert!(usec > Some(0), "{}: {stat}", dir.display());
    }
    assert!(
        s["workers"][0]["usage"]["cpu_usec"].as_u64().is_some(),
        "{s:#}"
    );
}

#[test]
fn an_adopted_site_loses_the_cpu_controller_below_it() {
    if !cgroup_controllers() {
        return;
    }
    let site = probe_site(
        "old",
        2,
        &format!("exec {BIN} __probe sleep"),
        "cpu_weight = 50\n",
    );
    let mut agent = TestAgent::start_ready(
        &[("old", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
        "old",
        2,
    );
    let s = agent.status("old");
    let leaf = Path::new(s["workers"][0]["cgroup"].as_str().expect("cgroup")).to_path_buf();
    let gen_dir = leaf.parent().expect("generation").to_path_buf();
    let site_dir = gen_dir.parent().expect("site").to_path_buf();
    let read = |p: &Path| std::fs::read_to_string(p).expect("read");
    let offered = read(&site_dir.join("cgroup.controllers"));
    if !offered.split_whitespace().any(|c| c == "cpu")
        && skip(&format!("no cpu controller for {}", site_dir.display()))
    {
        return;
    }
    // As an earlier agent left them: `cpu` enabled down to every worker's leaf.
    for dir in [&site_dir, &gen_dir] {
        std::fs::write(dir.join("cgroup.subtree_control"), "+cpu").expect("+cpu");
    }
    assert!(
        leaf.join("cpu.weight").exists(),
        "the leaf is a scheduling group"
    );
    let pids = agent.pids("old");
    agent.crash();
    agent.relaunch();
    agent.wait_for("old", "2 adopted workers", Duration::from_secs(30), |s| {
        s["ready"] == 2
    });
    assert_eq!(agent.pids("old"), pids, "the same workers, adopted");
    for dir in [&site_dir, &gen_dir] {
        let enabled = read(&dir.join("cgroup.subtree_control"));
        assert!(
            !enabled.split_whitespace().any(|c| c == "cpu")
                && enabled.contains("memory")
                && enabled.contains("pids"),
            "{}: {enabled:?}",
            dir.display()
        );
    }
    assert!(
        !leaf.join("cpu.weight").exists(),
        "the leaf is still a scheduling group"
    );
    assert_eq!(read(&site_dir.join("cpu.weight")).trim(), "50");
}

#[test]
fn both_tree_kill_paths_leave_no_process() {
    if !cgroup_controllers() {
        return;
    }
    for mode in ["kill", "freeze"] {
        let site = probe_site(
            "tree",
            2,
            &format!("trap '' TERM; {BIN} __probe sleep & {BIN} __probe sleep & wait"),
            "[stop]\ntimeout = \"500ms\"\n",
        );
        let agent = TestAgent::start_with_env(
            &[("tree", &site)],
            Options {
                reactor: "io_uring",
                cgroups: true,
            },
            &[("HATCHERY_TREE_KILL", mode)],
        );
        let s = agent.wait_for("tree", "all up", Duration::from_secs(20), |s| {
            s["ready"] == 2 && s["usage"]["pids"].as_u64() >= Some(6)
        });
        let features = serde_json::to_string(
            &serde_json::from_slice::<serde_json::Value>(&agent.cli(&["status", "--json"]).stdout)
                .expect("json")["agent"]["features"],
        )
        .expect("ser");
        let expect = if mode == "kill" {
            "cgroup.kill"
        } else {
            "cgroup.freeze"
        };
        assert!(features.contains(expect), "[{mode}] {features}");
        let out = agent.cli(&["stop", "tree"]);
        assert!(out.status.success(), "[{mode}] {}", stderr(&out));
        // The workers have exited; what they left is killed with their leaves and
        // leaves the site's cgroup as it dies.
        agent.wait_for(
            "tree",
            &format!("[{mode}] nothing left (was {s:#})"),
            Duration::from_secs(10),
            |after| after["usage"]["pids"] == 0,
        );
        // The killed trees' slots start again, each in a new leaf.
        let out = agent.cli(&["start", "tree"]);
        assert!(out.status.success(), "[{mode}] start: {}", stderr(&out));
        agent.wait_for(
            "tree",
            &format!("[{mode}] all up again"),
            Duration::from_secs(20),
            |s| s["ready"] == 2 && s["usage"]["pids"].as_u64() >= Some(6),
        );
    }
}

#[test]
fn budgets_beyond_the_host_are_refused() {
    // `check` refuses the file; the agent starts without that site and says why.
    let huge = "name = \"huge\"\ncommand = [\"/bin/true\"]\nmemory = \"100000G\"\n";
    let small = "name = \"small\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nmemory = \"64M\"\n";
    let agent = TestAgent::start_ready(
        &[("huge", huge), ("small", small)],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
        "small",
        1,
    );
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(agent.dir.path().join("hatchery.toml"))
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("huge.toml: memory:")
            && err.contains("memory_reserve")
            && err.contains("exceed the host's memory"),
        "{err}"
    );
    let s = agent.status("huge");
    assert_eq!(s["state"], "failed");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("exceed the host's memory")),
        "{s:#}"
    );
    assert_eq!(agent.status("small")["state"], "running");
}

#[test]
fn auto_workers_settle_at_what_the_budget_holds_and_scale_is_capped() {
    if !cgroup_controllers() {
        return;
    }
    // Each worker touches ~100 MiB; the estimate (64M) is too low on purpose: measurement
    // must correct it before the 512 MiB budget is at risk.
    let site = probe_site(
        "auto",
        0,
        &format!("exec {BIN} __probe alloc 100M"),
        "memory = \"512M\"\nworker_memory = \"64M\"\nworkers_max = 10\n",
    )
    .replace("workers = 0", "workers = \"auto\"");
    let agent = TestAgent::start(
        &[("auto", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let s = agent.wait_for(
        "auto",
        "4 workers, capped at 4",
        Duration::from_secs(120),
        |s| s["desired"] == 4 && s["ready"] == 4 && s["capacity"]["workers"] == 4,
    );
    assert_eq!(s["capacity"]["basis"], "measured", "{s:#}");
    // Asking for more is capped, and the site's OOM killer never fires.
    let out = agent.cli(&["scale", "auto", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("capped at 4 workers"),
        "{}",
        stderr(&out)
    );
    std::thread::sleep(Duration::from_secs(6));
    let s = agent.status("auto");
    assert_eq!(s["desired"], 4, "{s:#}");
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(4));
    let site_dir = std::path::Path::new(s["workers"][0]["cgroup"].as_str().expect("leaf"))
        .ancestors()
        .nth(2)
        .expect("site dir")
        .to_path_buf();
    let events = std::fs::read_to_string(site_dir.join("memory.events")).expect("memory.events");
    assert!(
        events.lines().any(|l| l == "oom_kill 0"),
        "no OOM kill in the site: {events}"
    );
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["restarts"], 0, "no worker died: {s:#}");
    }
}

#[test]
fn a_fixed_count_is_capped_by_the_budget_even_without_controllers() {
    // Uses only the configured figures, so it runs on any host.
    let site = probe_site(
        "capped",
        8,
        "exec sleep 1000",
        "memory = \"512M\"\nmemory_max = \"128M\"\n",
    );
    let agent = TestAgent::start(
        &[("capped", &site)],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
    );
    let s = agent.wait_for("capped", "4 ready", Duration::from_secs(10), |s| {
        s["ready"] == 4
    });
    assert_eq!(s["requested"], 8);
    assert_eq!(s["desired"], 4);
    assert_eq!(s["capacity"]["basis"], "estimate");
    assert!(
        s["capacity"]["derivation"]
            .as_str()
            .is_some_and(|d| d.contains("512M budget / 128M per worker")),
        "{s:#}"
    );
    let out = agent.cli(&["scale", "capped", "6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("capped at 4 workers"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        agent.status("capped")["workers"].as_array().map(Vec::len),
        Some(4)
    );
    let out = agent.cli(&["scale", "capped", "2"]);
    assert!(out.status.success());
    assert_eq!(
        agent.status("capped")["workers"].as_array().map(Vec::len),
        Some(2),
        "scaling down is not capped"
    );
}

#[test]
fn a_delegated_agent_manages_its_own_subtree_and_respects_its_memory_max() {
    if !cgroup_controllers() {
        return;
    }
    // What systemd's Delegate=yes gives a unit: a cgroup of its own, below the root, that
    // it may write to, with INVOCATION_ID set. The agent must move itself into agent/
    // (the no-internal-process rule) and put the sites beside it.
    let mount = hatchery::cgroup::cgroup2_mount().expect("mount");
    let unit = mount.join(format!("svc-{}.service", std::process::id()));
    std::fs::create_dir_all(&unit).expect("mkdir unit cgroup");
    std::fs::write(unit.join("memory.max"), (512u64 << 20).to_string()).expect("memory.max");
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir_all(&sites).expect("mkdir");
    let socket = dir.path().join("c.sock");
    std::fs::write(
        dir.path().join("hatchery.toml"),
        format!("control_socket = \"{}\"\nstate_dir = \"{}/state\"\nsites_dir = \"{}\"\ncgroup_base = \"auto\"\nmemory_reserve = \"64M\"\n", socket.display(), dir.path().display(), sites.display()),
    )
    .expect("write");
    let run_in_unit = |extra_site: &str| {
        std::fs::write(sites.join("web.toml"), format!("name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 2\n{extra_site}")).expect("write");
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {BIN} agent --config {}/hatchery.toml",
                unit.display(),
                dir.path().display()
            ))
            .env("INVOCATION_ID", "0123456789abcdef")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    // A budget that fits the host but not the unit's memory.max (512 MiB) is refused.
    let out = run_in_unit("memory = \"600M\"\n")
        .wait_with_output()
        .expect("wait");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the agent's own memory.max"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = run_in_unit("memory = \"256M\"\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "the delegated agent did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = || -> serde_json::Value {
        let out = std::process::Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(["status", "web", "--json"])
            .output()
            .expect("cli");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["sites"][0].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status()["ready"] != 2 {
        assert!(
            Instant::now() < deadline,
            "workers did not start: {:#}",
            status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_cgroup =
        std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("cgroup");
    assert!(
        agent_cgroup.trim_end().ends_with(&format!(
            "{}/agent",
            unit.file_name().and_then(|n| n.to_str()).expect("name")
        )),
        "the agent moved into agent/: {agent_cgroup}"
    );
    let leaf = status()["workers"][0]["cgroup"]
        .as_str()
        .expect("leaf")
        .to_string();
    assert!(
        leaf.starts_with(&unit.join("sites/web/gen-1/w-").display().to_string()),
        "{leaf}"
    );
    let controllers = std::fs::read_to_string(unit.join("cgroup.subtree_control")).expect("read");
    assert!(
        controllers.contains("memory") && controllers.contains("pids"),
        "{controllers}"
    );
    assert_eq!(
        std::fs::read_to_string(unit.join("sites/web/memory.max"))
            .expect("read")
            .trim(),
        (256u64 << 20).to_string()
    );
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let code = child.wait().expect("wait").code();
    assert_eq!(code, Some(0));
    // It moved back out and removed what it created; the unit cgroup is empty again.
    assert!(
        !unit.join("sites").exists() && !unit.join("agent").exists(),
        "cleaned up"
    );
    let _ = std::fs::remove_dir(&unit);
}

/// Before Linux 5.19 there is no `memory.peak`: the cap measures `memory.current`
/// (forced here with HATCHERY_CGROUP_NO_PEAK=1 on kernels that have it).
#[test]
fn without_memory_peak_the_cap_measures_memory_current() {
    if !cgroup_controllers() {
        return;
    }
    // The estimate (200M) allows one worker in 256M; measured at ~20M each, all 3 fit.
    let site = probe_site(
        "nopeak",
        0,
        &format!("exec {BIN} __probe alloc 20M"),
        "memory = \"256M\"\nworker_memory = \"200M\"\nworkers_min = 1\nworkers_max = 3\n",
    )
    .replace("workers = 0", "workers = \"auto\"");
    let agent = TestAgent::start_with_env(
        &[("nopeak", &site)],
        Options {
            reactor: "epoll",
            cgroups: true,
        },
        &[("HATCHERY_CGROUP_NO_PEAK", "1")],
    );
    let s = agent.wait_for(
        "nopeak",
        "3 workers on the measured figure",
        Duration::from_secs(120),
        |s| {
            s["ready"] == 3
                && s["capacity"]["basis"] == "measured"
                && s["workers"].as_array().is_some_and(|ws| {
                    ws.iter()
                        .all(|w| w["usage"]["memory_current"].as_u64() > Some(16 << 20))
                })
        },
    );
    let per_worker = s["capacity"]["per_worker"].as_u64().expect("per_worker");
    assert!(
        per_worker < 64 << 20,
        "measured from memory.current, not the estimate: {s:#}"
    );
    for w in s["workers"].as_array().expect("workers") {
        assert!(w["usage"]["memory_peak"].is_null(), "no peak read: {w:#}");
    }
}

/// Zygote mode and memory: pages the zygote loaded stay charged to its own leaf, so a
/// worker that only reads them fits under a `memory_max` smaller than them; a forked
/// worker that allocates past its `memory_max` is OOM-killed in its own leaf, reported as
/// such, and forked again; the zygote is untouched. What the zygote holds is left out of
/// the budget the workers' cap divides.
#[test]
fn forked_workers_are_charged_their_own_memory_and_oom_killed_in_their_own_leaf() {
    if !cgroup_controllers() {
        return;
    }
    let site = |name: &str, port: u16, alloc: u32| {
        format!(
            "name = \"{name}\"\ncommand = [\"{BIN}\", \"__demo-zygote\", \"--load-mib\", \"64\", \"--worker-alloc-mib\", \"{alloc}\"]\nmode = \"zygote\"\nworkers = 1\nmemory_max = \"40M\"\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\n[ready]\ncheck = \"notify\"\ntimeout = \"30s\"\n[restart]\nbackoff_initial = \"200ms\"\nflapping = {{ exits = 100, within = \"10s\" }}\n"
        )
    };
    let port = |l: std::net::TcpListener| l.local_addr().expect("addr").port();
    let (a, b) = (
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
    );
    // The reader has a budget: the zygote's share of it is left out of the workers'.
    let reader =
        site("reader", port(a), 0).replace("workers = 1\n", "workers = 1\nmemory = \"512M\"\n");
    let hog = site("hog", port(b), 100);
    let agent = TestAgent::start(
        &[("reader", &reader), ("hog", &hog)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let s = agent.wait_for("reader", "a ready worker", Duration::from_secs(60), |s| {
        s["ready"] == 1
    });
    let read_current = |dir: &str| -> u64 {
        std::fs::read_to_string(std::path::Path::new(dir).join("memory.current"))
            .expect("memory.current")
            .trim()
            .parse()
            .expect("a number")
    };
    let zleaf = s["generations"][0]["zygote"]["cgroup"]
        .as_str()
        .expect("the zygote's leaf")
        .to_string();
    let wleaf = s["workers"][0]["cgroup"]
        .as_str()
        .expect("the worker's leaf")
        .to_string();
    assert!(
        read_current(&zleaf) >= 64 << 20,
        "the zygote's pages are its own"
    );
    assert!(
        read_current(&wleaf) < 40 << 20,
        "the worker is charged only what it wrote: {}",
        read_current(&wleaf)
    );
    let s = agent.wait_for(
        "reader",
        "the zygote's share in the cap",
        Duration::from_secs(60),
        |s| {
            s["capacity"]["zygote"]
                .as_u64()
                .is_some_and(|z| z >= 64 << 20)
        },
    );
    let derivation = s["capacity"]["derivation"].as_str().unwrap_or("");
    assert!(derivation.starts_with("(512M budget - "), "{s:#}");
    let s = agent.wait_for(
        "hog",
        "an OOM kill reported",
        Duration::from_secs(60),
        |s| s["workers"][0]["last_exit"] == "oom-killed",
    );
    let zpid = s["generations"][0]["zygote"]["pid"].as_i64();
    assert!(zpid.is_some_and(alive), "the zygote lives on: {s:#}");
    let s = agent.wait_for(
        "hog",
        "the worker forked again",
        Duration::from_secs(60),
        |s| s["workers"][0]["restarts"].as_u64().is_some_and(|r| r >= 2),
    );
    assert_eq!(s["generations"][0]["zygote"]["pid"].as_i64(), zpid, "{s:#}");
    assert_eq!(s["generations"][0]["zygote"]["restarts"], 0, "{s:#}");
}

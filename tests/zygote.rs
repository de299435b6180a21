//! Zygote mode end to end (issue 12): the real agent starts a generation's zygote (the
//! demo zygote, `hatchery __demo-zygote`), forks its workers from it into their own
//! cgroup leaves, replaces a zygote that dies without losing a worker, and stops it with
//! its generation. The Python helper under load through deploys is in `deploy.rs`.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn in_vm() -> bool {
    std::env::var_os("HATCHERY_IN_VM").is_some()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Site `z` in zygote mode: the demo zygote with `zygote_args` (its own options, then the
/// demo worker's), `workers` workers on `port`.
fn zygote_site(port: u16, workers: u32, zygote_args: &[&str], extra: &str) -> String {
    let args: Vec<String> = zygote_args.iter().map(|a| format!("{a:?}")).collect();
    let timeout = if in_vm() { "30s" } else { "10s" };
    format!(
        r#"name = "z"
command = ["{BIN}", "__demo-zygote", {}]
mode = "zygote"
workers = {workers}
{extra}
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
timeout = "{timeout}"
[restart]
backoff_initial = "100ms"
"#,
        args.join(", ")
    )
}

/// The answer to `GET /` on `port`, if any.
fn get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Sends SIGKILL to `pid`.
fn sigkill(pid: i64) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("a pid")).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
}

/// Kills adopted worker `victim` and waits for a new zygote and a replacement forked from
/// it; checks that `other` was left alone and that the replacement is the agent's child.
fn replaced_from_a_new_zygote(agent: &TestAgent, victim: i64, other: i64, old_zygote: i64) {
    sigkill(victim);
    let s = agent.wait_for(
        "z",
        "a new zygote and a forked replacement",
        Duration::from_secs(30),
        |s| {
            let r = ready_pids(s);
            zygote(s)["state"] == "ready" && r.len() == 2 && !r.contains(&victim)
        },
    );
    assert!(ready_pids(&s).contains(&other), "{s:#}");
    assert_ne!(zygote(&s)["pid"].as_i64(), Some(old_zygote));
    let replacement = ready_pids(&s)
        .into_iter()
        .find(|p| *p != other)
        .expect("the replacement");
    assert_eq!(ppid(replacement), Some(i64::from(agent.pid())));
}

/// An agent (io_uring, cgroups where possible) with site `z` of 2 ready workers forked from
/// the demo zygote (8 MiB loaded), and its port.
fn two_forked_workers() -> (TestAgent, u16) {
    let port = free_port();
    let text = zygote_site(port, 2, &["--load-mib", "8"], "");
    let agent = TestAgent::start_ready(
        &[("z", &text)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
        "z",
        2,
    );
    (agent, port)
}

/// Waits until the agent's record of live workers (`state/workers.json`) has `n` of the
/// site's workers ready: a worker's readiness is written up to 100 ms after it came (the
/// record's writes are spaced), and an agent that crashes before that leaves it recorded
/// as starting (its successor then waits for a `READY=1` that never comes again).
fn wait_recorded_ready(agent: &TestAgent, n: usize) {
    let record = agent.dir.path().join("state/workers.json");
    wait_until(
        "the workers recorded ready",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&record)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|r| {
                    r["sites"][0]["machine"]["gens"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|g| g["workers"].as_array().into_iter().flatten())
                        .filter(|w| w["ready"] == true)
                        .count()
                        == n
                })
        },
    );
}

/// Field `n` (0: the state) of `/proc/PID/stat` behind the command name, as a number.
fn stat_field(pid: i64, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n)?
        .parse()
        .ok()
}

/// The parent pid of `pid`.
fn ppid(pid: i64) -> Option<i64> {
    stat_field(pid, 1)
}

/// The process group of `pid`.
fn pgid(pid: i64) -> Option<i64> {
    stat_field(pid, 2)
}

fn zygote(s: &serde_json::Value) -> &serde_json::Value {
    &s["generations"][0]["zygote"]
}

fn site_log(agent: &TestAgent) -> String {
    std::fs::read_to_string(agent.dir.path().join("state/logs/z.log")).unwrap_or_default()
}

/// Ready workers' pids.
fn ready_pids(s: &serde_json::Value) -> Vec<i64> {
    let mut pids: Vec<i64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["state"] == "ready")
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    pids
}

/// Workers are forked by the zygote, become the agent's own children, each in its own
/// leaf before its first instruction of app code (with cgroups), and serve; a worker that
/// dies is forked again from the same zygote; `scale` forks more. A zygote that dies takes
/// no worker with it: the generation is degraded (shown in `status`), a new zygote starts,
/// a worker that dies meanwhile waits for it, and once it is ready all is as before.
#[test]
fn workers_are_forked_into_their_own_leaves_and_outlive_a_zygote_that_dies() {
    for (reactor, cgroups) in [("io_uring", true), ("epoll", false)] {
        forked_workers_outlive_their_zygote(reactor, cgroups);
    }
}

fn forked_workers_outlive_their_zygote(reactor: &'static str, cgroups: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ready_file = dir.path().join("zygote-may-be-ready");
    std::fs::write(&ready_file, "").expect("write");
    let port = free_port();
    let ready_arg = ready_file.display().to_string();
    let text = zygote_site(
        port,
        2,
        &["--load-mib", "16", "--ready-when", &ready_arg],
        "",
    );
    let mut agent = TestAgent::start_ready(&[("z", &text)], Options { reactor, cgroups }, "z", 2);
    let s = agent.status("z");
    let z = zygote(&s);
    assert_eq!(z["state"], "ready", "{s:#}");
    assert_eq!(z["degraded"], false, "{s:#}");
    let zpid = z["pid"].as_i64().expect("the zygote's pid");
    let workers = ready_pids(&s);
    assert_eq!(workers.len(), 2, "{s:#}");
    for &w in &workers {
        assert_ne!(w, zpid);
        // Its stdout and stderr: two pipes of its own (protocol version 2), read apart.
        let fd = |n: u32| {
            std::fs::read_link(format!("/proc/{w}/fd/{n}"))
                .expect("a worker's output")
                .display()
                .to_string()
        };
        assert!(fd(1).starts_with("pipe:") && fd(2).starts_with("pipe:"));
        assert_ne!(fd(1), fd(2), "stdout and stderr apart");
        assert_eq!(
            ppid(w),
            Some(i64::from(agent.pid())),
            "worker {w} is the agent's own child"
        );
        assert_eq!(
            pgid(w),
            Some(w),
            "worker {w} leads a process group of its own"
        );
    }
    assert_eq!(ppid(zpid), Some(i64::from(agent.pid())));
    let body = get(port).expect("an answer");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let uses_cgroups = agent.cgroup_base.is_some();
    if uses_cgroups {
        let zleaf = z["cgroup"].as_str().expect("the zygote's leaf");
        assert!(zleaf.ends_with("/gen-1/zygote"), "{zleaf}");
        for w in s["workers"].as_array().expect("workers") {
            let leaf = w["cgroup"].as_str().expect("a worker's leaf");
            let name = format!("/gen-1/w-{}", w["id"]);
            assert!(leaf.ends_with(&name), "{leaf}");
            // What the worker read first thing after its go: already its own leaf.
            let first = format!("demo worker {} forked into cgroup ", w["id"]);
            let log = site_log(&agent);
            let line = log
                .lines()
                .find(|l| l.contains(&first))
                .unwrap_or_else(|| panic!("no line {first:?} in\n{log}"));
            assert!(line.trim_end().ends_with(&name), "{line}");
        }
    }
    assert!(
        site_log(&agent).contains(&format!("zygote[{zpid}] demo zygote: loaded 16 MiB")),
        "{}",
        site_log(&agent)
    );

    // A worker killed is forked again, from the same zygote.
    let victim = workers[0];
    sigkill(victim);
    let s = agent.wait_for("z", "a new worker", Duration::from_secs(30), |s| {
        let r = ready_pids(s);
        r.len() == 2 && !r.contains(&victim)
    });
    assert_eq!(zygote(&s)["pid"].as_i64(), Some(zpid), "{s:#}");

    // Scale: one more fork.
    let out = agent.cli(&["scale", "z", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.wait_for("z", "3 ready workers", Duration::from_secs(30), |s| {
        ready_pids(s).len() == 3
    });
    let before = ready_pids(&s);

    // The zygote dies, and the next one is held before its READY: degraded, and the
    // workers live on.
    std::fs::remove_file(&ready_file).expect("remove");
    sigkill(zpid);
    let s = agent.wait_for(
        "z",
        "a degraded generation with a new zygote starting",
        Duration::from_secs(30),
        |s| {
            let z = zygote(s);
            z["degraded"] == true
                && z["state"] == "starting"
                && z["pid"].as_i64().is_some_and(|p| p != zpid)
        },
    );
    assert_eq!(ready_pids(&s), before, "no worker lost: {s:#}");
    assert_eq!(zygote(&s)["restarts"], 1, "{s:#}");
    let text = stdout(&agent.cli(&["status", "z"]));
    assert!(text.contains("DEGRADED"), "{text}");
    // A worker that dies meanwhile waits for the new zygote.
    let victim = before[0];
    sigkill(victim);
    agent.wait_for(
        "z",
        "the dead worker's slot waiting",
        Duration::from_secs(30),
        |s| ready_pids(s).len() == 2 && s["workers"].as_array().is_some_and(|w| w.len() == 3),
    );
    std::fs::write(&ready_file, "").expect("write");
    let s = agent.wait_for(
        "z",
        "the new zygote ready and 3 workers",
        Duration::from_secs(30),
        |s| {
            zygote(s)["state"] == "ready"
                && zygote(s)["degraded"] == false
                && ready_pids(s).len() == 3
        },
    );
    let after = ready_pids(&s);
    assert!(
        before[1..].iter().all(|p| after.contains(p)),
        "{before:?} -> {after:?}"
    );
    let new_zygote = zygote(&s)["pid"].as_i64().expect("pid");
    assert_eq!(agent.stop(), Some(0), "{}", agent.agent_log());
    for p in after.iter().chain([&new_zygote]) {
        assert!(!alive(*p), "{p} still runs after the agent stopped");
    }
    if uses_cgroups {
        let base = agent.cgroup_base.clone().expect("base");
        assert!(
            !base.join("sites").join("z").exists(),
            "the site's cgroups are removed"
        );
    }
}

/// An agent that dies leaves the forked workers running, and its zygote exits (its link
/// closed); the next agent adopts the workers, starts no zygote until a worker is needed,
/// then starts one and forks from it, leaving the adopted workers alone.
#[test]
fn a_new_agent_adopts_forked_workers_and_starts_a_zygote_when_one_is_needed() {
    let (mut agent, port) = two_forked_workers();
    let s = agent.status("z");
    let zpid = zygote(&s)["pid"].as_i64().expect("the zygote's pid");
    let workers = ready_pids(&s);
    wait_recorded_ready(&agent, 2);
    agent.crash();
    wait_until(
        "the zygote exits with its link closed",
        Duration::from_secs(30),
        || !alive(zpid),
    );
    assert!(workers.iter().all(|p| alive(*p)), "the workers live on");
    agent.relaunch();
    let s = agent.wait_for("z", "the workers adopted", Duration::from_secs(30), |s| {
        ready_pids(s) == workers
    });
    assert_eq!(zygote(&s)["state"], "stopped", "{s:#}");
    assert!(zygote(&s)["pid"].is_null(), "{s:#}");
    let body = get(port).expect("an answer");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // A worker dies: a zygote is started for its replacement.
    replaced_from_a_new_zygote(&agent, workers[0], workers[1], zpid);
    assert_eq!(agent.stop(), Some(0), "{}", agent.agent_log());
}

/// A zygote that never says `READY` is stopped at `ready.timeout` (its spawns fail, as
/// crashes), and tried again after the backoff; the site's other workers are unaffected.
#[test]
fn a_zygote_that_never_becomes_ready_is_stopped_at_its_deadline_and_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let never = dir.path().join("never");
    let port = free_port();
    let never_arg = never.display().to_string();
    let text = zygote_site(port, 1, &["--ready-when", &never_arg], "")
        .replace("timeout = \"30s\"", "timeout = \"1s\"")
        .replace("timeout = \"10s\"", "timeout = \"1s\"");
    let mut agent = TestAgent::start(
        &[("z", &text)],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
    );
    let s = agent.wait_for(
        "z",
        "the zygote given up on once",
        Duration::from_secs(30),
        |s| zygote(s)["restarts"].as_u64().is_some_and(|r| r >= 1),
    );
    let log = agent.agent_log();
    assert!(log.contains("not ready within 1000 ms"), "{s:#}\n{log}");
    assert!(
        s["workers"][0]["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("the zygote did not become ready")),
        "{s:#}"
    );
    // Once it may become ready, it does, and the worker is forked.
    std::fs::write(&never, "").expect("write");
    agent.wait_for("z", "a ready worker", Duration::from_secs(60), |s| {
        s["ready"] == 1 && zygote(s)["state"] == "ready"
    });
    assert_eq!(agent.stop(), Some(0), "{}", agent.agent_log());
}

/// `hatchery upgrade` of an agent with a zygote-mode site: the agent keeps its pid and the
/// forked workers; the old zygote ends with its link (closed by the exec), and the new image
/// starts a zygote when a worker is next needed.
#[test]
fn an_upgrade_keeps_the_forked_workers_and_starts_a_zygote_when_one_is_needed() {
    let (mut agent, _) = two_forked_workers();
    let pid = agent.pid();
    let s = agent.status("z");
    let zpid = zygote(&s)["pid"].as_i64().expect("the zygote's pid");
    let workers = ready_pids(&s);
    let next = agent.dir.path().join("hatchery-next");
    std::fs::copy(BIN, &next).expect("copy the binary");
    let out = agent.cli(&["upgrade", "--binary", next.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        agent.agent_log()
    );
    assert_eq!(agent.pid(), pid);
    wait_until(
        "the old zygote exits with its link closed",
        Duration::from_secs(30),
        || !alive(zpid),
    );
    let s = agent.wait_for("z", "the workers kept", Duration::from_secs(30), |s| {
        ready_pids(s) == workers
    });
    assert_eq!(zygote(&s)["state"], "stopped", "{s:#}");
    replaced_from_a_new_zygote(&agent, workers[1], workers[0], zpid);
    assert_eq!(agent.stop(), Some(0), "{}", agent.agent_log());
}

/// A reload switches a running site between exec and zygote mode: the rolling restart
/// forks the workers from a new zygote, and back in exec mode execs them again and stops
/// the zygote; the site serves throughout.
#[test]
fn a_reload_switches_a_running_site_between_exec_and_zygote_mode() {
    let port = free_port();
    let zygote_text = zygote_site(port, 2, &["--load-mib", "4"], "");
    let exec_text = zygote_text.replace("mode = \"zygote\"\n", "").replace(
        &format!("command = [\"{BIN}\", \"__demo-zygote\", \"--load-mib\", \"4\"]"),
        &format!("command = [\"{BIN}\", \"__demo-worker\"]"),
    );
    assert!(exec_text.contains("__demo-worker"), "{exec_text}");
    let mut agent = TestAgent::start_ready(
        &[("z", &exec_text)],
        Options {
            reactor: "epoll",
            cgroups: true,
        },
        "z",
        2,
    );
    let s = agent.status("z");
    assert!(zygote(&s).is_null(), "exec mode has no zygote: {s:#}");
    let exec_workers = ready_pids(&s);
    std::fs::write(agent.site_file("z"), &zygote_text).expect("write the site");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.wait_for(
        "z",
        "workers forked from a zygote",
        Duration::from_secs(60),
        |s| {
            let r = ready_pids(s);
            zygote(s)["state"] == "ready"
                && r.len() == 2
                && r.iter().all(|p| !exec_workers.contains(p))
        },
    );
    let zpid = zygote(&s)["pid"].as_i64().expect("pid");
    assert!(get(port).is_some_and(|b| b.starts_with("HTTP/1.1 200")));
    let forked = ready_pids(&s);
    std::fs::write(agent.site_file("z"), &exec_text).expect("write the site");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_for(
        "z",
        "exec'd workers and no zygote",
        Duration::from_secs(60),
        |s| {
            let r = ready_pids(s);
            zygote(s).is_null() && r.len() == 2 && r.iter().all(|p| !forked.contains(p))
        },
    );
    wait_until("the zygote stopped", Duration::from_secs(30), || {
        !alive(zpid)
    });
    assert!(get(port).is_some_and(|b| b.starts_with("HTTP/1.1 200")));
    assert_eq!(agent.stop(), Some(0), "{}", agent.agent_log());
}

/// A zygote is stopped by its site's whole stop sequence, as its workers are: `SIGWINCH`
/// first (which the demo zygote and worker ignore, as any process does by default), then
/// `SIGTERM` after `stop.timeout`, which ends them; nothing is killed.
#[test]
fn a_zygote_gets_its_sites_whole_stop_sequence() {
    let port = free_port();
    let text = zygote_site(
        port,
        1,
        &[],
        "[stop]\nsignals = [\"SIGWINCH\", \"SIGTERM\"]\ntimeout = \"1s\"\n",
    );
    let agent = TestAgent::start_ready(
        &[("z", &text)],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
        "z",
        1,
    );
    let zygote_pid = zygote(&agent.status("z"))["pid"]
        .as_i64()
        .expect("the zygote's pid");
    let out = agent.cli(&["stop", "z"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the zygote to end", Duration::from_secs(30), || {
        agent
            .agent_log()
            .lines()
            .any(|l| l.contains("zygote killed by SIGTERM"))
    });
    let log = agent.agent_log();
    assert!(
        log.lines().any(
            |l| l.contains("the zygote still runs: next signal of its stop sequence")
                && l.contains("SIGTERM")
                && l.contains(&zygote_pid.to_string())
        ),
        "{log}"
    );
    assert!(!log.contains("stop timeout: killing"), "{log}");
}

/// A zygote is trusted less than the agent: a `SPARE` (version 3) naming a process that is
/// not a spare of its own (the zygote itself, another site's worker, the agent) moves
/// nothing, and a `FORKED` naming another site's worker (a child of the agent, as its
/// forks are) takes nothing and leaves that worker alone. The zygote here is a Python
/// script that speaks the protocol: `READY 3`, then a `SPARE` of itself, then one for each
/// pid the test writes to a FIFO, then `FORKED` with the first of them to every `FORK`.
#[test]
fn a_zygote_cannot_take_or_move_a_process_it_did_not_fork() {
    let Some(python) = python3() else {
        skip("python3 (3.9 or later) is not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("pids");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect("mkfifo");
    let script = dir.path().join("hostile.py");
    std::fs::write(
        &script,
        r#"import os, socket, sys
link = socket.socket(fileno=int(os.environ['HATCHERY_ZYGOTE_FD']))
link.send(b'READY 3')
link.send(b'SPARE %d' % os.getpid())
with open(sys.argv[1]) as f:
    pids = f.read().split()
for pid in pids:
    link.send(b'SPARE ' + pid.encode())
while True:
    data, fds, _, _ = socket.recv_fds(link, 600, 4)
    for fd in fds:
        os.close(fd)
    if not data:
        break
    # Each FORK answered with the first pid written: another site's worker.
    go_r, go_w = os.pipe()
    socket.send_fds(link, [b'FORKED ' + data.split()[2] + b' ' + pids[0].encode()], [go_w])
    os.close(go_w)
"#,
    )
    .expect("write the script");
    let [port, victim_port] = free_ports();
    let hostile = format!(
        "name = \"z\"\ncommand = [\"{}\", \"{}\", \"{}\"]\nmode = \"zygote\"\nworkers = 1\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\n[ready]\ncheck = \"notify\"\ntimeout = \"120s\"\n",
        python.display(),
        script.display(),
        fifo.display()
    );
    let victim = format!(
        "name = \"victim\"\ncommand = [\"{BIN}\", \"__demo-worker\"]\nworkers = 1\n[[listen]]\ntcp = \"127.0.0.1:{victim_port}\"\n[ready]\ncheck = \"notify\"\ntimeout = \"30s\"\n"
    );
    let agent = TestAgent::start_ready(
        &[("victim", &victim), ("z", &hostile)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
        "victim",
        1,
    );
    if agent.cgroup_base.is_none() {
        skip("no cgroup v2 to move spares into (not root, or no cgroup2 mount)");
        return;
    }
    let wait = Duration::from_secs(if in_vm() { 60 } else { 20 });
    let s = agent.wait_for("z", "the zygote ready", wait, |s| {
        zygote(s)["state"] == "ready"
    });
    let zpid = zygote(&s)["pid"].as_i64().expect("the zygote's pid");
    let zleaf = zygote(&s)["cgroup"].as_str().expect("its leaf").to_string();
    let v = agent.status("victim");
    let vpid = v["workers"][0]["pid"].as_i64().expect("the victim's pid");
    let vleaf = v["workers"][0]["cgroup"]
        .as_str()
        .expect("its leaf")
        .to_string();
    let cgroup_of = |pid: i64| hatchery::cgroup::cgroup_of(i32::try_from(pid).expect("pid"));
    let before = (cgroup_of(zpid), cgroup_of(vpid));
    std::fs::write(&fifo, format!("{vpid} {}\n", agent.pid())).expect("write the pids");
    // Each refusal is said in the agent's log (a whole field: `pid=12` is not `pid=123`).
    let said = |what: &str, line: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + wait;
        while !agent.agent_log().lines().any(line) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what}:\n{}",
                agent.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for pid in [zpid, vpid, i64::from(agent.pid())] {
        let field = format!("pid={pid}");
        said(&format!("refusal of the spare {pid}"), &|l: &str| {
            l.contains("a spare not moved ahead") && l.split_whitespace().any(|w| w == field)
        });
    }
    let forked = format!(
        "the zygote named pid {vpid} for worker 0, which does not hold the go pipe it sent"
    );
    said("FORKED refused", &|l: &str| l.contains(&forked));
    assert_eq!(
        (cgroup_of(zpid), cgroup_of(vpid)),
        before,
        "nothing was moved"
    );
    let v = agent.status("victim");
    assert_eq!(v["workers"][0]["pid"].as_i64(), Some(vpid), "{v:#}");
    assert_eq!(v["workers"][0]["state"], "ready", "untouched: {v:#}");
    let zrel = before.0.expect("the zygote's cgroup");
    let vrel = before.1.expect("the victim's cgroup");
    assert!(zleaf.ends_with(&zrel), "{zleaf} against {zrel}");
    assert!(vleaf.ends_with(&vrel), "{vleaf} against {vrel}");
    let s = agent.status("z");
    assert_eq!(zygote(&s)["spares"], serde_json::json!([]), "{s:#}");
}

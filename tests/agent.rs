//! Host integration tests: the real agent, driven by the real CLI, on both event loop
//! backends (io_uring and epoll).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn sleeper(name: &str, workers: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000 # marker-{name}\"]\nworkers = {workers}\n{extra}"
    )
}

fn each_reactor(mut body: impl FnMut(&'static str)) {
    for r in REACTORS {
        body(r);
    }
}

#[test]
fn workers_start_are_children_of_the_agent_and_listed_in_status() {
    each_reactor(|reactor| {
        let site = sleeper("web", 3, "");
        let agent = TestAgent::start(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        let s = agent.wait_for("web", "3 ready workers", Duration::from_secs(10), |s| {
            s["ready"] == 3
        });
        assert_eq!(s["state"], "running");
        let workers = s["workers"].as_array().expect("workers");
        assert_eq!(workers.len(), 3);
        for w in workers {
            let pid = w["pid"].as_i64().expect("pid");
            assert!(alive(pid));
            let ppid = processes().into_iter().find(|p| p.0 == pid).map(|p| p.1);
            assert_eq!(
                ppid,
                Some(i64::from(agent.pid())),
                "workers are the agent's children"
            );
            assert_eq!(w["restarts"], 0);
            assert!(w["started_at"].as_str().is_some_and(|t| t.ends_with('Z')));
            assert_eq!(w["state"], "ready");
        }
        // Human output names the site and its workers.
        let out = agent.cli(&["status", "web"]);
        assert!(out.status.success());
        assert!(stdout(&out).contains("w-2"), "{}", stdout(&out));
        // The event loop in use is the one asked for: its kernel object is among the
        // agent's fds (the report could say anything).
        assert_eq!(reactor_in_use(i64::from(agent.pid())), reactor);
        let all: serde_json::Value =
            serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).expect("json");
        let features = all["agent"]["features"].to_string();
        assert!(features.contains(reactor), "{features}");
        // From 6.1 the ring posts its completions when the loop waits, not in the middle
        // of whatever the loop is doing at each worker's exit.
        if reactor == "io_uring" && kernel_release() >= (6, 1) {
            assert!(features.contains("DEFER_TASKRUN"), "{features}");
        }
    });
}

#[test]
fn a_killed_worker_is_replaced_and_counted() {
    each_reactor(|reactor| {
        let site = sleeper("web", 2, "");
        let agent = TestAgent::start_ready(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "web",
            2,
        );
        let before = agent.pids("web");
        let victim = before[0];
        Command::new("kill")
            .arg("-KILL")
            .arg(victim.to_string())
            .status()
            .expect("kill");
        let s = agent.wait_for("web", "a replacement", Duration::from_secs(5), |s| {
            s["workers"][0]["pid"].as_i64().is_some_and(|p| p != victim) && s["ready"] == 2
        });
        assert_eq!(s["workers"][0]["restarts"], 1);
        assert_eq!(s["workers"][0]["last_exit"], "killed by SIGKILL");
        assert_eq!(
            s["workers"][1]["pid"].as_i64(),
            Some(before[1]),
            "the sibling is untouched"
        );
        assert_eq!(s["workers"][1]["restarts"], 0);
    });
}

#[test]
fn a_crash_loop_backs_off_then_marks_the_site_failed_until_started() {
    each_reactor(|reactor| {
        let site = "name = \"bad\"\ncommand = [\"/bin/sh\", \"-c\", \"echo crashing; exit 3\"]\nworkers = 1\n\
                    [restart]\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nflapping = { exits = 4, within = \"30s\" }\n";
        // Taken before the agent starts, so the first start is after it.
        let t0 = Instant::now();
        let agent = TestAgent::start(
            &[("bad", site)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        let s = agent.wait_for("bad", "failed", Duration::from_secs(10), |s| {
            s["state"] == "failed"
        });
        // 4 exits: starts at 0, then >= 100 ms floor, 100 ms, 200 ms backoff: >= 400 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "backoff was applied: {:?}",
            t0.elapsed()
        );
        let w = &s["workers"][0];
        assert_eq!(w["state"], "failed");
        assert_eq!(w["restarts"], 3);
        assert_eq!(w["last_exit"], "exited with code 3");
        // The agent's log says the exits before the failure they led to, none after it (a
        // fold's summary of them, said when their burst ends, may come later).
        let log = agent.agent_log();
        let lines: Vec<&str> = log.lines().collect();
        let failed = lines
            .iter()
            .position(|l| l.contains("site failed: worker flapping or unstartable"))
            .unwrap_or_else(|| panic!("no failure in the agent's log:\n{log}"));
        let exit =
            |l: &&str| l.contains("worker exited with code 3") && !l.contains(" more worker");
        assert!(lines[..failed].iter().any(exit), "no exit before:\n{log}");
        assert!(
            !lines[failed..].iter().any(exit),
            "an exit after the failure:\n{log}"
        );
        // Failed stays failed: nothing is restarted behind the operator's back.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(agent.status("bad")["workers"][0]["restarts"], 3);
        // `start` clears it: the worker runs again, and the crash loop ends in failed
        // again. `start` says so: a worker that dies right after it started (within
        // `ready.settle`) is not a successful start.
        let out = agent.cli(&["start", "bad"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("w-0 started"), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("w-0 exited with code 3"),
            "{}",
            stderr(&out)
        );
        agent.wait_for("bad", "failed again", Duration::from_secs(10), |s| {
            s["state"] == "failed" && s["workers"][0]["restarts"].as_u64() > Some(3)
        });
        let out = agent.cli(&["logs", "bad", "-n", "3"]);
        assert!(stdout(&out).contains("w-0["), "{}", stdout(&out));
        assert!(stdout(&out).contains("crashing"), "{}", stdout(&out));
    });
}

#[test]
fn stop_escalates_to_sigkill_of_the_whole_tree() {
    each_reactor(|reactor| {
        let marker = format!("stubborn-{reactor}-{}", std::process::id());
        let site = format!(
            "name = \"stubborn\"\ncommand = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 1000 & sleep 1000 & wait; # {marker}\"]\nworkers = 2\n\
             [stop]\ntimeout = \"700ms\"\n"
        );
        let agent = TestAgent::start_ready(
            &[("stubborn", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "stubborn",
            2,
        );
        // Each worker has forked its two sleeps.
        let pids = agent.pids("stubborn");
        let mut tree: Vec<i64> = Vec::new();
        wait_until("each worker's two sleeps", Duration::from_secs(20), || {
            tree = pids.iter().flat_map(|p| children(*p)).collect();
            tree.len() == 4
        });
        let t0 = Instant::now();
        let out = agent.cli(&["stop", "stubborn"]);
        let took = t0.elapsed();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            took >= Duration::from_millis(650),
            "waited for the stop timeout: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(
            stderr(&out).contains("killed"),
            "progress says it was killed: {}",
            stderr(&out)
        );
        for p in pids.iter().chain(&tree) {
            wait_until(
                &format!("process {p} to be gone after the stop"),
                Duration::from_secs(10),
                || !alive(*p),
            );
        }
        assert_eq!(agent.status("stubborn")["state"], "stopped");
        // The killed trees' slots start again (never in a killed cgroup).
        let out = agent.cli(&["start", "stubborn"]);
        assert!(out.status.success(), "start: {}", stderr(&out));
        wait_until(
            "the restarted workers' sleeps",
            Duration::from_secs(20),
            || {
                let now = agent.pids("stubborn");
                now.len() == 2
                    && now.iter().all(|p| !pids.contains(p))
                    && now.iter().map(|p| children(*p).len()).sum::<usize>() == 4
            },
        );
    });
}

#[test]
fn orphans_of_a_double_forking_worker_are_reaped() {
    each_reactor(|reactor| {
        // Each worker leaves two orphans that live until the test lets them go (no race
        // between their lifetime and the test's first look).
        let dir = tempfile::tempdir().expect("tempdir");
        let go = dir.path().join("go");
        let site = format!(
            "name = \"forky\"\ncommand = [\"/bin/sh\", \"-c\", \"(while [ ! -e {go} ]; do sleep 0.05; done &); (while [ ! -e {go} ]; do sleep 0.05; done &); exec sleep 1000\"]\nworkers = 2\n",
            go = go.display()
        );
        let agent = TestAgent::start_ready(
            &[("forky", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "forky",
            2,
        );
        let me = i64::from(agent.pid());
        let workers = agent.pids("forky");
        let orphans = || {
            processes()
                .into_iter()
                // The agent's other child is its fd holder.
                .filter(|p| p.1 == me && !workers.contains(&p.0) && !p.3.contains("fd-holder"))
                .collect::<Vec<_>>()
        };
        // The orphaned loops were re-parented to the agent (subreaper)...
        wait_until(
            "the 4 orphans adopted by the agent",
            Duration::from_secs(20),
            || orphans().iter().filter(|p| p.2 != 'Z').count() == 4,
        );
        // ...and reaped when they exit: no zombie child of the agent remains.
        std::fs::write(&go, "").expect("touch");
        wait_until(
            "the orphans exited and reaped",
            Duration::from_secs(20),
            || orphans().is_empty(),
        );
        assert_eq!(
            agent.status("forky")["ready"],
            2,
            "the workers themselves are fine"
        );
    });
}

#[test]
fn sigterm_stops_everything_and_leaves_no_process() {
    each_reactor(|reactor| {
        let site = sleeper("web", 3, "");
        let mut agent = TestAgent::start_ready(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "web",
            3,
        );
        let pids = agent.pids("web");
        assert_eq!(agent.stop(), Some(0));
        for p in pids {
            assert!(!alive(p), "worker {p} outlived the agent");
        }
        assert!(!agent.socket.exists(), "the control socket is removed");
        // Unreachable agent: its own exit code.
        let out = agent.cli(&["status"]);
        assert_eq!(out.status.code(), Some(3));
    });
}

#[test]
fn scale_and_rolling_restart() {
    each_reactor(|reactor| {
        let site = sleeper("web", 2, "");
        let agent = TestAgent::start_ready(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "web",
            2,
        );
        let out = agent.cli(&["scale", "web", "4"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(agent.status("web")["ready"], 4);
        let out = agent.cli(&["scale", "web", "1"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = agent.status("web");
        assert_eq!(s["workers"].as_array().map(Vec::len), Some(1));
        assert_eq!(s["workers"][0]["id"], 0, "the lowest slot is kept");
        agent.cli(&["scale", "web", "3"]);
        let before = agent.pids("web");
        let out = agent.cli(&["restart", "web"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let after = agent.pids("web");
        assert_eq!(after.len(), 3);
        for p in &before {
            assert!(!after.contains(p), "every worker was replaced");
        }
        // Progress shows one worker at a time.
        let events = stderr(&out);
        let first_ready = events.find("w-0 ready").expect("w-0 ready");
        let second_stop = events.find("w-1 killed").expect("w-1 stopped");
        assert!(
            first_ready < second_stop,
            "rolling, one at a time: {events}"
        );
    });
}

#[test]
fn scale_down_stops_idle_workers_before_busy_ones() {
    // Worker 3 reports BUSY=1, the others BUSY=0: scaling to 2 stops 2 and 1, not 3.
    let site = format!(
        "name = \"busy\"\ncommand = [\"{BIN}\", \"__probe\", \"busy-if\", \"3\"]\nworkers = 4\n[ready]\ncheck = \"notify\"\n"
    );
    let agent = TestAgent::start_ready(
        &[("busy", &site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "busy",
        4,
    );
    let busy = |s: &serde_json::Value| -> Vec<(u64, bool)> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| (w["id"].as_u64().expect("id"), w["busy"] == true))
            .collect()
    };
    // READY=1 and BUSY= arrive in one datagram: once all are ready, all have reported.
    assert_eq!(
        busy(&agent.status("busy")),
        vec![(0, false), (1, false), (2, false), (3, true)]
    );
    let out = agent.cli(&["scale", "busy", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<u64> = busy(&agent.status("busy"))
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        ids,
        vec![0, 3],
        "the idle workers went first, the busy one stayed"
    );
}

#[test]
fn ready_from_a_workers_child_is_ignored_and_said_in_the_log() {
    // The worker is a shell; its child (still running) sends READY=1 for itself.
    let site = format!(
        "name = \"kid\"\ncommand = [\"/bin/sh\", \"-c\", \"{BIN} __probe busy-if none & exec sleep 600\"]\nworkers = 1\n[ready]\ncheck = \"notify\"\ntimeout = \"60s\"\n"
    );
    let agent = TestAgent::start(
        &[("kid", &site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
    );
    let start = Instant::now();
    let mut log = String::new();
    while start.elapsed() < Duration::from_secs(20) && !log.contains("ignored") {
        std::thread::sleep(Duration::from_millis(100));
        log = stdout(&agent.cli(&["logs", "kid", "-n", "20"]));
    }
    assert!(
        log.contains("READY=1 from pid") && log.contains("a child of gen-1 w-0"),
        "{log}"
    );
    let s = agent.status("kid");
    assert_eq!(s["workers"][0]["state"], "starting", "{s:#}");
}

#[test]
fn signal_reaches_every_worker_and_logs_capture_output() {
    each_reactor(|reactor| {
        let site = "name = \"sig\"\ncommand = [\"/bin/sh\", \"-c\", \"trap 'echo got-usr1 $HATCHERY_WORKER_ID' USR1; echo hello $HATCHERY_WORKER_ID; while :; do sleep 0.05; done\"]\nworkers = 2\n";
        let agent = TestAgent::start_ready(
            &[("sig", site)],
            Options {
                reactor,
                cgroups: true,
            },
            "sig",
            2,
        );
        // Follow the log while the signal is sent.
        let mut follow = Command::new(BIN)
            .arg("--socket")
            .arg(&agent.socket)
            .args(["logs", "sig", "-f", "-n", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("logs -f");
        // Lines arrive on a channel, so a missed line cannot block the test; the signal
        // is sent again until both workers' lines are seen, since `logs -f` may attach
        // only after the first one was handled (a slow VM).
        let reader = BufReader::new(follow.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut got: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let seen =
            |got: &[String], id: &str| got.iter().any(|l| l.ends_with(&format!("got-usr1 {id}")));
        while !(seen(&got, "0") && seen(&got, "1")) && Instant::now() < deadline {
            let out = agent.cli(&["signal", "sig", "USR1"]);
            assert!(out.status.success(), "{}", stderr(&out));
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
                if line.contains("got-usr1") {
                    got.push(line);
                }
            }
        }
        let _ = follow.kill();
        let _ = follow.wait();
        assert!(
            seen(&got, "0") && seen(&got, "1"),
            "both workers trapped USR1: {got:?}"
        );
        let out = agent.cli(&["logs", "sig", "-n", "50"]);
        let text = stdout(&out);
        assert!(
            text.contains("hello 0") && text.contains("hello 1"),
            "{text}"
        );
        let out = agent.cli(&["signal", "sig", "SIGNOPE"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "unknown signals are usage errors"
        );
    });
}

#[test]
fn bad_requests_are_refused_and_nothing_is_disturbed() {
    each_reactor(|reactor| {
        let site = sleeper("web", 1, "");
        let agent = TestAgent::start_ready(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: false,
            },
            "web",
            1,
        );
        let pids = agent.pids("web");
        let ask = |payload: &[u8]| -> serde_json::Value {
            let mut s = UnixStream::connect(&agent.socket).expect("connect");
            if let Err(e) = s.write_all(payload) {
                // The agent answers an oversized request as soon as it passes the limit
                // and hangs up, so the rest of the write may meet a closed socket; its
                // reply is already queued on our side.
                assert!(
                    payload.len() > hatchery::control::MAX_REQUEST
                        && e.kind() == std::io::ErrorKind::BrokenPipe,
                    "write: {e}"
                );
            }
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).expect("read");
            serde_json::from_str(&line).expect("a JSON reply")
        };
        assert_eq!(ask(b"not json\n")["error"]["kind"], "bad_request");
        assert_eq!(
            ask(b"{\"cmd\":\"explode\"}\n")["error"]["kind"],
            "bad_request"
        );
        assert_eq!(
            ask(b"{\"cmd\":\"stop\",\"site\":\"nope\"}\n")["error"]["kind"],
            "not_found"
        );
        let huge = vec![b'x'; 4 * 1024 * 1024];
        assert_eq!(ask(&huge)["error"]["kind"], "bad_request");
        let out = agent.cli(&["restart", "nope"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("no such site: nope"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            agent.pids("web"),
            pids,
            "the running worker was not disturbed"
        );
    });
}

#[test]
fn bad_config_is_refused_by_check_agent_and_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir_all(&sites).expect("mkdir");
    // `hatchery check` of this directory's agent file.
    let check = || {
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(dir.path().join("hatchery.toml"))
            .output()
            .expect("check")
    };
    std::fs::write(
        dir.path().join("hatchery.toml"),
        format!(
            "state_dir = \"{}\"\nsites_dir = \"{}\"\n",
            dir.path().display(),
            sites.display()
        ),
    )
    .expect("write");
    std::fs::write(
        sites.join("blog.toml"),
        "name = \"blog\"\ncommand = [\"/bin/true\"]\n[stop]\ntimeout = \"soon\"\n",
    )
    .expect("write");
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("blog.toml:4: stop.timeout:") && err.contains("ms, s, m, h"),
        "{err}"
    );

    // Every problem of a file at once, each with its line and key, a typo with the key
    // meant.
    std::fs::write(
        sites.join("blog.toml"),
        "name = \"blog\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n[stop]\ntimeout = 5\n[[listen]]\nname = \"a\"\ntpc = \"127.0.0.1:1\"\n",
    )
    .expect("write");
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(text.contains("NOT valid: 3 problem(s)"), "{text}");
    for expected in [
        "blog.toml:3: wrokers: unknown key `wrokers`; did you mean `workers`?",
        "blog.toml:5: stop.timeout: expected a duration like \"30s\", found integer 5",
        "blog.toml:8: listen[0].tpc: unknown key `tpc`; did you mean `tcp`?",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }

    // A valid file checks fine and prints the effective configuration and features.
    std::fs::write(
        sites.join("blog.toml"),
        "name = \"blog\"\ncommand = [\"/bin/true\"]\n",
    )
    .expect("write");
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("backoff_initial = \"100ms\"")
            && text.contains("kernel features")
            && text.contains("pidfd"),
        "{text}"
    );
    // `--json` is the typed report: the effective file of each site, every default filled.
    let out = Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(dir.path().join("hatchery.toml"))
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: hatchery::status::CheckReport =
        serde_json::from_slice(&out.stdout).expect("check --json is a CheckReport");
    assert!(report.valid && report.problems.is_empty(), "{report:?}");
    let blog = &report.sites[0];
    assert_eq!(blog.name.as_deref(), Some("blog"));
    let restart = blog.restart.as_ref().expect("restart filled in");
    assert_eq!(restart.backoff_initial.as_deref(), Some("100ms"));
    assert!(report.sandbox.contains_key("blog"), "{report:?}");

    // On reload, a bad file changes nothing that runs.
    each_reactor(|reactor| {
        let site = sleeper("web", 2, "");
        let agent = TestAgent::start_ready(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: false,
            },
            "web",
            2,
        );
        let pids = agent.pids("web");
        std::fs::write(
            agent.site_file("web"),
            "name = \"web\"\ncommand = [\"/bin/sleep\"]\nworkers = \"many\"\n",
        )
        .expect("write");
        let out = agent.cli(&["reload"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("web.toml"), "{}", stderr(&out));
        // The refusal is the answer: nothing was changed before it.
        assert_eq!(agent.pids("web"), pids);
        assert_eq!(agent.status("web")["state"], "running");
    });
}

#[test]
fn reload_adds_removes_and_changes_sites() {
    each_reactor(|reactor| {
        let agent = TestAgent::start_ready(
            &[("a", &sleeper("a", 1, "")), ("b", &sleeper("b", 1, ""))],
            Options {
                reactor,
                cgroups: true,
            },
            "a",
            1,
        );
        agent.wait_for("b", "b ready", Duration::from_secs(10), |s| s["ready"] == 1);
        let b_pids = agent.pids("b");
        let a_pid = agent.pids("a")[0];
        std::fs::remove_file(agent.site_file("b")).expect("rm");
        std::fs::write(agent.site_file("c"), sleeper("c", 2, "")).expect("write");
        std::fs::write(
            agent.site_file("a"),
            sleeper("a", 1, "[env]\nNEW = \"1\"\n"),
        )
        .expect("write");
        let out = agent.cli(&["reload"]);
        assert!(out.status.success(), "{}", stderr(&out));
        agent.wait_for("c", "c ready", Duration::from_secs(10), |s| s["ready"] == 2);
        let a = agent.wait_for("a", "a restarted", Duration::from_secs(10), |s| {
            s["ready"] == 1 && s["workers"][0]["pid"].as_i64() != Some(a_pid)
        });
        let new_pid = a["workers"][0]["pid"].as_i64().expect("pid");
        let environ = std::fs::read(format!("/proc/{new_pid}/environ")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&environ).contains("NEW=1"),
            "the new env is in effect"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while b_pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            b_pids.iter().all(|p| !alive(*p)),
            "removed site's workers stopped"
        );
        let out = agent.cli(&["status", "b"]);
        assert_eq!(out.status.code(), Some(1), "b is gone");
        // SIGHUP does the same as `reload`.
        std::fs::write(agent.site_file("c"), sleeper("c", 3, "")).expect("write");
        Command::new("kill")
            .arg("-HUP")
            .arg(agent.pid().to_string())
            .status()
            .expect("kill");
        agent.wait_for("c", "c scaled by SIGHUP", Duration::from_secs(10), |s| {
            s["ready"] == 3
        });
    });
}

#[test]
fn listeners_are_passed_with_socket_activation_and_notify_readiness() {
    each_reactor(|reactor| {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let site = format!(
            "name = \"demo\"\ncommand = [\"{BIN}\", \"__demo-worker\"]\nworkers = 2\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n[ready]\ncheck = \"notify\"\ntimeout = \"10s\"\n"
        );
        let agent = TestAgent::start_ready(
            &[("demo", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "demo",
            2,
        );
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
            let mut body = String::new();
            std::io::Read::read_to_string(&mut s, &mut body).expect("read");
            let line = body.lines().last().unwrap_or("").to_string();
            assert!(
                line.starts_with("hello from worker ") && line.ends_with(", generation 1"),
                "{body}"
            );
            seen.insert(line);
        }
        assert!(!seen.is_empty());
        let pid = agent.pids("demo")[0];
        let environ = String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{pid}/environ")).expect("environ"),
        )
        .into_owned();
        let vars: Vec<&str> = environ.split('\0').filter(|v| !v.is_empty()).collect();
        assert!(
            vars.contains(&"LISTEN_FDS=1") && vars.contains(&"LISTEN_FDNAMES=http"),
            "{vars:?}"
        );
        assert!(
            vars.contains(&format!("LISTEN_PID={pid}").as_str()),
            "{vars:?}"
        );
        assert!(
            !vars
                .iter()
                .any(|v| v.starts_with("HATCHERY_LOG=") || v.starts_with("HATCHERY_REACTOR=")),
            "the agent's environment does not leak: {vars:?}"
        );
    });
}

#[test]
fn tcp_readiness_waits_for_a_worker_to_accept() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    // The worker starts accepting only once the test says so: it stays `starting` however
    // slow the machine, and is ready only after.
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let site = format!(
        "name = \"demo\"\ncommand = [\"/bin/sh\", \"-c\", \"while [ ! -e {go} ]; do sleep 0.05; done; exec {BIN} __demo-worker\"]\nworkers = 1\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\n[ready]\ncheck = \"tcp\"\ntimeout = \"60s\"\n",
        go = go.display()
    );
    let agent = TestAgent::start(
        &[("demo", &site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
    );
    agent.wait_for("demo", "starting", Duration::from_secs(20), |s| {
        s["workers"][0]["state"] == "starting"
    });
    // Probed for a while (every 50 ms), still not ready: nothing accepts yet.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300) {
        let s = agent.status("demo");
        assert_eq!(s["ready"], 0, "ready before the worker accepts: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&go, "").expect("let the worker start");
    agent.wait_for(
        "demo",
        "ready once accepting",
        Duration::from_secs(30),
        |s| s["ready"] == 1,
    );
}

#[test]
fn another_uid_is_refused_and_a_site_owner_sees_only_its_site() {
    if !is_root() && skip("needs root to run the CLI as another uid") {
        return;
    }
    each_reactor(|reactor| {
        let mine = sleeper("mine", 1, "user = \"nobody\"\n");
        let theirs = sleeper("theirs", 1, "");
        let agent = TestAgent::start_ready(
            &[("mine", &mine), ("theirs", &theirs)],
            Options {
                reactor,
                cgroups: false,
            },
            "theirs",
            1,
        );
        // The test directory must be reachable by nobody to connect to the socket.
        std::fs::set_permissions(
            agent.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let as_nobody = |args: &[&str]| {
            use std::os::unix::process::CommandExt;
            Command::new(BIN)
                .uid(65534)
                .gid(65534)
                .arg("--socket")
                .arg(&agent.socket)
                .args(args)
                .output()
                .expect("cli")
        };
        let out = as_nobody(&["stop", "theirs"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("may not control site theirs"),
            "{}",
            stderr(&out)
        );
        let out = as_nobody(&["reload"]);
        assert_eq!(out.status.code(), Some(1));
        let out = as_nobody(&["status", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let names: Vec<&str> = v["sites"]
            .as_array()
            .expect("sites")
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(names, vec!["mine"], "only its own site is visible");
        let out = as_nobody(&["restart", "mine"]);
        assert!(
            out.status.success(),
            "its own site may be controlled: {}",
            stderr(&out)
        );
        assert_eq!(
            agent.status("theirs")["state"],
            "running",
            "nothing was disturbed"
        );
    });
}

#[test]
fn workers_get_only_their_fds_and_declared_environment() {
    each_reactor(|reactor| {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let site = format!(
            "name = \"probe\"\ncommand = [\"{BIN}\", \"__probe\", \"info\"]\nworkers = 2\n[env]\nGREETING = \"hi\"\n[[listen]]\nname = \"web\"\ntcp = \"127.0.0.1:{port}\"\n"
        );
        let agent = TestAgent::start_with_env(
            &[("probe", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            &[("SECRET_OF_THE_AGENT", "x")],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let infos: Vec<serde_json::Value> = loop {
            let out = agent.cli(&["logs", "probe", "-n", "10"]);
            let found: Vec<serde_json::Value> = stdout(&out)
                .lines()
                .filter_map(|l| {
                    l.split_once("] ")
                        .and_then(|(_, json)| serde_json::from_str(json).ok())
                })
                .collect();
            if found.len() >= 2 {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "no probe output: {}",
                stdout(&out)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for info in infos {
            let fds: Vec<i64> = info["fds"]
                .as_array()
                .expect("fds")
                .iter()
                .filter(|f| !f["target"].as_str().unwrap_or("").starts_with("/proc/"))
                .filter_map(|f| f["fd"].as_i64())
                .collect();
            assert_eq!(
                fds,
                vec![0, 1, 2, 3],
                "stdio and the one listener, nothing of the agent: {info:#}"
            );
            let env: Vec<&String> = info["env"].as_object().expect("env").keys().collect();
            let expected = [
                "GREETING",
                "HATCHERY_GENERATION",
                "HATCHERY_SITE",
                "HATCHERY_WORKER_ID",
                "LISTEN_FDNAMES",
                "LISTEN_FDS",
                "LISTEN_PID",
                "NOTIFY_SOCKET",
                "PATH",
            ];
            assert_eq!(
                env, expected,
                "exactly the declared and protocol variables: {info:#}"
            );
            assert_eq!(info["env"]["LISTEN_PID"], info["pid"].to_string());
        }
    });
}

/// Whether this test runs with real cgroup placement (root and a cgroup2 mount): the
/// killed-leaf tests mean nothing without it.
fn cgroup_placement() -> bool {
    if !is_root() {
        return !skip("needs root for cgroup placement");
    }
    if hatchery::cgroup::cgroup2_mount().is_none() {
        return !skip("no cgroup2 mount");
    }
    true
}

/// `pids` and their children.
fn with_children(pids: &[i64]) -> Vec<i64> {
    pids.iter()
        .flat_map(|p| std::iter::once(*p).chain(children(*p)))
        .collect()
}

/// A site of `workers` shells, each waiting on a `sleep` child, listening on `addr`.
fn sleepers(name: &str, workers: u32, addr: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\n\
         workers = {workers}\n[[listen]]\ntcp = \"{addr}\"\n{extra}"
    )
}

/// Each worker of `site` runs, and has forked its `sleep` child (so it survived its birth
/// in its cgroup leaf); returns the workers' pids.
fn workers_with_children(agent: &TestAgent, site: &str, n: usize) -> Vec<i64> {
    let mut pids = Vec::new();
    wait_until(
        &format!("{n} workers of {site}, each with its child"),
        Duration::from_secs(20),
        || {
            let s = agent.status(site);
            pids = s["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["state"] == "ready")
                .filter_map(|w| w["pid"].as_i64())
                .collect();
            pids.len() == n && pids.iter().all(|p| alive(*p) && !children(*p).is_empty())
        },
    );
    pids
}

/// A leaf whose tree was killed (cgroup.kill) is never used again: on Linux 6.18 every
/// later child cloned into it is SIGKILLed at birth, so a slot that reused it could never
/// start again. Every path that kills a worker's tree is followed by starting the slot.
#[test]
fn slots_start_again_after_their_tree_was_killed() {
    if !cgroup_placement() {
        return;
    }
    each_reactor(|reactor| {
        let port = free_port();
        let site = format!(
            "name = \"kids\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\nworkers = 2\n\
             [[listen]]\ntcp = \"127.0.0.1:{port}\"\n[stop]\ntimeout = \"20s\"\n[restart]\nbackoff_initial = \"50ms\"\n"
        );
        let mut agent = TestAgent::start(
            &[("kids", &site)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        let first = workers_with_children(&agent, "kids", 2);
        let leaf_id = |s: &serde_json::Value| {
            use std::os::unix::fs::MetadataExt;
            let leaf = s["workers"][0]["cgroup"]
                .as_str()
                .expect("a leaf")
                .to_string();
            std::fs::metadata(&leaf).expect("the leaf exists").ino()
        };
        let leaf0 = leaf_id(&agent.status("kids"));

        // 1. kill -9 of a worker: its sleep is left in the leaf, which is killed.
        Command::new("kill")
            .args(["-KILL", &first[0].to_string()])
            .status()
            .expect("kill");
        let mut after_kill = Vec::new();
        wait_until("w-0 back with its child", Duration::from_secs(20), || {
            after_kill = workers_with_children_now(&agent, "kids");
            after_kill.len() == 2 && !after_kill.contains(&first[0])
        });
        let s = agent.status("kids");
        assert_eq!(s["state"], "running", "{s:#}");
        assert_eq!(s["workers"][0]["restarts"], 1, "{s:#}");
        assert_ne!(
            leaf_id(&s),
            leaf0,
            "the killed leaf is not used again: {s:#}"
        );

        // 2. restart: the stop signal ends each sh, its sleep is killed with the leaf.
        let out = agent.cli(&["restart", "kids"]);
        assert!(out.status.success(), "restart: {}", stderr(&out));
        let restarted = workers_with_children(&agent, "kids", 2);
        assert!(
            restarted.iter().all(|p| !after_kill.contains(p)),
            "every worker was restarted: {after_kill:?} -> {restarted:?}"
        );

        // 3. stop, then start.
        let out = agent.cli(&["stop", "kids"]);
        assert!(out.status.success(), "stop: {}", stderr(&out));
        let out = agent.cli(&["start", "kids"]);
        assert!(out.status.success(), "start: {}", stderr(&out));
        let started = workers_with_children(&agent, "kids", 2);

        // 4. the agent crashes; a new one on the same cgroup tree adopts the workers, in
        // their leaves; one killed then has its leaf killed, and starts in a fresh one.
        let leaf_before = leaf_id(&agent.status("kids"));
        agent.crash();
        agent.relaunch();
        let mut again = workers_with_children(&agent, "kids", 2);
        again.sort_unstable();
        let mut kept = started.clone();
        kept.sort_unstable();
        assert_eq!(again, kept, "adopted, not restarted");
        assert_eq!(leaf_id(&agent.status("kids")), leaf_before);
        Command::new("kill")
            .args(["-KILL", &started[0].to_string()])
            .status()
            .expect("kill");
        let mut after = Vec::new();
        wait_until(
            "the adopted w-0 back with its child",
            Duration::from_secs(20),
            || {
                after = workers_with_children_now(&agent, "kids");
                after.len() == 2 && !after.contains(&started[0])
            },
        );
        let s = agent.status("kids");
        assert_eq!(s["state"], "running", "{s:#}");
        assert_ne!(leaf_id(&s), leaf_before, "a fresh leaf: {s:#}");

        // 5. shutdown kills the children with their leaves and removes the whole tree.
        let base = agent.cgroup_base.clone().expect("cgroups in use");
        assert_eq!(agent.stop(), Some(0));
        assert!(
            !base.exists(),
            "the agent's cgroup tree is removed: {:?}",
            std::fs::read_dir(base.join("sites/kids/gen-1"))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
    });
}

/// A worker that crashes alone (nothing of it left in its leaf, which was never killed) is
/// replaced in the same leaf when its replacement starts at once: no cgroup made and removed
/// for each crash. One that leaves a process behind gets a fresh leaf (and what it left is
/// killed), and so does one asked to stop (a stop's timeout may have killed its leaf).
#[test]
fn a_worker_that_crashes_alone_is_replaced_in_its_leaf() {
    if !cgroup_placement() {
        return;
    }
    each_reactor(|reactor| {
        let restart = "[restart]\nbackoff_initial = \"10ms\"\nhealthy_after = \"200ms\"\n";
        let alone = format!(
            "name = \"alone\"\ncommand = [\"/bin/sleep\", \"1000\"]\nworkers = 1\n{restart}"
        );
        let kids = format!(
            "name = \"kids\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\n\
             workers = 1\n{restart}"
        );
        let agent = TestAgent::start(
            &[("alone", &alone), ("kids", &kids)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        // The ready worker's pid and leaf, once it has run long enough to be restarted at
        // once when it crashes (`healthy_after`) in its leaf (a second).
        let healthy_in = |site: &str, not: Option<i64>| {
            let mut found = (0, String::new());
            wait_until("w-0 up past healthy_after", Duration::from_secs(20), || {
                let s = agent.status(site);
                let w = &s["workers"][0];
                let pid = w["pid"].as_i64().unwrap_or(0);
                found = (pid, w["cgroup"].as_str().unwrap_or_default().to_string());
                w["state"] == "ready"
                    && Some(pid) != not
                    && w["uptime_ms"].as_u64().is_some_and(|u| u >= 1200)
            });
            found
        };
        let healthy = |not: Option<i64>| healthy_in("alone", not);
        let inode = |leaf: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(leaf).expect("the leaf exists").ino()
        };
        let (first, leaf) = healthy(None);
        let ino = inode(&leaf);
        for crash in 1..=2 {
            let before = healthy(None).0;
            Command::new("kill")
                .args(["-KILL", &before.to_string()])
                .status()
                .expect("kill");
            let (pid, again) = healthy(Some(before));
            assert_eq!(again, leaf, "crash {crash}: the same leaf");
            assert_eq!(
                inode(&again),
                ino,
                "crash {crash}: the same cgroup, not a new one"
            );
            let procs = std::fs::read_to_string(format!("{again}/cgroup.procs")).expect("procs");
            assert_eq!(
                procs.trim(),
                pid.to_string(),
                "crash {crash}: alone in its leaf"
            );
            let s = agent.status("alone");
            assert_eq!(s["workers"][0]["restarts"], crash, "{s:#}");
        }
        assert!(!alive(first));

        // A crash that leaves its child behind: a fresh leaf, the child killed with the old.
        let (sh, kids_leaf) = healthy_in("kids", None);
        let left = children(sh);
        assert_eq!(left.len(), 1, "the worker's sleep: {left:?}");
        let kids_ino = inode(&kids_leaf);
        Command::new("kill")
            .args(["-KILL", &sh.to_string()])
            .status()
            .expect("kill");
        let (_, next) = healthy_in("kids", Some(sh));
        assert_ne!(
            inode(&next),
            kids_ino,
            "a fresh leaf: {next} (was {kids_leaf})"
        );
        wait_until("the left child killed", Duration::from_secs(20), || {
            !alive(left[0])
        });

        let out = agent.cli(&["restart", "alone"]);
        assert!(out.status.success(), "restart: {}", stderr(&out));
        let (_, fresh) = healthy(None);
        assert_ne!(
            inode(&fresh),
            ino,
            "a worker asked to stop is replaced in a fresh leaf: {fresh} (was {leaf})"
        );
    });
}

/// The pids of ready workers that have their child, without waiting.
fn workers_with_children_now(agent: &TestAgent, site: &str) -> Vec<i64> {
    agent.status(site)["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["state"] == "ready")
        .filter_map(|w| w["pid"].as_i64())
        .filter(|p| alive(*p) && !children(*p).is_empty())
        .collect()
}

/// The mask in `/proc/<pid>/status` named `field` (`SigIgn`, `SigBlk`), as a bit set.
fn signal_mask(pid: i64, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .expect("field")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

/// Signals ignored by whoever started the agent (`nohup`, a shell's `&`) reach neither the
/// agent's handling nor its workers; workers start in `/`, not in the agent's directory;
/// signals the agent does not act on are logged, never fatal.
#[test]
fn inherited_signal_dispositions_and_directory_stay_with_the_agent() {
    each_reactor(|reactor| {
        let site = "name = \"quiet\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 2\n\
                    [stop]\nsignal = \"SIGINT\"\ntimeout = \"60s\"\n";
        let mut agent = TestAgent::start_ignoring(
            &[("quiet", site)],
            Options {
                reactor,
                cgroups: false,
            },
            &["INT", "QUIT", "HUP", "USR1"],
        );
        let s = agent.wait_for("quiet", "2 ready", Duration::from_secs(20), |s| {
            s["ready"] == 2
        });
        let agent_pid = i64::from(agent.pid());
        // The way the agent was started does leave these ignored in what it execs.
        let probe = Command::new("/bin/sh")
            .args([
                "-c",
                "trap '' INT QUIT HUP USR1; exec grep SigIgn /proc/self/status",
            ])
            .output()
            .expect("sh");
        let ignored = u64::from_str_radix(stdout(&probe).trim_start_matches("SigIgn:").trim(), 16)
            .expect("hex");
        for sig in ["HUP", "INT", "QUIT"] {
            assert_ne!(ignored & (1 << (libc_sig(sig) - 1)), 0, "{ignored:x}");
        }
        for w in s["workers"].as_array().expect("workers") {
            let pid = w["pid"].as_i64().expect("pid");
            assert_eq!(
                signal_mask(pid, "SigIgn"),
                0,
                "worker {pid} ignores nothing"
            );
            assert_eq!(signal_mask(pid, "SigBlk"), 0, "worker {pid} blocks nothing");
            assert_eq!(
                std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
                std::path::Path::new("/"),
                "worker {pid} runs in /, not in the agent's directory"
            );
        }
        // The stop signal (SIGINT) ends the workers, not the 60 s timeout's SIGKILL.
        let out = agent.cli(&["stop", "quiet"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = agent.status("quiet");
        for w in s["workers"].as_array().expect("workers") {
            assert_eq!(w["last_exit"], "killed by SIGINT", "{s:#}");
        }
        // Signals the agent does not act on: logged, never fatal, however often.
        for sig in ["USR1", "USR2", "ALRM", "SEGV", "SEGV", "QUIT", "XFSZ"] {
            let st = Command::new("kill")
                .args([&format!("-{sig}"), &agent_pid.to_string()])
                .status()
                .expect("kill");
            assert!(st.success());
            let log_has = format!("SIG{sig} ignored");
            wait_until(
                &format!("the agent to log {log_has}"),
                Duration::from_secs(10),
                || agent.agent_log().contains(&log_has),
            );
            assert_eq!(
                agent.status("quiet")["state"],
                "stopped",
                "alive after SIG{sig}"
            );
        }
        // SIGHUP still reloads and SIGINT still stops, though both were ignored at start.
        Command::new("kill")
            .args(["-HUP", &agent_pid.to_string()])
            .status()
            .expect("kill");
        wait_until("a reload on SIGHUP", Duration::from_secs(10), || {
            agent.agent_log().contains("configuration reloaded")
        });
        let mut child = agent.child.take().expect("running");
        Command::new("kill")
            .args(["-INT", &agent_pid.to_string()])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGINT");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "{}", agent.agent_log());
    });
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// An agent that dies leaves its workers running; a new one started on the same
/// configuration adopts them (issue 11): the same processes, found by the record of live
/// workers (pid and start time, checked through a pidfd), and the port held by them and
/// the new agent alone, with or without cgroups: never two sets of workers on one port.
/// A site whose file is gone when the new agent starts has its workers stopped instead,
/// before anything binds: its stop signal, then its tree killed after `stop.timeout` (as
/// recorded when its workers started: the site file is gone).
#[test]
fn a_new_agent_adopts_the_workers_of_a_dead_one_and_stops_those_of_removed_sites() {
    for (cgroups, stubborn) in [(false, false), (true, false), (false, true), (true, true)] {
        if cgroups && !cgroup_placement() {
            continue;
        }
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (script, timeout) = if stubborn {
            ("trap '' TERM; sleep 1000 & wait", "1s")
        } else {
            ("sleep 1000 & wait", "20s")
        };
        let site = format!(
            "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nworkers = 2\n\
             [[listen]]\ntcp = \"{addr}\"\n[stop]\ntimeout = \"{timeout}\"\n"
        );
        let mut agent = TestAgent::start(
            &[("web", &site)],
            Options {
                reactor: "io_uring",
                cgroups,
            },
        );
        let mut old = workers_with_children(&agent, "web", 2);
        old.sort_unstable();
        let old_tree = with_children(&old);
        let record = agent.dir.path().join("state/workers.json");
        let text = std::fs::read_to_string(&record).expect("the record of live workers");
        let recorded: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut pids: Vec<i64> = recorded["sites"][0]["gens"][0]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_i64())
            .collect();
        pids.sort_unstable();
        assert_eq!(pids, old, "{text}");

        agent.crash();
        assert!(
            old_tree.iter().all(|p| alive(*p)),
            "a SIGKILLed agent leaves its workers running"
        );
        agent.relaunch();
        let mut adopted = workers_with_children(&agent, "web", 2);
        adopted.sort_unstable();
        assert_eq!(adopted, old, "the same workers, adopted");
        assert_eq!(agent.status("web")["state"], "running");
        // One set of processes holds the port: the new agent, the workers and their
        // children.
        let ours: Vec<i64> = std::iter::once(i64::from(agent.pid()))
            .chain(old_tree.iter().copied())
            .collect();
        let holders: Vec<i64> = hatchery::net::tcp_holder_pids(addr)
            .into_iter()
            .map(i64::from)
            .collect();
        assert!(
            holders.contains(&i64::from(agent.pid())) && holders.iter().all(|h| ours.contains(h)),
            "holders of {addr}: {holders:?}, the new agent's: {ours:?}"
        );
        assert!(
            agent
                .agent_log()
                .contains("adopting 2 workers of a previous agent"),
            "{}",
            agent.agent_log()
        );

        // Again, but the site is gone from the configuration meanwhile.
        agent.crash();
        std::fs::remove_file(agent.site_file("web")).expect("remove the site");
        agent.relaunch();
        // The control socket answers only once the old workers were stopped.
        for p in &old_tree {
            wait_until(
                &format!("the dead agent's process {p} to be gone"),
                Duration::from_secs(10),
                || !alive(*p),
            );
        }
        let log = agent.agent_log();
        let said = log
            .lines()
            .find(|l| l.contains("stopping 2 workers of a previous agent"))
            .unwrap_or_else(|| panic!("the agent says what it found: {log}"));
        assert!(old.iter().all(|p| said.contains(&p.to_string())), "{said}");
        assert!(
            log.contains("stopped 2 workers of a previous agent"),
            "{log}"
        );
        // The site is gone, but its stop timeout is the one its workers were started
        // with (recorded): not the 10 s given to workers of an unknown site.
        assert_eq!(
            log.contains("a previous agent's worker did not stop within 1s"),
            stubborn,
            "{log}"
        );
        assert!(
            hatchery::net::tcp_holder_pids(addr).is_empty(),
            "nothing holds {addr} any more"
        );
        // A clean stop leaves no record behind.
        assert_eq!(agent.stop(), Some(0));
        assert!(!record.exists(), "the record is removed at shutdown");
    }
}

/// A site whose file was edited into one that does not load while its workers ran is not
/// a site removed: the agent's restart after a crash (and an upgrade) adopts its workers
/// with the configuration they were started with and shows the file's error, as a reload
/// of that file would have changed nothing. The mended file is applied by `reload`.
#[test]
fn a_site_whose_file_no_longer_loads_runs_on_across_a_crash_and_an_upgrade() {
    for cgroups in [false, true] {
        if cgroups && !cgroup_placement() {
            continue;
        }
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let site = sleepers("web", 2, addr, "");
        let mut agent = TestAgent::start(
            &[("web", &site)],
            Options {
                reactor: "io_uring",
                cgroups,
            },
        );
        let mut old = workers_with_children(&agent, "web", 2);
        old.sort_unstable();
        let old_tree = with_children(&old);
        let file = agent.site_file("web");

        // While no agent runs, the file is broken and a new site wants its address (its
        // file sorts first: it would be the one kept if the running site did not count).
        agent.crash();
        std::fs::write(&file, site.replace("workers = 2", "workers = \"many\"")).expect("edit");
        let api = agent.site_file("api");
        std::fs::write(&api, site.replace("\"web\"", "\"api\"")).expect("add api");
        agent.relaunch();
        let mut adopted = workers_with_children(&agent, "web", 2);
        adopted.sort_unstable();
        assert_eq!(
            adopted,
            old,
            "the same workers, adopted: {}",
            agent.agent_log()
        );
        let s = agent.status("web");
        assert_eq!(s["state"], "running", "{s:#}");
        let error = s["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("does not load") && error.contains("workers: invalid value \"many\""),
            "the file's error is shown: {s:#}"
        );
        assert_eq!(s["file"], file.display().to_string(), "{s:#}");
        let human = agent.cli(&["status"]);
        assert!(
            String::from_utf8_lossy(&human.stdout).contains("does not load"),
            "{}",
            String::from_utf8_lossy(&human.stdout)
        );
        assert!(
            !agent.agent_log().contains("stopping 2 workers"),
            "{}",
            agent.agent_log()
        );
        // The new site is the one put aside; only the running one holds the port.
        let a = agent.status("api");
        assert_eq!(a["state"], "failed", "{a:#}");
        assert!(
            a["error"]
                .as_str()
                .is_some_and(|e| e.contains("overlaps") && e.contains("site web")),
            "{a:#}"
        );
        let ours: Vec<i64> = std::iter::once(i64::from(agent.pid()))
            .chain(old_tree.iter().copied())
            .collect();
        let holders: Vec<i64> = hatchery::net::tcp_holder_pids(addr)
            .into_iter()
            .map(i64::from)
            .collect();
        assert!(
            holders.contains(&i64::from(agent.pid())) && holders.iter().all(|h| ours.contains(h)),
            "holders of {addr}: {holders:?}, the agent's and web's: {ours:?}"
        );
        std::fs::remove_file(&api).expect("remove api");

        // A reload of the same files changes nothing, and says why.
        let out = agent.cli(&["reload"]);
        assert!(!out.status.success(), "a reload of a bad file is refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("\"many\""),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut kept = agent.pids("web");
        kept.sort_unstable();
        assert_eq!(kept, old);

        // An upgrade, and a crash again: still the same workers, still the file's error.
        let out = agent.cli(&["upgrade"]);
        assert!(
            out.status.success(),
            "upgrade: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.agent_log()
        );
        agent.crash();
        agent.relaunch();
        let mut adopted = workers_with_children(&agent, "web", 2);
        adopted.sort_unstable();
        assert_eq!(adopted, old, "{}", agent.agent_log());
        assert!(agent.status("web")["error"].is_string());

        // Mended (with one more worker): the reload applies it, a scale that keeps both.
        std::fs::write(&file, site.replace("workers = 2", "workers = 3")).expect("mend");
        let out = agent.cli(&["reload"]);
        assert!(
            out.status.success(),
            "reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pids = workers_with_children(&agent, "web", 3);
        assert!(
            old.iter().all(|p| pids.contains(p)),
            "{pids:?} keeps {old:?}"
        );
        let s = agent.status("web");
        assert!(s["error"].is_null(), "{s:#}");

        // A site whose file no longer loads and whose workers are all gone is not started
        // again from its record: nothing of it runs, so it shows as not started.
        agent.crash();
        std::fs::write(&file, site.replace("workers = 2", "workers = \"many\"")).expect("edit");
        let tree = with_children(&pids);
        for p in &tree {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        for p in &tree {
            wait_until("the worker to be gone", Duration::from_secs(10), || {
                !alive(*p)
            });
        }
        agent.relaunch();
        let s = agent.status("web");
        assert_eq!(s["state"], "failed", "{s:#}");
        assert!(s["workers"].as_array().is_none_or(Vec::is_empty), "{s:#}");
        assert_eq!(agent.stop(), Some(0));
    }
}

/// A worker's number is its place in the site's slots: a record that numbers a live worker
/// beyond the most a site can have (`MAX_WORKERS`, a damaged record) is not taken over.
/// The new agent says why, stops that worker, and starts the site afresh.
#[test]
fn a_recorded_worker_numbered_beyond_the_most_a_site_can_have_is_stopped_not_adopted() {
    let site =
        "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\nworkers = 1\n";
    let mut agent = TestAgent::start(
        &[("web", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
    );
    let old = workers_with_children(&agent, "web", 1);
    let record = agent.dir.path().join("state/workers.json");
    // The record's writes are spaced (up to 100 ms): the worker in it, ready, before the crash.
    let paths = [
        "/sites/0/gens/0/workers/0",
        "/sites/0/machine/gens/0/workers/0",
    ];
    wait_until("the worker recorded ready", Duration::from_secs(20), || {
        std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|r| {
                paths.iter().all(|p| {
                    r.pointer(p)
                        .is_some_and(|w| w["pid"].as_i64() == Some(old[0]))
                }) && r.pointer(paths[1]).is_some_and(|w| w["ready"] == true)
            })
    });
    agent.crash();
    let text = std::fs::read_to_string(&record).expect("the record of live workers");
    let mut recorded: serde_json::Value = serde_json::from_str(&text).expect("json");
    let beyond = hatchery::config::MAX_WORKERS;
    // Both the process's record and the site machine's.
    for path in paths {
        let worker = recorded.pointer_mut(path).expect(path);
        assert_eq!(worker["pid"].as_i64(), Some(old[0]), "{text}");
        worker["slot"] = serde_json::json!(beyond);
    }
    std::fs::write(&record, recorded.to_string()).expect("write the record");
    agent.relaunch();
    wait_until(
        "the worker with the damaged record to be stopped",
        Duration::from_secs(20),
        || !alive(old[0]),
    );
    let new = workers_with_children(&agent, "web", 1);
    assert_ne!(new, old);
    let log = agent.agent_log();
    assert!(
        log.contains(&format!(
            "cannot adopt the workers of a previous agent (a worker is numbered w-{beyond}"
        )),
        "{log}"
    );
}

/// Workers told to stop that left (here by a scale down) do not rewrite the record of live
/// workers by themselves (a stop of 10,000 rewrote its 2 MB every 100 ms): it lists them
/// until the next change of another kind, such as a client's request. An agent that
/// crashes meanwhile leaves them listed, and its successor neither adopts nor starts them
/// again: it keeps the worker that runs.
#[test]
fn workers_that_left_when_told_stay_recorded_until_the_next_change_and_are_not_started_again() {
    let site = "name = \"web\"\ncommand = [\"/bin/sleep\", \"1000\"]\nworkers = 3\n";
    let mut agent = TestAgent::start_ready(
        &[("web", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "web",
        3,
    );
    let record = agent.dir.path().join("state/workers.json");
    let recorded = || recorded_pids(&record);
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&record).expect("the record").ino()
    };
    let slot_pid = |slot: u64| -> i64 {
        let s = agent.status("web");
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| w["id"] == slot)
            .and_then(|w| w["pid"].as_i64())
            .expect("the slot's worker")
    };
    // Scale down by one, twice: the scale is written at once, the worker's exit is not.
    let scale_down = |to: &str, leaving: i64| {
        let out = agent.cli(&["scale", "web", to]);
        assert!(out.status.success(), "{}", stderr(&out));
        wait_until(
            "the worker told to stop to exit",
            Duration::from_secs(20),
            || !alive(leaving),
        );
        let written = inode();
        assert!(
            recorded().contains(&leaving),
            "the worker that left is still listed"
        );
        // Longer than the record's longest wait after a change (100 ms): not written.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            inode(),
            written,
            "the record was rewritten for the exit alone"
        );
    };
    // Once settled (a `scale` to the count running waits for it): the settling's own
    // change of the record is behind.
    let out = agent.cli(&["scale", "web", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let w2 = slot_pid(2);
    scale_down("2", w2);
    // The next request is answered after the record is brought up to date.
    let kept = agent.pids("web");
    let mut listed = recorded();
    listed.sort_unstable();
    let mut running = kept.clone();
    running.sort_unstable();
    assert_eq!(listed, running, "the record after a request");

    let (w0, w1) = (slot_pid(0), slot_pid(1));
    scale_down("1", w1);
    agent.crash();
    agent.relaunch();
    agent.wait_for("web", "the worker adopted", Duration::from_secs(20), |s| {
        s["workers"].as_array().map(Vec::len) == Some(1) && s["ready"] == 1
    });
    assert_eq!(
        agent.pids("web"),
        vec![w0],
        "the running worker kept, no other"
    );
    assert!(!alive(w1));
    let log = agent.agent_log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// The pids of the first site's workers in the record of live workers at `record`.
fn recorded_pids(record: &std::path::Path) -> Vec<i64> {
    let text = std::fs::read_to_string(record).expect("the record of live workers");
    let value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["sites"][0]["gens"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["workers"].as_array().into_iter().flatten())
        .filter_map(|w| w["pid"].as_i64())
        .collect()
}

fn libc_sig(name: &str) -> u32 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        _ => panic!("unknown signal {name}"),
    }
}

/// A worker that writes all the time survives an agent SIGKILL (its pipe's read end is
/// held by the fd holder: no SIGPIPE), and what it wrote while no agent ran is in the
/// site's log once a new agent adopts it: every line, once, in order.
#[test]
fn a_chatty_worker_survives_an_agent_crash_and_its_lines_are_logged() {
    chatty_worker_across_a_crash("pipe", None);
}

/// The agent reads its workers' output by peeking at the socket, writes the lines, and
/// only then takes them off. Killed right after peeking, before writing: the next agent
/// reads those bytes again (nothing lost).
#[test]
fn an_agent_killed_after_reading_lines_it_had_not_written_loses_none() {
    chatty_worker_across_a_crash("pipe", Some("peeked"));
    chatty_worker_across_a_crash("socket", Some("peeked"));
}

/// Killed in the middle of writing the lines (half of them written): the next agent cuts
/// the log back to where the write began and reads the bytes again (nothing twice, no
/// torn line).
#[test]
fn an_agent_killed_inside_a_write_of_lines_leaves_no_half() {
    chatty_worker_across_a_crash("pipe", Some("torn"));
    chatty_worker_across_a_crash("socket", Some("torn"));
}

/// Killed right after writing the lines, before taking them off the socket: the next
/// agent sees (by the log having moved past where the output cursor says it stood) that
/// they are written, and takes them off without writing them again (nothing twice).
#[test]
fn an_agent_killed_after_writing_lines_it_had_not_taken_logs_none_twice() {
    chatty_worker_across_a_crash("pipe", Some("logged"));
    chatty_worker_across_a_crash("socket", Some("logged"));
}

/// A worker that prints a numbered line every 10 ms (through `output`, a pipe or the
/// site's socket); the agent dies (killed by the test, or, with `crash_at`, by itself at
/// that point of a read of the output), a new one adopts the worker; every line is in the
/// site's log once, in order.
fn chatty_worker_across_a_crash(output: &str, crash_at: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ticks = dir.path().join("ticks");
    let arm = dir.path().join("arm");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo tick $i; echo $i > {}.tmp; mv {}.tmp {}; sleep 0.01; done",
        ticks.display(),
        ticks.display(),
        ticks.display()
    );
    let site = format!(
        "name = \"chat\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nworkers = 1\noutput = \"{output}\"\n"
    );
    let crash_env = crash_at.map(|point| format!("{point} {}", arm.display()));
    let env: Vec<(&str, &str)> = crash_env
        .iter()
        .map(|v| ("HATCHERY_TEST_CRASH_OUTPUT", v.as_str()))
        .collect();
    let mut agent = TestAgent::start_with_env(
        &[("chat", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
        &env,
    );
    let tick = || -> u64 {
        std::fs::read_to_string(&ticks)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until("20 lines written", Duration::from_secs(20), || tick() >= 20);
    let pid = agent.pids("chat")[0];
    if crash_at.is_some() {
        std::fs::write(&arm, "").expect("arm the crash");
        agent.wait_killed();
        assert!(!arm.exists(), "the agent died where it was armed to");
    } else {
        agent.crash();
    }
    let at_crash = tick();
    wait_until(
        "50 more lines written while no agent runs",
        Duration::from_secs(30),
        || tick() >= at_crash + 50,
    );
    assert!(alive(pid), "the worker did not die of SIGPIPE");
    agent.relaunch();
    assert_eq!(agent.pids("chat"), [pid], "the same worker, adopted");
    let last = tick() + 10;
    let mut text = String::new();
    wait_until(
        &format!("line {last} in the site's log"),
        Duration::from_secs(30),
        || {
            text = stdout(&agent.cli(&["logs", "chat", "-n", "100000"]));
            text.lines().any(|l| l.ends_with(&format!("tick {last}")))
        },
    );
    let seen: Vec<u64> = text
        .lines()
        .filter_map(|l| l.rsplit_once("tick ").and_then(|(_, n)| n.parse().ok()))
        .collect();
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected, "every line once, in order");
    assert!(seen.len() as u64 >= last);
    // And whole: every line `<time> <who> ...` (a worker's `w-0[<pid>] tick <n>`),
    // nothing left of a write cut short.
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let time = fields.first().copied().unwrap_or_default();
        assert!(
            time.len() == "2026-12-04T17:06:49.736Z".len()
                && time.ends_with('Z')
                && time.as_bytes()[10] == b'T',
            "a whole line: {line:?}"
        );
        if line.contains("tick ") {
            assert!(
                fields.len() == 4 && fields[1].starts_with("w-0[") && fields[2] == "tick",
                "a whole line: {line:?}"
            );
        }
    }
    assert_eq!(agent.stop(), Some(0));
}

/// A site whose file changed while no agent ran is adopted as it ran, then changed as a
/// reload would change it: here only `workers` changed, so the adopted workers stay and
/// one more starts; then `env` changes too, so the adopted workers are restarted one at
/// a time with it.
#[test]
fn a_site_changed_while_the_agent_was_down_is_adopted_then_reconciled() {
    let site = |workers: u32, env: &str| {
        format!(
            "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\nworkers = {workers}\n\
             [env]\nFLAVOUR = \"{env}\"\n"
        )
    };
    let mut agent = TestAgent::start(
        &[("web", &site(2, "plain"))],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let old = workers_with_children(&agent, "web", 2);
    agent.crash();
    std::fs::write(agent.site_file("web"), site(3, "plain")).expect("write the site");
    agent.relaunch();
    let now = workers_with_children(&agent, "web", 3);
    assert!(
        old.iter().all(|p| now.contains(p)),
        "the two adopted workers stay, one more starts: {old:?} -> {now:?}"
    );
    let log = agent.agent_log();
    assert!(
        log.contains("the site's file changed while the agent was down"),
        "{log}"
    );
    agent.crash();
    std::fs::write(agent.site_file("web"), site(3, "spicy")).expect("write the site");
    agent.relaunch();
    let mut restarted = Vec::new();
    wait_until(
        "every adopted worker restarted with the new environment",
        Duration::from_secs(30),
        || {
            restarted = workers_with_children_now(&agent, "web");
            restarted.len() == 3
                && restarted.iter().all(|p| !now.contains(p))
                && restarted.iter().all(|p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == b"FLAVOUR=spicy"))
                })
        },
    );
    assert_eq!(agent.stop(), Some(0));
}

/// The workers' numbers of the summaries of `what` in `text` (`N more workers WHAT (`).
fn folded(text: &str, what: &str) -> u64 {
    let tail = format!(" more workers {what} (");
    text.lines()
        .filter_map(|l| {
            let at = l.find(&tail)?;
            l[..at].rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn a_mass_kill_is_logged_as_a_few_lines_and_a_summary_and_stop_prints_one() {
    const N: u64 = 200;
    each_reactor(|reactor| {
        // The replacements wait 5 s: the agent takes in every exit before it starts one,
        // so the exits come as one burst however slow the machine is at spawning (under
        // TCG beside other jobs a spawn takes ~70 ms, and exits seen between 200 spawns
        // came in a dozen bursts).
        let site = sleeper("mass", 200, "[restart]\nbackoff_initial = \"5s\"\n");
        let agent = TestAgent::start_ready(
            &[("mass", &site)],
            Options {
                reactor,
                cgroups: false,
            },
            "mass",
            N,
        );
        let pids: Vec<String> = agent.pids("mass").iter().map(i64::to_string).collect();
        assert_eq!(pids.len(), 200);
        let killed = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .status()
            .expect("kill");
        assert!(killed.success());
        agent.wait_for(
            "mass",
            "every worker restarted",
            Duration::from_secs(30),
            |s| {
                s["ready"] == N
                    && s["workers"]
                        .as_array()
                        .is_some_and(|w| w.iter().all(|w| w["restarts"] == 1))
            },
        );
        // The summary is said from the loop's deadline, while the agent runs: wait for
        // every crash to be accounted for in the log.
        let per_worker = |log: &str| {
            log.lines()
                .filter(|l| l.contains("worker killed by SIGKILL") && l.contains("site=mass"))
                .count() as u64
        };
        wait_until(
            "the summary of the crashes",
            Duration::from_secs(10),
            || {
                let log = agent.agent_log();
                per_worker(&log) + folded(&log, "killed by SIGKILL") == N
            },
        );
        let log = agent.agent_log();
        let shown = per_worker(&log);
        assert!(
            (5..=20).contains(&shown),
            "[{reactor}] a few lines per worker, not {shown}:\n{log}"
        );
        let summary = log
            .lines()
            .find(|l| l.contains("more workers killed by SIGKILL ("))
            .expect("a summary");
        assert!(
            summary.contains(" WARN ") && summary.contains("site=mass"),
            "{summary}"
        );

        // `stop` prints a few workers and a summary, then its reply as before.
        let out = agent.cli(&["stop", "mass"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "mass: all workers stopped\n");
        let progress = stderr(&out);
        let lines = progress
            .lines()
            .filter(|l| l.starts_with("  w-") && l.ends_with(" killed by SIGTERM"))
            .count() as u64;
        assert!(
            (5..=20).contains(&lines),
            "[{reactor}] a few lines per worker, not {lines}:\n{progress}"
        );
        assert_eq!(
            lines + folded(&progress, "killed by SIGTERM"),
            N,
            "every worker is counted once:\n{progress}"
        );
        assert!(progress.lines().count() < 30, "{progress}");
        // The workers are reaped once the stop is answered (each turn of the agent's loop
        // that handles exits of a stop only says how they ended): none is left a zombie.
        let me = i64::from(agent.pid());
        wait_until(
            "the stopped workers to be reaped",
            Duration::from_secs(10),
            || !processes().iter().any(|p| p.1 == me && p.2 == 'Z'),
        );

        // Machine-readable progress is never folded: one event per worker.
        let out = agent.cli(&["start", "mass", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let ready = stdout(&out)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"].as_str().is_some_and(|e| e.ends_with(" ready")))
            .count() as u64;
        assert_eq!(ready, N, "{}", stdout(&out));
    });
}

/// Under systemd with stderr connected to the journal (`JOURNAL_STREAM` names it), the
/// agent's lines go to the journal's native socket as entries with their fields, so
/// `journalctl HATCHERY_SITE=web` finds them; nothing goes to the stream.
#[test]
fn under_systemd_the_agents_lines_are_journal_entries_with_the_site_and_worker() {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket).expect("bind the journal's socket");
    journal
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Read from the start, as journald does: entries the agent sends while nobody reads
    // would fill the socket's queue (10 datagrams by default, where systemd is not there to
    // raise `net.unix.max_dgram_qlen`), and the agent drops what does not fit.
    let (entries, received) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = journal.recv(&mut buf) {
            if entries.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // What systemd gives a service with `StandardError=journal`: a stream socket.
    let (stream, stream_end) = UnixStream::pair().expect("stream");
    let st = rustix::fs::fstat(&stream_end).expect("fstat");
    let journal_stream = format!("{}:{}", st.st_dev, st.st_ino);
    let site = sleeper("web", 2, "");
    let agent = TestAgent::start_with_env_and_output(
        &[("web", &site)],
        Options {
            reactor: REACTORS[0],
            cgroups: false,
        },
        &[
            ("JOURNAL_STREAM", &journal_stream),
            (
                "HATCHERY_JOURNAL_SOCKET",
                socket.to_str().expect("utf-8 path"),
            ),
        ],
        OwnedFd::from(stream_end),
    );
    let victim = agent.wait_for("web", "2 ready", Duration::from_secs(10), |s| {
        s["ready"] == 2
    })["workers"][0]["pid"]
        .as_i64()
        .expect("pid");
    Command::new("kill")
        .arg("-KILL")
        .arg(victim.to_string())
        .status()
        .expect("kill");
    // Entries until the one about the victim's death.
    let mut seen = Vec::new();
    let exit = loop {
        let entry = received
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| {
                panic!("no journal entry about w-0's death ({e}); entries: {seen:#?}")
            });
        if entry.is_empty() {
            continue;
        }
        let fields: std::collections::BTreeMap<String, String> = hatchery::journal::parse(&entry)
            .expect("a well-formed entry")
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        if fields.get("HATCHERY_PID") == Some(&victim.to_string())
            && fields["MESSAGE"].contains("SIGKILL")
        {
            break fields;
        }
        seen.push(fields);
    };
    assert_eq!(exit["HATCHERY_SITE"], "web", "{exit:?}");
    assert_eq!(exit["HATCHERY_WORKER"], "0", "{exit:?}");
    assert_eq!(exit["SYSLOG_IDENTIFIER"], "hatchery", "{exit:?}");
    assert!(
        seen.iter().any(
            |f| f.get("HATCHERY_SITE").map(String::as_str) == Some("web")
                && f["MESSAGE"].contains("spawned")
        ),
        "the spawns are there too: {seen:#?}"
    );
    // The stream got none of it.
    stream.set_nonblocking(true).expect("nonblocking");
    let mut text = Vec::new();
    let _ = (&stream).read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    assert!(
        !text.contains("spawned"),
        "the log went to the stream too: {text}"
    );
    drop(agent);
}

/// Without cgroup accounting (here `cgroup_base = "off"`; on a host without the memory
/// controller the same), `status` adds up each worker's processes from `/proc` and says so,
/// instead of showing nothing.
#[test]
fn without_cgroup_accounting_status_reads_each_workers_tree_from_proc() {
    let site =
        "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & wait\"]\nworkers = 2\n";
    let agent = TestAgent::start_ready(
        &[("web", site)],
        Options {
            reactor: REACTORS[0],
            cgroups: false,
        },
        "web",
        2,
    );
    // Each worker is a shell and its `sleep`, once the shell has forked it.
    let s = agent.wait_for(
        "web",
        "two processes per worker",
        Duration::from_secs(10),
        |s| {
            s["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().all(|w| w["usage"]["pids"] == 2))
        },
    );
    let mut memory = 0;
    for w in s["workers"].as_array().expect("workers") {
        let u = &w["usage"];
        assert_eq!(u["source"], "proc", "{w:#}");
        let m = u["memory_current"].as_u64().expect("memory from /proc");
        assert!(
            m >= 2 * 4096,
            "two resident processes, a page at least each: {w:#}"
        );
        assert!(u["cpu_usec"].as_u64().is_some(), "{w:#}");
        assert!(u["oom_kills"].is_null(), "not known from /proc: {w:#}");
        memory += m;
    }
    // The site is the sum of its workers, read in the same status.
    assert_eq!(s["usage"]["source"], "proc", "{s:#}");
    assert_eq!(s["usage"]["pids"], 4, "{s:#}");
    assert_eq!(s["usage"]["memory_current"].as_u64(), Some(memory), "{s:#}");
    let out = agent.cli(&["status", "web"]);
    let text = stdout(&out);
    assert!(
        text.contains("RSS"),
        "the text says where memory comes from: {text}"
    );
    assert!(text.contains("site: memory "), "{text}");
    assert!(!text.contains("site: memory -"), "{text}");
}

/// Workers that exit together each keep their own end: sixteen exit at one `kill`, each
/// with a code of its own, and each slot's last exit says its own code.
#[test]
fn workers_that_exit_together_each_keep_their_own_end() {
    each_reactor(|reactor| {
        let site = r#"name = "codes"
command = ["/bin/sh", "-c", "trap 'exit $((40 + HATCHERY_WORKER_ID))' TERM; sleep 1000 & wait"]
workers = 16
"#;
        let agent = TestAgent::start_ready(
            &[("codes", site)],
            Options {
                reactor,
                cgroups: true,
            },
            "codes",
            16,
        );
        let pids = agent.pids("codes");
        assert_eq!(pids.len(), 16);
        let kill = Command::new("kill")
            .arg("-TERM")
            .args(pids.iter().map(i64::to_string))
            .status()
            .expect("kill");
        assert!(kill.success());
        agent.wait_for(
            "codes",
            "each slot's own end",
            Duration::from_secs(20),
            |s| {
                s["workers"].as_array().is_some_and(|ws| {
                    ws.len() == 16
                        && ws.iter().all(|w| {
                            let id = w["id"].as_u64().unwrap_or(999);
                            w["last_exit"] == format!("exited with code {}", 40 + id).as_str()
                        })
                })
            },
        );
    });
}

/// Several workers whose starts are asked for at once (every site's first workers, then
/// the replacements of workers killed together) are started two at a time
/// (`spawn::start_all`): each still gets its own process, environment, output and leaf,
/// and a start that fails fails only its own worker.
#[test]
fn workers_started_together_each_get_their_own_process_and_answer() {
    each_reactor(|reactor| {
        let good = "name = \"good\"\ncommand = [\"/bin/sh\", \"-c\", \"echo started $HATCHERY_WORKER_ID $$; exec sleep 1000\"]\nworkers = 8\n";
        let lost = "name = \"lost\"\ncommand = [\"/bin/sleep\", \"1000\"]\nworkers = 4\nworkdir = \"/nonexistent/hatchery-test\"\n";
        let agent = TestAgent::start_ready(
            &[("good", good), ("lost", lost)],
            Options {
                reactor,
                cgroups: true,
            },
            "good",
            8,
        );
        // Each worker is the agent's child, alone in its leaf, and the line it wrote
        // (its own id and pid) is in the log under its name and pid.
        let each_its_own = |old: &[i64]| -> Vec<i64> {
            let s = agent.status("good");
            let workers = s["workers"].as_array().expect("workers").clone();
            assert_eq!(workers.len(), 8, "{s:#}");
            let pids: Vec<i64> = workers
                .iter()
                .map(|w| w["pid"].as_i64().expect("a pid"))
                .collect();
            let mut distinct = pids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 8, "one process each: {pids:?}");
            assert!(pids.iter().all(|p| !old.contains(p)), "{pids:?} {old:?}");
            let kids = children(i64::from(agent.pid()));
            for w in &workers {
                let id = w["id"].as_u64().expect("an id");
                let pid = w["pid"].as_i64().expect("a pid");
                assert!(
                    kids.contains(&pid),
                    "w-{id} (pid {pid}) is the agent's child"
                );
                let line = format!("w-{id}[{pid}]");
                let text = format!("started {id} {pid}");
                wait_until(&format!("{line}'s line"), Duration::from_secs(10), || {
                    stdout(&agent.cli(&["logs", "good", "-n", "100"]))
                        .lines()
                        .any(|l| l.contains(&line) && l.ends_with(&text))
                });
                if let Some(leaf) = w["cgroup"].as_str() {
                    let procs = std::fs::read_to_string(format!("{leaf}/cgroup.procs"))
                        .expect("the leaf's processes");
                    assert_eq!(procs.trim(), pid.to_string(), "w-{id} alone in {leaf}");
                }
            }
            pids
        };
        let first = each_its_own(&[]);
        // The other site's starts failed, each with the child's own error, and nothing of
        // them runs.
        let s = agent.wait_for("lost", "its starts to fail", Duration::from_secs(10), |s| {
            s["workers"].as_array().is_some_and(|ws| {
                ws.len() == 4
                    && ws.iter().all(|w| {
                        w["pid"].is_null()
                            && w["last_exit"].as_str().is_some_and(|e| {
                                e.contains("change to the working directory /nonexistent/")
                            })
                    })
            })
        });
        assert_eq!(s["ready"], 0, "{s:#}");
        assert!(
            with_marker("/nonexistent/hatchery-test").is_empty(),
            "nothing of the failed site runs"
        );
        // Killed together, replaced together, each by a process of its own.
        let kill = Command::new("kill")
            .arg("-KILL")
            .args(first.iter().map(i64::to_string))
            .status()
            .expect("kill");
        assert!(kill.success());
        agent.wait_for("good", "8 replacements", Duration::from_secs(20), |s| {
            s["ready"] == 8
                && s["workers"].as_array().is_some_and(|ws| {
                    ws.iter()
                        .all(|w| w["pid"].as_i64().is_some_and(|p| !first.contains(&p)))
                })
        });
        each_its_own(&first);
    });
}

/// The record of live workers (`state/workers.json`) is written a little after workers
/// come and go (not while the workers just started are in their `execve`), by itself, and
/// always before a client is answered: a restarted worker's pid that a `status` reply
/// shows is in the record when the reply arrives.
#[test]
fn a_restarted_worker_is_recorded_by_itself_and_before_a_client_is_told() {
    // Each crash restarted at once, however many in a row.
    let site = "name = \"web\"\ncommand = [\"/bin/sleep\", \"1000\"]\nworkers = 2\n\
                [restart]\nhealthy_after = \"0s\"\nbackoff_initial = \"1ms\"\n\
                flapping = { exits = 100, within = \"1s\" }\n";
    let agent = TestAgent::start(
        &[("web", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
    );
    let record = agent.dir.path().join("state/workers.json");
    let recorded = || recorded_pids(&record);
    // A status request on the control socket, without starting a CLI: one every few
    // hundred microseconds, so that a reply can follow a restart by less than the time
    // the record's write is put off.
    let running = || -> Vec<i64> {
        let mut s = UnixStream::connect(&agent.socket).expect("connect");
        s.write_all(b"{\"cmd\":\"status\",\"site\":\"web\"}\n")
            .expect("write");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        let reply: serde_json::Value = serde_json::from_str(&line).expect("json");
        reply["ok"]["sites"][0]["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["pid"].as_i64())
            .collect()
    };
    wait_until("2 workers", Duration::from_secs(20), || {
        running().len() == 2
    });

    // 1. Without a request: the agent's children are looked at, not the agent.
    let before = running();
    let agent_pid = i64::from(agent.pid());
    assert!(sigkill(before[0]));
    let mut restarted = None;
    wait_until("the replacement", Duration::from_secs(20), || {
        restarted = children(agent_pid)
            .into_iter()
            .find(|p| !before.contains(p) && comm(*p) == "sleep");
        restarted.is_some()
    });
    let restarted = restarted.expect("found");
    wait_until(
        "the replacement in the record, written by itself",
        Duration::from_secs(20),
        || recorded().contains(&restarted),
    );

    // 2. What a reply shows is in the record already.
    for _ in 0..5 {
        let before = running();
        assert!(sigkill(before[0]));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = running();
            if now.len() == 2 && !now.contains(&before[0]) {
                let rec = recorded();
                assert!(
                    now.iter().all(|p| rec.contains(p)),
                    "status shows {now:?}, the record {rec:?}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no replacement of {}", before[0]);
        }
    }

    // 3. The workers replaced were reaped (after their replacements started).
    wait_until("no zombie of the agent", Duration::from_secs(20), || {
        processes()
            .iter()
            .all(|p| !(p.1 == agent_pid && p.2 == 'Z'))
    });
}

/// `SIGKILL` to `pid`, through `kill(1)`: whether it was sent.
fn sigkill(pid: i64) -> bool {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The name of process `pid` (`/proc/<pid>/comm`), empty once it is gone.
fn comm(pid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn a_second_agent_on_the_same_cgroup_base_is_refused_and_touches_nothing() {
    if !is_root() {
        skip("needs root (a cgroup base of its own)");
        return;
    }
    let site = sleeper("first", 2, "");
    let first = TestAgent::start(
        &[("first", &site)],
        Options {
            reactor: "io_uring",
            cgroups: true,
        },
    );
    let Some(base) = first.cgroup_base.clone() else {
        skip("no cgroup2 mount");
        return;
    };
    let who = |s: &serde_json::Value| -> Vec<(i64, i64, u64)> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| {
                (
                    w["id"].as_i64().expect("id"),
                    w["pid"].as_i64().expect("pid"),
                    w["restarts"].as_u64().expect("restarts"),
                )
            })
            .collect()
    };
    let before = who(
        &first.wait_for("first", "2 ready workers", Duration::from_secs(10), |s| {
            s["ready"] == 2
        }),
    );
    // Another agent, its own socket, state and sites, the first one's cgroup base: as an
    // operator trying a second configuration on a host would start it.
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir_all(&sites).expect("mkdir");
    std::fs::write(sites.join("second.toml"), sleeper("second", 1, "")).expect("site");
    let config = dir.path().join("hatchery.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\nstate_dir = \"{}\"\nsites_dir = \"{}\"\ncgroup_base = \"{}\"\n",
            dir.path().join("control.sock").display(),
            dir.path().join("state").display(),
            sites.display(),
            base.display()
        ),
    )
    .expect("config");
    let mut second = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the second agent");
    let mut exited = None;
    poll_until(Duration::from_secs(20), || {
        exited = second.try_wait().expect("try_wait");
        exited.is_some()
    });
    let Some(status) = exited else {
        // Stopped as an operator would (its sites, its fd holder), then failed.
        let _ = Command::new("kill").arg(second.id().to_string()).status();
        if !poll_until(Duration::from_secs(10), || {
            second.try_wait().ok().flatten().is_some()
        }) {
            let _ = second.kill();
        }
        let _ = second.wait();
        panic!("the second agent runs on a cgroup base another agent holds");
    };
    let mut said = String::new();
    second
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut said)
        .expect("read");
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("another agent")
            && said.contains(&base.display().to_string())
            && said.contains(&format!("pid {}", first.pid())),
        "the refusal names the base and the agent that holds it: {said}"
    );
    // Nothing of the first agent's was touched: the same workers, alive, and no start of
    // the second one's site anywhere.
    let after = who(&first.status("first"));
    assert_eq!(after, before, "{}", first.agent_log());
    for (_, pid, _) in after {
        assert!(alive(pid));
    }
    assert!(with_marker("marker-second").is_empty());
    assert!(!base.join("sites").join("second").exists());
}

/// An agent (epoll, no cgroups) with one site, `web`, started on a new pseudo-terminal as
/// its controlling terminal (`setsid -c`, stdin the terminal), as from a shell; and the
/// terminal's master, whose last close hangs the terminal up.
fn on_a_terminal(site: &str) -> (std::os::fd::OwnedFd, TestAgent) {
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("openpt");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let pts = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    let redirect = format!("exec setsid -c \"$@\" < {}", pts.to_str().expect("utf-8"));
    let agent = TestAgent::start_through(
        &[("web", site)],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
        &["/bin/sh", "-c", &redirect, "sh"],
    );
    (master, agent)
}

/// `/proc/PID/stat`'s process group, session and controlling terminal (`tty_nr`).
fn group_session_tty(pid: i64) -> (i64, i64, i64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let f: Vec<i64> = rest
        .split_ascii_whitespace()
        .skip(2)
        .take(3)
        .map(|v| v.parse().expect("number"))
        .collect();
    (f[0], f[1], f[2])
}

/// Each worker leads a process group of its own. Without a terminal it stays in the agent's
/// session (a session each would be a scheduler group each); with one, each worker is given
/// a session of its own, so that none has the agent's terminal.
#[test]
fn a_worker_leads_its_own_group_and_never_has_the_agents_terminal() {
    let site = sleeper("web", 2, "");
    // Started through `setsid`: a session without a terminal, the agent its leader.
    let opts = Options {
        reactor: "epoll",
        cgroups: false,
    };
    let agent = TestAgent::start_through(&[("web", &site)], opts, &["setsid"]);
    agent.wait_for("web", "2 ready", Duration::from_secs(20), |s| {
        s["ready"] == 2
    });
    let pid = i64::from(agent.pid());
    assert_eq!(group_session_tty(pid), (pid, pid, 0), "the agent's own");
    for w in agent.pids("web") {
        assert_eq!(group_session_tty(w), (w, pid, 0), "worker {w}");
    }
    drop(agent);

    // On a terminal of its own (`setsid -c`, stdin the terminal), as in a shell.
    let (master, agent) = on_a_terminal(&site);
    agent.wait_for("web", "2 ready", Duration::from_secs(20), |s| {
        s["ready"] == 2
    });
    let pid = i64::from(agent.pid());
    let (_, session, tty) = group_session_tty(pid);
    assert_eq!(session, pid);
    assert_ne!(tty, 0, "the agent has the terminal");
    for w in agent.pids("web") {
        assert_eq!(group_session_tty(w), (w, w, 0), "worker {w}");
    }
    // The agent stops before the terminal closes (a hang-up would signal it).
    drop(agent);
    drop(master);
}

/// What the README says of a worker stopped when the agent dies: its process group, left
/// without a parent in the agent's session, is sent `SIGHUP` and `SIGCONT` by the kernel, and
/// the next agent restarts the worker it ended (the others are adopted as they run).
#[test]
fn a_worker_stopped_when_the_agent_dies_is_restarted_by_the_next_agent() {
    let site = sleeper("web", 2, "");
    let opts = Options {
        reactor: "epoll",
        cgroups: false,
    };
    let mut agent = TestAgent::start_through(&[("web", &site)], opts, &["setsid"]);
    agent.wait_for("web", "2 ready", Duration::from_secs(20), |s| {
        s["ready"] == 2
    });
    let pids = agent.pids("web");
    let out = Command::new("kill")
        .args(["-STOP", &pids[0].to_string()])
        .status()
        .expect("kill");
    assert!(out.success());
    wait_until("the worker stopped", Duration::from_secs(10), || {
        processes().iter().any(|p| p.0 == pids[0] && p.2 == 'T')
    });
    agent.crash();
    agent.relaunch();
    let s = agent.wait_for("web", "w-0 replaced", Duration::from_secs(20), |s| {
        s["ready"] == 2
            && s["workers"][0]["pid"]
                .as_i64()
                .is_some_and(|p| p != pids[0])
    });
    // (Its restart is counted where it is still a zombie when the new agent adopts it; a
    // worker reaped by then, as init reaps it in the VMs, is started again without one.)
    assert_eq!(
        s["workers"][1]["pid"], pids[1],
        "w-1 adopted as it ran: {s}"
    );
    assert_eq!(s["workers"][1]["restarts"], 0, "{s}");
    // The ended worker's pipe, let go by the fd holder, is not said to be lost.
    let log = agent.agent_log();
    assert!(!log.contains("did not hold its pipe"), "{log}");
}

/// A `SIGHUP` the kernel sends is no reload: only one a process sends is. The kernel sends
/// one at a terminal's hang-up (here: the agent on a terminal of its own, which then goes
/// away), and, on kernels that send it to a whole group, to a process group left orphaned
/// with a stopped process in it, which a worker could bring about from the agent's session.
#[test]
fn a_sighup_the_kernel_sends_is_no_reload() {
    let (master, agent) = on_a_terminal(&sleeper("web", 1, ""));
    agent.wait_for("web", "1 ready", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    // The terminal's last master goes: a hang-up, SIGHUP (and SIGCONT) to its session's
    // leader, the agent.
    drop(master);
    wait_until("the kernel's SIGHUP", Duration::from_secs(30), || {
        agent.agent_log().contains("SIGHUP from the kernel ignored")
    });
    let log = agent.agent_log();
    assert!(!log.contains("SIGHUP: reloading"), "{log}");
    // A SIGHUP a process sends still reloads.
    let pid = agent.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    wait_until("the reload", Duration::from_secs(30), || {
        agent.agent_log().contains("SIGHUP: reloading")
    });
    assert_eq!(agent.status("web")["ready"], 1);
}

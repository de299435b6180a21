//! The event history: `hatchery events --json` after a crash (the exit with its signal,
//! the restart scheduled, the new process started and ready), after a deploy (its steps
//! in order, the flip, the old generation retired), after an operator's `scale` and
//! `restart` (with the uid that asked); `--since`; `-f` streaming a new event; the
//! marked agent line in the site's `logs` among the workers' lines; and `logs -n` across a
//! rotation of the site's log.

mod common;

use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A site of `workers` shell workers that say hello and sleep. A worker that crashes
/// again after a crash waits 1 s to start: none runs the hour after which a record is
/// clean.
fn site(workers: u32) -> String {
    format!(
        "name = \"ev\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hello $HATCHERY_WORKER_ID; exec sleep 1000\"]\nworkers = {workers}\n[restart]\nbackoff_initial = \"1s\"\nhealthy_after = \"1h\"\n"
    )
}

fn start(reactor: &'static str, workers: u32) -> TestAgent {
    TestAgent::start_ready(
        &[("ev", &site(workers))],
        Options {
            reactor,
            cgroups: true,
        },
        "ev",
        u64::from(workers),
    )
}

/// `hatchery events <args> --json`, one object per line.
fn events(agent: &TestAgent, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["events"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = agent.cli(&all);
    assert!(
        out.status.success(),
        "events failed: {}\n{}",
        stderr(&out),
        agent.agent_log()
    );
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits until the site's history has an entry that `want` accepts; returns the history.
fn wait_event(agent: &TestAgent, what: &str, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    wait_until(what, Duration::from_secs(20), || {
        seen = events(agent, &["ev", "-n", "1000"]);
        want(&seen)
    });
    seen
}

/// Where the first entry `want` accepts is.
fn position(list: &[Value], want: impl Fn(&Value) -> bool) -> Option<usize> {
    list.iter().position(want)
}

fn kill9(pid: i64) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn my_uid() -> u64 {
    u64::from(std::fs::metadata("/proc/self").expect("proc").uid())
}

#[test]
fn a_crash_is_an_exit_with_its_signal_a_restart_scheduled_a_start_and_ready() {
    for reactor in REACTORS {
        let agent = start(reactor, 2);
        let status = agent.status("ev");
        let victim = &status["workers"][0];
        let (pid, slot) = (
            victim["pid"].as_i64().expect("pid"),
            victim["id"].as_u64().expect("id"),
        );
        // The first crash: its exit, then the slot started again and ready (at once, or at
        // the floor `backoff_initial` after the start: the machine's speed decides which).
        kill9(pid);
        let history = wait_event(&agent, "the crashed worker started again and ready", |h| {
            let Some(exit) = position(h, |e| e["kind"] == "exited" && e["pid"] == pid) else {
                return false;
            };
            let worker = &h[exit]["worker"];
            h[exit..]
                .iter()
                .any(|e| e["kind"] == "ready" && e["worker"] == *worker)
        });
        let exit =
            position(&history, |e| e["kind"] == "exited" && e["pid"] == pid).expect("waited for");
        let e = &history[exit];
        assert_eq!(e["signal"], "SIGKILL", "{e}");
        assert_eq!(e["exit"], "signal", "{e}");
        assert_eq!(e["crash"], true, "{e}");
        assert_eq!(e["site"], "ev");
        assert!(
            e["gen"].as_u64().is_some() && e["time"].as_str().is_some(),
            "{e}"
        );
        assert_eq!(e["worker"], slot, "{e}");
        let worker = e["worker"].clone();
        let of = |after: &[Value], kind: &str| {
            after
                .iter()
                .position(|x| x["kind"] == kind && x["worker"] == worker)
                .unwrap_or_else(|| panic!("no {kind} after the exit: {after:#?}"))
        };
        let after = &history[exit..];
        let (started, ready) = (of(after, "started"), of(after, "ready"));
        assert!(started < ready, "in order: {after:#?}");
        let new_pid = after[started]["pid"].as_i64().expect("a pid");
        assert_ne!(new_pid, pid);
        assert_eq!(after[ready]["pid"], new_pid);

        // The site's log: the workers' lines and the agent's marked line about the crash.
        let hello = |p: i64| format!(" w-{worker}[{p}] hello ");
        let mut log = String::new();
        wait_until(
            "the successor's hello in the log",
            Duration::from_secs(20),
            || {
                log = stdout(&agent.cli(&["logs", "ev", "-n", "100"]));
                log.contains(&hello(new_pid))
            },
        );
        let marked = format!("w-{worker}[{pid}] killed by SIGKILL");
        let line = log
            .lines()
            .find(|l| l.contains(&marked))
            .unwrap_or_else(|| panic!("no line about the crash in the site's log:\n{log}"));
        let (_, rest) = line.split_once(' ').expect("a time");
        assert!(rest.starts_with("hatchery: "), "marked: {line}");
        assert!(
            log.contains(&hello(pid)),
            "the worker's own lines are there too:\n{log}"
        );

        // The second crash in a row (the successor ran far less than `healthy_after`)
        // always waits its backoff, `backoff_initial` × 2⁰: a restart scheduled in 1000
        // ms, then the start and the ready.
        kill9(new_pid);
        let history = wait_event(&agent, "the second crash's successor ready", |h| {
            let Some(exit) = position(h, |e| e["kind"] == "exited" && e["pid"] == new_pid) else {
                return false;
            };
            h[exit..]
                .iter()
                .any(|e| e["kind"] == "ready" && e["worker"] == worker)
        });
        let exit = position(&history, |e| e["kind"] == "exited" && e["pid"] == new_pid)
            .expect("waited for");
        assert_eq!(history[exit]["signal"], "SIGKILL", "{}", history[exit]);
        let after = &history[exit..];
        let (scheduled, started, ready) = (
            of(after, "restart_scheduled"),
            of(after, "started"),
            of(after, "ready"),
        );
        assert!(
            scheduled < started && started < ready,
            "in order: {after:#?}"
        );
        assert_eq!(
            after[scheduled]["delay_ms"], 1000,
            "{:#?}",
            after[scheduled]
        );
        let third = after[started]["pid"].as_i64().expect("a pid");
        assert!(third != pid && third != new_pid, "{after:#?}");
        assert_eq!(after[ready]["pid"], third);

        // The text form: one line per event, time, site, who, what.
        let text = stdout(&agent.cli(&["events", "ev", "-n", "1000"]));
        for said in [
            format!(" ev gen-1 w-{worker}[{pid}] killed by SIGKILL"),
            format!(" ev gen-1 w-{worker}[{new_pid}] killed by SIGKILL"),
            format!(" ev gen-1 w-{worker} restarting in 1000 ms"),
        ] {
            assert!(text.lines().any(|l| l.ends_with(&said)), "{said}:\n{text}");
        }
    }
}

#[test]
fn operators_scale_and_restart_with_their_uid_and_since_filters() {
    for reactor in REACTORS {
        let agent = start(reactor, 1);
        let out = agent.cli(&["scale", "ev", "2"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = agent.cli(&["restart", "ev"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let history = wait_event(&agent, "the restart done", |h| {
            h.iter().any(|e| e["kind"] == "restart_done")
        });
        let asked = |action: &str| {
            position(&history, |e| {
                e["kind"] == "operator" && e["action"] == action
            })
            .unwrap_or_else(|| panic!("no {action}: {history:#?}"))
        };
        let (scale, restart) = (asked("scale"), asked("restart"));
        assert!(scale < restart);
        assert_eq!(history[scale]["uid"], my_uid());
        assert_eq!(history[scale]["to"], 2);
        assert_eq!(history[restart]["uid"], my_uid());
        assert!(
            history[scale..restart]
                .iter()
                .any(|e| e["kind"] == "started" && e["worker"] == 1),
            "the new worker started after the scale: {history:#?}"
        );
        // Every worker stopped and started again after the restart was asked.
        let after = &history[restart..];
        for w in 0..2 {
            assert!(
                after
                    .iter()
                    .any(|e| e["kind"] == "exited" && e["worker"] == w && e["crash"] == false),
                "w-{w} stopped: {after:#?}"
            );
        }

        // --since: from the scale on.
        let since = history[scale]["time"].as_str().expect("time").to_string();
        let later = events(&agent, &["ev", "-n", "1000", "--since", &since]);
        assert!(
            later
                .iter()
                .all(|e| e["time"].as_str() >= Some(since.as_str()))
        );
        assert!(later.iter().any(|e| e["action"] == "scale"));
        assert!(
            later.len() < history.len(),
            "the first starts are before it: {later:#?}"
        );
        let all = events(&agent, &["ev", "-n", "1000", "--since", "1h"]);
        assert!(all.len() >= history.len());
        assert!(events(&agent, &["ev", "--since", "2999-01-01T00:00:00Z"]).is_empty());
        let bad = agent.cli(&["events", "--since", "yesterday"]);
        assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
        // -n: the last N.
        let last = events(&agent, &["ev", "-n", "2"]);
        assert_eq!(last.as_slice(), &history[history.len() - 2..]);
        // Without a site: every site's, and the agent's own.
        let everything = events(&agent, &["-n", "1000"]);
        assert!(everything.len() >= history.len());
    }
}

#[test]
fn a_follower_gets_a_new_event() {
    for reactor in REACTORS {
        let agent = start(reactor, 1);
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(&agent.socket)
            .args(["events", "ev", "-f", "-n", "1", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("events -f");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The backlog first: once it came, the client follows.
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the last event");
        assert!(first.starts_with('{'), "{first}");
        let pid = agent.pids("ev")[0];
        kill9(pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let exited = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("no exit event followed: {got:#?}");
            };
            let e: Value = serde_json::from_str(&line).expect("json");
            if e["kind"] == "exited" && e["pid"] == pid {
                break e;
            }
            got.push(line);
        };
        assert_eq!(exited["signal"], "SIGKILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn a_deploy_is_its_steps_in_order_the_flip_and_the_old_generation_retired() {
    for reactor in REACTORS {
        let agent = start(reactor, 2);
        let out = agent.cli(&["deploy", "ev"]);
        assert!(
            out.status.success(),
            "{}\n{}",
            stderr(&out),
            agent.agent_log()
        );
        let history = wait_event(&agent, "gen-1 retired", |h| {
            h.iter().any(|e| e["kind"] == "retired" && e["gen"] == 1)
        });
        let at = |kind: &str| {
            position(&history, |e| e["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind}: {history:#?}"))
        };
        let asked = position(&history, |e| e["action"] == "deploy").expect("operator deploy");
        assert_eq!(history[asked]["uid"], my_uid());
        let (began, flipped, done) = (at("deploy_started"), at("flipped"), at("deployed"));
        let retired =
            position(&history, |e| e["kind"] == "retired" && e["gen"] == 1).expect("waited for");
        assert!(
            asked < began && began < flipped && flipped < done && flipped < retired,
            "in order: {history:#?}"
        );
        assert_eq!(history[began]["from"], 1);
        assert_eq!(history[began]["to"], 2);
        assert_eq!(history[flipped]["from"], 1);
        assert_eq!(history[flipped]["to"], 2);
        assert!(history[done]["duration_ms"].as_u64().is_some());
        // The new generation's workers were ready before the flip; the old one's stopped
        // (asked) after it.
        for w in 0..2 {
            assert!(
                history[began..flipped]
                    .iter()
                    .any(|e| e["kind"] == "ready" && e["gen"] == 2 && e["worker"] == w),
                "gen-2 w-{w} ready before the flip: {history:#?}"
            );
            assert!(
                history[flipped..].iter().any(|e| e["kind"] == "exited"
                    && e["gen"] == 1
                    && e["worker"] == w
                    && e["crash"] == false),
                "gen-1 w-{w} stopped after the flip: {history:#?}"
            );
        }
    }
}

#[test]
fn logs_n_reads_across_a_rotation() {
    let script = "i=0; while [ $i -lt 150 ]; do echo line-$i-abcdefghijklmnopqrstuvwxyz; i=$((i+1)); done; exec sleep 1000";
    let text = format!(
        "name = \"ev\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nworkers = 1\n[logs]\nmax_size = \"4K\"\nkeep = 3\n"
    );
    for reactor in REACTORS {
        let agent = TestAgent::start_ready(
            &[("ev", &text)],
            Options {
                reactor,
                cgroups: true,
            },
            "ev",
            1,
        );
        let logs = agent.dir.path().join("state").join("logs");
        wait_until("the last line written", Duration::from_secs(20), || {
            std::fs::read_to_string(logs.join("ev.log")).is_ok_and(|t| t.contains("line-149-"))
        });
        let current = std::fs::read_to_string(logs.join("ev.log")).expect("log");
        assert!(logs.join("ev.log.1").exists(), "rotated");
        assert!(
            current.lines().count() < 100,
            "the current file alone holds fewer than asked: {}",
            current.lines().count()
        );
        let out = agent.cli(&["logs", "ev", "-n", "100"]);
        let shown = stdout(&out);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 100, "{shown}");
        let numbers: Vec<u32> = lines
            .iter()
            .filter_map(|l| {
                l.split_once(" line-")
                    .and_then(|(_, r)| r.split('-').next()?.parse().ok())
            })
            .collect();
        assert_eq!(numbers.last(), Some(&149), "{shown}");
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive, across the files: {numbers:?}"
        );
        assert!(numbers.len() >= 90, "{shown}");
    }
}

/// `hatchery <args>` as `nobody` (uid and gid 65534).
fn as_nobody(agent: &TestAgent) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(BIN);
    c.uid(65534)
        .gid(65534)
        .current_dir("/")
        .arg("--socket")
        .arg(&agent.socket);
    c
}

/// A site's user sees through `events` (past and followed) and `watch` (`top`) its own
/// site only: another site's entries, and the agent-wide ones that name other sites (a
/// reload), never reach it.
#[test]
fn a_site_owner_sees_only_its_own_sites_events_and_snapshots() {
    if !is_root() && skip("needs root to run the CLI as another uid") {
        return;
    }
    for reactor in REACTORS {
        let sleeper = |name: &str, extra: &str| {
            format!(
                "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 1\n{extra}[restart]\nbackoff_initial = \"10ms\"\n"
            )
        };
        let (mine, theirs) = (
            sleeper("mine", "user = \"nobody\"\n"),
            sleeper("theirs", ""),
        );
        let agent = TestAgent::start(
            &[("mine", &mine), ("theirs", &theirs)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        for site in ["mine", "theirs"] {
            agent.wait_for(site, "ready", Duration::from_secs(20), |s| s["ready"] == 1);
        }
        // The socket is reachable by others (the test directory is private otherwise).
        std::fs::set_permissions(
            agent.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");

        // A follower as nobody, from now on.
        let mut follower = as_nobody(&agent)
            .args(["events", "-f", "-n", "0", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("events -f as nobody");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out = follower.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        // Things happen to both sites, and to the agent (a reload that adds a site).
        let out = agent.cli(&["restart", "theirs"]);
        assert!(out.status.success(), "{}", stderr(&out));
        kill9(agent.pids("theirs")[0]);
        std::fs::write(agent.site_file("other"), sleeper("other", "")).expect("write site");
        let out = agent.cli(&["reload"]);
        assert!(out.status.success(), "{}", stderr(&out));
        // Root sees them all.
        wait_until(
            "theirs' crash in root's history",
            Duration::from_secs(20),
            || {
                let all = events(&agent, &["-n", "1000"]);
                all.iter()
                    .any(|e| e["site"] == "theirs" && e["kind"] == "exited")
                    && all
                        .iter()
                        .any(|e| e["kind"] == "reload" && e.get("site").is_none())
            },
        );
        // Then mine's crash: the follower's first sight of it comes after everything
        // above was published, so anything of theirs it were sent would come first.
        let mine_pid = agent.pids("mine")[0];
        kill9(mine_pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut followed = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("nobody's follower never saw mine's crash: {followed:#?}");
            };
            let e: Value = serde_json::from_str(&line).expect("json");
            followed.push(e.clone());
            if e["site"] == "mine" && e["kind"] == "exited" && e["pid"] == mine_pid {
                break;
            }
        }
        let _ = follower.kill();
        let _ = follower.wait();
        assert!(
            followed.iter().all(|e| e["site"] == "mine"),
            "the follower got only mine's entries: {followed:#?}"
        );

        // The past, as nobody: mine's entries (its start, its crash), nothing else.
        let past = as_nobody(&agent)
            .args(["events", "-n", "1000", "--json"])
            .output()
            .expect("events as nobody");
        assert!(past.status.success(), "{}", stderr(&past));
        let text = stdout(&past);
        let past: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert!(
            past.iter().any(|e| e["kind"] == "started")
                && past.iter().any(|e| e["kind"] == "exited"),
            "{text}"
        );
        assert!(past.iter().all(|e| e["site"] == "mine"), "{text}");
        assert!(
            !text.contains("theirs") && !text.contains("other"),
            "nothing names another site: {text}"
        );
        // Asked for by name: refused, and nothing of it shown.
        let refused = as_nobody(&agent)
            .args(["events", "theirs", "--json"])
            .output()
            .expect("events theirs as nobody");
        assert!(!refused.status.success(), "{}", stdout(&refused));
        // Only the refusal: no entry (an entry has a time).
        assert!(
            stdout(&refused).contains("may not") && !stdout(&refused).contains("\"time\""),
            "{}",
            stdout(&refused)
        );

        // `watch` (through `top` without a terminal): a snapshot of mine only.
        let snap = as_nobody(&agent)
            .args(["top", "--json"])
            .output()
            .expect("top as nobody");
        assert!(snap.status.success(), "{}", stderr(&snap));
        let snapshot: hatchery::control::Snapshot =
            serde_json::from_slice(&snap.stdout).expect("a snapshot");
        let names: Vec<&str> = snapshot
            .status
            .sites
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["mine"], "{}", stdout(&snap));
        let summed: Vec<&str> = snapshot.summaries.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(summed, ["mine"], "{}", stdout(&snap));
        assert!(!stdout(&snap).contains("theirs"), "{}", stdout(&snap));
        // Root's snapshot has every site: the filter is the caller's, not the snapshot's.
        let all: hatchery::control::Snapshot =
            serde_json::from_slice(&agent.cli(&["top", "--json"]).stdout).expect("a snapshot");
        assert_eq!(all.status.sites.len(), 3, "mine, theirs and other");
        let refused = as_nobody(&agent)
            .args(["top", "theirs", "--json"])
            .output()
            .expect("top theirs as nobody");
        assert!(!refused.status.success(), "{}", stdout(&refused));
        assert!(
            !stdout(&refused).contains("snapshot"),
            "{}",
            stdout(&refused)
        );
    }
}

//! Worker output through the site's one output socket (`output = "socket"`): every line
//! still attributed to its worker, with the pid that wrote it, a worker's (live) child's
//! lines to the worker, a long write kept whole, an unfinished line written once its
//! worker exits; and every worker writes to the one socket.

mod common;

use std::time::Duration;

use common::*;

/// Each worker says its pid, writes a line of 300,000 bytes, has a child that lives on say
/// its own pid, and leaves a line unfinished when it is stopped.
const SCRIPT: &str = r#"echo parent $HATCHERY_WORKER_ID $$; printf \"%0300000d\\n\" 0; sh -c \"echo child \\$HATCHERY_WORKER_ID \\$\\$; exec sleep 1000\" & trap \"printf unfinished-$HATCHERY_WORKER_ID; exit 0\" TERM; while :; do sleep 1; done"#;

fn site(workers: u32) -> String {
    format!(
        "name = \"out\"\ncommand = [\"/bin/sh\", \"-c\", \"{SCRIPT}\"]\nworkers = {workers}\noutput = \"socket\"\n"
    )
}

/// The log lines (`<time> <writer>[<pid>] <text>`, a stderr line's `<writer>[<pid>]!`)
/// as (writer, pid, text).
fn lines(text: &str) -> Vec<(String, i32, String)> {
    streams(text)
        .into_iter()
        .map(|(w, p, _, t)| (w, p, t))
        .collect()
}

/// The log lines as (writer, pid, whether a stderr line, text).
fn streams(text: &str) -> Vec<(String, i32, bool, String)> {
    text.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(' ')?;
            let (who, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let (who, err) = match who.strip_suffix('!') {
                Some(w) => (w, true),
                None => (who, false),
            };
            let (writer, pid) = who.strip_suffix(']')?.split_once('[')?;
            Some((writer.to_string(), pid.parse().ok()?, err, text.to_string()))
        })
        .collect()
}

/// The pids of the workers of site `out`, by slot.
fn worker_pids(agent: &TestAgent) -> Vec<i32> {
    agent.status("out")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|x| x["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}

#[test]
fn lines_are_attributed_to_their_worker_and_pid_through_one_socket() {
    for reactor in REACTORS {
        let agent = TestAgent::start_ready(
            &[("out", &site(2))],
            Options {
                reactor,
                cgroups: true,
            },
            "out",
            2,
        );
        let zeros = |log: &[(String, i32, String)], k: u32| {
            log.iter()
                .filter(|(w, _, t)| *w == format!("w-{k}") && !t.is_empty())
                .filter(|(_, _, t)| t.bytes().all(|b| b == b'0'))
                .map(|(_, _, t)| t.len())
                .sum::<usize>()
        };
        let mut log = Vec::new();
        let done = poll_until(Duration::from_secs(20), || {
            let out = agent.cli(&["logs", "out", "-n", "200"]);
            log = lines(&stdout(&out));
            (0..2).all(|k| {
                log.iter()
                    .any(|(_, _, t)| t.starts_with(&format!("child {k} ")))
            }) && (0..2).all(|k| zeros(&log, k) == 300_000)
        });
        if !done {
            let shown: Vec<_> = log
                .iter()
                .map(|(w, p, t)| format!("{w}[{p}] {} bytes: {:.40}", t.len(), t))
                .collect();
            panic!(
                "timed out waiting for both workers' and children's lines: zeros {} and {}, \
                 {} lines:\n{}",
                zeros(&log, 0),
                zeros(&log, 1),
                log.len(),
                shown.join("\n")
            );
        }
        let status = agent.status("out");
        for k in 0..2u32 {
            let w = format!("w-{k}");
            let pid = status["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .find(|x| x["id"] == k)
                .and_then(|x| x["pid"].as_i64())
                .expect("the worker's pid") as i32;
            assert!(
                log.contains(&(w.clone(), pid, format!("parent {k} {pid}"))),
                "{w} (pid {pid}) said it: {log:?}"
            );
            let child = log
                .iter()
                .find(|(_, _, t)| t.starts_with(&format!("child {k} ")))
                .expect("the child's line");
            assert_eq!(child.0, w, "the child's line is its worker's: {child:?}");
            assert_ne!(child.1, pid, "with the child's own pid: {child:?}");
            assert_eq!(child.2, format!("child {k} {}", child.1));
            // The long line: kept whole (in MAX_LINE pieces), the worker's.
            let long: Vec<_> = log
                .iter()
                .filter(|(_, _, t)| !t.is_empty() && t.bytes().all(|b| b == b'0'))
                .filter(|(x, _, _)| *x == w)
                .collect();
            assert!(long.len() >= 2, "{long:?}");
            assert!(
                long.iter()
                    .all(|(_, _, t)| t.len() <= hatchery::logs::MAX_LINE),
                "no piece longer than MAX_LINE: {:?}",
                long.iter().map(|(_, _, t)| t.len()).collect::<Vec<_>>()
            );
            assert!(
                long.iter().all(|(_, p, _)| *p == pid),
                "written by the worker"
            );
        }

        // Every worker's stdout is the same socket, the site's, and every worker's stderr
        // the site's other one: no pipe per worker.
        let outputs = |fd: u32| -> Vec<String> {
            status["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .filter_map(|x| x["pid"].as_i64())
                .map(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                        .expect("a worker's output")
                        .display()
                        .to_string()
                })
                .collect()
        };
        let (out, err) = (outputs(1), outputs(2));
        assert_eq!((out.len(), err.len()), (2, 2), "{out:?} {err:?}");
        assert!(
            out.iter().all(|o| o.starts_with("socket:") && *o == out[0]),
            "one stdout socket: {out:?}"
        );
        assert!(
            err.iter().all(|o| o.starts_with("socket:") && *o == err[0]),
            "one stderr socket: {err:?}"
        );
        assert_ne!(out[0], err[0], "stdout and stderr are two sockets");

        // Stopped: each worker's unfinished line is written, as its own.
        let out = agent.cli(&["stop", "out"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let log = lines(&stdout(&agent.cli(&["logs", "out", "-n", "400"])));
        for k in 0..2 {
            let w = format!("w-{k}");
            assert!(
                log.iter()
                    .any(|(x, _, t)| *x == w && *t == format!("unfinished-{k}")),
                "{w}'s unfinished line: {log:?}"
            );
        }
    }
}

#[test]
fn output_written_while_no_agent_runs_is_logged_by_the_next_one() {
    let script = r#"trap \"echo during $HATCHERY_WORKER_ID\" USR1; echo up $HATCHERY_WORKER_ID; while :; do sleep 1; done"#;
    let site = format!(
        "name = \"out\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nworkers = 2\noutput = \"socket\"\n"
    );
    let mut agent = TestAgent::start_ready(
        &[("out", &site)],
        Options {
            reactor: REACTORS[0],
            cgroups: true,
        },
        "out",
        2,
    );
    let pids = worker_pids(&agent);
    assert_eq!(pids.len(), 2);
    agent.crash();
    // Written while no agent runs: it waits in the socket the fd holder keeps (without
    // it, the workers would die of SIGPIPE at this write).
    for pid in &pids {
        let _ = std::process::Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status();
    }
    agent.relaunch();
    let mut log = Vec::new();
    wait_until(
        "the lines written meanwhile",
        Duration::from_secs(20),
        || {
            log = lines(&stdout(&agent.cli(&["logs", "out", "-n", "50"])));
            (0..2).all(|k| log.iter().any(|(_, _, t)| *t == format!("during {k}")))
        },
    );
    for (k, pid) in pids.iter().enumerate() {
        assert!(
            log.contains(&(format!("w-{k}"), *pid, format!("during {k}"))),
            "w-{k} (pid {pid}) wrote it while no agent ran: {log:?}"
        );
    }
    // The same workers, adopted: none died of SIGPIPE.
    let now = worker_pids(&agent);
    assert_eq!(now, pids, "adopted, not restarted");
}

#[test]
fn a_scale_beyond_the_agents_fd_limit_is_refused_with_the_numbers() {
    // The agent inherits this limit (lowering it needs no privilege): 4096 fds hold fewer
    // than 2048 workers with a pipe each.
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(4096),
            maximum: Some(4096),
        },
    )
    .expect("lower the fd limit");
    let site =
        "name = \"out\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 1\n";
    let agent = TestAgent::start_ready(
        &[("out", site)],
        Options {
            reactor: REACTORS[0],
            cgroups: true,
        },
        "out",
        1,
    );
    let out = agent.cli(&["scale", "out", "2000"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("2000 workers need 6010 fds in the agent (a pidfd and two output pipes each")
            && err.contains("beyond the agent's fd limit (4096")
            && err.contains("write output = \"socket\""),
        "{err}"
    );
    // Nothing changed.
    let s = agent.status("out");
    assert_eq!(s["ready"], 1);
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(1));
}

/// Each worker writes a line to each stream at its start, and again on `SIGUSR1`.
const BOTH: &str = "trap 'echo during-out-$HATCHERY_WORKER_ID; echo during-err-$HATCHERY_WORKER_ID >&2' USR1; echo up-out-$HATCHERY_WORKER_ID; echo up-err-$HATCHERY_WORKER_ID >&2; while :; do sleep 1; done";

/// Asserts that `log` (the site's `logs` text) has `w-<k>`'s lines `<what>-out-<k>` as
/// stdout's and `<what>-err-<k>` as stderr's (marked), by `pids[k]`; and that `json`
/// (`logs --json`) says the same in its `stream` field.
fn assert_streams(log: &str, json: &str, pids: &[i32], what: &str) {
    let parsed = streams(log);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("logs --json: one object a line"))
        .collect();
    for (k, pid) in pids.iter().enumerate() {
        let w = format!("w-{k}");
        for (stream, err) in [("out", false), ("err", true)] {
            let text = format!("{what}-{stream}-{k}");
            assert!(
                parsed.contains(&(w.clone(), *pid, err, text.clone())),
                "{w} (pid {pid}) wrote {text:?} to std{stream}: {log}"
            );
            let mark = if err { "!" } else { "" };
            assert!(
                log.lines()
                    .any(|l| l.ends_with(&format!(" {w}[{pid}]{mark} {text}"))),
                "marked as std{stream}'s: {log}"
            );
            let object = objects
                .iter()
                .find(|o| o["text"] == text.as_str())
                .unwrap_or_else(|| panic!("{text:?} in logs --json: {json}"));
            assert_eq!(object["stream"], format!("std{stream}"), "{object}");
            assert_eq!(object["source"], w.as_str(), "{object}");
            assert_eq!(object["pid"], *pid, "{object}");
            assert!(object["time"].is_string(), "{object}");
        }
    }
}

#[test]
fn stdout_and_stderr_lines_are_told_apart_across_an_agent_crash() {
    for (reactor, output) in [
        (REACTORS[0], "pipe"),
        (REACTORS[1], "pipe"),
        (REACTORS[0], "socket"),
        (REACTORS[1], "socket"),
    ] {
        let site = format!(
            "name = \"out\"\ncommand = [\"/bin/sh\", \"-c\", \"{BOTH}\"]\nworkers = 2\noutput = \"{output}\"\n"
        );
        let mut agent = TestAgent::start_ready(
            &[("out", &site)],
            Options {
                reactor,
                cgroups: true,
            },
            "out",
            2,
        );
        let mut pids = worker_pids(&agent);
        pids.sort_by_key(|p| {
            // By slot: the status lists them so, but be sure.
            let s = agent.status("out");
            s["workers"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["pid"] == *p))
                .and_then(|w| w["id"].as_u64())
                .unwrap_or(u64::MAX)
        });
        assert_eq!(pids.len(), 2);
        let logs = |agent: &TestAgent, json: bool| {
            let mut args = vec!["logs", "out", "-n", "100"];
            if json {
                args.push("--json");
            }
            let out = agent.cli(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            stdout(&out)
        };
        let has_all = |log: &str, what: &str| {
            let parsed = streams(log);
            (0..2).all(|k| {
                parsed
                    .iter()
                    .any(|(_, _, e, t)| !*e && *t == format!("{what}-out-{k}"))
                    && parsed
                        .iter()
                        .any(|(_, _, e, t)| *e && *t == format!("{what}-err-{k}"))
            })
        };
        let mut log = String::new();
        wait_until("both streams' lines", Duration::from_secs(20), || {
            log = logs(&agent, false);
            has_all(&log, "up")
        });
        assert_streams(&log, &logs(&agent, true), &pids, "up");

        // Each stream its own pipe in pipe mode (two per worker), or the site's socket
        // of the stream in socket mode.
        for pid in &pids {
            let fd = |n: u32| {
                std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
                    .expect("a worker's output")
                    .display()
                    .to_string()
            };
            let kind = if output == "pipe" { "pipe:" } else { "socket:" };
            assert!(
                fd(1).starts_with(kind) && fd(2).starts_with(kind),
                "{} {}",
                fd(1),
                fd(2)
            );
            assert_ne!(fd(1), fd(2), "stdout and stderr are two {kind}");
        }

        // Written while no agent runs: it waits in the pipes or sockets the fd holder
        // keeps, and the next agent reads each stream as its own.
        agent.crash();
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args(["-USR1", &pid.to_string()])
                .status();
        }
        agent.relaunch();
        wait_until(
            "the lines written while no agent ran",
            Duration::from_secs(20),
            || {
                log = logs(&agent, false);
                has_all(&log, "during")
            },
        );
        assert_streams(&log, &logs(&agent, true), &pids, "during");
        assert_eq!(worker_pids(&agent), pids, "adopted, not restarted");

        // Followed: a stderr line written now reaches `logs -f --json`, marked.
        let mut follow = std::process::Command::new(BIN)
            .arg("--socket")
            .arg(&agent.socket)
            .args(["logs", "out", "-f", "-n", "0", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("logs -f");
        let reader = follow.stdout.take().expect("its stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        // Asked again until it comes: the follower may subscribe after a first signal.
        let found = loop {
            let _ = std::process::Command::new("kill")
                .args(["-USR1", &pids[0].to_string()])
                .status();
            let got = rx.recv_timeout(Duration::from_secs(2));
            if let Ok(line) = got {
                let v: serde_json::Value = serde_json::from_str(&line).expect("json");
                if v["text"] == "during-err-0" {
                    break Some(v);
                }
                seen.push(line);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
        };
        let _ = follow.kill();
        let _ = follow.wait();
        let found = found.unwrap_or_else(|| panic!("logs -f: no stderr line in {seen:?}"));
        assert_eq!(found["stream"], "stderr", "{found}");
        assert_eq!(found["source"], "w-0", "{found}");
        assert_eq!(found["pid"], pids[0], "{found}");
    }
}

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

/// The log lines (`<time> <writer>[<pid>] <text>`) as (writer, pid, text).
fn lines(text: &str) -> Vec<(String, i32, String)> {
    text.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(' ')?;
            let (who, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let (writer, pid) = who.strip_suffix(']')?.split_once('[')?;
            Some((writer.to_string(), pid.parse().ok()?, text.to_string()))
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
        let mut log = Vec::new();
        wait_until(
            "both workers' and children's lines",
            Duration::from_secs(20),
            || {
                let out = agent.cli(&["logs", "out", "-n", "200"]);
                log = lines(&stdout(&out));
                (0..2).all(|k| {
                    log.iter()
                        .any(|(_, _, t)| t.starts_with(&format!("child {k} ")))
                }) && (0..2).all(|k| {
                    log.iter()
                        .filter(|(w, _, t)| *w == format!("w-{k}") && !t.is_empty())
                        .filter(|(_, _, t)| t.bytes().all(|b| b == b'0'))
                        .map(|(_, _, t)| t.len())
                        .sum::<usize>()
                        == 300_000
                })
            },
        );
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
                long.iter().all(|(_, p, _)| *p == pid),
                "written by the worker"
            );
        }

        // Every worker's stdout and stderr are the same socket, the site's: no pipe per
        // worker.
        let outputs: Vec<String> = status["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|x| x["pid"].as_i64())
            .flat_map(|pid| [1, 2].map(|fd| format!("/proc/{pid}/fd/{fd}")))
            .map(|p| {
                std::fs::read_link(&p)
                    .expect("a worker's output")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(outputs.len(), 4, "{outputs:?}");
        assert!(
            outputs
                .iter()
                .all(|o| o.starts_with("socket:") && *o == outputs[0]),
            "one socket: {outputs:?}"
        );

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
        err.contains("2000 workers need 4008 fds in the agent (a pidfd and an output pipe each")
            && err.contains("beyond the agent's fd limit (4096")
            && err.contains("write output = \"socket\""),
        "{err}"
    );
    // Nothing changed.
    let s = agent.status("out");
    assert_eq!(s["ready"], 1);
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(1));
}

//! The control protocol as a library: `hatchery::control::Client`'s typed calls, the
//! example program that embeds it (`examples/status.rs`), and the Python client of
//! `tests/clients/` speaking the protocol as documented in the README.

mod common;

#[path = "../examples/status.rs"]
mod status_example;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use hatchery::control::{Client, ClientError, ErrorKind, PROTOCOL_VERSION, ScaleTo};

fn sleeper(name: &str, workers: u32) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000 # marker-{name}\"]\nworkers = {workers}\n"
    )
}

fn agent(reactor: &'static str) -> TestAgent {
    let agent = TestAgent::start_ready(
        &[("web", &sleeper("web", 1)), ("api", &sleeper("api", 2))],
        Options {
            reactor,
            cgroups: false,
        },
        "web",
        1,
    );
    agent.wait_for("api", "api ready", Duration::from_secs(10), |s| {
        s["ready"] == 2
    });
    agent
}

#[test]
fn the_typed_client_reads_status_scales_and_reports_the_agents_errors() {
    for reactor in REACTORS {
        let agent = agent(reactor);
        let connect = || Client::connect(&agent.socket).expect("connect");
        let status = connect().status(None).expect("status");
        assert_eq!(status.agent.protocol, PROTOCOL_VERSION);
        assert_eq!(connect().protocol().expect("protocol"), PROTOCOL_VERSION);
        let names: Vec<&str> = status.sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        let mut events = Vec::new();
        let done = connect()
            .scale("web", ScaleTo::Count(2), |e| events.push(e.to_string()))
            .expect("scale");
        assert_eq!(done.site, "web");
        assert!(!events.is_empty(), "scale reports progress");
        let web = connect().status(Some("web")).expect("status web");
        assert_eq!(web.sites.len(), 1);
        assert_eq!((web.sites[0].ready, web.sites[0].desired), (2, 2));
        assert_eq!(
            web.sites[0].workers.len(),
            2,
            "one site comes with its workers"
        );
        let signalled = connect().signal("web", "CONT").expect("signal");
        assert_eq!(
            (signalled.signal.as_str(), signalled.workers),
            ("SIGCONT", 2)
        );
        let mut lines = 0;
        let ended = connect()
            .logs("web", 5, false, |_| lines += 1)
            .expect("logs");
        assert_eq!(ended.site, "web");
        assert!(lines <= 5);
        // A site added from its file, then removed.
        let incoming = agent.dir.path().join("incoming");
        std::fs::create_dir_all(&incoming).expect("mkdir");
        let shop = incoming.join("shop.toml");
        std::fs::write(&shop, sleeper("shop", 1)).expect("write");
        let added = connect().add_site(&shop).expect("add");
        assert_eq!(added.site, "shop");
        agent.wait_for("shop", "shop ready", Duration::from_secs(10), |s| {
            s["ready"] == 1
        });
        assert!(agent.dir.path().join("sites.d/shop.toml").exists());
        let err = connect().add_site(&shop).expect_err("a name taken");
        assert!(err.to_string().contains("site shop exists"), "{err}");
        let removed = connect().remove_site("shop").expect("remove");
        assert_eq!(removed.site, "shop");
        assert!(!agent.dir.path().join("sites.d/shop.toml").exists());
        let err = connect().remove_site("shop").expect_err("gone");
        assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
        // The agent's errors, typed.
        let err = connect().status(Some("nope")).expect_err("no such site");
        assert_eq!(err.kind(), Some(ErrorKind::NotFound));
        assert_eq!(err.to_string(), "no such site: nope");
        let err = connect()
            .scale("web", ScaleTo::Auto, |_| {})
            .expect_err("a fixed count has no auto");
        assert_eq!(err.kind(), Some(ErrorKind::BadRequest), "{err}");
        // And the machine's.
        let gone = agent.dir.path().join("gone.sock");
        match Client::connect(&gone).map_err(ClientError::from) {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("expected an I/O error: {other:?}"),
        }
    }
}

/// What the example prints for this agent: its first line, then one per site.
fn expected_output(agent: &TestAgent) -> Vec<String> {
    let status = Client::connect(&agent.socket)
        .expect("connect")
        .status(None)
        .expect("status");
    let mut want = vec![format!(
        "agent {} (pid {}, protocol {PROTOCOL_VERSION})",
        status.agent.version, status.agent.pid
    )];
    want.extend(["api running 2/2".to_string(), "web running 1/1".to_string()]);
    want
}

#[test]
fn the_example_program_prints_each_sites_state_and_workers() {
    let agent = agent("epoll");
    let want = expected_output(&agent);
    // Its code, compiled into this test.
    let mut out = Vec::new();
    status_example::run(&agent.socket, &mut out).expect("run");
    let got: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
    // Its program, as `cargo test` builds it (beside this test's `deps` directory).
    let exe = std::env::current_exe().expect("current exe");
    let example: Option<PathBuf> = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("status"));
    let Some(example) = example.filter(|e| e.exists()) else {
        skip(
            "the example program is not built: cargo test (all targets) builds it, cargo test --test client_api does not",
        );
        return;
    };
    let by_env = Command::new(&example)
        .env("HATCHERY_SOCKET", &agent.socket)
        .output()
        .expect("run the example");
    assert!(by_env.status.success(), "{}", stderr(&by_env));
    assert_eq!(stdout(&by_env).lines().collect::<Vec<_>>(), want);
    let by_arg = Command::new(&example)
        .arg(&agent.socket)
        .env_remove("HATCHERY_SOCKET")
        .output()
        .expect("run the example");
    assert_eq!(stdout(&by_arg).lines().collect::<Vec<_>>(), want);
    let gone = agent.dir.path().join("gone.sock");
    let unreachable = Command::new(&example)
        .arg(&gone)
        .output()
        .expect("run the example");
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("cannot talk to the agent"),
        "{}",
        stderr(&unreachable)
    );
}

#[test]
fn the_python_client_reads_status_and_scales() {
    if Command::new("python3").arg("--version").output().is_err()
        && skip("python3 is not installed")
    {
        return;
    }
    let agent = agent("epoll");
    let client = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/hatchery_client.py"
    );
    let python = |args: &[&str]| {
        Command::new("python3")
            .arg(client)
            .arg(&agent.socket)
            .args(args)
            .output()
            .expect("run python3")
    };
    let out = python(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(
        lines[1..],
        ["api running 2/2".to_string(), "web running 1/1".to_string()]
    );
    assert!(
        lines[0].starts_with("agent ")
            && lines[0].ends_with(&format!("protocol {PROTOCOL_VERSION}")),
        "{}",
        lines[0]
    );
    let out = python(&["scale", "web", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("web: "), "{}", stdout(&out));
    let web = agent.status("web");
    assert_eq!(
        (web["ready"].as_u64(), web["desired"].as_u64()),
        (Some(3), Some(3))
    );
    let out = python(&["status", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "hatchery (not_found): no such site: nope"
    );
}

/// The README's Rust example is the client's documented example, which `cargo test`
/// compiles (a doctest of `hatchery::control`); its protocol transcript's lines are what
/// this build sends and reads.
#[test]
fn the_readmes_client_examples_are_the_tested_ones() {
    let readme = include_str!("../README.md");
    let section = &readme[readme
        .find("## Embedding it: the control protocol")
        .expect("the section")..];
    let block = |fence: &str| -> String {
        let start = section.find(fence).expect("a block") + fence.len();
        let end = start + section[start..].find("\n```").expect("its end");
        section[start..end].trim_start_matches('\n').to_string()
    };
    let rust = block("```rust\n");
    let doc: String = include_str!("../src/control.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let start = doc.find("```no_run\n").expect("the module's example") + "```no_run\n".len();
    let end = start + doc[start..].find("\n```").expect("its end");
    let example: Vec<&str> = doc[start..end]
        .lines()
        .filter(|l| !l.starts_with("# "))
        .collect();
    assert_eq!(rust.lines().collect::<Vec<_>>(), example);
    let transcript = block("```text\n");
    let mut lines = transcript.lines();
    let request = lines
        .next()
        .and_then(|l| l.strip_prefix("→ "))
        .expect("a request");
    let request: hatchery::control::Request = serde_json::from_str(request).expect("a request");
    assert!(matches!(
        request,
        hatchery::control::Request::Scale {
            workers: ScaleTo::Count(4),
            ..
        }
    ));
    let replies: Vec<hatchery::control::Reply> = lines
        .map(|l| serde_json::from_str(l.strip_prefix("← ").expect("a reply")).expect("a reply"))
        .collect();
    assert!(matches!(
        replies.last(),
        Some(hatchery::control::Reply::Ok(_))
    ));
}

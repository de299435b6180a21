//! README command one: `hatchery demo` serves, answers the commands it suggests (a
//! deploy among them), and Ctrl-C leaves no process behind.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// One HTTP request to the demo; the body's last line.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    Ok(body.lines().last().unwrap_or("").to_string())
}

#[test]
fn the_demo_serves_deploys_and_stops_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let mut demo = Command::new(BIN)
        .args(["demo", "--listen", &listen, "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("hatchery demo");
    let mut out = BufReader::new(demo.stdout.take().expect("stdout"));
    // The hints name the control socket; read until they are printed.
    let mut socket = None;
    let mut hints = String::new();
    while !hints.contains("Press Ctrl-C") {
        let mut line = String::new();
        if out.read_line(&mut line).expect("read the demo's output") == 0 {
            break;
        }
        if let Some(s) = line.trim().strip_prefix("export HATCHERY_SOCKET=") {
            socket = Some(s.to_string());
        }
        hints.push_str(&line);
    }
    let socket = socket.unwrap_or_else(|| panic!("no socket in the hints:\n{hints}"));
    for hint in [
        "curl",
        "status demo",
        "restart demo",
        "deploy demo",
        "logs demo -f",
    ] {
        assert!(hints.contains(hint), "{hint} is not suggested:\n{hints}");
    }
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("HATCHERY_SOCKET", &socket)
            .output()
            .expect("run the CLI")
    };

    let start = Instant::now();
    let first = loop {
        match get(port) {
            Ok(line) if line.starts_with("hello from worker") => break line,
            other => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the demo does not answer: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(first.ends_with("generation 1"), "{first}");
    let status = cli(&["status", "demo"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(stdout(&status).contains("running"), "{}", stdout(&status));

    // The suggested deploy: a new generation of the same command, then the flip.
    let deploy = cli(&["deploy", "demo"]);
    assert!(deploy.status.success(), "{}", stderr(&deploy));
    let after = get(port).expect("the demo answers after the deploy");
    assert!(after.ends_with("generation 2"), "{after}");

    let pids: Vec<i64> = {
        let s = cli(&["status", "demo", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&s.stdout).expect("status json");
        let site = if v["sites"].is_array() {
            v["sites"][0].clone()
        } else {
            v
        };
        site["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_i64())
            .collect()
    };
    assert_eq!(pids.len(), 2);

    // Ctrl-C: everything stops, nothing is left.
    let pid = rustix::process::Pid::from_raw(i32::try_from(demo.id()).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let start = Instant::now();
    let code = loop {
        if let Some(code) = demo.try_wait().expect("wait") {
            break code;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the demo did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code:?}");
    for p in pids {
        assert!(!alive(p), "worker {p} outlived the demo");
    }
    assert!(get(port).is_err(), "something still answers on {listen}");
}

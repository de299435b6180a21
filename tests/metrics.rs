//! Prometheus metrics (`metrics = "127.0.0.1:PORT"` in the agent file): `/metrics` read
//! with a plain TCP client, parsed by the Prometheus Python client's own text parser
//! (`prometheus_client`, installed by `run-tests` beside gunicorn), its values checked
//! against `status --json`; the limits of the listener; a port already taken. On both
//! event loops.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sleeper(name: &str, workers: u32) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000 # marker-{name}\"]\nworkers = {workers}\n"
    )
}

/// A python3 that imports `prometheus_client`, and the `PYTHONPATH` it needs; `None`
/// (having said why) where `run-tests` did not install it.
fn prometheus_parser() -> Option<(PathBuf, OsString)> {
    let Some(pythonpath) = std::env::var_os("HATCHERY_TEST_PYTHONPATH") else {
        skip("HATCHERY_TEST_PYTHONPATH is not set (run-tests installs prometheus_client there)");
        return None;
    };
    let python = std::env::var_os("HATCHERY_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/python3", "/usr/local/bin/python3"].map(PathBuf::from))
        .find(|p| {
            Command::new(p)
                .args(["-c", "import prometheus_client.parser"])
                .env("PYTHONPATH", &pythonpath)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    match python {
        Some(p) => Some((p, pythonpath)),
        None => {
            skip("no python3 imports prometheus_client from HATCHERY_TEST_PYTHONPATH");
            None
        }
    }
}

/// One sample as the Prometheus parser read it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

/// `text` parsed by `prometheus_client.parser.text_string_to_metric_families` (which
/// raises on anything that is not the text format).
fn parse(parser: &(PathBuf, OsString), text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append({"family": f.name, "kind": f.type, "name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;
    let mut child = Command::new(&parser.0)
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", &parser.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to the parser");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}

/// The value of the sample `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// An agent with `sites` serving metrics on a free loopback port.
fn start(sites: &[(&str, &str)], reactor: &'static str) -> (TestAgent, SocketAddr) {
    let mut agent = TestAgent::start(
        sites,
        Options {
            reactor,
            cgroups: true,
        },
    );
    agent.stop();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let file = agent.dir.path().join("hatchery.toml");
    let text = std::fs::read_to_string(&file).expect("agent file");
    std::fs::write(&file, format!("{text}metrics = \"{addr}\"\n")).expect("write");
    agent.relaunch();
    (agent, addr)
}

/// An HTTP exchange: the status line, then the headers and body as text.
fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send the request");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read the answer");
    let text = String::from_utf8(answer).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    assert!(headers.contains("Connection: close"), "{headers}");
    assert!(
        headers.contains(&format!("Content-Length: {}", body.len())),
        "{headers}"
    );
    body
}

fn full_status(agent: &TestAgent) -> hatchery::status::Status {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status --json")
}

#[test]
fn metrics_agree_with_status_and_count_a_restart() {
    let Some(parser) = prometheus_parser() else {
        return;
    };
    for reactor in REACTORS {
        let site = sleeper("blog", 2);
        let (agent, addr) = start(&[("blog", &site)], reactor);
        agent.wait_for("blog", "2 ready workers", Duration::from_secs(10), |s| {
            s["ready"] == 2
        });
        let before = full_status(&agent);
        let samples = parse(&parser, &scrape(addr));
        let blog = [("site", "blog")];
        let site = &before.sites[0];
        assert_eq!(
            value(
                &samples,
                "hatchery_agent_info",
                &[("version", &before.agent.version)]
            ),
            Some(1.0),
            "[{reactor}] {samples:?}"
        );
        assert_eq!(
            value(&samples, "hatchery_site_workers_ready", &blog),
            Some(f64::from(site.ready))
        );
        assert_eq!(
            value(&samples, "hatchery_site_workers_desired", &blog),
            Some(f64::from(site.desired))
        );
        assert_eq!(
            value(&samples, "hatchery_site_workers_requested", &blog),
            Some(f64::from(site.requested))
        );
        assert_eq!(
            value(
                &samples,
                "hatchery_site_workers",
                &[("site", "blog"), ("state", "ready")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&samples, "hatchery_site_worker_restarts_total", &blog),
            Some(0.0)
        );
        assert_eq!(
            value(
                &samples,
                "hatchery_site_state_info",
                &[("site", "blog"), ("state", "running")]
            ),
            Some(1.0)
        );
        // A counter family is named without `_total`, and typed as one.
        assert!(
            samples
                .iter()
                .any(|s| s.family == "hatchery_site_worker_restarts" && s.kind == "counter"),
            "{samples:?}"
        );
        // Accounting is there exactly where status has it (cgroup v2 here or not).
        let usage = site.usage.unwrap_or_default();
        assert_eq!(
            value(&samples, "hatchery_site_cpu_seconds_total", &blog).is_some(),
            usage.cpu_usec.is_some(),
            "{usage:?}"
        );
        if let (Some(cpu), Some(us)) = (
            value(&samples, "hatchery_site_cpu_seconds_total", &blog),
            usage.cpu_usec,
        ) {
            assert!(cpu >= us as f64 / 1e6, "CPU time only grows: {cpu} {us}");
        }
        let source = match usage.source {
            hatchery::cgroup::UsageSource::Cgroup => "cgroup",
            hatchery::cgroup::UsageSource::Proc => "proc",
        };
        assert_eq!(
            value(
                &samples,
                "hatchery_site_memory_bytes",
                &[("site", "blog"), ("source", source)]
            )
            .is_some(),
            usage.memory_current.is_some(),
            "{usage:?}"
        );
        assert_eq!(
            value(&samples, "hatchery_site_pids", &blog).is_some(),
            usage.pids.is_some()
        );
        // The status request above was counted, and the loop turned.
        assert!(
            value(&samples, "hatchery_agent_control_requests_total", &[]).is_some_and(|v| v >= 1.0)
        );
        assert!(
            value(&samples, "hatchery_agent_loop_iterations_total", &[]).is_some_and(|v| v >= 1.0)
        );

        // A killed worker is restarted: status and metrics count it alike.
        let victim = site.workers[0].pid.expect("a pid");
        Command::new("kill")
            .arg("-KILL")
            .arg(victim.to_string())
            .status()
            .expect("kill");
        agent.wait_for("blog", "a replacement", Duration::from_secs(10), |s| {
            s["workers"][0]["pid"]
                .as_i64()
                .is_some_and(|p| p != i64::from(victim))
                && s["ready"] == 2
        });
        let after = full_status(&agent);
        let samples = parse(&parser, &scrape(addr));
        let restarts: u32 = after.sites[0].workers.iter().map(|w| w.restarts).sum();
        assert_eq!(restarts, 1);
        assert_eq!(
            value(&samples, "hatchery_site_worker_restarts_total", &blog),
            Some(f64::from(restarts)),
            "[{reactor}]"
        );
        assert_eq!(
            value(
                &samples,
                "hatchery_site_worker_crashes_total",
                &[("site", "blog"), ("cause", "killed")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                "hatchery_site_worker_crashes_total",
                &[("site", "blog"), ("cause", "exited")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&samples, "hatchery_site_workers_ready", &blog),
            Some(f64::from(after.sites[0].ready))
        );
    }
}

#[test]
fn other_paths_methods_and_slow_clients_do_not_get_metrics_or_block_them() {
    for reactor in REACTORS {
        let site = sleeper("blog", 1);
        let (agent, addr) = start(&[("blog", &site)], reactor);
        let (status, _, body) = http(addr, "GET /other HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found", "[{reactor}] {body}");
        let (status, headers, _) = http(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(headers.contains("Allow: GET, HEAD"), "{headers}");
        let (status, _, _) = http(addr, "nonsense\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let (status, headers, body) = http(addr, "HEAD /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            body.is_empty() && headers.contains("Content-Length: "),
            "{headers}"
        );
        // A request that never ends is cut at 8 KiB.
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let (status, _, _) = http(addr, &long);
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

        // Clients that send nothing, or half a request, hold no scrape up: the next one
        // is answered while they are still connected.
        let mut idle = TcpStream::connect(addr).expect("connect");
        let mut half = TcpStream::connect(addr).expect("connect");
        half.write_all(b"GET /metr").expect("send half a request");
        let began = Instant::now();
        assert!(scrape(addr).contains("hatchery_site_workers_ready{site=\"blog\"} 1"));
        let took = began.elapsed();
        idle.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        assert!(
            matches!(idle.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "[{reactor}] the idle client is still connected (the scrape took {took:?})"
        );
        // Then the agent closes them once their time is up, without an answer.
        for c in [&mut idle, &mut half] {
            c.set_nonblocking(false).expect("blocking");
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)
                .expect("the agent closes a client that sends no request");
            assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        }
        assert_eq!(agent.status("blog")["ready"], 1);
    }
}

#[test]
fn a_metrics_port_in_use_stops_the_agent_at_startup_with_the_reason() {
    let mut agent = TestAgent::start(
        &[],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
    );
    agent.stop();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let file = agent.dir.path().join("hatchery.toml");
    let text = std::fs::read_to_string(&file).expect("agent file");
    std::fs::write(&file, format!("{text}metrics = \"{addr}\"\n")).expect("write");
    let mut child = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent started on a port in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("failed to bind the metrics address {addr}"))
            && err.contains("Address already in use"),
        "{err}"
    );
    drop(taken);
}

#[test]
fn deploys_and_rollbacks_are_counted_as_status_reports_them() {
    let Some(parser) = prometheus_parser() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let release = |name: &str, script: &str| {
        let dir = root.path().join("releases").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let run = dir.join("run");
        std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).expect("write");
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        dir
    };
    let link = root.path().join("current");
    let point = |target: &std::path::Path| {
        let tmp = link.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).expect("symlink");
        std::fs::rename(&tmp, &link).expect("rename");
    };
    point(&release("r1", "exec sleep 1000"));
    let site = format!(
        "name = \"web\"\ncommand = [\"{{release}}/run\"]\nworkers = 1\nrelease = \"{}\"\n[deploy]\nprobation = \"100ms\"\n[ready]\ntimeout = \"3s\"\n",
        link.display()
    );
    let (agent, addr) = start(&[("web", &site)], "epoll");
    agent.wait_for("web", "a ready worker", Duration::from_secs(10), |s| {
        s["ready"] == 1
    });
    point(&release("r2", "exec sleep 1000"));
    let out = agent.cli(&["deploy", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.wait_for("web", "the deploy done", Duration::from_secs(20), |s| {
        s["last_deploy"]["result"] == "done" && s["deploy"].is_null()
    });
    let took = s["last_deploy"]["duration_ms"].as_u64().expect("duration");
    let samples = parse(&parser, &scrape(addr));
    let web = [("site", "web")];
    assert_eq!(
        value(&samples, "hatchery_site_deploys_total", &web),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "hatchery_site_rollbacks_total", &web),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "hatchery_site_last_deploy_duration_seconds", &web),
        Some(took as f64 / 1e3)
    );
    assert_eq!(
        value(&samples, "hatchery_site_generation", &web),
        s["generation"].as_f64()
    );
    // A release whose workers exit at once is rolled back.
    point(&release("r3", "exit 3"));
    let out = agent.cli(&["deploy", "web"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    agent.wait_for("web", "the rollback", Duration::from_secs(30), |s| {
        s["last_deploy"]["result"] == "rolled_back" && s["deploy"].is_null()
    });
    let samples = parse(&parser, &scrape(addr));
    assert_eq!(
        value(&samples, "hatchery_site_deploys_total", &web),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "hatchery_site_rollbacks_total", &web),
        Some(1.0)
    );
    assert!(
        value(
            &samples,
            "hatchery_site_worker_crashes_total",
            &[("site", "web"), ("cause", "exited")]
        )
        .is_some_and(|n| n >= 1.0),
        "{samples:?}"
    );
}

/// A site may not listen where the agent does: at its control socket's path (a site's unix
/// socket is bound by removing the one there), in its state directory (its notify and fd
/// holder sockets), or on its metrics address, a wildcard too (it would join the metrics
/// socket's `SO_REUSEPORT` group). Such a file is put aside with its reason at the start and
/// refused at a reload, and the agent's own sockets keep answering; a reload that moves
/// `metrics` (which takes effect at a restart) still holds the address served.
#[test]
fn a_site_cannot_listen_where_the_agent_does() {
    let (mut agent, addr) = start(&[("web", &sleeper("web", 1))], "io_uring");
    agent.stop();
    let state = agent.dir.path().join("state");
    let unix = |name: &str, path: &std::path::Path| {
        format!(
            "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n[[listen]]\nunix = \"{}\"\n",
            path.display()
        )
    };
    let tcp = |name: &str, at: String| {
        format!(
            "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n[[listen]]\ntcp = \"{at}\"\n"
        )
    };
    // The control socket spelled another way, to be found all the same.
    let control = agent.dir.path().join("state/../control.sock");
    std::fs::write(agent.site_file("ctl"), unix("ctl", &control)).expect("write");
    std::fs::write(
        agent.site_file("inside"),
        unix("inside", &state.join("notify.sock")),
    )
    .expect("write");
    std::fs::write(
        agent.site_file("wild"),
        tcp("wild", format!("0.0.0.0:{}", addr.port())),
    )
    .expect("write");
    agent.relaunch();
    agent.wait_for("web", "web up", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    let file = agent.dir.path().join("hatchery.toml");
    for (site, want) in [
        (
            "ctl",
            format!(
                "ctl.toml: listen: unix {} is the agent's control socket (control_socket in {})",
                control.display(),
                file.display()
            ),
        ),
        (
            "inside",
            format!(
                "inside.toml: listen: unix {} is one of the agent's own sockets (in its state_dir {}, in {})",
                state.join("notify.sock").display(),
                state.display(),
                file.display()
            ),
        ),
        (
            "wild",
            format!(
                "wild.toml: listen: tcp 0.0.0.0:{} overlaps the agent's metrics address {addr} (metrics in {})",
                addr.port(),
                file.display()
            ),
        ),
    ] {
        let s = agent.status(site);
        assert_eq!(s["state"], "failed", "{site}: {s:#}");
        assert!(
            s["error"].as_str().is_some_and(|e| e.contains(&want)),
            "{s:#}\nwanted: {want}"
        );
    }
    // The control socket answered all of that.
    let out = agent.cli(&["start", "ctl"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        agent.status("web")["ready"] == 1,
        "the control socket still answers"
    );

    // At a reload: the file that brings such a site is refused, nothing changes.
    for f in ["ctl", "inside", "wild"] {
        std::fs::remove_file(agent.site_file(f)).expect("rm");
    }
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(
        agent.site_file("late"),
        tcp("late", format!("127.0.0.1:{}", addr.port())),
    )
    .expect("write");
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("late.toml: listen: tcp 127.0.0.1:")
            && stderr(&out).contains("overlaps the agent's metrics address"),
        "{}",
        stderr(&out)
    );
    // `metrics` moved in the file: the new address is refused by the load, the one still
    // served (until a restart) by the reload.
    let [moved] = free_ports::<1>();
    let text = std::fs::read_to_string(&file).expect("agent file");
    std::fs::write(
        &file,
        text.replace(&addr.to_string(), &format!("127.0.0.1:{moved}")),
    )
    .expect("write");
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "late.toml: listen: tcp 127.0.0.1:{} overlaps the agent's metrics address {addr} (metrics served until the agent restarts)",
            addr.port(),
        )),
        "the address served: {}",
        stderr(&out)
    );
    std::fs::write(
        agent.site_file("late"),
        tcp("late", format!("127.0.0.1:{moved}")),
    )
    .expect("write");
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "late.toml: listen: tcp 127.0.0.1:{moved} overlaps the agent's metrics address 127.0.0.1:{moved}"
        )),
        "the address in the file: {}",
        stderr(&out)
    );
    let out = agent.cli(&["status", "late"]);
    assert!(!out.status.success(), "not added: {}", stdout(&out));

    // A site runs on a port, and `metrics` is then moved onto it: the agent that comes
    // after a crash adopts the site on its address and serves no metrics there.
    std::fs::remove_file(agent.site_file("late")).expect("rm");
    let [port] = free_ports::<1>();
    std::fs::write(
        agent.site_file("shop"),
        tcp("shop", format!("127.0.0.1:{port}")),
    )
    .expect("write");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_for("shop", "shop up", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    let shop = agent.pids("shop");
    let text = std::fs::read_to_string(&file).expect("agent file");
    std::fs::write(
        &file,
        text.replace(&format!("127.0.0.1:{moved}"), &format!("127.0.0.1:{port}")),
    )
    .expect("write");
    agent.crash();
    agent.relaunch();
    agent.wait_for("shop", "shop adopted", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    assert_eq!(agent.pids("shop"), shop, "shop's worker adopted");
    assert!(
        agent.status("shop")["error"].is_null(),
        "{:#}",
        agent.status("shop")
    );
    let want = format!(
        "metrics are not served: 127.0.0.1:{port} overlaps tcp 127.0.0.1:{port}, where site shop runs"
    );
    assert!(agent.agent_log().contains(&want), "{}", agent.agent_log());
    // One socket listens on the port: the site's.
    assert_eq!(listening_on(port), 1, "sockets listening on {port}");
    // And a reload does not take the running site for one that wants the metrics address,
    // nor the metrics for changed.
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.pids("shop"), shop, "shop's worker kept");
    assert_eq!(listening_on(port), 1, "sockets listening on {port}");
    let log = agent.agent_log();
    let since = log.rfind(&want).expect("the line above");
    assert!(
        !log[since..].contains("metrics changed"),
        "{}",
        &log[since..]
    );
    // An upgrade (to the same binary) is not refused for metrics the file has and the
    // agent does not serve; the new image does not serve them either.
    let out = agent.cli(&["upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.pids("shop"), shop, "shop's worker kept");
    assert_eq!(listening_on(port), 1, "sockets listening on {port}");
    // Moved again in the file: an upgrade is refused, with what changed.
    let text = std::fs::read_to_string(&file).expect("agent file");
    std::fs::write(
        &file,
        text.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{moved}")),
    )
    .expect("write");
    let out = agent.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "upgrade refused: metrics changed in {} since the agent started (127.0.0.1:{port}, now 127.0.0.1:{moved})",
            file.display()
        )),
        "{}",
        stderr(&out)
    );
}

/// How many TCP sockets listen on `port` (`/proc/net/tcp` and `tcp6`).
fn listening_on(port: u16) -> usize {
    let local = format!(":{port:04X}");
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // The local address, then the state: 0A is LISTEN.
            if f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A" {
                n += 1;
            }
        }
    }
    n
}

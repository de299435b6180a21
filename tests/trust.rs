//! What neither a closed pipe, a hostile local user nor an unlucky signal may do: take a
//! site or the agent down (issue: trust). Host integration tests; those that need root
//! run in vm-tests too.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn status_json(agent: &TestAgent) -> serde_json::Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The agent's stderr reader goes away, or stops reading: log writes are dropped and
/// counted, the agent goes on (it used to abort: the logging library reported the failed
/// write on the same broken stderr, with a panic).
#[test]
fn the_agent_outlives_its_log_reader() {
    for reactor in REACTORS {
        // A crash loop writes a WARN line at every exit.
        let site = "name = \"loud\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 3\"]\nworkers = 2\n\
                    [restart]\nbackoff_initial = \"10ms\"\nbackoff_max = \"20ms\"\nflapping = { exits = 1000000, within = \"1s\" }\n";
        // Closed: the reader is gone before the agent writes its first line.
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        drop(r);
        let agent = TestAgent::start_with_output(
            &[("loud", site)],
            Options {
                reactor,
                cgroups: false,
            },
            w,
        );
        wait_until("log bytes dropped", Duration::from_secs(20), || {
            status_json(&agent)["agent"]["log_bytes_dropped"].as_u64() > Some(1000)
        });
        assert_eq!(agent.status("loud")["state"], "running");
        drop(agent);

        // Full: a reader that never reads, on the smallest pipe the kernel gives.
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        rustix::pipe::fcntl_setpipe_size(&w, 4096).expect("F_SETPIPE_SZ");
        let agent = TestAgent::start_with_output(
            &[("loud", site)],
            Options {
                reactor,
                cgroups: false,
            },
            w,
        );
        wait_until(
            "log bytes dropped on a full pipe",
            Duration::from_secs(20),
            || status_json(&agent)["agent"]["log_bytes_dropped"].as_u64() > Some(1000),
        );
        // Still answering at once: no write blocks the loop.
        let t1 = Instant::now();
        assert_eq!(agent.status("loud")["state"], "running");
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "status took {:?}",
            t1.elapsed()
        );
        drop(r);
    }
}

/// `hatchery demo` started with its output into a pipe whose reader is gone still runs
/// and serves (its banner used to panic it).
#[test]
fn the_demo_outlives_a_closed_stdout() {
    let port = free_port();
    let (r, w) = rustix::pipe::pipe().expect("pipe");
    drop(r);
    let w2 = w.try_clone().expect("dup");
    let mut demo = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::from(w))
        .stderr(std::fs::File::from(w2))
        .spawn()
        .expect("demo");
    let served = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = demo.try_wait().expect("wait") {
                return Err(format!("the demo exited: {st}"));
            }
            if let Ok(body) = http_get(port, "/") {
                return Ok(body);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("the demo never served".into())
    })();
    let _ = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status();
    let st = demo.wait().expect("wait");
    let body = served.expect("served");
    assert!(body.contains("hello from worker 0"), "{body}");
    assert_eq!(st.code(), Some(0), "a clean stop: {st}");
}

/// A closed stdout ends the CLI quietly (SIGPIPE, as `head` expects), never with a
/// panic; worker output shown by `logs` has its control characters escaped.
#[test]
fn the_cli_is_a_good_pipe_citizen() {
    let site = "name = \"chatty\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; printf 'red \\\\033[31mRED\\\\033]0;title\\\\007 bell\\\\n'; exec sleep 1000\"]\nworkers = 1\n";
    let agent = TestAgent::start_ready(
        &[("chatty", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "chatty",
        1,
    );
    wait_until(
        "the worker's output in the log",
        Duration::from_secs(20),
        || stdout(&agent.cli(&["logs", "chatty", "-n", "3"])).contains("bell"),
    );
    // `hatchery logs chatty -n 2000 | head -1`
    let mut cli = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["logs", "chatty", "-n", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs");
    let mut out = BufReader::new(cli.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("a line");
    drop(out);
    let mut err = String::new();
    cli.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let st = cli.wait().expect("wait");
    assert!(
        st.success() || st.signal() == Some(libc_sigpipe()),
        "quiet end on a closed stdout, not {st}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Escapes, not raw control characters.
    // Among the last lines (the agent's own `hatchery:` lines may come after it).
    let text = stdout(&agent.cli(&["logs", "chatty", "-n", "20"]));
    assert!(
        text.contains("red \\x1b[31mRED\\x1b]0;title\\x07 bell"),
        "{text:?}"
    );
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
}

fn libc_sigpipe() -> i32 {
    13
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Lets `nobody` reach the agent's socket (the test directory is private by default).
fn open_to_others(agent: &TestAgent) {
    std::fs::set_permissions(
        agent.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
}

/// A local user opens every connection it can and sends half a request on each: root's
/// `status`, `stop` and `reload` still work at once, the user gets at most its share,
/// and the half-open connections are closed after the request timeout.
#[test]
fn a_hostile_local_user_cannot_lock_root_out_of_the_control_socket() {
    if !is_root() && skip("needs root to connect as another uid") {
        return;
    }
    for reactor in REACTORS {
        let site =
            "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 1\n";
        let agent = TestAgent::start_ready(
            &[("web", site)],
            Options {
                reactor,
                cgroups: false,
            },
            "web",
            1,
        );
        open_to_others(&agent);
        let socket = agent.socket.display().to_string();
        let mut hog = {
            use std::os::unix::process::CommandExt;
            Command::new(BIN)
                .uid(65534)
                .gid(65534)
                .args(["__probe", "hold-connections", &socket, "100"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("probe")
        };
        let mut lines = BufReader::new(hog.stdout.take().expect("stdout")).lines();
        let connected = lines.next().expect("a line").expect("read");
        assert!(connected.contains("\"connected\""), "{connected}");
        // Root is served at once while they are held.
        let t0 = Instant::now();
        assert_eq!(agent.status("web")["state"], "running");
        let out = agent.cli(&["reload"]);
        assert!(out.status.success(), "reload: {}", stderr(&out));
        let out = agent.cli(&["stop", "web"]);
        assert!(out.status.success(), "stop: {}", stderr(&out));
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        // Every held connection was refused or timed out, none kept.
        let replies: serde_json::Value =
            serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("json");
        let replies: Vec<&str> = replies["replies"]
            .as_array()
            .expect("replies")
            .iter()
            .filter_map(|r| r.as_str())
            .collect();
        let timed_out = replies
            .iter()
            .filter(|r| r.contains("no complete request within"))
            .count();
        let refused = replies
            .iter()
            .filter(|r| r.contains("too many connections from uid 65534"))
            .count();
        assert_eq!(timed_out, 8, "a uid's share: {replies:?}");
        assert_eq!(timed_out + refused, replies.len(), "{replies:?}");
        assert!(hog.wait().expect("wait").success());
    }
}

/// `logs -n 100000 -f` clients that never read cost the agent a bounded buffer each; a
/// client that reads gets every line, in order; a follower that falls too far behind is
/// dropped with a notice.
#[test]
fn slow_log_readers_cannot_balloon_the_agent() {
    // 100 000 lines of ~90 bytes, then a 4 KiB line every 10 ms.
    let site = r#"name = "chatty"
command = ["/bin/sh", "-c", '''
awk 'BEGIN { for (i = 0; i < 100000; i++) printf "line %d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n", i }'
big=$(awk 'BEGIN { for (i = 0; i < 512; i++) printf "ticking " }')
while :; do echo "$big"; sleep 0.01; done
''']
workers = 1
[logs]
max_size = "1G"
"#;
    let agent = TestAgent::start_ready(
        &[("chatty", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "chatty",
        1,
    );
    wait_until("the backlog in the log", Duration::from_secs(60), || {
        stdout(&agent.cli(&["logs", "chatty", "-n", "1"])).contains("ticking")
    });
    let rss = || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    };
    let before = rss();
    // 30 clients ask for everything and follow, and never read.
    let mut idle = Vec::new();
    for _ in 0..30 {
        let mut c = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
        use std::io::Write;
        c.write_all(b"{\"cmd\":\"logs\",\"site\":\"chatty\",\"lines\":100000,\"follow\":true}\n")
            .expect("request");
        idle.push(c);
    }
    // The agent stays responsive while they sit there (timed on the host only: under
    // software emulation every step is many times slower).
    let secs = if std::env::var_os("HATCHERY_IN_VM").is_some() {
        30
    } else {
        2
    };
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(agent.status("chatty")["state"], "running");
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "status took {:?}",
            t.elapsed()
        );
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 24 << 20,
        "30 idle log clients grew the agent by {} MiB",
        grown >> 20
    );
    // They stay connected, each paused in its backlog (the file is its buffer). A client
    // that follows from the end and stops reading falls behind the live lines and is
    // dropped, with a notice at the end of what it was sent.
    drop(idle);
    let mut follower = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
    {
        use std::io::Write;
        follower
            .write_all(b"{\"cmd\":\"logs\",\"site\":\"chatty\",\"lines\":0,\"follow\":true}\n")
            .expect("request");
    }
    let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
    let dropped = |log: &str| log.contains("a logs -f client fell behind");
    wait_until(
        "the silent follower to be dropped",
        Duration::from_secs(60),
        || dropped(&agent.agent_log()),
    );
    assert!(!dropped(&log));
    follower
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let last = BufReader::new(follower)
        .lines()
        .map(|l| l.expect("read"))
        .last()
        .expect("lines");
    assert!(last.contains("logs -f dropped"), "{last}");
    // A client that reads gets the last 100 000 lines, complete and in order: the
    // worker's, with the agent's own `hatchery:` lines about it (started, ready) among them.
    let out = agent.cli(&["logs", "chatty", "-n", "100000"]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 100_000);
    let agent_lines = lines.iter().filter(|l| l.contains(" hatchery: ")).count();
    assert!(agent_lines < 10, "{agent_lines} agent lines");
    let worker: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.contains(" hatchery: "))
        .collect();
    let mut last_tick = 0;
    for (i, l) in worker.iter().enumerate() {
        assert!(l.contains(" w-0["), "line {i}: {l}");
        if l.contains("ticking") {
            last_tick = i;
        }
    }
    assert_eq!(last_tick, worker.len() - 1, "the newest line is last");
}

/// Runs the CLI as `nobody` (uid and gid 65534) in `dir`.
fn as_nobody(agent: &TestAgent, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new(BIN)
        .uid(65534)
        .gid(65534)
        .current_dir(dir)
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("cli")
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

/// A site's owner may scale within its configuration and deploy releases it can reach
/// beside its release symlink; nothing beyond, and a refusal tells nothing about paths it
/// may not see. Its log is readable by it and root, not by other users.
#[test]
fn a_site_owner_stays_within_its_site() {
    if !is_root() && skip("needs root to act as another uid") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    chmod(tmp.path(), 0o755);
    let srv = tmp.path().join("srv/mine");
    for r in ["r1", "r2"] {
        std::fs::create_dir_all(srv.join("releases").join(r)).expect("mkdir");
    }
    std::os::unix::fs::symlink("releases/r1", srv.join("current")).expect("symlink");
    let secret = tmp.path().join("secret");
    std::fs::create_dir_all(secret.join("inner")).expect("mkdir");
    chmod(&secret, 0o700);
    let elsewhere = tmp.path().join("elsewhere/r9");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let mine = format!(
        "name = \"mine\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 2\nuser = \"nobody\"\nrelease = \"{}\"\n",
        srv.join("current").display()
    );
    let theirs = "name = \"theirs\"\ncommand = [\"/bin/sh\", \"-c\", \"echo secret-of-theirs; exec sleep 1000\"]\nworkers = 1\n";
    let agent = TestAgent::start_ready(
        &[("mine", &mine), ("theirs", theirs)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "mine",
        2,
    );
    open_to_others(&agent);
    chmod(&agent.dir.path().join("state"), 0o755);

    // Scale: up to the configured count, not beyond; root may.
    let out = as_nobody(&agent, tmp.path(), &["scale", "mine", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("may scale site mine to at most 2"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.status("mine")["desired"], 2, "nothing changed");
    let out = as_nobody(&agent, tmp.path(), &["scale", "mine", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&["scale", "mine", "3"]);
    assert!(out.status.success(), "root may: {}", stderr(&out));

    // Deploy --release: only a directory beside the symlink that nobody can reach.
    let refusal = |out: &std::process::Output, path: &std::path::Path| {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
        let want = format!(
            "release {}: not a directory inside {} that uid 65534 can reach",
            path.display(),
            srv.display()
        );
        assert!(
            stderr(out).contains(&want),
            "{}\nwanted: {want}",
            stderr(out)
        );
    };
    for path in [
        secret.join("inner"),
        secret.join("no-such-dir"),
        elsewhere.clone(),
        srv.join("releases/none"),
    ] {
        let out = as_nobody(
            &agent,
            tmp.path(),
            &["deploy", "mine", "--release", &path.display().to_string()],
        );
        refusal(&out, &path);
    }
    assert_eq!(
        agent.status("mine")["generation"],
        1,
        "nothing was deployed"
    );
    // Its symlink, which it may repoint, is resolved with its permissions too.
    std::fs::remove_file(srv.join("current")).expect("rm");
    std::os::unix::fs::symlink(secret.join("inner"), srv.join("current")).expect("symlink");
    let out = as_nobody(&agent, tmp.path(), &["deploy", "mine"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not resolve to a directory that uid 65534 can reach"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(srv.join("current")).expect("rm");
    std::os::unix::fs::symlink("releases/r1", srv.join("current")).expect("symlink");
    assert_eq!(agent.status("mine")["generation"], 1);
    // A relative path is the caller's, not the agent's.
    let out = as_nobody(
        &agent,
        &srv,
        &["deploy", "mine", "--release", "releases/r2"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.status("mine");
    assert_eq!(s["generation"], 2);
    assert_eq!(
        s["release"].as_str(),
        Some(srv.join("releases/r2").to_str().expect("utf-8")),
        "{s:#}"
    );

    // Logs: 0640, the site's group; the directory cannot be listed by others.
    use std::os::unix::fs::MetadataExt;
    let logs = agent.dir.path().join("state/logs");
    let m = std::fs::metadata(logs.join("mine.log")).expect("mine.log");
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.gid(), 65534);
    let m = std::fs::metadata(logs.join("theirs.log")).expect("theirs.log");
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.gid(), 0);
    assert_eq!(
        std::fs::metadata(&logs).expect("logs").mode() & 0o777,
        0o711
    );
    let read = |file: &str| {
        use std::os::unix::process::CommandExt;
        Command::new("cat")
            .uid(65534)
            .gid(65534)
            .arg(logs.join(file))
            .output()
            .expect("cat")
    };
    assert!(read("mine.log").status.success(), "its own log");
    let out = read("theirs.log");
    assert!(
        !out.status.success(),
        "another site's log: {}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("secret-of-theirs"));
}

/// One bad site file, or a port another process holds, keeps only that site from
/// starting: the others run, the bad ones show as failed with the reason, `start` tries a
/// site again once the host allows it, and `check` reports every problem at once.
#[test]
fn a_bad_site_keeps_only_itself_from_starting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let good =
        "name = \"good\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 1\n";
    let typo = "name = \"typo\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n";
    let busy = format!(
        "name = \"busy\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 1\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\n"
    );
    let agent = TestAgent::start_ready(
        &[("good", good), ("typo", typo), ("busy", &busy)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "good",
        1,
    );
    let typo_s = agent.status("typo");
    assert_eq!(typo_s["state"], "failed");
    assert!(
        typo_s["error"]
            .as_str()
            .is_some_and(|e| e.contains("typo.toml") && e.contains("wrokers")),
        "{typo_s:#}"
    );
    let busy_s = agent.status("busy");
    assert_eq!(busy_s["state"], "failed");
    let me = std::process::id();
    let want = format!("127.0.0.1:{port}: address in use by pid {me}");
    assert!(
        busy_s["error"].as_str().is_some_and(|e| e.contains(&want)),
        "{busy_s:#}\nwanted: {want}"
    );
    assert!(agent.agent_log().contains(&want), "said in the agent's log");
    let table = stdout(&agent.cli(&["status"]));
    assert!(table.contains("typo") && table.contains(&want), "{table}");
    // Other requests for them say why; `start` tries again once the port is free.
    let out = agent.cli(&["restart", "busy"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    let out = agent.cli(&["start", "busy"]);
    assert_eq!(out.status.code(), Some(1), "still taken");
    drop(taken);
    let out = agent.cli(&["start", "busy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.status("busy")["ready"], 1);
    let out = agent.cli(&["start", "typo"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // `check` reports every problem at once: the typo, a command that does not exist, a
    // port held by another process (the running agent's own do not count).
    std::fs::write(
        agent.site_file("ghost"),
        "name = \"ghost\"\ncommand = [\"/no/such/server\"]\n",
    )
    .expect("write");
    let holder = std::net::TcpListener::bind(("127.0.0.1", free)).expect("bind");
    std::fs::write(
        agent.site_file("late"),
        format!(
            "name = \"late\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n[[listen]]\ntcp = \"127.0.0.1:{free}\"\n"
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(agent.dir.path().join("hatchery.toml"))
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("typo: ") && err.contains("wrokers"), "{err}");
    assert!(
        err.contains("ghost: ") && err.contains("/no/such/server"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "late: listen: 127.0.0.1:{free}: address in use by pid {me}"
        )),
        "{err}"
    );
    assert!(
        !err.contains("busy:"),
        "the agent's own port is not a problem: {err}"
    );
    drop(holder);

    // A reload that brings a duplicate address blames the file that brought it.
    std::fs::remove_file(agent.site_file("ghost")).expect("rm");
    std::fs::remove_file(agent.site_file("late")).expect("rm");
    std::fs::write(agent.site_file("typo"), good.replace("good", "typo")).expect("write");
    std::fs::write(
        agent.site_file("aaa"),
        format!(
            "name = \"aaa\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n[[listen]]\ntcp = \"0.0.0.0:{port}\"\n"
        ),
    )
    .expect("write");
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("aaa.toml: listen:")
            && stderr(&out).contains(&format!("overlaps tcp 127.0.0.1:{port} of site busy")),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(agent.site_file("aaa")).expect("rm");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_for(
        "typo",
        "typo fixed and started",
        Duration::from_secs(20),
        |s| s["ready"] == 1,
    );
}

/// `start`, `scale` and `restart` wait until their workers have stayed up for
/// `ready.settle`; one that dies right after it started is a failure, said as such, and
/// a restart stops at it so the workers not yet restarted keep serving.
#[test]
fn operations_do_not_report_success_for_workers_that_die_right_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad");
    // w-1 dies 0.2 s after it starts; so does every worker once `bad` exists.
    let site = format!(
        "name = \"flaky\"\ncommand = [\"/bin/sh\", \"-c\", \"if [ -e {bad} ] || [ $HATCHERY_WORKER_ID = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 1000\"]\nworkers = 1\n\
         [ready]\nsettle = \"2s\"\n[restart]\nbackoff_initial = \"5s\"\n",
        bad = bad.display()
    );
    let agent = TestAgent::start_ready(
        &[("flaky", &site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "flaky",
        1,
    );
    let out = agent.cli(&["scale", "flaky", "2"]);
    assert_eq!(out.status.code(), Some(1), "scale: {}", stderr(&out));
    assert!(
        stderr(&out).contains("w-1 exited with code 3")
            && stderr(&out).contains("after it started"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["scale", "flaky", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A new release that dies right after it starts: the restart stops at the first
    // worker, the others keep their processes.
    let out = agent.cli(&["scale", "flaky", "3"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "w-1 still dies: {}",
        stderr(&out)
    );
    let site3 = site
        .replace("|| [ $HATCHERY_WORKER_ID = 1 ]", "")
        .replace("workers = 1", "workers = 3");
    std::fs::write(agent.site_file("flaky"), &site3).expect("write");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.wait_for(
        "flaky",
        "3 ready after the reload",
        Duration::from_secs(30),
        |s| s["ready"] == 3 && s["restarting"] == false,
    );
    let before: Vec<i64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    std::fs::write(&bad, "").expect("touch");
    let t0 = Instant::now();
    let out = agent.cli(&["restart", "flaky"]);
    assert_eq!(out.status.code(), Some(1), "restart: {}", stderr(&out));
    assert!(
        stderr(&out).contains("w-0 exited with code 3"),
        "{}",
        stderr(&out)
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let s = agent.status("flaky");
    let after: Vec<i64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    assert_eq!(s["restarting"], false, "{s:#}");
    assert!(
        before[1..].iter().all(|p| after.contains(p)),
        "w-1 and w-2 were not restarted: {before:?} -> {after:?}"
    );

    // `start` of a site whose workers die right after they start fails too.
    let out = agent.cli(&["stop", "flaky"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&["start", "flaky"]);
    assert_eq!(out.status.code(), Some(1), "start: {}", stderr(&out));
    assert!(
        stderr(&out).contains("exited with code 3"),
        "{}",
        stderr(&out)
    );
}

/// A deploy whose new workers die after the flip, once the old generation was told to
/// stop, is not reported as a success.
#[test]
fn a_deploy_whose_workers_die_after_the_flip_is_not_a_success() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let link = root.join("current");
    let (die, let_go) = (root.join("die"), root.join("let-old-go"));
    for (name, script) in [
        (
            "r1",
            format!(
                "trap 'while [ ! -e {0} ]; do sleep 0.05; done; exit 0' TERM\nwhile :; do sleep 0.05; done\n",
                let_go.display()
            ),
        ),
        (
            "r2",
            format!(
                "while [ ! -e {0} ]; do sleep 0.05; done\nexit 3\n",
                die.display()
            ),
        ),
    ] {
        let rel = root.join("releases").join(name);
        std::fs::create_dir_all(&rel).expect("mkdir");
        std::fs::write(rel.join("run"), script).expect("write");
    }
    std::os::unix::fs::symlink(root.join("releases/r1"), &link).expect("symlink");
    let site = format!(
        "name = \"web\"\ncommand = [\"/bin/sh\", \"{{release}}/run\"]\nworkers = 1\nrelease = \"{}\"\n\
         [stop]\ntimeout = \"60s\"\n[deploy]\nprobation = \"300ms\"\n[restart]\nbackoff_initial = \"5s\"\n",
        link.display()
    );
    let agent = TestAgent::start_ready(
        &[("web", &site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "web",
        1,
    );
    std::fs::remove_file(&link).expect("rm");
    std::os::unix::fs::symlink(root.join("releases/r2"), &link).expect("symlink");
    let mut deploy = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["deploy", "web"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("deploy");
    let mut progress = BufReader::new(deploy.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    for line in progress.by_ref() {
        let line = line.expect("read");
        seen.push(line.clone());
        if line.contains("gen-1: queue drained, stopping its workers") {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("gen-2 serves")), "{seen:?}");
    // gen-1 is stopping (slowly); now gen-2's worker dies.
    std::fs::write(&die, "").expect("touch");
    agent.wait_for("web", "the crash seen", Duration::from_secs(20), |s| {
        s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["generation"] == 2 && w["last_exit"] == "exited with code 3")
    });
    std::fs::write(&let_go, "").expect("touch");
    let rest: Vec<String> = progress.map(|l| l.expect("read")).collect();
    let st = deploy.wait().expect("wait");
    assert_eq!(st.code(), Some(1), "{seen:?} {rest:?}");
    let all = rest.join("\n");
    assert!(
        all.contains(
            "a new worker died after the old generation was stopped: w-0 exited with code 3"
        ),
        "{all}"
    );
    assert_eq!(
        agent.status("web")["last_deploy"]["result"],
        "done_with_crashes"
    );
}

/// Where io_uring is refused (a container runtime's seccomp profile), the agent runs on
/// epoll by itself, says why, and supervises as usual.
#[test]
fn io_uring_refused_falls_back_to_epoll() {
    let site =
        "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nworkers = 2\n";
    let agent = TestAgent::start_through(
        &[("web", site)],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        &[BIN, "__probe", "without-io-uring"],
    );
    agent.wait_for("web", "2 ready", Duration::from_secs(20), |s| {
        s["ready"] == 2
    });
    assert_eq!(reactor_in_use(i64::from(agent.pid())), "epoll");
    let features = status_json(&agent)["agent"]["features"].to_string();
    assert!(
        features.contains("epoll (io_uring unavailable")
            && features.contains("Operation not permitted"),
        "{features}"
    );
    let victim = agent.pids("web")[0];
    let _ = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    agent.wait_for("web", "a replacement", Duration::from_secs(20), |s| {
        s["ready"] == 2 && s["workers"][0]["pid"].as_i64().is_some_and(|p| p != victim)
    });
}

/// A reload whose new listener cannot be bound changes nothing: the site keeps its
/// address and its workers, and the answer names the holder.
#[test]
fn a_reload_whose_listener_cannot_bind_changes_nothing() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").port();
    let site = |p: u16| {
        format!(
            "name = \"web\"\ncommand = [\"{BIN}\", \"__demo-worker\"]\nworkers = 2\n[[listen]]\ntcp = \"127.0.0.1:{p}\"\n[ready]\ncheck = \"notify\"\n"
        )
    };
    let agent = TestAgent::start_ready(
        &[("web", &site(port))],
        Options {
            reactor: "io_uring",
            cgroups: false,
        },
        "web",
        2,
    );
    let pids = agent.pids("web");
    std::fs::write(agent.site_file("web"), site(taken)).expect("write");
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let want = format!(
        "127.0.0.1:{taken}: address in use by pid {}",
        std::process::id()
    );
    assert!(
        stderr(&out).contains("nothing changed") && stderr(&out).contains(&want),
        "{}",
        stderr(&out)
    );
    let s = agent.status("web");
    assert_eq!(s["listen"][0], format!("tcp 127.0.0.1:{port}"), "{s:#}");
    assert_eq!(agent.pids("web"), pids);
    assert!(
        http_get(port, "/").is_ok_and(|b| b.contains("hello from worker")),
        "still served on the old address"
    );
    drop(holder);
}

//! `hatchery upgrade` against the real agent under HTTP load: the same process runs a new
//! binary, every worker is kept and is its child again; a bad binary changes nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The demo worker site of `tests/deploy.rs`, on a `current` release symlink.
fn site(link: &Path, port: u16) -> String {
    format!(
        r#"name = "web"
command = ["{BIN}", "__demo-worker", "--delay-ms", "20", "--behaviour-from", "{{release}}"]
workers = 4
release = "{}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{port}"
[ready]
check = "notify"
timeout = "8s"
[stop]
timeout = "10s"
[deploy]
probation = "300ms"
"#,
        link.display()
    )
}

/// A release directory, and the `current` symlink pointing at it (atomically replaced).
fn release(root: &Path, name: &str) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("mkdir release");
    let link = root.join("current");
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&dir, &tmp).expect("symlink");
    std::fs::rename(&tmp, &link).expect("rename symlink");
    link
}

/// One request on a fresh connection: `Err` says what went wrong.
fn one_request(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    if body.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("bad response: {body:?}"))
    }
}

/// `conns` clients, each making one request per fresh connection until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<Result<(), String>>>>,
}

impl Load {
    fn start(port: u16, conns: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let threads = (0..conns)
            .map(|_| {
                let (stop, answered) = (stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let until = Instant::now() + Duration::from_secs(300);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let r = one_request(addr);
                        if r.is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        out.push(r);
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            answered,
            threads,
        }
    }

    /// Waits until `n` more requests than now have been answered.
    fn wait_for_more(&self, n: usize) {
        let target = self.answered.load(Ordering::Relaxed) + n;
        wait_until(
            &format!("{n} more answers"),
            Duration::from_secs(60),
            || self.answered.load(Ordering::Relaxed) >= target,
        );
    }

    /// Stops the clients; the failures, and how many requests there were.
    fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let all: Vec<Result<(), String>> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        let n = all.len();
        (all.into_iter().filter_map(Result::err).collect(), n)
    }
}

/// The agent section of `status --json`.
fn agent_status(agent: &TestAgent) -> serde_json::Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["agent"].clone()
}

/// SIGKILLs worker `victim` of `web` and waits (generously: TCG) until a replacement is
/// ready; returns that status.
fn kill_and_wait_for_replacement(agent: &TestAgent, victim: i64) -> serde_json::Value {
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill {victim}");
    agent.wait_for("web", "a replacement", Duration::from_secs(30), |s| {
        s["ready"] == 4
            && s["workers"]
                .as_array()
                .is_some_and(|w| w.iter().all(|w| w["pid"].as_i64() != Some(victim)))
    })
}

/// The capability set `set` (`CapBnd:`, ...) of thread `tid` of process `pid`.
fn capabilities(pid: i32, tid: i32, set: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(set))
        .expect("the set")
        .trim()
        .to_string()
}

/// With cgroups, that the agent holds its cgroup base's lock: this process cannot take it
/// (a second agent on that base would be refused).
fn assert_base_locked(agent: &TestAgent, when: &str) {
    let Some(base) = &agent.cgroup_base else {
        return;
    };
    let dir = std::fs::File::open(base).expect("the cgroup base");
    let taken = rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    assert_eq!(
        taken,
        Err(rustix::io::Errno::WOULDBLOCK),
        "{when}: the agent does not hold {}'s lock\n{}",
        base.display(),
        agent.agent_log()
    );
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

fn start(reactor: &'static str) -> (TestAgent, u16, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tempdir");
    let link = release(root.path(), "r1");
    let port = free_port();
    let agent = TestAgent::start_ready(
        &[("web", &site(&link, port))],
        Options {
            reactor,
            cgroups: true,
        },
        "web",
        4,
    );
    (agent, port, root)
}

/// An executable script in the agent's directory.
fn script(agent: &TestAgent, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = agent.dir.path().join(name);
    std::fs::write(&path, text).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn an_upgrade_under_load_keeps_the_pid_and_every_worker_and_loses_no_request() {
    for reactor in REACTORS {
        let (agent, port, root) = start(reactor);
        let pid = agent.pid();
        let before = sorted(agent.pids("web"));
        let next = agent.dir.path().join("hatchery-next");
        std::fs::copy(BIN, &next).expect("copy the binary");

        assert_base_locked(&agent, "before the upgrade");
        let load = Load::start(port, 4);
        load.wait_for_more(20);
        // For comparison: the slowest of 20 `status` calls without an upgrade.
        let baseline = (0..20)
            .map(|_| {
                let t = Instant::now();
                assert!(agent.cli(&["status", "--json"]).status.success());
                t.elapsed()
            })
            .max()
            .unwrap_or_default();
        eprintln!("[{reactor}] slowest of 20 status calls under load: {baseline:?}");
        // The control socket's pause: the slowest of back-to-back `status` calls.
        let stop_probe = Arc::new(AtomicBool::new(false));
        let probe = {
            let stop = stop_probe.clone();
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let out = Command::new(BIN)
                        .arg("--socket")
                        .arg(&socket)
                        .args(["status", "--json"])
                        .output()
                        .expect("status");
                    assert!(
                        out.status.success(),
                        "status during the upgrade: {}",
                        stderr(&out)
                    );
                    slowest = slowest.max(t.elapsed());
                }
                slowest
            })
        };
        // The cgroup base stays locked throughout: the lock is passed on, not taken again
        // (another agent could take it in between).
        let stop_lock_probe = Arc::new(AtomicBool::new(false));
        let lock_probe = agent.cgroup_base.clone().map(|base| {
            let stop = stop_lock_probe.clone();
            std::thread::spawn(move || {
                let dir = std::fs::File::open(&base).expect("the cgroup base");
                let mut tries = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tries += 1;
                    let op = rustix::fs::FlockOperation::NonBlockingLockExclusive;
                    if rustix::fs::flock(&dir, op).is_ok() {
                        let _ = rustix::fs::flock(&dir, rustix::fs::FlockOperation::Unlock);
                        return Err(tries);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Ok(tries)
            })
        });
        let out = agent.cli(&["upgrade", "--binary", next.to_str().expect("utf-8")]);
        stop_lock_probe.store(true, Ordering::Relaxed);
        if let Some(probe) = lock_probe {
            let tries = probe.join().expect("lock probe");
            assert!(
                tries.is_ok(),
                "[{reactor}] the cgroup base was free during the upgrade (try {tries:?})"
            );
        }
        assert!(
            out.status.success(),
            "[{reactor}] upgrade: {}\n{}",
            stderr(&out),
            agent.agent_log()
        );
        assert!(
            stdout(&out).contains(&format!("pid {pid} unchanged; 4 workers kept")),
            "{}",
            stdout(&out)
        );
        load.wait_for_more(50);
        stop_probe.store(true, Ordering::Relaxed);
        let slowest = probe.join().expect("status probe");
        eprintln!("[{reactor}] slowest status call during the upgrade: {slowest:?}");
        let (failed, total) = load.finish();
        assert!(
            failed.is_empty(),
            "[{reactor}] {} of {total} requests failed: {:?}\n{}",
            failed.len(),
            &failed[..failed.len().min(5)],
            agent.agent_log()
        );

        assert_eq!(agent.pid(), pid);
        assert!(alive(i64::from(pid)), "the agent runs");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(exe, next, "the agent runs the new binary");
        assert_base_locked(&agent, "after the upgrade");
        assert_eq!(sorted(agent.pids("web")), before, "every worker kept");
        let a = agent_status(&agent);
        assert_eq!(a["pid"], i64::from(pid));
        assert_eq!(a["upgraded_from"]["version"], a["version"], "{a:#}");

        // The workers are its children again: a killed one's exit is known.
        let victim = before[0];
        let s = kill_and_wait_for_replacement(&agent, victim);
        let w = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| w["restarts"] == 1)
            .unwrap_or_else(|| panic!("the restarted worker: {s:#}"))
            .clone();
        assert_eq!(w["last_exit"], "killed by SIGKILL", "{s:#}");

        // As root, that restart's sandbox dropped every capability from the bounding set,
        // and the agent's own thread, which started it, dropped them from its own.
        if is_root() {
            assert_eq!(capabilities(pid, pid, "CapBnd:"), "0000000000000000");
        }
        // Again, to the binary it runs now (the default).
        let out = agent.cli(&["upgrade"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(exe, next, "the default is the agent's own binary");
        assert_eq!(agent.pid(), pid);
        // The new image was executed by a thread that kept the whole bounding set: the
        // agent has the capabilities it was started with (this test's).
        let me = i32::try_from(std::process::id()).expect("pid");
        for set in ["CapBnd:", "CapPrm:", "CapEff:"] {
            assert_eq!(
                capabilities(pid, pid, set),
                capabilities(me, me, set),
                "{set} of the upgraded agent"
            );
        }

        // And a deploy works after.
        release(root.path(), "r2");
        let out = agent.cli(&["deploy", "web"]);
        assert!(
            out.status.success(),
            "deploy after the upgrade: {}\n{}",
            stderr(&out),
            agent.agent_log()
        );
        assert!(
            one_request(([127, 0, 0, 1], port).into()).is_ok(),
            "serving after the deploy"
        );
    }
}

#[test]
fn a_bad_binary_is_refused_and_changes_nothing() {
    let (agent, port, _root) = start("io_uring");
    let pid = agent.pid();
    let before = sorted(agent.pids("web"));
    let cases = [
        ("exits", "#!/bin/sh\necho broken >&2\nexit 1\n", "broken"),
        (
            "other-record",
            "#!/bin/sh\necho '{\"version\":\"9.9.9\",\"record_version\":999}'\n",
            "reads records of format 999",
        ),
        ("garbage", "#!/bin/sh\necho hello\n", "printed \"hello\""),
    ];
    for (name, text, said) in cases {
        let bin = script(&agent, name, text);
        let out = agent.cli(&["upgrade", "--binary", bin.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("upgrade refused") && stderr(&out).contains(said),
            "{name}: {}",
            stderr(&out)
        );
        assert_eq!(agent.pid(), pid);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(
            exe,
            Path::new(BIN),
            "{name}: the agent still runs its binary"
        );
        assert_eq!(sorted(agent.pids("web")), before, "{name}");
        assert!(
            one_request(([127, 0, 0, 1], port).into()).is_ok(),
            "{name}: still serving"
        );
        assert!(agent_status(&agent)["upgraded_from"].is_null());
    }
    // The file's state_dir changed since the agent started (a reload keeps the one it
    // runs with until a restart): the new image would look for the record there.
    let file = agent.dir.path().join("hatchery.toml");
    let text = std::fs::read_to_string(&file).expect("agent file");
    let state = agent.dir.path().join("state");
    let moved = text.replace(
        &format!("state_dir = \"{}\"", state.display()),
        &format!(
            "state_dir = \"{}\"",
            agent.dir.path().join("elsewhere").display()
        ),
    );
    assert_ne!(moved, text, "state_dir in {text}");
    std::fs::write(&file, &moved).expect("write");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "upgrade refused: state_dir changed in {} since the agent started ({}, now {})",
            file.display(),
            state.display(),
            agent.dir.path().join("elsewhere").display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(sorted(agent.pids("web")), before);
    assert!(agent_status(&agent)["upgraded_from"].is_null());
    // Put back, it upgrades.
    std::fs::write(&file, &text).expect("write");
    let out = agent.cli(&["upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.pid(), pid);
    assert_eq!(sorted(agent.pids("web")), before);
    assert!(
        one_request(([127, 0, 0, 1], port).into()).is_ok(),
        "serving after the upgrade"
    );
}

#[test]
fn another_uid_may_not_upgrade() {
    if !is_root() && skip("needs root to run the CLI as another uid") {
        return;
    }
    let (agent, _port, _root) = start("epoll");
    let pid = agent.pid();
    std::fs::set_permissions(
        agent.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(BIN)
            .uid(65534)
            .gid(65534)
            .arg("--socket")
            .arg(&agent.socket)
            .args(["upgrade", "--binary", BIN])
            .output()
            .expect("cli")
    };
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("may not do this"), "{}", stderr(&out));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert_eq!(exe, Path::new(BIN));
}

#[test]
fn a_new_binary_that_fails_to_take_over_resumes_the_previous_one() {
    let (agent, port, _root) = start("io_uring");
    let pid = agent.pid();
    let before = sorted(agent.pids("web"));
    // It passes the check, then fails in the agent's start (the hook is removed from the
    // environment at once, so the previous binary, resumed, does not fail).
    let bin = script(
        &agent,
        "fails-to-take-over",
        &format!(
            "#!/bin/sh\nif [ \"$1\" = __upgrade-check ]; then exec {BIN} \"$@\"; fi\n\
             HATCHERY_TEST_FAIL_UPGRADE=1 exec {BIN} \"$@\"\n"
        ),
    );
    let out = agent.cli(&["upgrade", "--binary", bin.to_str().expect("utf-8")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stderr(&out),
        agent.agent_log()
    );
    assert!(
        stderr(&out).contains("upgrade failed")
            && stderr(&out).contains("HATCHERY_TEST_FAIL_UPGRADE is set")
            && stderr(&out).contains("the previous binary resumed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.pid(), pid);
    assert!(alive(i64::from(pid)));
    assert_eq!(sorted(agent.pids("web")), before);
    assert!(one_request(([127, 0, 0, 1], port).into()).is_ok());
    assert!(agent_status(&agent)["upgraded_from"].is_null());
    assert_base_locked(&agent, "resumed after a failed upgrade");
    // The workers are its children still.
    let victim = before[1];
    let s = kill_and_wait_for_replacement(&agent, victim);
    assert!(
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["last_exit"] == "killed by SIGKILL"),
        "{s:#}"
    );
}

#[test]
fn an_upgrade_is_refused_while_a_deploy_is_under_way() {
    let (agent, _port, root) = start("epoll");
    let pid = agent.pid();
    let r2 = root.path().join("releases").join("r2");
    std::fs::create_dir_all(&r2).expect("mkdir");
    std::fs::write(r2.join("behaviour"), "never-ready").expect("behaviour");
    release(root.path(), "r2");
    let mut deploy = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["deploy", "web"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("deploy");
    agent.wait_for("web", "a deploy", Duration::from_secs(10), |s| {
        !s["deploy"].is_null()
    });
    let out = agent.cli(&["upgrade", "--binary", BIN]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("site web has a deploy under way"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.pid(), pid);
    let _ = agent.cli(&["rollback", "web"]);
    let _ = deploy.wait();
}

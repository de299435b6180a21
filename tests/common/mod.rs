//! Test support: start the real agent with a temporary config, drive it with the CLI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_hatchery");

/// Both event loop backends: every agent test runs on each.
pub const REACTORS: &[&str] = &["io_uring", "epoll"];

/// Whether privileged tests must run (`HATCHERY_TEST_REQUIRE=all`): a skip is a failure.
pub fn require_all() -> bool {
    std::env::var("HATCHERY_TEST_REQUIRE").is_ok_and(|v| v == "all")
}

/// Skips (returns true) with a reason, or fails when skips are not allowed.
pub fn skip(reason: &str) -> bool {
    assert!(!require_all(), "HATCHERY_TEST_REQUIRE=all but: {reason}");
    eprintln!("skipped: {reason}");
    true
}

/// A Python 3.9 or later: the interpreter vm-tests copies into a VM
/// (`HATCHERY_TEST_PYTHON`), else the host's.
pub fn python3() -> Option<PathBuf> {
    std::env::var_os("HATCHERY_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/python3", "/usr/local/bin/python3", "python3"].map(Into::into))
        .find(|p| {
            Command::new(p)
                .args(["-c", "import sys; assert sys.version_info >= (3, 9)"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub reactor: String,
    /// The agent's cgroup base, when it uses cgroups.
    pub cgroup_base: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// Signals ignored (`SIG_IGN`) by whoever starts the agent, as `nohup` or a shell's
    /// `&` would leave them.
    ignored: Vec<&'static str>,
    /// Where the next launch sends the agent's stdout and stderr instead of `agent.log`.
    output: Option<std::os::fd::OwnedFd>,
    /// A command the agent is started through (its arguments, then the agent's).
    through: Vec<String>,
}

pub struct Options {
    pub reactor: &'static str,
    /// `off`, or `auto-test` for a unique cgroup under the cgroup2 mount when root.
    pub cgroups: bool,
}

/// A unique cgroup base for this agent, when root with cgroup2 available.
fn cgroup_base(dir: &Path) -> String {
    if !is_root() {
        return "off".into();
    }
    match hatchery::cgroup::cgroup2_mount() {
        Some(m) => {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
                .replace('.', "");
            m.join(format!("hatchery-test-{name}"))
                .display()
                .to_string()
        }
        None => "off".into(),
    }
}

impl TestAgent {
    pub fn start(sites: &[(&str, &str)], opts: Options) -> TestAgent {
        TestAgent::start_with_env(sites, opts, &[])
    }

    pub fn start_with_env(
        sites: &[(&str, &str)],
        opts: Options,
        env: &[(&str, &str)],
    ) -> TestAgent {
        let dir = tempfile::Builder::new()
            .prefix("hatchery-t")
            .tempdir()
            .expect("tempdir");
        let sites_dir = dir.path().join("sites.d");
        std::fs::create_dir_all(&sites_dir).expect("mkdir");
        for (name, text) in sites {
            std::fs::write(sites_dir.join(format!("{name}.toml")), text).expect("write site");
        }
        let socket = dir.path().join("control.sock");
        let cg = if opts.cgroups {
            cgroup_base(dir.path())
        } else {
            "off".into()
        };
        let agent = format!(
            "control_socket = \"{}\"\nstate_dir = \"{}\"\nsites_dir = \"{}\"\ncgroup_base = \"{cg}\"\n",
            socket.display(),
            dir.path().join("state").display(),
            sites_dir.display()
        );
        std::fs::write(dir.path().join("hatchery.toml"), agent).expect("write agent");
        let mut a = TestAgent {
            dir,
            child: None,
            socket,
            reactor: opts.reactor.into(),
            cgroup_base: (cg != "off").then(|| PathBuf::from(&cg)),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ignored: Vec::new(),
            output: None,
            through: Vec::new(),
        };
        a.launch();
        a
    }

    /// As [`TestAgent::start`], with the agent started through `through` (a command and
    /// its arguments, followed by the agent's command line).
    pub fn start_through(sites: &[(&str, &str)], opts: Options, through: &[&str]) -> TestAgent {
        let mut a = TestAgent::start(sites, opts);
        a.stop();
        a.through = through.iter().map(|s| s.to_string()).collect();
        a.launch();
        a
    }

    /// As [`TestAgent::start`], with the agent's stdout and stderr on `output` (the
    /// agent log stays empty).
    pub fn start_with_output(
        sites: &[(&str, &str)],
        opts: Options,
        output: std::os::fd::OwnedFd,
    ) -> TestAgent {
        let mut a = TestAgent::start(sites, opts);
        a.stop();
        a.output = Some(output);
        a.launch();
        a
    }

    /// As [`TestAgent::start_with_env`], with the agent's stdout and stderr on `output`.
    pub fn start_with_env_and_output(
        sites: &[(&str, &str)],
        opts: Options,
        env: &[(&str, &str)],
        output: std::os::fd::OwnedFd,
    ) -> TestAgent {
        let mut a = TestAgent::start_with_env(sites, opts, env);
        a.stop();
        a.output = Some(output);
        a.launch();
        a
    }

    /// As [`TestAgent::start`], with `signals` (names without SIG) ignored by the shell
    /// that starts the agent, and the agent's working directory in its temporary dir.
    pub fn start_ignoring(
        sites: &[(&str, &str)],
        opts: Options,
        signals: &[&'static str],
    ) -> TestAgent {
        let mut a = TestAgent::start(sites, opts);
        a.stop();
        a.ignored = signals.to_vec();
        a.launch();
        a
    }

    /// Starts the agent process on this agent's configuration and waits for its socket.
    fn launch(&mut self) {
        let log: std::fs::File = match self.output.take() {
            Some(fd) => fd.into(),
            None => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("agent.log"))
                .expect("log"),
        };
        let mut cmd = if let Some((first, rest)) = self.through.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        } else if self.ignored.is_empty() {
            Command::new(BIN)
        } else {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(format!(
                    "trap '' {}; exec \"$0\" \"$@\"",
                    self.ignored.join(" ")
                ))
                .arg(BIN)
                .current_dir(self.dir.path());
            c
        };
        let child = cmd
            .args(["agent", "--config"])
            .arg(self.dir.path().join("hatchery.toml"))
            .env("HATCHERY_REACTOR", &self.reactor)
            .env("HATCHERY_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        // A full answer, not just a connect: the socket of a killed io_uring agent may
        // still take connections for a moment (its ring is torn down asynchronously).
        let answers = |socket: &Path| {
            hatchery::control::Client::connect(socket)
                .and_then(|mut c| {
                    c.call(&hatchery::control::Request::Status { site: None }, |_| {})
                })
                .is_ok_and(|r| matches!(r, hatchery::control::Reply::Ok(_)))
        };
        while !answers(&self.socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agent exited with {status}: {}", self.agent_log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up: {}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the agent (as a crash would) and waits for it to be gone; its workers
    /// are left running.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("the agent runs");
        child.kill().expect("kill -9 the agent");
        child.wait().expect("wait for the agent");
    }

    /// Waits for the agent to die by itself (a crash the test armed), and checks that it
    /// was killed by `SIGKILL`; its workers are left running.
    pub fn wait_killed(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("the agent runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not die as armed: {}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }

    /// Starts a new agent on the same configuration, state and cgroups (after `crash`).
    pub fn relaunch(&mut self) {
        assert!(self.child.is_none(), "the agent still runs");
        self.launch();
    }

    /// Starts the agent and waits until `site` has `ready` ready workers.
    pub fn start_ready(sites: &[(&str, &str)], opts: Options, site: &str, ready: u64) -> TestAgent {
        let agent = TestAgent::start(sites, opts);
        // Under TCG (vm-tests) a Python server imports ten times slower, beside the other
        // tests of its binary: longer than the longest `ready.timeout` of a test site (30s).
        let limit = if std::env::var_os("HATCHERY_IN_VM").is_some() {
            60
        } else {
            20
        };
        agent.wait_for(
            site,
            &format!("{ready} ready workers"),
            Duration::from_secs(limit),
            |s| s["ready"] == ready,
        );
        agent
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn site_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("sites.d").join(format!("{name}.toml"))
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run cli")
    }

    pub fn status(&self, site: &str) -> serde_json::Value {
        let out = self.cli(&["status", site, "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent_log()
        );
        // The JSON is that of the typed status the agent and the CLI share.
        let typed: Result<hatchery::status::Status, _> = serde_json::from_slice(&out.stdout);
        assert!(typed.is_ok(), "status --json is not a Status: {typed:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["sites"][0].clone()
    }

    pub fn pids(&self, site: &str) -> Vec<i64> {
        let s = self.status(site);
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_i64())
            .collect()
    }

    /// Waits until `cond` holds on the site's status, or panics with the last status.
    pub fn wait_for(
        &self,
        site: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(site);
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] timed out waiting for {what}: {s:#}\n{}",
                self.reactor,
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and wait for the agent to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not stop after SIGTERM: {}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // A clean stop makes the fd holder exit; after a crash (or a failed test) it is
        // still there, holding what it held.
        let dir = self.dir.path().to_string_lossy().into_owned();
        for (pid, _, _, cmdline) in processes() {
            if cmdline.contains("fd-holder") && cmdline.contains(&dir) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// A temporary directory whose every ancestor is root's and writable by root alone, as a
/// site's `sandbox.root` requires (a directory under `/tmp`, mode 1777, is refused).
pub fn root_owned_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = Path::new("/var/lib/hatchery-tests");
    std::fs::create_dir_all(base).expect("mkdir /var/lib/hatchery-tests");
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `N` free loopback ports, all different: each stays bound until every one is known (a
/// port given back at once may be handed out again by the next bind).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// Polls `cond` every 10 ms until it holds, or panics after `timeout` saying `what`.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(poll_until(timeout, cond), "timed out waiting for {what}");
}

/// Polls `cond` every 10 ms until it holds (true), or until `timeout` has passed (false).
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The children of `pid` (direct, not zombies).
pub fn children(pid: i64) -> Vec<i64> {
    processes()
        .into_iter()
        .filter(|p| p.1 == pid && p.2 != 'Z')
        .map(|p| p.0)
        .collect()
}

/// The event loop a process really runs, from its fds: an io_uring instance
/// (`anon_inode:[io_uring]`) or an epoll one (`anon_inode:[eventpoll]`), never both. The
/// agent has one more epoll set with either (its listeners watched for a shutdown:
/// `src/event/shut_watch.rs`): one eventpoll beside io_uring, or two without it.
pub fn reactor_in_use(pid: i64) -> &'static str {
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    let uring = links.iter().any(|l| l == "anon_inode:[io_uring]");
    let epolls = links
        .iter()
        .filter(|l| *l == "anon_inode:[eventpoll]")
        .count();
    match (uring, epolls) {
        (true, 1) => "io_uring",
        (false, 2) => "epoll",
        _ => panic!("no single event loop among the fds of {pid}: {links:?}"),
    }
}

/// Whether a process is alive (and not a zombie).
/// The running kernel's release as (major, minor).
pub fn kernel_release() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = r.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let after = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !after.starts_with('Z') && !after.starts_with('X')
        }
        Err(_) => false,
    }
}

/// (pid, ppid, state) of every process.
pub fn processes() -> Vec<(i64, i64, char, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        out.push((pid, ppid, state, cmdline));
    }
    out
}

/// Processes whose command line contains `marker`.
pub fn with_marker(marker: &str) -> Vec<i64> {
    processes()
        .into_iter()
        .filter(|p| p.3.contains(marker) && p.2 != 'Z')
        .map(|p| p.0)
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills worker 0 of `site` with `SIGKILL` `rounds` times, each once both workers run,
/// waiting for its replacement each time; then checks the site's history: as many
/// `SIGKILL` exits, and no start that failed (each replacement started at once).
pub fn crash_w0_and_see_each_restart(agent: &TestAgent, site: &str, rounds: usize) {
    for round in 0..rounds {
        let s = agent.wait_for(site, "2 workers", Duration::from_secs(20), |s| {
            s["workers"][0]["pid"].is_i64() && s["workers"][1]["pid"].is_i64()
        });
        let victim = s["workers"][0]["pid"].as_i64().expect("a pid");
        let killed = Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "round {round}");
        agent.wait_for(site, "w-0 replaced", Duration::from_secs(20), |s| {
            s["workers"][0]["pid"].as_i64().is_some_and(|p| p != victim)
        });
    }
    let out = agent.cli(&["events", site, "-n", "1000", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let history: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let failed: Vec<_> = history
        .iter()
        .filter(|e| e["exit"] == "spawn_failed")
        .collect();
    assert!(failed.is_empty(), "a start failed: {failed:#?}");
    let killed = history
        .iter()
        .filter(|e| e["kind"] == "exited" && e["signal"] == "SIGKILL")
        .count();
    assert_eq!(killed, rounds, "{history:#?}");
}

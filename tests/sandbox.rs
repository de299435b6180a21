//! The sandbox against the real kernel, as root: the probe worker's view of itself
//! matches the configuration, and every attempt a hostile worker makes fails without
//! disturbing the agent or other sites. Runs in vm-tests on Linux 6.1 (Landlock ABI 2:
//! no network rules) and 6.12 (ABI 6); needs root and the users `www-data` and `backup`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const USER_A: &str = "www-data";
const USER_B: &str = "backup";

fn privileged() -> bool {
    if !is_root() {
        return !skip("needs root");
    }
    for u in [USER_A, USER_B] {
        if hatchery::config::lookup_user(u).is_none() {
            return !skip(&format!("needs the user {u} in /etc/passwd"));
        }
    }
    true
}

fn uid_of(user: &str) -> u32 {
    hatchery::config::lookup_user(user).expect("user").uid
}

fn landlock_abi() -> u32 {
    hatchery::sandbox::landlock_abi()
}

/// A site root holding the hatchery binary and its libraries, with `/proc` mounted so the
/// worker could try `/proc/1/root`; unmounted on drop.
struct Root {
    path: PathBuf,
}

impl Root {
    fn new(base: &Path, name: &str) -> Root {
        let path = base.join(name);
        std::fs::create_dir_all(&path).expect("mkdir root");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        copy_with_libs(Path::new(BIN), &path, Path::new("/hatchery"));
        for d in ["proc", "tmp", "etc", "data"] {
            std::fs::create_dir_all(path.join(d)).expect("mkdir");
        }
        std::fs::set_permissions(path.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod tmp");
        std::fs::write(path.join("etc/motd"), "inside\n").expect("motd");
        let st = Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(path.join("proc"))
            .status()
            .expect("mount");
        assert!(st.success(), "mount proc");
        Root { path }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.path.join("proc"))
            .status();
    }
}

fn copy_with_libs(exe: &Path, root: &Path, as_path: &Path) {
    let dest = root.join(as_path.strip_prefix("/").expect("absolute"));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(exe, &dest).expect("copy binary");
    // What ldd does, without ldd (not in the VM): the dynamic loader lists the libraries.
    let out = Command::new(exe)
        .env("LD_TRACE_LOADED_OBJECTS", "1")
        .output()
        .expect("list libraries");
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let d = root.join(&lib[1..]);
        if !d.exists() {
            std::fs::create_dir_all(d.parent().expect("parent")).expect("mkdir lib");
            std::fs::copy(lib, &d).expect("copy lib");
        }
    }
}

/// Whether this process holds capability `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

/// This process's hard limit on the line `label` of /proc/self/limits.
fn hard_limit(label: &str) -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(label))
        .and_then(|l| l[label.len()..].split_whitespace().nth(1)?.parse().ok())
        .expect("a numeric hard limit")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The site's log lines (worker output), from the CLI.
fn log_lines(agent: &TestAgent, site: &str) -> Vec<String> {
    let out = agent.cli(&["logs", site, "-n", "500"]);
    stdout(&out).lines().map(str::to_string).collect()
}

/// Reads the site's log lines until `found` finds in them what it looks for (30 s at most,
/// then fails saying there was no `what`).
fn poll_log<T>(
    agent: &TestAgent,
    site: &str,
    what: &str,
    mut found: impl FnMut(&[String]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = log_lines(agent, site);
        if let Some(t) = found(&lines) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in the log of {site}: {lines:#?}\nstatus: {:#}\n{}",
            agent.status(site),
            agent.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a worker output line containing `marker`; returns every line so far.
fn wait_log(agent: &TestAgent, site: &str, marker: &str) -> Vec<String> {
    poll_log(agent, site, &format!("{marker:?}"), |lines| {
        lines
            .iter()
            .any(|l| l.contains(marker))
            .then(|| lines.to_vec())
    })
}

/// The JSON object printed on a log line.
fn json_of(line: &str) -> serde_json::Value {
    let start = line.find('{').expect("json on the line");
    serde_json::from_str(&line[start..]).expect("json")
}

fn opts() -> Options {
    Options {
        reactor: "io_uring",
        cgroups: true,
    }
}

/// Workers started together, some by the helper threads (which drop from their own
/// bounding set, once, what their children's sandboxes drop) and some by the agent's own
/// thread (which keeps its whole set, and starts what a helper cannot: a worker keeping a
/// capability the helper dropped): each has exactly its site's bounding set.
#[test]
fn workers_started_together_have_their_own_sites_bounding_set() {
    if !privileged() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_hatchery");
    let site = |name: &str, workers: usize, caps: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"{exe}\", \"__probe\", \"info\"]\nuser = \"{USER_A}\"\n\
             workers = {workers}\n[sandbox]\ncapabilities = [{caps}]\n"
        )
    };
    // Started in one batch at the agent's start, in this order: the helpers that took a
    // worker of "a-none" have dropped every capability when they come to those of "z-keeps".
    let none = site("a-none", 6, "");
    let keeps = site("z-keeps", 24, "\"CAP_NET_BIND_SERVICE\"");
    let agent = TestAgent::start(&[("a-none", &none), ("z-keeps", &keeps)], opts());
    for (name, n, want) in [
        ("a-none", 6, "0000000000000000"),
        ("z-keeps", 24, "0000000000000400"),
    ] {
        let infos = poll_log(&agent, name, "sets of every worker", |lines| {
            let infos: Vec<serde_json::Value> = lines
                .iter()
                .filter(|l| l.contains("\"cap_bnd\""))
                .map(|l| json_of(l))
                .collect();
            let ids: std::collections::BTreeSet<String> = infos
                .iter()
                .filter_map(|i| i["env"]["HATCHERY_WORKER_ID"].as_str().map(str::to_string))
                .collect();
            (ids.len() == n).then_some(infos)
        });
        for info in &infos {
            for set in ["cap_bnd", "cap_prm", "cap_eff"] {
                assert_eq!(info[set], want, "{name} {set}: {info:#}");
            }
        }
    }
}

/// The capability sets the probe printed on the log line `line`, if it printed them.
fn capability_sets(line: &str) -> Option<(i64, [String; 3])> {
    if !line.contains("\"cap_bnd\"") {
        return None;
    }
    let info = json_of(line);
    let set = |s: &str| info[s].as_str().unwrap_or("?").to_string();
    Some((
        info["pid"].as_i64()?,
        [set("cap_bnd"), set("cap_prm"), set("cap_eff")],
    ))
}

/// The bounding set of the agent's thread named `comm` (`CapBnd` of its status), or of its
/// first thread (the event loop's) when `comm` is `None`.
fn thread_bounding_set(agent_pid: i32, comm: Option<&str>) -> Option<String> {
    let task = format!("/proc/{agent_pid}/task");
    let dir = match comm {
        None => Path::new(&task).join(agent_pid.to_string()),
        Some(comm) => std::fs::read_dir(&task)
            .ok()?
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })?
            .path(),
    };
    std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .map(|v| v.trim().to_string())
        })
}

/// A worker restarted after a crash is started by the agent's own thread, which has then
/// dropped from its own bounding set what its workers' sandboxes drop (their children skip
/// it); what it can no longer start (a worker or an `exec` command keeping a capability it
/// dropped) a thread of the agent that keeps its whole set starts: each has exactly its
/// site's sets.
#[test]
fn restarts_and_exec_commands_have_their_own_sites_bounding_set() {
    if !privileged() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_hatchery");
    let site = |name: &str, caps: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"{exe}\", \"__probe\", \"info\"]\nuser = \"{USER_A}\"\n\
             workers = 1\n[restart]\nbackoff_initial = \"10ms\"\n[sandbox]\ncapabilities = [{caps}]\n"
        )
    };
    let none = site("a-none", "");
    let keeps = site("z-keeps", "\"CAP_NET_BIND_SERVICE\"");
    let agent = TestAgent::start(&[("a-none", &none), ("z-keeps", &keeps)], opts());
    let whole = thread_bounding_set(agent.pid(), Some("hatchery-whole")).expect("the thread");
    // Each site's worker is killed and its restart says its sets, "a-none" first: the
    // agent's thread has dropped every capability when it comes to "z-keeps".
    for (name, want) in [
        ("a-none", "0000000000000000"),
        ("z-keeps", "0000000000000400"),
    ] {
        let first = wait_log(&agent, name, "\"cap_bnd\"");
        let (pid, _) = first.iter().find_map(|l| capability_sets(l)).expect("sets");
        assert_eq!(agent.pids(name), vec![pid], "{name}");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid"),
            rustix::process::Signal::KILL,
        )
        .expect("kill");
        let (_, sets) = poll_log(&agent, name, "sets of the restarted worker", |lines| {
            lines
                .iter()
                .filter_map(|l| capability_sets(l))
                .find(|(p, _)| *p != pid)
        });
        assert_eq!(sets, [want, want, want].map(str::to_string), "{name}");
    }
    assert_eq!(
        thread_bounding_set(agent.pid(), None).as_deref(),
        Some("0000000000000000"),
        "the agent's own thread dropped its set"
    );
    assert_eq!(
        thread_bounding_set(agent.pid(), Some("hatchery-whole")),
        Some(whole.clone()),
        "the other kept it"
    );
    assert_ne!(whole, "0000000000000000");
    // An `exec` command of the site that keeps a capability.
    let out = agent.cli(&["exec", "z-keeps", "--", exe, "__probe", "info-once"]);
    let line = stdout(&out);
    let (_, sets) = capability_sets(line.trim()).unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(sets, ["0000000000000400"; 3].map(str::to_string));
}

#[test]
fn sandbox_probe_sees_exactly_its_configuration() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    let root = Root::new(base.path(), "root-a");
    let port = free_port();
    // Above the default hard limit where we hold CAP_SYS_RESOURCE (a VM): only possible
    // because rlimits are set before the uid changes. Without it, the current hard limit.
    let memlock: u64 = if has_capability(24) {
        1 << 30
    } else {
        hard_limit("Max locked memory")
    };
    let site = format!(
        r#"name = "a"
command = ["/hatchery", "__probe", "info"]
user = "{USER_A}"
workdir = "/data"
[env]
GREETING = "hi"
[[listen]]
name = "web"
tcp = "127.0.0.1:{port}"
[sandbox]
root = "{}"
groups = ["proxy"]
capabilities = ["CAP_NET_BIND_SERVICE"]
[sandbox.rlimits]
nofile = 64
core = 0
memlock = {memlock}
"#,
        root.path.display()
    );
    let agent = TestAgent::start(&[("a", &site)], opts());
    let lines = wait_log(&agent, "a", "\"uid\"");
    let info = json_of(lines.iter().find(|l| l.contains("\"uid\"")).expect("info"));
    let uid = uid_of(USER_A);
    let gid = hatchery::config::lookup_user(USER_A).expect("user").gid;
    let proxy = hatchery::config::lookup_group("proxy").expect("group proxy");
    assert_eq!(
        info["uid"],
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "{info:#}"
    );
    assert_eq!(info["gid"], format!("{gid}\t{gid}\t{gid}\t{gid}"));
    let groups: Vec<u32> = info["groups"]
        .as_str()
        .expect("groups")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    assert!(groups.contains(&proxy), "{groups:?}");
    assert_eq!(info["no_new_privs"], "1");
    // CAP_NET_BIND_SERVICE is bit 10: kept in every set, nothing else anywhere.
    for set in ["cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"] {
        assert_eq!(info[set], "0000000000000400", "{set}: {info:#}");
    }
    assert_eq!(info["cwd"], "/data");
    let listing: Vec<&str> = info["root"]
        .as_array()
        .expect("root")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for want in ["hatchery", "proc", "tmp", "etc", "data"] {
        assert!(listing.contains(&want), "{listing:?}");
    }
    assert!(
        !listing.contains(&"root-a"),
        "the root is the site's: {listing:?}"
    );
    assert_eq!(info["rlimits"]["nofile"], "64");
    assert_eq!(info["rlimits"]["core"], "0");
    assert_eq!(info["rlimits"]["memlock"], memlock.to_string());
    // Environment: the declared variables and the protocol ones, nothing of the agent's.
    let env = info["env"].as_object().expect("env");
    let mut keys: Vec<&str> = env.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec![
            "GREETING",
            "HATCHERY_GENERATION",
            "HATCHERY_SITE",
            "HATCHERY_WORKER_ID",
            "LISTEN_FDNAMES",
            "LISTEN_FDS",
            "LISTEN_PID",
            "NOTIFY_SOCKET",
            "PATH"
        ]
    );
    assert_eq!(env["GREETING"], "hi");
    // fds: stdio, the listener, and the directory the probe itself opened to list them.
    let fds: Vec<i64> = info["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["fd"].as_i64())
        .collect();
    assert_eq!(&fds[..4], &[0, 1, 2, 3], "{info:#}");
    assert!(fds.len() <= 5, "only the expected fds: {info:#}");
    assert!(
        info["cgroup"].as_str().unwrap_or("").contains("/sites/a/"),
        "{info:#}"
    );
    let status = agent.status("a");
    let enforced = status["sandbox"]["enforced"].to_string();
    assert!(enforced.contains("chroot"), "{status:#}");
    if landlock_abi() < 4 {
        assert!(
            status["sandbox"]["not_enforced"]
                .to_string()
                .contains("Landlock network rules: not available"),
            "{status:#}"
        );
    }

    // A reload that changes the sandbox restarts the worker with the new plan.
    let text = std::fs::read_to_string(agent.site_file("a")).expect("site file");
    std::fs::write(
        agent.site_file("a"),
        text.replace("nofile = 64", "nofile = 48"),
    )
    .expect("rewrite the site");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = wait_log(&agent, "a", "\"nofile\":\"48\"");
    let info = json_of(
        lines
            .iter()
            .rev()
            .find(|l| l.contains("\"uid\""))
            .expect("info"),
    );
    assert_eq!(info["rlimits"]["nofile"], "48", "{info:#}");
}

#[test]
fn sandbox_hostile_workers_fail_and_disturb_nothing() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root_a = Root::new(base.path(), "root-a");
    let root_b = Root::new(base.path(), "root-b");
    // A secret of site b, in its root, readable only by its user.
    let secret = root_b.path.join("data/secret");
    std::fs::write(&secret, "b's secret\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let uid_b = uid_of(USER_B);
    rustix::fs::chown(
        &secret,
        Some(rustix::fs::Uid::from_raw(uid_b)),
        Some(rustix::fs::Gid::from_raw(uid_b)),
    )
    .expect("chown");
    // A file only the host sees, and a setuid-root copy of the probe inside a's root.
    let outside = base.path().join("outside-marker");
    std::fs::write(&outside, "host\n").expect("marker");
    // /data is writable for everyone: only Landlock (read_write = ["/tmp"]) stops a write.
    std::fs::set_permissions(
        root_a.path.join("data"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .expect("chmod data");
    let suid = root_a.path.join("suid-hatchery");
    std::fs::copy(BIN, &suid).expect("copy");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).expect("setuid");
    // A TCP server the workers may connect to, and one they may not.
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let forbidden = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_port = allowed.local_addr().expect("addr").port();
    let forbidden_port = forbidden.local_addr().expect("addr").port();

    let port_b = free_port();
    let victim = format!(
        r#"name = "b"
command = ["/hatchery", "__probe", "sleep"]
user = "{USER_B}"
[[listen]]
tcp = "127.0.0.1:{port_b}"
[sandbox]
root = "{}"
"#,
        root_b.path.display()
    );
    let mut agent = TestAgent::start_ready(&[("b", &victim)], opts(), "b", 1);
    let victim_pid = agent.pids("b")[0];
    let agent_pid = agent.pid();

    let port_a = free_port();
    let attacks = [
        format!("read:{}", secret.display()),
        format!("escape:{}", secret.display()),
        format!("escape:{}", outside.display()),
        "escape:/etc/shadow".into(),
        "write:/etc/motd".into(),
        "write:/data/planted".into(),
        format!("signal:{victim_pid}"),
        format!("signal:{agent_pid}"),
        format!("ptrace:{victim_pid}"),
        format!("ptrace:{agent_pid}"),
        format!("environ:{agent_pid}"),
        format!("environ:{victim_pid}"),
        "exec:/suid-hatchery".into(),
        "nofile:1000".into(),
        "nproc:200".into(),
        format!("bind:{}", free_port()),
        format!("connect:{forbidden_port}"),
    ];
    let command: Vec<String> = ["/hatchery", "__probe", "attacks"]
        .iter()
        .map(|s| s.to_string())
        .chain(attacks.iter().cloned())
        .chain([format!("connect:{allowed_port}")])
        .collect();
    let attacker = format!(
        r#"name = "a"
command = {}
user = "{USER_A}"
[[listen]]
tcp = "127.0.0.1:{port_a}"
[sandbox]
root = "{}"
strict = false
[sandbox.rlimits]
nofile = 64
nproc = 20
[sandbox.landlock]
read_write = ["/tmp"]
connect = [{allowed_port}]
"#,
        serde_json::to_string(&command).expect("json"),
        root_a.path.display()
    );
    std::fs::write(agent.site_file("a"), attacker).expect("write site");
    // A second attacker without a root: only its user and Landlock hold it (/tmp is
    // writable for everyone, but not in its read_write list).
    let planted = format!("/tmp/hatchery-planted-{}", std::process::id());
    let unrooted_attacks = [
        "read:/etc/shadow".to_string(),
        format!("read:{}", secret.display()),
        format!("write:{planted}"),
        format!("signal:{victim_pid}"),
        format!("ptrace:{agent_pid}"),
        format!("environ:{agent_pid}"),
    ];
    let unrooted = format!(
        "name = \"c\"\ncommand = {}\nuser = \"{USER_A}\"\n[sandbox.landlock]\nread_write = []\n",
        serde_json::to_string(
            &[BIN, "__probe", "attacks"]
                .iter()
                .map(|s| s.to_string())
                .chain(unrooted_attacks.iter().cloned())
                .collect::<Vec<_>>()
        )
        .expect("json")
    );
    std::fs::write(agent.site_file("c"), unrooted).expect("write site");
    // A site sharing the victim's user: only a Landlock scope (ABI 6) stops its signals.
    let same_user = format!(
        "name = \"d\"\ncommand = [\"{BIN}\", \"__probe\", \"attacks\", \"signal:{victim_pid}\"]\nuser = \"{USER_B}\"\n"
    );
    std::fs::write(agent.site_file("d"), same_user).expect("write site");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", stderr(&out));
    let lines = wait_log(&agent, "a", "attacks done");
    let results: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.contains("\"attack\""))
        .map(|l| json_of(l))
        .collect();
    let net = landlock_abi() >= 4;
    for r in &results {
        let attack = r["attack"].as_str().expect("attack");
        let expect_blocked =
            if attack.starts_with("connect:") && attack.ends_with(&allowed_port.to_string()) {
                false
            } else if attack.starts_with("bind:") || attack.starts_with("connect:") {
                net
            } else {
                true
            };
        assert_eq!(
            r["blocked"].as_bool(),
            Some(expect_blocked),
            "attack {attack}: {r}\nall: {results:#?}"
        );
    }
    assert_eq!(results.len(), attacks.len() + 1, "{lines:#?}");
    let lines_c = wait_log(&agent, "c", "attacks done");
    let results_c: Vec<serde_json::Value> = lines_c
        .iter()
        .filter(|l| l.contains("\"attack\""))
        .map(|l| json_of(l))
        .collect();
    assert_eq!(results_c.len(), unrooted_attacks.len(), "{lines_c:#?}");
    for r in &results_c {
        assert_eq!(r["blocked"], true, "unrooted: {r}\nall: {results_c:#?}");
    }
    assert!(!Path::new(&planted).exists());
    let lines_d = wait_log(&agent, "d", "attacks done");
    let signal = json_of(
        lines_d
            .iter()
            .find(|l| l.contains("\"attack\""))
            .expect("signal attack"),
    );
    assert_eq!(
        signal["blocked"],
        landlock_abi() >= 6,
        "same-user signal: {signal}"
    );
    let exec = results
        .iter()
        .find(|r| r["attack"] == "exec:/suid-hatchery")
        .expect("exec attack");
    let uid_a = uid_of(USER_A);
    assert!(
        exec["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("ids: {uid_a} {uid_a}")),
        "the setuid binary ran and gained nothing: {exec}"
    );
    // Nothing was disturbed: the victim runs with the same pid, nothing was planted,
    // the agent answers.
    assert_eq!(agent.pids("b"), vec![victim_pid]);
    assert!(alive(victim_pid));
    assert!(!root_a.path.join("data/planted").exists());
    assert_eq!(
        std::fs::read_to_string(root_a.path.join("etc/motd")).expect("motd"),
        "inside\n"
    );
    assert_eq!(agent.status("b")["state"], "running");
    assert_eq!(agent.stop(), Some(0));
}

#[test]
fn sandbox_refuses_unsafe_roots_and_missing_required_features() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    let strict = Root::new(base.path(), "strict");
    let suid = strict.path.join("suid");
    std::fs::copy(BIN, &suid).expect("copy");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).expect("setuid");
    let owned = Root::new(base.path(), "owned");
    let uid = uid_of(USER_A);
    rustix::fs::chown(&owned.path, Some(rustix::fs::Uid::from_raw(uid)), None).expect("chown");
    let site = |name: &str, extra: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"/hatchery\", \"__probe\", \"sleep\"]\nuser = \"{USER_A}\"\n[sandbox]\n{extra}"
        )
    };
    let s_strict = site("strict", &format!("root = \"{}\"\n", strict.path.display()));
    let s_owned = site("owned", &format!("root = \"{}\"\n", owned.path.display()));
    let net = Root::new(base.path(), "net");
    let s_net = site(
        "net",
        &format!(
            "root = \"{}\"\n[sandbox.landlock]\nnetwork = \"required\"\n",
            net.path.display()
        ),
    );
    let agent = TestAgent::start(
        &[("strict", &s_strict), ("owned", &s_owned), ("net", &s_net)],
        opts(),
    );
    let failed = |name: &str, what: &str| {
        let s = agent.wait_for(name, "failed", Duration::from_secs(20), |s| {
            s["state"] == "failed"
        });
        let why = s["workers"][0]["last_exit"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(why.contains(what), "{name}: {s:#}");
    };
    // `check` says the same without starting anything.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(agent.dir.path().join("hatchery.toml"))
        .output()
        .expect("check");
    assert!(
        stdout(&out).contains("strict: REFUSED: sandbox.root:"),
        "{}",
        stdout(&out)
    );
    failed("strict", "is setuid or setgid (strict = true refuses it)");
    failed(
        "owned",
        &format!("is owned by uid {uid}: every directory from / to the root must be owned by root"),
    );
    if landlock_abi() < 4 {
        failed(
            "net",
            "sandbox: Landlock network (TCP bind/connect rules) is required but this kernel does not provide it (Landlock ABI 4, Linux 6.7;",
        );
    } else {
        agent.wait_for("net", "running", Duration::from_secs(20), |s| {
            s["workers"][0]["pid"].is_number()
        });
    }
}

/// Busybox inside `root` as `/bin/busybox`, with the applets the exec tests use.
fn add_busybox(root: &Path) -> bool {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return !skip("needs /bin/busybox (static) for a shell inside the root");
    }
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "id", "pwd", "ls", "cat", "echo", "stty", "sleep"] {
        std::fs::hard_link(root.join("bin/busybox"), root.join("bin").join(applet))
            .expect("link applet");
    }
    true
}

fn exec_site(root: &Root) -> String {
    format!(
        r#"name = "a"
command = ["/hatchery", "__probe", "sleep"]
user = "{USER_A}"
workdir = "/data"
[env]
GREETING = "hi"
[sandbox]
root = "{}"
private_tmp = true
"#,
        root.path.display()
    )
}

#[test]
fn sandbox_exec_without_a_terminal_uses_pipes_and_returns_the_status() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    let root = Root::new(base.path(), "root-a");
    if !add_busybox(&root.path) {
        return;
    }
    let agent = TestAgent::start_ready(&[("a", &exec_site(&root))], opts(), "a", 1);
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exec", "a", "--", "/bin/sh", "-c"])
        .arg("id -u; pwd; echo $GREETING; read line; echo got $line; echo oops >&2; echo t > /tmp/mine && cat /tmp/mine; exit 7")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"hello\n")?;
            c.wait_with_output()
        })
        .expect("exec");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\n/data\nhi\ngot hello\nt\n", uid_of(USER_A))
    );
    assert!(
        !root.path.join("tmp/mine").exists(),
        "/tmp was private to the command"
    );
    assert_eq!(stderr(&out), "oops\n");
    // A signal to `hatchery exec` reaches the command: 128 + SIGTERM.
    let cli = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exec", "a", "--", "/bin/sleep", "30"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("exec sleep");
    // Once the command runs (the CLI holds signals from before its request: one sent as the
    // command starts, before the CLI has its answer, is passed on too).
    let agent_pid = i64::from(agent.pid());
    wait_until("the exec'd sleep", Duration::from_secs(20), || {
        processes()
            .iter()
            .any(|p| p.1 == agent_pid && p.3.starts_with("/bin/sleep 30"))
    });
    let _ = Command::new("kill")
        .args(["-TERM", &cli.id().to_string()])
        .status();
    let out = cli.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(128 + 15));
    // A client that goes away hangs its command up.
    let mut cli = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exec", "a", "--", "/bin/sleep", "31"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("exec sleep");
    let deadline = Instant::now() + Duration::from_secs(10);
    while with_marker("/bin/sleep 31").is_empty() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli.kill().expect("kill the client");
    let _ = cli.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !with_marker("/bin/sleep 31").is_empty() {
        assert!(Instant::now() < deadline, "the command outlived its client");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent and the site are undisturbed.
    assert_eq!(agent.status("a")["ready"], 1);
}

#[test]
fn sandbox_exec_runs_a_shell_on_a_terminal_and_refuses_another_uid() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = Root::new(base.path(), "root-a");
    if !add_busybox(&root.path) {
        return;
    }
    let agent = TestAgent::start_ready(&[("a", &exec_site(&root))], opts(), "a", 1);
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");

    // Another uid (not root, not the site's user) is refused.
    {
        use std::os::unix::process::CommandExt;
        let uid_b = uid_of(USER_B);
        let out = Command::new(BIN)
            .uid(uid_b)
            .gid(uid_b)
            .arg("--socket")
            .arg(&agent.socket)
            .args(["exec", "a", "--", "/bin/id"])
            .output()
            .expect("exec as another uid");
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("may not control site a"),
            "{}",
            stderr(&out)
        );
    }

    // A terminal of our own: the CLI gets its slave side as stdin/stdout/stderr.
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("openpt");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .expect("open slave");
    let size = |rows, cols| rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size(30, 90)).expect("winsize");
    let mut cli = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exec", "a"])
        .env("TERM", "dumb")
        .stdin(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stdout(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stderr(std::process::Stdio::from(slave))
        .spawn()
        .expect("spawn cli");
    rustix::io::ioctl_fionbio(&master, true).expect("nonblocking");
    let mut seen = String::new();
    let read_until = |want: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.contains(want) {
            assert!(
                Instant::now() < deadline,
                "no {want:?} on the terminal; saw {seen:?}\n{}",
                agent.agent_log()
            );
            let mut buf = [0u8; 4096];
            match rustix::io::read(&master, &mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    let type_line = |line: &str| {
        rustix::io::write(&master, line.as_bytes()).expect("type");
    };
    // The shell's prompt first: typing earlier would race the CLI's switch to raw mode.
    read_until("/data $ ", &mut seen);
    type_line("echo uid=$(id -u) cwd=$(pwd) size=$(stty size) tty=$([ -t 0 ] && echo yes)\n");
    let uid = uid_of(USER_A);
    read_until(
        &format!("uid={uid} cwd=/data size=30 90 tty=yes"),
        &mut seen,
    );
    // Resizing: the new size reaches the command's terminal on SIGWINCH.
    rustix::termios::tcsetwinsize(&master, size(40, 100)).expect("winsize");
    let _ = Command::new("kill")
        .args(["-WINCH", &cli.id().to_string()])
        .status();
    // Asked until the answer shows it (the CLI applies the size when it handles the
    // signal, which may come after the first question).
    let want = "size=40 100 root=/hatchery";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(want) {
        assert!(Instant::now() < deadline, "no {want:?}; saw {seen:?}");
        type_line("echo size=$(stty size) root=$(ls /hatchery)\n");
        let answer = Instant::now() + Duration::from_millis(500);
        while !seen.contains(want) && Instant::now() < answer {
            let mut buf = [0u8; 4096];
            match rustix::io::read(&master, &mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    type_line("exit 3\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = cli.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "exec did not end: {seen:?}");
        let mut buf = [0u8; 4096];
        let _ = rustix::io::read(&master, &mut buf);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(3), "{seen:?}");
    assert_eq!(agent.status("a")["ready"], 1, "the site is undisturbed");
}

/// A root holding only the hatchery binary, at the path it has on the host, and its
/// libraries (no `/proc` mounted, so nothing outside it is touched when a test swaps it
/// for a symlink). The same command then runs inside the root and outside it.
fn plain_root(path: &Path) {
    std::fs::create_dir_all(path).expect("mkdir root");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy_with_libs(Path::new(BIN), path, Path::new(BIN));
}

/// A site user who owns a directory on the way to its root could rename the root and put
/// a symlink to `/` in its place: the next worker would run with the host's `/` as its
/// root. Such a root is refused from the start, and such a change after the site started
/// is caught at the next spawn (chroot follows the path again every time).
#[test]
fn a_root_the_site_user_could_swap_is_never_entered() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    let jail = base.path().join("jail");
    let root = jail.join("root");
    plain_root(&root);
    std::fs::set_permissions(&jail, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let site = format!(
        "name = \"jailed\"\ncommand = [\"{BIN}\", \"__probe\", \"sleep\"]\nuser = \"{USER_A}\"\n\
         [restart]\nbackoff_initial = \"50ms\"\n[sandbox]\nroot = \"{}\"\n",
        root.display()
    );
    let agent = TestAgent::start_ready(&[("jailed", &site)], opts(), "jailed", 1);
    let pid = agent.pids("jailed")[0];
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).expect("root of the worker"),
        root,
        "the worker runs in its root"
    );
    // The operator hands jail/ to the site's user, who swaps the root for `/`.
    let uid = uid_of(USER_A);
    rustix::fs::chown(&jail, Some(rustix::fs::Uid::from_raw(uid)), None).expect("chown");
    let kept = jail.join("kept");
    std::fs::rename(&root, &kept).expect("rename");
    std::os::unix::fs::symlink("/", &root).expect("symlink");
    let out = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(out.success());
    let s = agent.wait_for("jailed", "the slot refused", Duration::from_secs(20), |s| {
        s["state"] == "failed" || s["workers"][0]["pid"].as_i64().is_some_and(|p| p != pid)
    });
    let escaped = s["workers"][0]["pid"]
        .as_i64()
        .and_then(|p| std::fs::read_link(format!("/proc/{p}/root")).ok());
    // Put things back before any assertion can fail.
    std::fs::remove_file(&root).expect("remove symlink");
    std::fs::rename(&kept, &root).expect("rename back");
    assert_eq!(
        escaped, None,
        "a worker ran with the host's / as its root: {s:#}"
    );
    assert_eq!(s["state"], "failed", "{s:#}");
    let why = s["workers"][0]["last_exit"].as_str().unwrap_or("");
    assert!(
        why.contains(&format!("{} is owned by uid {uid}", jail.display())),
        "{s:#}"
    );
    // And `check` refuses such a root before anything starts.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(agent.dir.path().join("hatchery.toml"))
        .output()
        .expect("check");
    assert!(
        stdout(&out).contains(&format!(
            "jailed: REFUSED: sandbox.root: {} is owned by uid {uid}",
            jail.display()
        )),
        "{}",
        stdout(&out)
    );
}

/// The Landlock ABI this kernel reports is the one it is known to have (vm-tests passes
/// it per kernel: 2 on 6.1, at least 6 on 6.12): the other sandbox tests derive what they
/// expect from the project's own detection, which this pins.
#[test]
fn landlock_abi_is_the_kernels() {
    let Ok(want) = std::env::var("HATCHERY_EXPECT_LANDLOCK_ABI") else {
        skip("no expected Landlock ABI given (vm-tests gives one per kernel)");
        return;
    };
    let abi = landlock_abi();
    match want.strip_suffix('+') {
        Some(min) => assert!(
            abi >= min.parse().expect("number"),
            "ABI {abi}, wanted {want}"
        ),
        None => assert_eq!(abi, want.parse::<u32>().expect("number"), "wanted {want}"),
    }
}

/// Landlock set to `off` is off: the same write, outside the site's `read_write` paths but
/// allowed by the file's permissions, is refused with filesystem rules on and done with
/// them off, and `status` says so.
#[test]
fn landlock_off_enforces_no_filesystem_rules() {
    if !privileged() {
        return;
    }
    if landlock_abi() == 0 {
        skip("Landlock is not available: nothing to turn off");
        return;
    }
    let base = root_owned_tempdir();
    let open = base.path().join("open");
    std::fs::create_dir_all(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let site = |name: &str, mode: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"{BIN}\", \"__probe\", \"attacks\", \"write:{}/{name}\"]\nuser = \"{USER_A}\"\n\
             [sandbox.landlock]\nfilesystem = \"{mode}\"\nread_write = [\"/tmp\"]\n",
            open.display()
        )
    };
    let (on, off) = (site("on", "required"), site("off", "off"));
    let agent = TestAgent::start(&[("on", &on), ("off", &off)], opts());
    let result = |name: &str| {
        let lines = wait_log(&agent, name, "attacks done");
        json_of(
            lines
                .iter()
                .find(|l| l.contains("\"attack\""))
                .expect("an attack line"),
        )
    };
    let on_r = result("on");
    assert_eq!(on_r["blocked"], true, "rules on: {on_r}");
    let off_r = result("off");
    assert_eq!(off_r["blocked"], false, "rules off: {off_r}");
    assert!(open.join("off").exists() && !open.join("on").exists());
    let off_status = agent.status("off")["sandbox"]["not_enforced"].to_string();
    assert!(
        off_status.contains("Landlock filesystem rules: off"),
        "{off_status}"
    );
}

/// The agent builds a site's Landlock ruleset for its workers, resolving each path inside
/// the site's root as the `chroot`ed worker would: `/rw`, a symlink in the root to the
/// absolute `/data`, names the root's `/data` (the host has no `/rw`: resolved there, the
/// rule would be skipped and the write refused); `/tmp/app`, the site user's own symlink
/// in the sticky `/tmp`, is followed as that user follows it (with `protected_symlinks`,
/// root may not). Three workers started together share one ruleset; each may write
/// through both and nowhere else (`/tmp`, writable for everyone, is refused).
#[test]
fn landlock_paths_are_resolved_inside_the_root_as_the_worker_sees_them() {
    let Some(base) = landlock_base("Landlock is not available: no ruleset to build") else {
        return;
    };
    let root = Root::new(base.path(), "root-l");
    std::fs::set_permissions(
        root.path.join("data"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .expect("chmod data");
    std::os::unix::fs::symlink("/data", root.path.join("rw")).expect("symlink");
    assert!(!Path::new("/rw").exists(), "the host must not have /rw");
    let data2 = root.path.join("data2");
    std::fs::create_dir(&data2).expect("mkdir data2");
    std::fs::set_permissions(&data2, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let app = root.path.join("tmp/app");
    std::os::unix::fs::symlink("/data2", &app).expect("symlink");
    let uid = uid_of(USER_A);
    rustix::fs::chownat(
        rustix::fs::CWD,
        &app,
        Some(rustix::fs::Uid::from_raw(uid)),
        None,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("chown the link");
    // Set back when the test ends, passed or failed.
    struct Sysctl(&'static str, String);
    impl Drop for Sysctl {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0, self.1.trim());
        }
    }
    let protected = "/proc/sys/fs/protected_symlinks";
    let was = std::fs::read_to_string(protected).expect("protected_symlinks");
    let _restore = Sysctl(protected, was);
    std::fs::write(protected, "1").expect("protect symlinks");
    let site = format!(
        r#"name = "l"
command = ["/hatchery", "__probe", "attacks", "write:/rw/through-link", "write:/tmp/app/own-link", "write:/tmp/refused"]
user = "{USER_A}"
workers = 3
[sandbox]
root = "{}"
[sandbox.landlock]
filesystem = "required"
read_write = ["/rw", "/tmp/app"]
"#,
        root.path.display()
    );
    let agent = TestAgent::start(&[("l", &site)], opts());
    let lines = wait_log(&agent, "l", "attacks done");
    let results: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.contains("\"attack\""))
        .map(|l| json_of(l))
        .collect();
    let of = |attack: &str| {
        results
            .iter()
            .find(|r| r["attack"] == attack)
            .unwrap_or_else(|| panic!("no result for {attack}: {lines:#?}"))
            .clone()
    };
    let through = of("write:/rw/through-link");
    assert_eq!(through["blocked"], false, "{through}");
    let own = of("write:/tmp/app/own-link");
    assert_eq!(own["blocked"], false, "{own}");
    let refused = of("write:/tmp/refused");
    assert_eq!(refused["blocked"], true, "{refused}");
    assert!(root.path.join("data/through-link").exists());
    assert!(data2.join("own-link").exists());
    assert!(!root.path.join("tmp/refused").exists());
}

/// A root-owned directory the site users may enter, for a test that needs root and
/// Landlock (`None`, said, without them).
fn landlock_base(why_skipped: &str) -> Option<tempfile::TempDir> {
    if !privileged() {
        return None;
    }
    if landlock_abi() == 0 {
        skip(why_skipped);
        return None;
    }
    let base = root_owned_tempdir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(base)
}

/// The pid of the site's one worker once it is not `not`.
fn only_worker_other_than(agent: &TestAgent, site: &str, not: i64) -> i64 {
    let s = agent.wait_for(site, "a new worker", Duration::from_secs(30), |s| {
        s["workers"][0]["pid"].as_i64().is_some_and(|p| p != not)
    });
    s["workers"][0]["pid"].as_i64().expect("pid")
}

/// The result of the one attack of worker `pid` (`__probe attacks`), once it has said it
/// (its line is `<time> w-<K>[<pid>] {"attack":...}`).
fn attack_result_of(agent: &TestAgent, site: &str, pid: i64) -> serde_json::Value {
    let marker = format!("[{pid}] {{\"attack\"");
    let lines = wait_log(agent, site, &marker);
    json_of(lines.iter().find(|l| l.contains(&marker)).expect("found"))
}

/// A generation's workers get the Landlock rules the agent resolved at its first start,
/// kept for the workers restarted after a crash (whose child then only enforces them) and
/// resolved again at `hatchery restart`: `late`, a read-write path made after the first
/// start (open to everyone), is refused by Landlock to the worker restarted after a crash
/// and granted to the worker of the rolling restart.
#[test]
fn landlock_rules_are_the_generations_until_a_restart() {
    let Some(base) = landlock_base("Landlock is not available: no rules to keep") else {
        return;
    };
    let late = base.path().join("late");
    let site = format!(
        "name = \"late\"\ncommand = [\"{BIN}\", \"__probe\", \"attacks\", \"write:{}/w\"]\n\
         user = \"{USER_A}\"\n[sandbox.landlock]\nfilesystem = \"required\"\n\
         read_write = [\"/tmp\", \"{}\"]\n",
        late.display(),
        late.display()
    );
    let agent = TestAgent::start(&[("late", &site)], opts());
    let worker_other_than = |not: i64| only_worker_other_than(&agent, "late", not);
    let result_of = |pid: i64| attack_result_of(&agent, "late", pid);
    let first = worker_other_than(0);
    let r = result_of(first);
    assert_eq!(r["blocked"], true, "there is no such directory yet: {r}");
    std::fs::create_dir(&late).expect("mkdir late");
    std::fs::set_permissions(&late, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "kill: {out:?}");
    let restarted = worker_other_than(first);
    let r = result_of(restarted);
    assert_eq!(
        r["blocked"], true,
        "the generation's rules name no `late`: {r}"
    );
    assert!(
        r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("os error 13")),
        "refused by Landlock (EACCES), the directory being there: {r}"
    );
    assert!(!late.join("w").exists());
    let out = agent.cli(&["restart", "late"]);
    assert!(out.status.success(), "restart: {out:?}");
    let after = worker_other_than(restarted);
    let r = result_of(after);
    assert_eq!(r["blocked"], false, "resolved again at the restart: {r}");
    assert!(late.join("w").exists());
}

/// The Landlock rules a generation keeps are for its root: a root replaced by another
/// directory (root-owned, so the check before each start passes) gets rules of its own at
/// the next start; with the old root's (rules name inodes) even its `execve` would be
/// refused.
#[test]
fn a_replaced_root_gets_landlock_rules_of_its_own() {
    let Some(base) = landlock_base("Landlock is not available: no rules to keep") else {
        return;
    };
    let mut first = Root::new(base.path(), "r");
    let mut next = Root::new(base.path(), "next");
    for root in [&first, &next] {
        std::fs::set_permissions(
            root.path.join("data"),
            std::fs::Permissions::from_mode(0o1777),
        )
        .expect("chmod data");
    }
    let site = format!(
        "name = \"swap\"\ncommand = [\"/hatchery\", \"__probe\", \"attacks\", \"write:/data/w\"]\n\
         user = \"{USER_A}\"\n[sandbox]\nroot = \"{}\"\n[sandbox.landlock]\n\
         filesystem = \"required\"\nread_write = [\"/data\"]\n",
        first.path.display()
    );
    let agent = TestAgent::start(&[("swap", &site)], opts());
    let worker_other_than = |not: i64| only_worker_other_than(&agent, "swap", not);
    let result_of = |pid: i64| attack_result_of(&agent, "swap", pid);
    let before = worker_other_than(0);
    let r = result_of(before);
    assert_eq!(r["blocked"], false, "{r}");
    assert!(first.path.join("data/w").exists());
    // The root replaced: `r` becomes `r.old`, and `next` takes its name.
    let old = base.path().join("r.old");
    std::fs::rename(&first.path, &old).expect("rename r");
    first.path = old;
    std::fs::rename(&next.path, base.path().join("r")).expect("rename next");
    next.path = base.path().join("r");
    let out = Command::new("kill")
        .args(["-KILL", &before.to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "kill: {out:?}");
    let after = worker_other_than(before);
    let r = result_of(after);
    assert_eq!(r["blocked"], false, "the new root's /data: {r}");
    assert!(next.path.join("data/w").exists());
}

/// A worker binding a port its site does not declare: with Landlock network rules (ABI
/// 4, Linux 6.7) the kernel refuses it (EACCES), and the site's log says which ports the
/// app may bind (when the site starts) and the fix (right after the app's own error). The
/// port declared `mode = "own"` is the app's: the agent leaves it free. Without network
/// rules (Debian's 6.1, ABI 2) nothing refuses the bind, and `status` says binds are not
/// restricted: that is what this test checks there.
#[test]
fn an_undeclared_bind_is_refused_by_landlock_and_the_site_log_gives_the_fix() {
    let [own, other] = free_ports();
    let site = format!(
        "name = \"a\"\ncommand = [\"{BIN}\", \"__demo-worker\", \"--bind\", \"127.0.0.1:{other}\"]\n\
         [[listen]]\ntcp = \"127.0.0.1:{own}\"\nmode = \"own\"\n[restart]\nbackoff_initial = \"1s\"\n"
    );
    let agent = TestAgent::start(&[("a", &site)], opts());
    let abi = landlock_abi();
    if abi < 4 {
        wait_log(&agent, "a", &format!("bound 127.0.0.1:{other}"));
        let status = agent.status("a");
        assert!(
            status["sandbox"]["not_enforced"]
                .to_string()
                .contains("binds and connects are not restricted"),
            "{status:#}"
        );
        eprintln!(
            "Landlock ABI {abi}: no network rules on this kernel; checked that the bind is not restricted and that status says so"
        );
        return;
    }
    let lines = wait_log(&agent, "a", "w-0 was refused something");
    let at = |what: &str, needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {what} ({needle:?}) in the log: {lines:#?}"))
    };
    let rule = at(
        "the rule, said at start",
        &format!(
            "hatchery: sandbox: workers may bind only TCP port {own} (Landlock network rules); a bind to another port fails with EACCES"
        ),
    );
    let error = at(
        "the app's error",
        &format!("failed to bind 127.0.0.1:{other}: Permission denied"),
    );
    let hint = at(
        "the fix",
        &format!(
            "hatchery: w-0 was refused something (Permission denied): if it was a bind, it may not bind ports the site does not declare (it may bind only TCP port {own}): declare it in [[listen]] (the agent binds it and passes fd 3), or say mode = \"own\" to let the app bind it"
        ),
    );
    assert!(rule < error && error < hint, "{lines:#?}");
    // The agent bound nothing: the declared port is free for the app.
    std::net::TcpListener::bind(("127.0.0.1", own)).expect("the app's own port is free");
}

/// Zygote mode in a sandbox: the zygote is started like a worker (the site's user, its
/// root, `no_new_privs`, no capabilities, its rlimits, Landlock), and the workers it forks
/// inherit all of it, each moved into its own leaf before its go.
#[test]
fn a_sandboxed_zygote_forks_workers_that_inherit_its_sandbox() {
    if !privileged() {
        return;
    }
    let base = root_owned_tempdir();
    let root = Root::new(base.path(), "root-z");
    // Writable for the site's user by its mode: only Landlock can refuse a write there.
    let uid = uid_of(USER_A);
    std::os::unix::fs::chown(root.path.join("data"), Some(uid), None).expect("chown data");
    let port = free_port();
    let site = format!(
        r#"name = "z"
command = ["/hatchery", "__demo-zygote", "--load-mib", "4", "--worker-info", "--worker-try-write", "/data/w", "--worker-try-write", "/tmp/w"]
mode = "zygote"
user = "{USER_A}"
workers = 2
[[listen]]
name = "web"
tcp = "127.0.0.1:{port}"
[ready]
check = "tcp"
timeout = "30s"
[sandbox]
root = "{}"
[sandbox.rlimits]
nofile = 64
"#,
        root.path.display()
    );
    let agent = TestAgent::start_ready(&[("z", &site)], opts(), "z", 2);
    let status = agent.status("z");
    let zpid = status["generations"][0]["zygote"]["pid"]
        .as_i64()
        .expect("the zygote's pid");
    // The zygote itself runs sandboxed.
    let zstatus = std::fs::read_to_string(format!("/proc/{zpid}/status")).expect("status");
    let field = |name: &str| {
        zstatus
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    let lines = wait_log(&agent, "z", "\"uid\"");
    let infos: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.contains("\"uid\""))
        .map(|l| json_of(l))
        .collect();
    assert!(!infos.is_empty(), "{lines:#?}");
    for info in &infos {
        assert_eq!(
            info["uid"],
            format!("{uid}\t{uid}\t{uid}\t{uid}"),
            "{info:#}"
        );
        assert_eq!(info["no_new_privs"], "1", "{info:#}");
        for set in ["cap_eff", "cap_prm", "cap_inh", "cap_amb"] {
            assert_eq!(info[set], "0000000000000000", "{set}: {info:#}");
        }
        let listing = info["root"].to_string();
        assert!(listing.contains("hatchery"), "in the site's root: {info:#}");
        assert!(!listing.contains("root-z"), "{info:#}");
        assert_eq!(info["rlimits"]["nofile"], "64", "{info:#}");
        // Its own leaf, not the zygote's.
        let cgroup = info["cgroup"].as_str().unwrap_or("");
        assert!(cgroup.contains("/sites/z/gen-1/w-"), "{info:#}");
        assert_eq!(
            info["env"]["LISTEN_PID"],
            info["pid"].to_string(),
            "{info:#}"
        );
        assert!(info["env"].get("HATCHERY_ZYGOTE_FD").is_none(), "{info:#}");
    }
    let lines = wait_log(&agent, "z", "writing /tmp/w");
    let wrote = |path: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!("writing {path}: ")))
            .unwrap_or_else(|| panic!("no write to {path}: {lines:#?}"))
            .clone()
    };
    assert!(wrote("/tmp/w").ends_with(": ok"), "{lines:#?}");
    if landlock_abi() >= 1 {
        assert!(
            wrote("/data/w").contains("Permission denied"),
            "Landlock refuses what the sandbox does not allow: {lines:#?}"
        );
    }
    assert!(!root.path.join("data/w").exists());
}

/// A site whose user may run just as many processes as it has workers (`nproc`, counted
/// by the kernel per user, zombies included; at `setuid` it counts the user's other
/// processes, so `nproc = 1` lets two workers start): a crashed worker's replacement
/// starts at once, every time. The crashed worker, a zombie until reaped, still counts
/// for its user: it is reaped before the start (where no site started has an `nproc`
/// rlimit, after).
#[test]
fn a_crash_at_the_users_nproc_is_restarted_at_once() {
    if !privileged() {
        return;
    }
    if hatchery::config::lookup_user("nobody").is_none() {
        skip("needs the user nobody in /etc/passwd");
        return;
    }
    // Run as nobody, which no other test of this file runs as: the count is this site's.
    let site = format!(
        "name = \"full\"\ncommand = [\"{BIN}\", \"__probe\", \"sleep\"]\nworkers = 2\n\
         user = \"nobody\"\n[restart]\nhealthy_after = \"0s\"\nbackoff_initial = \"1ms\"\n\
         flapping = {{ exits = 100, within = \"1s\" }}\n[sandbox.rlimits]\nnproc = 1\n"
    );
    let agent = TestAgent::start(&[("full", &site)], opts());
    crash_w0_and_see_each_restart(&agent, "full", 5);
}

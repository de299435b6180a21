//! The packaged unit (`packaging/hatchery.service`) under real systemd: these tests run in
//! the systemd VM of `vm-tests/run` (a Debian rootfs booted with systemd as PID 1, the
//! agent installed as `/usr/local/bin/hatchery` and the unit in `/etc/systemd/system`).
//! Elsewhere they skip with the reason (and fail under `HATCHERY_TEST_REQUIRE=all`).
//!
//! Each test writes `/etc/hatchery`, drives the unit with `systemctl` and stops it at the
//! end; they take a lock, so they never overlap.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use common::{skip, stderr, stdout, wait_until};

/// Where the VM installs the agent (the unit's `ExecStart`).
const INSTALLED: &str = "/usr/local/bin/hatchery";
/// The unit's cgroup.
const UNIT_CGROUP: &str = "/sys/fs/cgroup/system.slice/hatchery.service";

/// One test at a time: they share the unit.
static UNIT: Mutex<()> = Mutex::new(());

/// Whether systemd is PID 1 and the agent and unit are installed; else skip with the reason.
fn under_systemd() -> bool {
    let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if comm.trim() != "systemd" || !Path::new("/run/systemd/system").exists() {
        return !skip("systemd is not PID 1 here (these tests run in vm-tests' systemd VM)");
    }
    if !Path::new(INSTALLED).exists() || !Path::new("/etc/systemd/system/hatchery.service").exists()
    {
        return !skip(
            "the agent or its unit is not installed (vm-tests' systemd VM installs them)",
        );
    }
    true
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn systemctl(args: &[&str]) -> Output {
    run("systemctl", args)
}

/// `systemctl show -p NAME --value hatchery`.
fn show(name: &str) -> String {
    stdout(&systemctl(&["show", "-p", name, "--value", "hatchery"]))
        .trim()
        .to_string()
}

fn hatchery(args: &[&str]) -> Output {
    run(INSTALLED, args)
}

fn status() -> serde_json::Value {
    let out = hatchery(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status --json")
}

fn site<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no site {name} in {status}"))
}

fn worker_pids(status: &serde_json::Value, name: &str) -> Vec<i64> {
    let mut pids: Vec<i64> = site(status, name)["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    pids
}

/// A demo site: `workers` workers on `port`; `slow` makes each wait 1.5 s before it is
/// ready (and accepts).
fn demo_site(name: &str, port: u16, workers: u32, slow: bool) -> String {
    let behaviour = format!("/run/hatchery-test/{name}");
    std::fs::create_dir_all(&behaviour).expect("behaviour dir");
    std::fs::write(
        format!("{behaviour}/behaviour"),
        if slow { "slow-start" } else { "" },
    )
    .expect("behaviour");
    format!(
        "name = \"{name}\"\ncommand = [\"{INSTALLED}\", \"__demo-worker\", \"--behaviour-from\", \"{behaviour}\"]\n\
         workers = {workers}\nmemory = \"256M\"\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\n\
         [ready]\ncheck = \"notify\"\ntimeout = \"60s\"\n"
    )
}

/// Writes `/etc/hatchery/hatchery.toml` and one file per site (and nothing else there).
fn configure(sites: &[(&str, String)]) {
    let _ = std::fs::remove_dir_all("/etc/hatchery");
    std::fs::create_dir_all("/etc/hatchery/sites.d").expect("mkdir /etc/hatchery");
    std::fs::write(
        "/etc/hatchery/hatchery.toml",
        "state_dir = \"/var/lib/hatchery\"\nsites_dir = \"/etc/hatchery/sites.d\"\n",
    )
    .expect("agent file");
    for (name, text) in sites {
        write_site(name, text);
    }
}

fn write_site(name: &str, text: &str) {
    std::fs::write(format!("/etc/hatchery/sites.d/{name}.toml"), text).expect("site file");
}

/// The unit, stopped (and its failures forgotten) when the test ends however it ends.
struct Unit;

impl Unit {
    fn start() -> Unit {
        let out = systemctl(&["start", "hatchery"]);
        assert!(
            out.status.success(),
            "systemctl start failed: {}\n{}",
            stderr(&out),
            journal()
        );
        Unit
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        let _ = systemctl(&["stop", "hatchery"]);
        let _ = systemctl(&["reset-failed", "hatchery"]);
    }
}

/// The unit's journal, for failure messages.
fn journal() -> String {
    stdout(&run(
        "journalctl",
        &[
            "-u",
            "hatchery",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            "60",
        ],
    ))
}

/// An HTTP GET to `port`, answered 200.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
        Ok(answer)
    } else {
        Err(format!("answered {answer:?}"))
    }
}

/// The cgroup of `pid`, relative to the cgroup2 mount.
fn cgroup_of(pid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .trim()
        .trim_start_matches("0::")
        .to_string()
}

/// The agent: the only child of the keeper, the unit's main process.
fn agent_pid() -> i64 {
    let main = show("MainPID");
    let children =
        std::fs::read_to_string(format!("/proc/{main}/task/{main}/children")).unwrap_or_default();
    let pids: Vec<i64> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "the keeper {main} has children {pids:?}");
    pids[0]
}

/// Requests to `port`, one after another on a thread, until the returned flag is set;
/// the thread returns how many were answered and the failures.
fn keep_asking(
    port: u16,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<(u64, Vec<String>)>,
) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let thread = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match get(port) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    });
    (done, thread)
}

fn signal(pid: i64, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn start_returns_once_every_site_serves_in_the_delegated_tree_and_stop_leaves_nothing() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[
        ("blog", demo_site("blog", 18080, 2, true)),
        ("shop", demo_site("shop", 18081, 3, false)),
    ]);
    let unit = Unit::start();
    // Type=notify: `start` returned, so every worker is ready (blog's take 1.5 s).
    let s = status();
    for (name, workers) in [("blog", 2), ("shop", 3)] {
        let site = site(&s, name);
        assert_eq!(site["state"], "running", "{name}: {site}");
        assert_eq!(
            site["ready"], workers,
            "{name} not ready when start returned: {site}"
        );
    }
    assert_eq!(show("ActiveState"), "active");
    get(18080).expect("blog serves");
    get(18081).expect("shop serves");
    wait_until("the status line", Duration::from_secs(10), || {
        show("StatusText") == "2 sites, 5 workers"
    });

    // Delegate=yes: the keeper (the unit's main process) in keeper/, the agent it started
    // in agent/, each site below the unit with its memory budget.
    let main_pid: i64 = show("MainPID").parse().expect("MainPID");
    assert_eq!(cgroup_of(main_pid), "/system.slice/hatchery.service/keeper");
    assert_eq!(
        cgroup_of(agent_pid()),
        "/system.slice/hatchery.service/agent"
    );
    assert_eq!(show("ControlGroup"), "/system.slice/hatchery.service");
    for name in ["blog", "shop"] {
        let dir = format!("{UNIT_CGROUP}/sites/{name}");
        let max = std::fs::read_to_string(format!("{dir}/memory.max"))
            .unwrap_or_else(|e| panic!("{dir}/memory.max: {e}"));
        assert_eq!(max.trim(), (256u64 << 20).to_string(), "{name}'s budget");
        for pid in worker_pids(&s, name) {
            let cg = cgroup_of(pid);
            assert!(
                cg.starts_with(&format!(
                    "/system.slice/hatchery.service/sites/{name}/gen-1/w-"
                )),
                "worker {pid} of {name} in {cg}"
            );
        }
    }

    let mut pids = worker_pids(&s, "blog");
    pids.extend(worker_pids(&s, "shop"));
    drop(unit);
    assert_eq!(show("ActiveState"), "inactive");
    for pid in &pids {
        assert!(!alive(*pid), "worker {pid} outlived systemctl stop");
    }
    let procs = stdout(&run(
        "sh",
        &[
            "-c",
            &format!("cat $(find {UNIT_CGROUP} -name cgroup.procs 2>/dev/null) 2>/dev/null"),
        ],
    ));
    assert!(
        procs.trim().is_empty(),
        "processes left in the unit's cgroup: {procs}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", 18080)).is_err(),
        "blog's port still open"
    );
}

#[test]
fn reload_applies_a_valid_change_and_fails_on_an_invalid_one_without_disturbing_the_sites() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[("shop", demo_site("shop", 18082, 2, false))]);
    let _unit = Unit::start();
    write_site("shop", &demo_site("shop", 18082, 3, false));
    let out = systemctl(&["reload", "hatchery"]);
    assert!(
        out.status.success(),
        "reload failed: {}\n{}",
        stderr(&out),
        journal()
    );
    wait_until(
        "3 ready workers after the reload",
        Duration::from_secs(60),
        || site(&status(), "shop")["ready"] == 3,
    );
    let before = worker_pids(&status(), "shop");

    // A file that does not parse: the reload fails, and nothing changes.
    write_site("shop", "name = \"shop\"\nwrokers = 4\n");
    let out = systemctl(&["reload", "hatchery"]);
    assert!(
        !out.status.success(),
        "a reload of a bad file succeeded\n{}",
        journal()
    );
    assert_eq!(
        show("ActiveState"),
        "active",
        "the unit after a failed reload"
    );
    let after = status();
    assert_eq!(
        worker_pids(&after, "shop"),
        before,
        "workers changed by a failed reload"
    );
    assert_eq!(site(&after, "shop")["ready"], 3);
    get(18082).expect("shop serves after a failed reload");
    let log = journal();
    assert!(
        log.contains("wrokers"),
        "the reload's error is not in the journal:\n{log}"
    );
}

#[test]
fn a_bad_configuration_fails_the_start_with_the_checks_message() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[(
        "shop",
        "name = \"shop\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n".into(),
    )]);
    let out = systemctl(&["start", "hatchery"]);
    let _ = systemctl(&["stop", "hatchery"]);
    let _ = systemctl(&["reset-failed", "hatchery"]);
    assert!(
        !out.status.success(),
        "a bad configuration started\n{}",
        journal()
    );
    let log = journal();
    assert!(
        log.contains("did you mean `workers`"),
        "ExecStartPre's check did not say what is wrong:\n{log}"
    );
}

#[test]
fn the_agent_pings_the_watchdog_and_a_hung_agent_is_replaced() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[("shop", demo_site("shop", 18083, 2, false))]);
    let _unit = Unit::start();
    let watchdog = show("WatchdogUSec");
    assert!(
        !watchdog.is_empty() && watchdog != "0",
        "WatchdogSec is not set: {watchdog:?}"
    );
    let first = show("WatchdogTimestampMonotonic");
    wait_until("a second watchdog ping", Duration::from_secs(60), || {
        show("WatchdogTimestampMonotonic") != first
    });

    // A hung agent stops pinging: the keeper aborts it (and kills it: a stopped process
    // does not die of SIGABRT) and starts another, which adopts the workers. The unit is
    // not restarted and no worker is.
    let main_pid = show("MainPID");
    let restarts = show("NRestarts");
    let agent = agent_pid();
    let workers = worker_pids(&status(), "shop");
    let (done, asking) = keep_asking(18083);
    signal(agent, rustix::process::Signal::STOP);
    wait_until(
        "the keeper to replace the hung agent",
        Duration::from_secs(120),
        || {
            let now = show("MainPID");
            let children = std::fs::read_to_string(format!("/proc/{now}/task/{now}/children"))
                .unwrap_or_default();
            !children.trim().is_empty() && !children.contains(&agent.to_string())
        },
    );
    wait_until("the new agent to answer", Duration::from_secs(60), || {
        hatchery(&["status", "--json"]).status.success()
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failed) = asking.join().expect("requests");
    assert!(
        failed.is_empty(),
        "requests failed while the agent was replaced: {failed:?}"
    );
    assert!(answered > 0);
    assert_eq!(show("MainPID"), main_pid, "the unit was restarted");
    assert_eq!(show("NRestarts"), restarts, "systemd restarted the unit");
    assert_eq!(
        worker_pids(&status(), "shop"),
        workers,
        "workers were restarted"
    );
    let log = stdout(&run(
        "journalctl",
        &["-u", "hatchery", "--no-pager", "-o", "cat"],
    ));
    assert!(
        log.contains("sent no watchdog ping"),
        "the keeper did not say why it replaced the agent:\n{log}"
    );
}

#[test]
fn an_agent_killed_under_systemd_is_replaced_and_adopts_its_workers_without_a_failed_request() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[
        ("blog", demo_site("blog", 18085, 2, false)),
        ("shop", demo_site("shop", 18086, 3, false)),
    ]);
    let unit = Unit::start();
    let main_pid = show("MainPID");
    let restarts = show("NRestarts");
    let before = status();
    let (done, asking) = keep_asking(18085);
    let agent = agent_pid();
    signal(agent, rustix::process::Signal::KILL);
    wait_until("a new agent", Duration::from_secs(60), || {
        let children =
            std::fs::read_to_string(format!("/proc/{main_pid}/task/{main_pid}/children"))
                .unwrap_or_default();
        !children.trim().is_empty() && !children.contains(&agent.to_string())
    });
    wait_until("the new agent to answer", Duration::from_secs(60), || {
        hatchery(&["status", "--json"]).status.success()
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failed) = asking.join().expect("requests");
    assert!(
        failed.is_empty(),
        "requests failed across the agent's crash: {failed:?}"
    );
    assert!(answered > 0);
    assert_eq!(show("MainPID"), main_pid, "the unit was restarted");
    assert_eq!(show("NRestarts"), restarts, "systemd restarted the unit");
    assert_eq!(show("ActiveState"), "active");
    assert_eq!(
        cgroup_of(agent_pid()),
        "/system.slice/hatchery.service/agent"
    );
    let after = status();
    for name in ["blog", "shop"] {
        assert_eq!(
            worker_pids(&after, name),
            worker_pids(&before, name),
            "{name}'s workers were not adopted"
        );
    }
    // A crash of an adopted worker is still seen and repaired.
    let victim = worker_pids(&after, "shop")[0];
    signal(victim, rustix::process::Signal::KILL);
    wait_until("shop's worker replaced", Duration::from_secs(60), || {
        let s = status();
        let pids = worker_pids(&s, "shop");
        site(&s, "shop")["ready"] == 3 && pids.len() == 3 && !pids.contains(&victim)
    });
    // And `systemctl stop` still leaves nothing.
    let pids: Vec<i64> = worker_pids(&status(), "blog")
        .into_iter()
        .chain(worker_pids(&status(), "shop"))
        .collect();
    drop(unit);
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived systemctl stop");
    }
}

#[test]
fn the_agents_lines_are_journal_entries_with_the_site_and_worker() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[("blog", demo_site("blog", 18084, 2, false))]);
    let _unit = Unit::start();
    // A crash: the agent says which worker exited and how, at `warning`.
    let pid = worker_pids(&status(), "blog")[0];
    signal(pid, rustix::process::Signal::KILL);
    let mut entries = Vec::new();
    let mut all = String::new();
    wait_until(
        "the journal's entry about the crash",
        Duration::from_secs(30),
        || {
            all = stdout(&run(
                "journalctl",
                &[
                    "-u",
                    "hatchery",
                    "HATCHERY_SITE=blog",
                    "-o",
                    "json",
                    "--no-pager",
                ],
            ));
            entries = all
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|e| e["HATCHERY_PID"].as_str() == Some(pid.to_string().as_str()))
                .collect();
            !entries.is_empty()
        },
    );
    for e in &entries {
        assert_eq!(e["HATCHERY_SITE"], "blog", "{e}");
        assert!(e["HATCHERY_WORKER"].is_string(), "{e}");
        assert_eq!(e["HATCHERY_GEN"], "1", "{e}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "hatchery", "{e}");
        assert_eq!(e["_SYSTEMD_UNIT"], "hatchery.service", "{e}");
        assert!(
            e["PRIORITY"].as_str().is_some_and(|p| p <= "4"),
            "not a warning: {e}"
        );
        assert!(
            e["MESSAGE"].as_str().is_some_and(|m| !m.contains('\x1b')),
            "{e}"
        );
    }
    // Only blog's entries match the field.
    for line in all.lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("journalctl -o json");
        assert_eq!(e["HATCHERY_SITE"], "blog", "{e}");
    }
}

//! The packaged unit (`packaging/hatchery.service`) under real systemd: these tests run in
//! the systemd VM of `vm-tests/run` (a Debian rootfs booted with systemd as PID 1, where the
//! agent's Debian package from `packaging/build-deb` was installed with `dpkg -i`).
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

/// Where the package installs the agent (the unit's `ExecStart`).
const INSTALLED: &str = "/usr/bin/hatchery";
/// Where it installs the unit.
const UNIT_FILE: &str = "/lib/systemd/system/hatchery.service";
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
    if !Path::new(INSTALLED).exists() || !Path::new(UNIT_FILE).exists() {
        return !skip("the hatchery package is not installed (vm-tests' systemd VM installs it)");
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

/// The keeper's agents: its children started as `hatchery agent` (after an agent's death
/// the keeper is also the parent of its workers and fd holder).
fn agents_of(keeper: &str) -> Vec<i64> {
    std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid: &i64| {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            argv.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice())
        })
        .collect()
}

/// The agent: the one agent child of the keeper, the unit's main process.
fn agent_pid() -> i64 {
    let main = show("MainPID");
    let pids = agents_of(&main);
    assert_eq!(pids.len(), 1, "the keeper {main} has agents {pids:?}");
    pids[0]
}

/// Requests to a port, one after another on a thread, until [`Load::end`].
struct Load {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

/// Starts asking `port`.
fn keep_asking(port: u16) -> Load {
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
    Load { done, thread }
}

impl Load {
    /// Stops asking; every request was answered, and some were, `during` what happened.
    fn end(self, during: &str) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (answered, failed) = self.thread.join().expect("requests");
        assert!(failed.is_empty(), "requests failed {during}: {failed:?}");
        assert!(answered > 0, "no request was answered {during}");
    }
}

/// Waits until the keeper (the unit's main process `keeper`) has an agent other than
/// `old`, and that new agent answers.
fn wait_for_a_new_agent(what: &str, keeper: &str, old: i64) {
    wait_until(what, Duration::from_secs(120), || {
        agents_of(keeper).iter().any(|&pid| pid != old)
    });
    wait_until("the new agent to answer", Duration::from_secs(60), || {
        hatchery(&["status", "--json"]).status.success()
    });
}

fn signal(pid: i64, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `/proc/PID/stat`'s state and parent, behind the command name.
fn stat_fields(pid: i64) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.next()?.to_string()))
}

fn state_of(pid: i64) -> Option<char> {
    stat_fields(pid).map(|f| f.0)
}

fn parent_of(pid: i64) -> Option<String> {
    stat_fields(pid).map(|f| f.1)
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
    // No cap on the unit's tasks: systemd's default (15 % of pid_max, 4915 with the
    // kernel's default of 32768) would stop the workers short of 10,000; each site's
    // pids_max limits its own.
    assert_eq!(show("TasksMax"), "infinity");
    let pids_max = std::fs::read_to_string(format!("{UNIT_CGROUP}/pids.max")).expect("pids.max");
    assert_eq!(pids_max.trim(), "max", "the unit's pids.max");
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
    let load = keep_asking(18083);
    signal(agent, rustix::process::Signal::STOP);
    wait_for_a_new_agent("the keeper to replace the hung agent", &main_pid, agent);
    load.end("while the agent was replaced");
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
    // A worker stopped by hand (of the site not under load: a stopped worker takes its
    // share of connections and answers none) keeps its stop across the crash: the keeper
    // becomes its parent, in its session, so its process group is not orphaned (the
    // kernel would send it SIGHUP and SIGCONT).
    let stopped = worker_pids(&before, "shop")[2];
    signal(stopped, rustix::process::Signal::STOP);
    wait_until("shop's w-2 stopped", Duration::from_secs(20), || {
        state_of(stopped) == Some('T')
    });
    // And shop's file no longer loads (a typo): shop runs on as recorded, and the unit's
    // status line says so.
    write_site("shop", "name = \"shop\"\nwrokers = 3\n");
    let load = keep_asking(18085);
    let agent = agent_pid();
    signal(agent, rustix::process::Signal::KILL);
    wait_for_a_new_agent("a new agent", &main_pid, agent);
    load.end("across the agent's crash");
    assert_eq!(state_of(stopped), Some('T'), "shop's w-2 kept its stop");
    assert_eq!(
        parent_of(stopped).as_deref(),
        Some(main_pid.as_str()),
        "the keeper is the parent of the dead agent's workers"
    );
    signal(stopped, rustix::process::Signal::CONT);
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
    wait_until("the status line", Duration::from_secs(10), || {
        show("StatusText") == "2 sites, 5 workers, file not loading: shop"
    });
    // The file mended, a reload takes it in: the same workers, the line as before.
    write_site("shop", &demo_site("shop", 18086, 3, false));
    let out = hatchery(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the status line", Duration::from_secs(10), || {
        show("StatusText") == "2 sites, 5 workers"
    });
    assert_eq!(
        worker_pids(&status(), "shop"),
        worker_pids(&before, "shop"),
        "shop's workers kept by the reload"
    );
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

#[test]
fn the_package_installs_the_agent_its_unit_a_configuration_man_pages_and_completions() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    let out = run("dpkg", &["-s", "hatchery"]);
    assert!(
        stdout(&out).contains("Status: install ok installed"),
        "{}",
        stdout(&out)
    );
    let files = stdout(&run("dpkg", &["-L", "hatchery"]));
    for f in [
        INSTALLED,
        UNIT_FILE,
        "/etc/hatchery/hatchery.toml",
        "/etc/hatchery/sites.d",
        "/usr/share/man/man1/hatchery.1.gz",
        "/usr/share/man/man1/hatchery-deploy.1.gz",
        "/usr/share/bash-completion/completions/hatchery",
        "/usr/share/zsh/vendor-completions/_hatchery",
        "/usr/share/fish/vendor_completions.d/hatchery.fish",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "the package lacks {f}:\n{files}"
        );
    }
    let conffiles =
        std::fs::read_to_string("/var/lib/dpkg/info/hatchery.conffiles").unwrap_or_default();
    assert_eq!(conffiles.trim(), "/etc/hatchery/hatchery.toml");
    // The unit runs the installed binary, and enables like any other.
    let unit = std::fs::read_to_string(UNIT_FILE).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/hatchery agent"), "{unit}");
    let out = systemctl(&["enable", "hatchery"]);
    assert!(out.status.success(), "enable: {}", stderr(&out));
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/hatchery.service").exists());
    let out = systemctl(&["disable", "hatchery"]);
    assert!(out.status.success(), "disable: {}", stderr(&out));
    // bash loads the completion script and completes a command.
    let out = run(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/hatchery && complete -p hatchery",
        ],
    );
    assert!(out.status.success(), "bash completion: {}", stderr(&out));
    // The default configuration, as packaged (the other tests write their own), checks.
    let unpacked = tempfile::tempdir().expect("tempdir");
    let dir = unpacked.path().to_str().expect("utf-8");
    let out = run("dpkg-deb", &["-x", "/vmtests/hatchery.deb", dir]);
    assert!(out.status.success(), "dpkg-deb -x: {}", stderr(&out));
    let default = format!("{dir}/etc/hatchery/hatchery.toml");
    let out = hatchery(&["check", "--config", &default]);
    assert!(
        out.status.success(),
        "check of the default configuration: {}",
        stderr(&out)
    );
}

#[test]
fn upgrade_under_systemd_keeps_the_agents_pid_the_keeper_and_every_worker() {
    let _one = UNIT.lock().unwrap_or_else(|e| e.into_inner());
    if !under_systemd() {
        return;
    }
    configure(&[("shop", demo_site("shop", 18087, 3, false))]);
    let _unit = Unit::start();
    let main_pid = show("MainPID");
    let agent = agent_pid();
    let before = worker_pids(&status(), "shop");
    let load = keep_asking(18087);
    // The installed binary again: the path the agent runs from is the default.
    let out = hatchery(&["upgrade"]);
    load.end("across the upgrade");
    assert!(
        out.status.success(),
        "upgrade failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(show("MainPID"), main_pid, "the unit's main process changed");
    assert_eq!(agent_pid(), agent, "the agent's pid changed");
    let after = status();
    assert_eq!(
        worker_pids(&after, "shop"),
        before,
        "workers were restarted"
    );
    assert!(
        after["agent"]["upgraded_from"]["version"].is_string(),
        "status does not say the agent was upgraded: {}",
        after["agent"]
    );
    assert_eq!(show("ActiveState"), "active");
}

//! The fleet playbook (`examples/fleet/deploy.yml`) run by a real `ansible-playbook`
//! against two agents on this host: two inventory hosts with `ansible_connection=local`,
//! each with its own control socket and its own site directory.
//!
//! A good release is deployed to both; a release whose workers exit at start is rolled back
//! on the first host, and the rollout stops there: the second host still serves the good
//! release, and was never touched.
//!
//! Ansible comes from `$HATCHERY_TEST_PYTHONPATH` (where `run-tests` installs ansible-core)
//! or from the `PATH`; without it the test says why it skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to run `ansible-playbook`: `python3 -m ansible playbook` with the test's Python
/// path, or the program on the `PATH`.
fn ansible_playbook() -> Option<Command> {
    if let Some(dir) = std::env::var_os("HATCHERY_TEST_PYTHONPATH")
        .filter(|d| Path::new(d).join("ansible/__main__.py").exists())
    {
        let mut c = Command::new("python3");
        c.args(["-m", "ansible", "playbook"]).env("PYTHONPATH", dir);
        return Some(c);
    }
    let on_path = Command::new("ansible-playbook")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    on_path.then(|| Command::new("ansible-playbook"))
}

/// One host of the fleet: its agent and the directory of its site's releases.
struct Host {
    name: &'static str,
    root: tempfile::TempDir,
    agent: TestAgent,
}

impl Host {
    /// An agent whose site `web` serves release `r1` (demo workers, two of them).
    fn start(name: &'static str) -> Host {
        let root = tempfile::tempdir().expect("tempdir");
        let r1 = root.path().join("releases/r1");
        std::fs::create_dir_all(&r1).expect("mkdir r1");
        std::os::unix::fs::symlink(&r1, root.path().join("current")).expect("symlink");
        let site = format!(
            r#"name = "blog"
command = ["{BIN}", "__demo-worker", "--delay-ms", "10", "--behaviour-from", "{{release}}"]
workers = 2
release = "{}"
[[listen]]
name = "http"
tcp = "127.0.0.1:{}"
[ready]
check = "notify"
timeout = "10s"
[stop]
timeout = "5s"
[deploy]
probation = "200ms"
"#,
            root.path().join("current").display(),
            free_port()
        );
        let agent = TestAgent::start_ready(
            &[("blog", &site)],
            Options {
                reactor: REACTORS[0],
                cgroups: false,
            },
            "blog",
            2,
        );
        Host { name, root, agent }
    }

    fn link(&self) -> PathBuf {
        self.root.path().join("current")
    }

    /// The serving generation and the last path component of its release.
    fn serving(&self) -> (u64, String) {
        let s = self.agent.status("blog");
        let release = s["release"]
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        (s["generation"].as_u64().expect("generation"), release)
    }

    /// Where the symlink points (its last component).
    fn linked(&self) -> String {
        std::fs::read_link(self.link())
            .expect("readlink")
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Runs the playbook with `extra` variables.
fn playbook(run: &Path, hosts: &[&Host], extra: &[(&str, &Path)], release: &str) -> Output {
    let mut inventory = String::from("[hatchery]\n");
    for h in hosts {
        inventory.push_str(&format!(
            "{} ansible_connection=local hatchery_socket={} release_link={}\n",
            h.name,
            h.agent.socket.display(),
            h.link().display()
        ));
    }
    inventory.push_str(&format!(
        "\n[hatchery:vars]\nhatchery={BIN}\nsite=blog\nansible_python_interpreter=python3\n"
    ));
    let inventory_file = run.join("inventory.ini");
    std::fs::write(&inventory_file, inventory).expect("write inventory");
    let playbook = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet/deploy.yml");
    let mut cmd = ansible_playbook().expect("ansible-playbook");
    cmd.arg("-i")
        .arg(&inventory_file)
        .arg(&playbook)
        .args(["-e", &format!("release={release}")]);
    for (k, v) in extra {
        cmd.arg("-e").arg(format!("{k}={}", v.display()));
    }
    cmd.env("LC_ALL", "C.UTF-8")
        .env("ANSIBLE_HOME", run.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", run.join("ansible-tmp"))
        .env("ANSIBLE_REMOTE_TEMP", run.join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_LOCALHOST_WARNING", "0")
        .env_remove("HATCHERY_SOCKET")
        .env_remove("HATCHERY_HOST")
        .output()
        .expect("run ansible-playbook")
}

/// The report's lines, one JSON object each.
fn report(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn the_fleet_playbook_deploys_host_by_host_and_stops_at_a_rolled_back_deploy() {
    if ansible_playbook().is_none() {
        skip(
            "ansible-playbook is not available (run-tests installs ansible-core into target/pydeps)",
        );
        return;
    }
    let started = std::time::Instant::now();
    let web1 = Host::start("web1");
    let web2 = Host::start("web2");
    let hosts = [&web1, &web2];
    let run = tempfile::tempdir().expect("tempdir");
    let report_file = run.path().join("report.jsonl");

    // The releases, built on the controller.
    let good = run.path().join("build/good");
    std::fs::create_dir_all(&good).expect("mkdir");
    std::fs::write(good.join("VERSION"), "2\n").expect("write");
    let bad = run.path().join("build/bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("behaviour"), "exit").expect("write");

    // A good release: both hosts deploy it, one after the other.
    let out = playbook(
        run.path(),
        &hosts,
        &[("release_src", &good), ("hatchery_report", &report_file)],
        "r2",
    );
    let text = format!("{}\n{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "the good rollout failed:\n{text}");
    for h in hosts {
        assert_eq!(h.serving(), (2, "r2".to_string()), "{}:\n{text}", h.name);
        assert_eq!(h.linked(), "r2", "{}", h.name);
        assert!(h.root.path().join("releases/r2/VERSION").exists());
    }
    assert!(text.contains("web1: blog deployed (generation 2"), "{text}");
    let lines = report(&report_file);
    assert_eq!(
        lines
            .iter()
            .map(|l| (
                l["host"].as_str(),
                l["outcome"].as_str(),
                l["exit"].as_i64()
            ))
            .collect::<Vec<_>>(),
        [
            (Some("web1"), Some("deployed"), Some(0)),
            (Some("web2"), Some("deployed"), Some(0))
        ],
        "{lines:?}"
    );
    assert_eq!(lines[0]["generation"], 2);

    // A release whose workers exit at start: rolled back on web1, and the rollout stops.
    let out = playbook(
        run.path(),
        &hosts,
        &[("release_src", &bad), ("hatchery_report", &report_file)],
        "r3",
    );
    let text = format!("{}\n{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "the bad rollout succeeded:\n{text}");
    assert!(
        text.contains("web1: blog rolled back (exit 4)")
            && text.contains("the rollout stops here and no later host was touched"),
        "{text}"
    );
    // web1 rolled back: its old generation serves, and its symlink says so again.
    assert_eq!(web1.serving(), (2, "r2".to_string()), "{text}");
    assert_eq!(web1.linked(), "r2");
    let s = web1.agent.status("blog");
    assert_eq!(s["ready"], 2, "{s:#}");
    // web2 was never touched: the release was not even copied there.
    assert_eq!(web2.serving(), (2, "r2".to_string()), "{text}");
    assert_eq!(web2.linked(), "r2");
    assert!(!web2.root.path().join("releases/r3").exists());
    let lines = report(&report_file);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["host"], "web1");
    assert_eq!(lines[2]["outcome"], "rolled back");
    assert_eq!(lines[2]["exit"], 4);
    assert!(
        lines[2]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rolled back")),
        "{lines:?}"
    );
    eprintln!("fleet test took {:?}", started.elapsed());
}

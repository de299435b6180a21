//! `hatchery add FILE` and `hatchery remove SITE`: sites added and removed at runtime,
//! persisted in `sites_dir`, refused without changing anything when invalid or taken.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn sleeper(name: &str, workers: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000 # marker-{name}\"]\nworkers = {workers}\n{extra}"
    )
}

fn each_reactor(mut body: impl FnMut(&'static str)) {
    for r in REACTORS {
        body(r);
    }
}

/// The files in the agent's `sites_dir`, with their text.
fn sites_dir(agent: &TestAgent) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(agent.dir.path().join("sites.d"))
        .expect("read sites.d")
        .filter_map(|e| e.ok())
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), text)
        })
        .collect();
    files.sort();
    files
}

/// A file outside `sites_dir` for `add` to read.
fn outside(agent: &TestAgent, file: &str, text: &str) -> String {
    let dir = agent.dir.path().join("incoming");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[test]
fn an_added_site_serves_persists_across_a_relaunch_and_remove_stops_and_deletes_it() {
    each_reactor(|reactor| {
        let mut agent = TestAgent::start_ready(
            &[("a", &sleeper("a", 1, ""))],
            Options {
                reactor,
                cgroups: true,
            },
            "a",
            1,
        );
        let text = sleeper("b", 2, "");
        let file = outside(&agent, "b.toml", &text);
        let out = agent.cli(&["add", &file]);
        assert!(
            out.status.success(),
            "{}\n{}",
            stderr(&out),
            agent.agent_log()
        );
        let written = agent.site_file("b");
        assert_eq!(
            stdout(&out).trim(),
            format!("b: added as {}", written.display())
        );
        assert_eq!(
            std::fs::read_to_string(&written).expect("the file is in sites_dir"),
            text
        );
        agent.wait_for("b", "b serving", Duration::from_secs(10), |s| {
            s["state"] == "running" && s["ready"] == 2
        });
        // Persisted: a new agent on the same configuration has it.
        agent.crash();
        agent.relaunch();
        let b = agent.wait_for("b", "b after the relaunch", Duration::from_secs(10), |s| {
            s["ready"] == 2
        });
        assert_eq!(b["desired"], 2, "{b:#}");
        let pids = agent.pids("b");
        assert_eq!(pids.len(), 2);
        let out = agent.cli(&["remove", "b"]);
        assert!(
            out.status.success(),
            "{}\n{}",
            stderr(&out),
            agent.agent_log()
        );
        assert_eq!(stdout(&out).trim(), "b: site removed");
        // The answer comes once the workers have exited.
        let running: Vec<i64> = pids.iter().copied().filter(|p| alive(*p)).collect();
        assert!(
            running.is_empty(),
            "workers still alive after remove: {running:?}"
        );
        assert!(!written.exists(), "the file is deleted from sites_dir");
        let out = agent.cli(&["status", "b"]);
        assert_eq!(out.status.code(), Some(1), "b is forgotten");
        assert!(stderr(&out).contains("no such site: b"), "{}", stderr(&out));
        assert_eq!(
            agent.status("a")["ready"],
            1,
            "the other site is undisturbed"
        );
        // Removing it again, or a site that never was, says so.
        let out = agent.cli(&["remove", "b"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("no such site: b"), "{}", stderr(&out));
        // And it stays gone across a relaunch.
        agent.crash();
        agent.relaunch();
        agent.wait_for("a", "a after the relaunch", Duration::from_secs(10), |s| {
            s["ready"] == 1
        });
        let out = agent.cli(&["status", "b"]);
        assert_eq!(out.status.code(), Some(1), "b stays removed");
    });
}

#[test]
fn an_invalid_file_or_a_taken_name_is_refused_and_nothing_changes() {
    each_reactor(|reactor| {
        let agent = TestAgent::start_ready(
            &[("a", &sleeper("a", 1, ""))],
            Options {
                reactor,
                cgroups: false,
            },
            "a",
            1,
        );
        let a_pid = agent.pids("a");
        let before = sites_dir(&agent);
        // Invalid: no command.
        let file = outside(&agent, "c.toml", "name = \"c\"\nworkers = 1\n");
        let out = agent.cli(&["add", &file]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("site not added, nothing changed")
                && stderr(&out).contains("command: missing or empty"),
            "{}",
            stderr(&out)
        );
        // Invalid: the file's name is not the site's, as the loader requires.
        let file = outside(&agent, "other.toml", &sleeper("d", 1, ""));
        let out = agent.cli(&["add", &file]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("name the file d.toml"),
            "{}",
            stderr(&out)
        );
        // Taken: a site of that name runs.
        let file = outside(&agent, "a.toml", &sleeper("a", 3, ""));
        let out = agent.cli(&["add", &file]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let want = format!(
            "hatchery: site a exists (its file is {}): remove it first, or edit its file and reload",
            agent.site_file("a").display()
        );
        assert_eq!(stderr(&out).trim(), want);
        // An unreadable file never reaches the agent.
        let out = agent.cli(&["add", "/nonexistent/e.toml"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains("cannot read /nonexistent/e.toml"),
            "{}",
            stderr(&out)
        );
        assert_eq!(sites_dir(&agent), before, "sites_dir is unchanged");
        let a = agent.status("a");
        assert_eq!(a["desired"], 1, "a was not scaled: {a:#}");
        assert_eq!(agent.pids("a"), a_pid, "a was not restarted");
        for site in ["c", "d"] {
            let out = agent.cli(&["status", site]);
            assert_eq!(out.status.code(), Some(1), "{site} was not added");
        }
        // A valid file that the reload refuses (its address is another site's) is taken
        // back out.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let _held = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the port");
        let listen = format!("[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n");
        let file = outside(&agent, "f.toml", &sleeper("f", 1, &listen));
        let out = agent.cli(&["add", &file]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("site f not added, nothing changed"),
            "{}",
            stderr(&out)
        );
        assert_eq!(sites_dir(&agent), before, "the refused file was taken back");
    });
}

#[test]
fn only_root_and_the_agents_user_may_add_or_remove_a_site() {
    if !is_root() && skip("needs root to run the CLI as another uid") {
        return;
    }
    let agent = TestAgent::start_ready(
        &[("mine", &sleeper("mine", 1, "user = \"nobody\"\n"))],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
        "mine",
        1,
    );
    // The test directory must be reachable by nobody to connect to the socket.
    std::fs::set_permissions(
        agent.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let file = outside(&agent, "x.toml", &sleeper("x", 1, ""));
    std::fs::set_permissions(
        agent.dir.path().join("incoming"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let before = sites_dir(&agent);
    let as_nobody = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        Command::new(BIN)
            .uid(65534)
            .gid(65534)
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .output()
            .expect("cli")
    };
    let out = as_nobody(&["add", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim(), "hatchery: uid 65534 may not do this");
    // Not even its own site: its file is the administrator's.
    let pid = agent.pids("mine");
    let out = as_nobody(&["remove", "mine"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "hatchery: uid 65534 may not remove site mine: only root and the agent's user may"
    );
    assert_eq!(sites_dir(&agent), before, "nothing changed");
    assert_eq!(agent.pids("mine"), pid, "its workers are untouched");
    assert_eq!(
        agent.cli(&["status", "x"]).status.code(),
        Some(1),
        "x was not added"
    );
}

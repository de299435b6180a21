//! Configuration that explains itself, against the real agent: `env_file` (merged, checked,
//! reloaded), the stop sequence (`[stop] signals`) as the workers themselves saw it, and
//! `hatchery check` without `--config` (the running agent's file, or the default one).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn each_reactor(mut body: impl FnMut(&'static str)) {
    for r in REACTORS {
        body(r);
    }
}

/// A worker that writes each HUP and TERM it receives, with the monotonic clock's time, to
/// the file given as its first argument, and exits on the signals named in its second
/// (comma-separated); it writes `ready` once its handlers are installed.
const RECORDER: &str = r#"
import signal, sys, time
out = open(sys.argv[1], "a", buffering=1)
exit_on = set(filter(None, sys.argv[2].split(",")))
def on(n, _):
    name = signal.Signals(n).name
    out.write(f"{name} {time.monotonic()}\n")
    if name in exit_on:
        sys.exit(0)
signal.signal(signal.SIGHUP, on)
signal.signal(signal.SIGTERM, on)
out.write(f"ready {time.monotonic()}\n")
while True:
    signal.pause()
"#;

/// A site running [`RECORDER`], recording into `record`, exiting on `exit_on`.
fn recorder_site(name: &str, record: &Path, exit_on: &str, stop: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"python3\", \"-c\", '''{RECORDER}''', \"{}\", \"{exit_on}\"]\n[stop]\n{stop}\n",
        record.display()
    )
}

/// The signals a recorder received, in order, with their times.
fn received(record: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, t) = l.split_once(' ')?;
            Some((name.to_string(), t.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_stop_sequence_sends_each_signal_in_turn_then_kills() {
    each_reactor(|reactor| {
        let dir = tempfile::tempdir().expect("tempdir");
        let polite = dir.path().join("polite");
        let stubborn = dir.path().join("stubborn");
        let stop = "signals = [\"SIGHUP\", \"SIGTERM\"]\ntimeout = \"1s\"";
        let agent = TestAgent::start(
            &[
                // Ignores HUP, exits on TERM.
                ("polite", &recorder_site("polite", &polite, "SIGTERM", stop)),
                // Ignores both: killed.
                ("stubborn", &recorder_site("stubborn", &stubborn, "", stop)),
            ],
            Options {
                reactor,
                cgroups: true,
            },
        );
        for record in [&polite, &stubborn] {
            wait_until("the workers' handlers", Duration::from_secs(20), || {
                received(record).first().is_some_and(|(n, _)| n == "ready")
            });
        }
        let stubborn_pid = agent.pids("stubborn")[0];
        for site in ["polite", "stubborn"] {
            let out = agent.cli(&["stop", site]);
            assert!(out.status.success(), "{site}: {}", stderr(&out));
        }
        let p = received(&polite);
        let names: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ready", "SIGHUP", "SIGTERM"], "[{reactor}]");
        let waited = p[2].1 - p[1].1;
        assert!(
            (0.9..5.0).contains(&waited),
            "[{reactor}] TERM came {waited:.3}s after HUP, not the 1s step"
        );
        let s = received(&stubborn);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ready", "SIGHUP", "SIGTERM"], "[{reactor}]");
        assert!(s[2].1 - s[1].1 >= 0.9, "[{reactor}] {s:?}");
        assert!(
            !alive(stubborn_pid),
            "[{reactor}] the stubborn worker is gone"
        );
        // It ended by SIGKILL, after both steps.
        let out = agent.cli(&["events", "stubborn", "--json"]);
        let killed = stdout(&out).lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["kind"] == "exited" && v["signal"] == "SIGKILL"
        });
        assert!(killed, "[{reactor}] {}", stdout(&out));
        let polite_exit = agent.cli(&["events", "polite", "--json"]);
        assert!(
            !stdout(&polite_exit).contains("SIGKILL"),
            "[{reactor}] {}",
            stdout(&polite_exit)
        );
    });
}

#[test]
fn an_env_file_is_merged_under_env_checked_and_reloaded() {
    each_reactor(|reactor| {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_file = dir.path().join("web.env");
        std::fs::write(
            &env_file,
            "# web's settings\nDB_URL=\"postgres://db/web\"\nMODE=from-file\n",
        )
        .expect("write");
        let site = format!(
            "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nenv_file = \"{}\"\n[env]\nMODE = \"explicit\"\n",
            env_file.display()
        );
        let agent = TestAgent::start(
            &[("web", &site)],
            Options {
                reactor,
                cgroups: true,
            },
        );
        let s = agent.wait_for("web", "1 ready", Duration::from_secs(20), |s| {
            s["ready"] == 1
        });
        let pid = s["workers"][0]["pid"].as_i64().expect("pid");
        let environ = |pid: i64| {
            String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default(),
            )
            .split('\0')
            .map(str::to_string)
            .collect::<Vec<_>>()
        };
        let env = environ(pid);
        assert!(
            env.contains(&"DB_URL=postgres://db/web".to_string()),
            "{env:?}"
        );
        assert!(
            env.contains(&"MODE=explicit".to_string()),
            "env wins: {env:?}"
        );

        // check sees a bad line, with its file and line; reload refuses it and changes nothing.
        std::fs::write(&env_file, "DB_URL=x\nthis is not a variable\n").expect("write");
        let config = agent.dir.path().join("hatchery.toml");
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("check");
        assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
        let line = format!(
            "{}:2: env_file: expected NAME=VALUE, found \"this is not a variable\"",
            env_file.display()
        );
        assert!(stderr(&out).contains(&line), "{}", stderr(&out));
        let out = agent.cli(&["reload"]);
        assert!(!out.status.success(), "a bad env file fails the reload");
        assert!(stderr(&out).contains(&line), "{}", stderr(&out));
        assert_eq!(agent.pids("web"), [pid], "nothing changed");

        // A good one is in effect after reload: the worker restarts with it.
        std::fs::write(&env_file, "DB_URL=postgres://db2/web\n").expect("write");
        let out = agent.cli(&["reload"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = agent.wait_for("web", "restarted", Duration::from_secs(20), |s| {
            s["ready"] == 1 && s["workers"][0]["pid"].as_i64() != Some(pid)
        });
        let env = environ(s["workers"][0]["pid"].as_i64().expect("pid"));
        assert!(
            env.contains(&"DB_URL=postgres://db2/web".to_string()),
            "{env:?}"
        );
    });
}

#[test]
fn check_without_config_checks_the_running_agents_file() {
    let agent = TestAgent::start(
        &[(
            "web",
            "name = \"web\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n",
        )],
        Options {
            reactor: "epoll",
            cgroups: false,
        },
    );
    agent.wait_for("web", "1 ready", Duration::from_secs(20), |s| {
        s["ready"] == 1
    });
    // Valid: the running agent's file, said on stderr.
    let out = agent.cli(&["check"]);
    let config = std::fs::canonicalize(agent.dir.path().join("hatchery.toml")).expect("path");
    assert!(
        stderr(&out).contains(&format!(
            "checking the running agent's configuration, {}",
            config.display()
        )),
        "{}",
        stderr(&out)
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).starts_with("configuration is valid: 1 site(s)"),
        "{}",
        stdout(&out)
    );
    // --quiet (the unit's ExecStartPre): nothing on stdout when valid.
    let out = agent.cli(&["check", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "check --quiet printed the report");

    // `hatchery signal` names signals by the same table: a bad name says what is accepted.
    let out = agent.cli(&["signal", "web", "SIGNOPE"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown signal \"SIGNOPE\": use a name (HUP, INT, QUIT,")
            && stderr(&out).contains("TTIN, TTOU, URG, XCPU, XFSZ, VTALRM, PROF, WINCH"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["signal", "web", "sigwinch"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Every problem at once, as JSON: file, line, key and message apart.
    let site = agent.site_file("web");
    std::fs::write(
        &site,
        "name = \"web\"\ncommand = [\"/bin/true\"]\nwrokers = 2\n[stop]\ntimeout = 30\nsignal = \"SIGNOPE\"\n[restart]\nbackoff_initial = \"5s\"\nbackoff_max = \"1s\"\n",
    )
    .expect("write");
    // --quiet: the problems, on stderr only.
    let out = agent.cli(&["check", "--quiet"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "check --quiet printed the report");
    assert!(
        stderr(&out).contains("unknown key `wrokers`; did you mean `workers`?"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli(&["--json", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["valid"], false);
    let problems: Vec<(u64, String, String)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            assert_eq!(p["file"], site.display().to_string(), "{p}");
            assert_eq!(p["kind"], "invalid", "{p}");
            (
                p["line"].as_u64().expect("line"),
                p["key"].as_str().expect("key").to_string(),
                p["message"].as_str().expect("message").to_string(),
            )
        })
        .collect();
    let keys: Vec<(u64, &str)> = problems.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
    assert_eq!(
        keys,
        [
            (3, "wrokers"),
            (5, "stop.timeout"),
            (6, "stop.signal"),
            (9, "restart.backoff_max")
        ],
        "{problems:?}"
    );
    assert_eq!(
        problems[0].2,
        "unknown key `wrokers`; did you mean `workers`?"
    );
    assert_eq!(
        problems[1].2,
        "expected a duration like \"30s\", found integer 30"
    );
    // No Rust Debug forms anywhere.
    for (_, _, m) in &problems {
        for rust in ["Some(", "None", "\\\"", "Raw"] {
            assert!(!m.contains(rust), "{m}");
        }
    }

    // The agent file itself invalid: still one JSON document.
    let config_text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, format!("{config_text}memory_reserve = 5\n")).expect("write");
    let out = agent.cli(&["--json", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["problems"][0]["key"], "memory_reserve", "{report}");
    assert_eq!(
        report["problems"][0]["message"],
        "expected a size like \"512MiB\", found integer 5"
    );
    std::fs::write(&config, config_text).expect("write");

    // No agent: the default file, said.
    let out = Command::new(BIN)
        .args(["--socket", "/nonexistent/control.sock", "check"])
        .output()
        .expect("check");
    assert!(
        stderr(&out).contains("no agent answered on /nonexistent/control.sock (")
            && stderr(&out).contains("); checking /etc/hatchery/hatchery.toml"),
        "{}",
        stderr(&out)
    );
}

//! The command line itself: bash loads the completion script of `hatchery completions
//! bash` and completes commands and options (hidden commands never offered); the man pages
//! of `hatchery man` name every command and render with `man`; every command's `--json`
//! output is valid JSON (one document, or one object per line where it streams), errors
//! included; `signal` and `reload` answer in sentences; `--socket` works before and after
//! the command, and `HATCHERY_SOCKET` without it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The hidden commands: never offered, never in a man page.
const HIDDEN: &[&str] = &[
    "man",
    "fd-holder",
    "__probe",
    "__demo-worker",
    "__demo-zygote",
    "__upgrade-check",
];

/// The commands `hatchery --help` lists.
const VISIBLE: &[&str] = &[
    "agent",
    "check",
    "demo",
    "status",
    "start",
    "stop",
    "restart",
    "scale",
    "signal",
    "top",
    "logs",
    "events",
    "add",
    "remove",
    "reload",
    "deploy",
    "promote",
    "rollback",
    "exec",
    "upgrade",
    "completions",
];

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Writes the completion script of `shell` to `dir` and returns its path.
fn completion_script(shell: &str, dir: &Path) -> std::path::PathBuf {
    let out = Command::new(BIN)
        .args(["completions", shell])
        .output()
        .expect("run hatchery completions");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    let path = dir.join(format!("hatchery.{shell}"));
    std::fs::write(&path, &out.stdout).expect("write the script");
    path
}

/// What bash's completion of `line` offers (the cursor at its end), with the script loaded
/// as bash-completion would load it: `source`d, then the function that `complete -p
/// hatchery` names is called as bash calls it, with `COMP_WORDS`, `COMP_CWORD`,
/// `COMP_LINE` and `COMP_POINT` set.
fn bash_complete(script: &Path, line: &str) -> Vec<String> {
    let program = r#"
set -u
source "$1" || exit 10
spec=$(complete -p hatchery) || exit 11
fn=$(printf '%s\n' "$spec" | sed -n 's/.*-F \([^ ]*\).*/\1/p')
[ -n "$fn" ] || exit 12
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
read -r -a COMP_WORDS <<< "$COMP_LINE"
# A line that ends with a space completes a new, empty word.
[ "${COMP_LINE: -1}" = " " ] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
cur=${COMP_WORDS[COMP_CWORD]}
prev=${COMP_WORDS[COMP_CWORD-1]}
COMPREPLY=()
"$fn" hatchery "$cur" "$prev" || exit 13
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", program, "bash"])
        .arg(script)
        .arg(line)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash could not complete {line:?} ({}): {}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completes_commands_and_their_options_and_never_a_hidden_command() {
    if !installed("bash") {
        skip("bash is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let script = completion_script("bash", dir.path());

    // Every visible command, and no hidden one.
    let commands = bash_complete(&script, "hatchery ");
    for c in VISIBLE {
        assert!(
            commands.iter().any(|x| x == c),
            "{c} not offered: {commands:?}"
        );
    }
    for h in HIDDEN {
        assert!(
            !commands.iter().any(|x| x == h),
            "{h} offered: {commands:?}"
        );
    }
    // A prefix narrows them.
    let mut st = bash_complete(&script, "hatchery st");
    st.sort();
    assert_eq!(st, ["start", "status", "stop"]);
    for prefix in ["hatchery fd", "hatchery __", "hatchery ma"] {
        let offered = bash_complete(&script, prefix);
        for h in HIDDEN {
            assert!(!offered.iter().any(|x| x == h), "{prefix:?}: {offered:?}");
        }
    }
    // Options only where they apply: `--socket` and `--json` for the commands that talk to
    // the agent, not for `agent`.
    let logs = bash_complete(&script, "hatchery logs --");
    for o in ["--socket", "--json", "--follow", "--lines"] {
        assert!(logs.iter().any(|x| x == o), "{o}: {logs:?}");
    }
    let agent = bash_complete(&script, "hatchery agent --");
    assert!(agent.iter().any(|x| x == "--config"), "{agent:?}");
    assert!(
        !agent.iter().any(|x| x == "--socket" || x == "--json"),
        "{agent:?}"
    );
    let shells = bash_complete(&script, "hatchery completions ");
    for s in ["bash", "zsh", "fish"] {
        assert!(shells.iter().any(|x| x == s), "{shells:?}");
    }
}

#[test]
fn zsh_and_fish_scripts_name_every_command_and_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (shell, check) in [("zsh", &["-n"][..]), ("fish", &["--no-execute"][..])] {
        let script = completion_script(shell, dir.path());
        let text = std::fs::read_to_string(&script).expect("read");
        let words: std::collections::BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .collect();
        for c in VISIBLE {
            assert!(words.contains(c), "{shell}: {c} missing");
        }
        for h in HIDDEN {
            assert!(!words.contains(h), "{shell}: {h} offered");
        }
        if !installed(shell) {
            skip(&format!(
                "{shell} is not installed: its script was checked for its commands, not parsed"
            ));
            continue;
        }
        let out = Command::new(shell)
            .args(check)
            .arg(&script)
            .output()
            .expect("run the shell");
        assert!(
            out.status.success(),
            "{shell} rejects its script: {}",
            stderr(&out)
        );
    }
    // fish completes from the script as it would at a prompt (`complete -C`).
    if !installed("fish") {
        return;
    }
    let script = dir.path().join("hatchery.fish");
    let complete = |line: &str| {
        let out = Command::new("fish")
            .args(["--no-config", "-c", "source $argv[1]; complete -C $argv[2]"])
            .arg(&script)
            .arg(line)
            .output()
            .expect("run fish");
        assert!(out.status.success(), "{line:?}: {}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_string())
            .collect::<Vec<String>>()
    };
    let commands = complete("hatchery ");
    for c in VISIBLE {
        assert!(
            commands.iter().any(|x| x == c),
            "fish: {c} not offered: {commands:?}"
        );
    }
    for h in HIDDEN {
        assert!(
            !commands.iter().any(|x| x == h),
            "fish: {h} offered: {commands:?}"
        );
    }
    let agent = complete("hatchery agent --");
    assert!(agent.iter().any(|x| x == "--config"), "{agent:?}");
    assert!(
        !agent.iter().any(|x| x == "--socket" || x == "--json"),
        "{agent:?}"
    );
    let status = complete("hatchery status --");
    assert!(
        status.iter().any(|x| x == "--socket") && status.iter().any(|x| x == "--json"),
        "{status:?}"
    );
}

#[test]
fn man_pages_name_every_command_and_render() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mandir = dir.path().join("man1");
    let out = Command::new(BIN)
        .args(["man", "--out"])
        .arg(&mandir)
        .output()
        .expect("run hatchery man");
    assert!(out.status.success(), "{}", stderr(&out));
    // It says what it wrote: hatchery.1 and one page per visible command.
    let written: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(written.len(), 1 + VISIBLE.len(), "{written:?}");
    let mut files: Vec<String> = std::fs::read_dir(&mandir)
        .expect("read the directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    files.sort();
    let mut expected: Vec<String> = VISIBLE.iter().map(|c| format!("hatchery-{c}.1")).collect();
    expected.push("hatchery.1".into());
    expected.sort();
    assert_eq!(files, expected);
    let top = std::fs::read_to_string(mandir.join("hatchery.1")).expect("read");
    for c in VISIBLE {
        assert!(
            top.contains(&format!("hatchery\\-{c}(1)")),
            "hatchery.1 does not name {c}"
        );
    }
    for h in HIDDEN {
        let h = h.replace('-', "\\-");
        assert!(
            !top.contains(&format!("hatchery\\-{h}")) && !top.contains(&format!(" {h} ")),
            "hatchery.1 names {h}"
        );
    }
    // `man` renders each page without a warning, with its examples as written.
    if !installed("man") {
        skip("man is not installed: the pages were generated and read, not rendered");
        return;
    }
    for f in &files {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(mandir.join(f))
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .expect("run man");
        assert!(out.status.success(), "{f}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{f}: {}", stderr(&out));
        let page = stdout(&out);
        assert!(page.contains("NAME"), "{f}: {page}");
        if f == "hatchery-status.1" {
            assert!(
                page.contains("--socket") && page.contains("--json"),
                "{page}"
            );
            assert!(page.contains("EXAMPLES"), "{page}");
            assert!(
                page.contains("  hatchery status --json | jq '.sites[] | {name, state}'"),
                "{page}"
            );
        }
        if f == "hatchery-agent.1" {
            assert!(
                !page.contains("--socket") && !page.contains("--json"),
                "{page}"
            );
        }
    }
}

/// Every line of `text` is a JSON object; returns them.
fn json_lines(what: &str, text: &str) -> Vec<serde_json::Value> {
    assert!(!text.is_empty(), "{what}: no output");
    text.lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v.is_object() => v,
            other => panic!("{what}: a line that is not a JSON object ({other:?}): {l:?}\n{text}"),
        })
        .collect()
}

/// `text` is one JSON document; returns it.
fn json_document(what: &str, text: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what}: not one JSON document ({e}):\n{text}"))
}

/// A site whose workers say hello, answer SIGHUP with a line, and keep running.
fn site(name: &str, workers: u32) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"trap 'echo got-hup' HUP; echo hello $HATCHERY_WORKER_ID; while :; do sleep 0.2; done\"]\nworkers = {workers}\n"
    )
}

#[test]
fn json_output_is_valid_everywhere_and_signal_and_reload_say_sentences() {
    let agent = TestAgent::start_ready(
        &[("blog", &site("blog", 2))],
        Options {
            reactor: REACTORS[0],
            cgroups: false,
        },
        "blog",
        2,
    );
    let run = |args: &[&str]| {
        let out = agent.cli(args);
        (out.status.code(), stdout(&out), stderr(&out))
    };

    // One document: status, status SITE, signal, reload, top, check.
    for args in [
        &["status", "--json"][..],
        &["status", "blog", "--json"],
        &["top", "--json"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        json_document(&format!("{args:?}"), &out);
    }
    let config = agent.dir.path().join("hatchery.toml");
    let out = Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("check");
    let report = json_document("check --json", &stdout(&out));
    assert_eq!(report["valid"], true, "{report}");

    // signal: a sentence; with --json, the typed answer.
    let (code, out, err) = run(&["signal", "blog", "HUP"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "blog: SIGHUP sent to 2 workers\n");
    let (code, out, err) = run(&["signal", "blog", "SIGHUP", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let signalled: hatchery::control::Signalled =
        serde_json::from_value(json_document("signal --json", &out)).expect("a Signalled");
    assert_eq!(
        (signalled.signal.as_str(), signalled.workers),
        ("SIGHUP", 2)
    );
    // The workers took SIGHUP and live on.
    wait_until("both workers' got-hup", Duration::from_secs(20), || {
        stdout(&agent.cli(&["logs", "blog", "-n", "100"]))
            .matches("got-hup")
            .count()
            >= 2
    });

    // reload: nothing, then a site added, then removed; each said in a sentence.
    let (code, out, err) = run(&["reload"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "configuration reloaded: nothing changed\n"),
        "{err}"
    );
    std::fs::write(agent.site_file("shop"), site("shop", 1)).expect("write a site");
    let (code, out, err) = run(&["reload"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "configuration reloaded: shop added\n"),
        "{err}"
    );
    std::fs::remove_file(agent.site_file("shop")).expect("remove the site");
    let (code, out, err) = run(&["reload", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let reloaded: hatchery::control::Reloaded =
        serde_json::from_value(json_document("reload --json", &out)).expect("a Reloaded");
    assert_eq!(reloaded.removed, ["shop"]);

    // JSON lines: logs (one object per log line), events, and the commands that report
    // progress (each step, then the answer).
    let (code, out, err) = run(&["logs", "blog", "-n", "5", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines = json_lines("logs --json", &out);
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines.iter().all(|l| l["text"].is_string()), "{out}");
    let (code, out, err) = run(&["events", "blog", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let events = json_lines("events --json", &out);
    assert!(events.iter().all(|e| e["kind"].is_string()), "{out}");
    for args in [
        &["scale", "blog", "3", "--json"][..],
        &["restart", "blog", "--json"],
        &["stop", "blog", "--json"],
        &["start", "blog", "--json"],
        &["deploy", "blog", "--json"],
        &["rollback", "blog", "--json"],
        &["upgrade", "--binary", "/nonexistent/hatchery", "--json"],
    ] {
        let (_, out, _) = run(args);
        let lines = json_lines(&format!("{args:?}"), &out);
        let last = lines.last().expect("an answer");
        assert!(
            last.get("site").is_some() || last.get("error").is_some(),
            "{args:?}: the answer comes last: {out}"
        );
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .all(|l| l["event"].is_string()),
            "{args:?}: {out}"
        );
    }
    let (_, out, _) = run(&["scale", "blog", "2", "--json"]);
    let done: hatchery::control::Done =
        serde_json::from_value(json_lines("scale", &out).pop().expect("an answer"))
            .expect("a Done");
    assert_eq!(done.site, "blog");

    // Errors: one object, `error` with its kind, on stdout too.
    for (args, code, kind) in [
        (&["status", "nosuch", "--json"][..], 1, "not_found"),
        (&["promote", "blog", "--json"], 1, ""),
        (&["events", "--since", "yesterday", "--json"], 2, "usage"),
        // Refused by the command line's parser itself, before anything else.
        (&["scale", "blog", "abc", "--json"], 2, "usage"),
        (&["--json", "deploy", "blog", "--canary", "abc"], 2, "usage"),
        (&["--json", "nosuchcommand"], 2, "usage"),
    ] {
        let (c, out, err) = run(args);
        assert_eq!(c, Some(code), "{args:?}: {out} {err}");
        let v = json_document(&format!("{args:?}"), &out);
        assert!(v["error"]["message"].is_string(), "{args:?}: {v}");
        if !kind.is_empty() {
            assert_eq!(v["error"]["kind"], kind, "{args:?}: {v}");
        }
        assert!(!err.is_empty(), "{args:?}: the message on stderr too");
    }
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket", "/nonexistent/control.sock"])
        .output()
        .expect("status");
    assert_eq!(out.status.code(), Some(3));
    let v = json_document("unreachable", &stdout(&out));
    assert_eq!(v["error"]["kind"], "unreachable", "{v}");
    let out = Command::new(BIN)
        .args(["top", "--json", "--socket", "/nonexistent/control.sock"])
        .output()
        .expect("top");
    assert_eq!(out.status.code(), Some(3));
    let v = json_document("top unreachable", &stdout(&out));
    assert_eq!(v["error"]["kind"], "unreachable", "{v}");
    let (c, out, err) = run(&["top", "nosuch", "--json"]);
    assert_eq!(c, Some(1), "{out} {err}");
    let v = json_document("top nosuch", &out);
    assert!(v["error"]["message"].is_string(), "{v}");

    // Streams that follow: one object per line as they come.
    for args in [
        &["logs", "blog", "-f", "-n", "2", "--json"][..],
        &["events", "-f", "-n", "2", "--json"],
    ] {
        let mut child = Command::new(BIN)
            .args(args)
            .env("HATCHERY_SOCKET", &agent.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        for _ in 0..2 {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read a line");
            json_lines(&format!("{args:?}"), line.trim_end());
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    // The README's examples with jq, as written (but the one that follows forever).
    if installed("jq") && installed("bash") {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .expect("README");
        let block = readme
            .split("### Output for scripts")
            .nth(1)
            .and_then(|s| s.split("```sh\n").nth(1))
            .and_then(|b| b.split("```").next())
            .expect("the README's --json examples");
        let bin_dir = Path::new(BIN).parent().expect("the binary's directory");
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let examples: Vec<&str> = block
            .lines()
            .filter(|l| l.starts_with("hatchery ") && !l.contains(" -f "))
            .collect();
        assert_eq!(examples.len(), 3, "{block}");
        for line in examples {
            let out = Command::new("bash")
                .args(["-o", "pipefail", "-c", line])
                .env("PATH", &path)
                .env("HATCHERY_SOCKET", &agent.socket)
                .output()
                .expect("sh");
            assert!(out.status.success(), "{line}: {}", stderr(&out));
            let said = stdout(&out);
            assert!(
                !said.trim().is_empty() && !said.contains("null"),
                "{line}: {said}"
            );
        }
    } else {
        skip("jq or bash is not installed: the README's jq examples were not run");
    }

    // --socket after the command, and HATCHERY_SOCKET alone.
    let after = Command::new(BIN)
        .args(["status", "blog", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("status");
    assert!(after.status.success(), "{}", stderr(&after));
    let env = Command::new(BIN)
        .args(["status", "blog"])
        .env("HATCHERY_SOCKET", &agent.socket)
        .output()
        .expect("status");
    assert!(env.status.success(), "{}", stderr(&env));
    assert_eq!(stdout(&after).lines().next(), stdout(&env).lines().next());
    // Not an option of `agent`: refused as a usage error, before anything runs.
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["agent", "--config", "/nonexistent.toml"])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--socket is not an option of `hatchery agent`"),
        "{}",
        stderr(&out)
    );
}

/// The README's completion and man page commands run as written, each writing into a
/// temporary directory instead of the system's.
#[test]
fn readme_completion_and_man_examples_run() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let section = readme
        .split("### Shell completions and man pages")
        .nth(1)
        .expect("the README's section on completions and man pages");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its example block");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ran = Vec::new();
    for line in block.lines().filter(|l| l.starts_with("hatchery ")) {
        let (command, target) = match line.split_once(" > ") {
            Some((c, t)) => (c, Some(t)),
            None => (line, None),
        };
        let mut args: Vec<String> = command
            .split_whitespace()
            .skip(1)
            .map(String::from)
            .collect();
        // `--out DIR`: a directory of the test's own.
        let out_dir = dir.path().join("man1");
        if let Some(i) = args.iter().position(|a| a == "--out") {
            args[i + 1] = out_dir.display().to_string();
        }
        let out = Command::new(BIN).args(&args).output().expect("run");
        assert!(out.status.success(), "{line}: {}", stderr(&out));
        assert!(!out.stdout.is_empty(), "{line}: no output");
        if let Some(target) = target {
            let name = Path::new(target).file_name().expect("a file name");
            std::fs::write(dir.path().join(name), &out.stdout).expect("write");
        } else {
            assert!(out_dir.join("hatchery.1").exists(), "{line}");
        }
        ran.push(args[0].clone());
    }
    assert_eq!(ran, ["completions", "completions", "completions", "man"]);
}

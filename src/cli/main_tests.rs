//! Unit tests of the command line's definition (`main.rs`): the examples of `--help`,
//! `--socket` and `--json` per command, hidden commands never suggested, completions and
//! man pages without them.

use super::*;
use std::path::Path;

/// The names of the hidden commands.
fn hidden() -> Vec<String> {
    command()
        .get_subcommands()
        .filter(|s| s.is_hide_set())
        .map(|s| s.get_name().to_string())
        .collect()
}

#[test]
fn the_hidden_commands_are_the_agents_helpers_and_man() {
    assert_eq!(
        hidden(),
        [
            "man",
            "__upgrade-check",
            "__demo-worker",
            "__demo-zygote",
            "__probe",
            "fd-holder"
        ]
    );
}

/// Every example of every `--help` is a command line this CLI accepts, and each section
/// is the one its command shows.
#[test]
fn every_example_in_help_is_a_valid_command_line() {
    let cmd = command();
    for (name, section) in cli::help::ALL {
        let shown = match name {
            None => cmd.get_after_help(),
            Some(n) => cmd
                .find_subcommand(n)
                .unwrap_or_else(|| panic!("no command {n}"))
                .get_after_help(),
        };
        assert_eq!(
            shown.map(|s| s.to_string()).as_deref(),
            Some(*section),
            "{name:?}"
        );
        assert!(section.starts_with("Examples:\n"), "{name:?}");
        let examples = cli::help::example_commands(section);
        assert!(examples.len() >= 2 || *name == Some("reload"), "{name:?}");
        if let Some(n) = name {
            assert!(examples.iter().any(|w| w[1] == *n), "{n}: {examples:?}");
        }
        for words in examples {
            let parsed = command()
                .try_get_matches_from(&words)
                .map_err(|e| e.to_string())
                .and_then(|m| match misplaced_option(&m) {
                    Some(e) => Err(e.to_string()),
                    None => Ok(m),
                });
            assert!(parsed.is_ok(), "{words:?}: {parsed:?}");
        }
    }
    // The main commands all have examples.
    for n in [
        "status", "deploy", "scale", "logs", "events", "top", "exec", "check", "agent",
    ] {
        assert!(
            cli::help::ALL.iter().any(|(name, _)| *name == Some(n)),
            "{n}"
        );
    }
}

/// `--socket` and `--json` are options of the commands that talk to the agent (and
/// `--json` of `check`), in `--help` too, not of `agent`, `demo` or `completions`;
/// before the command they are still accepted where the command has them.
#[test]
fn socket_and_json_are_options_of_the_commands_they_affect() {
    let cmd = command();
    let has = |sub: &str, id: &str| {
        cmd.find_subcommand(sub)
            .expect("command")
            .get_arguments()
            .any(|a| a.get_id() == id)
    };
    let clients = [
        "status", "start", "stop", "restart", "scale", "signal", "top", "logs", "events", "reload",
        "deploy", "promote", "rollback", "upgrade", "add", "remove",
    ];
    for sub in clients {
        assert!(has(sub, "socket") && has(sub, "json"), "{sub}");
    }
    assert!(has("exec", "socket") && !has("exec", "json"));
    // Without --config, check asks the agent on the socket for its file.
    assert!(has("check", "json") && has("check", "socket"));
    for sub in ["agent", "demo", "completions"] {
        assert!(!has(sub, "socket") && !has(sub, "json"), "{sub}");
    }
    let help = |sub: &str| {
        let mut c = command();
        c.find_subcommand_mut(sub)
            .expect("command")
            .render_long_help()
            .to_string()
    };
    assert!(!help("agent").contains("--socket") && !help("agent").contains("--json"));
    assert!(!help("demo").contains("--socket") && !help("demo").contains("--json"));
    assert!(help("status").contains("--socket") && help("status").contains("--json"));
    let top = command().render_long_help().to_string();
    let options = top
        .split("Options:")
        .nth(1)
        .and_then(|o| o.split("Examples:").next())
        .unwrap_or_default();
    assert!(options.contains("--help"), "{top}");
    assert!(
        !options.contains("--socket") && !options.contains("--json"),
        "{top}"
    );

    let parse = |args: &[&str]| {
        command()
            .try_get_matches_from(args)
            .map_err(|e| e.to_string())
            .and_then(|m| match misplaced_option(&m) {
                Some(e) => Err(e.to_string()),
                None => Cli::from_arg_matches(&m).map_err(|e| e.to_string()),
            })
    };
    use clap::FromArgMatches as _;
    for args in [
        &["hatchery", "--socket", "/s", "status", "--json"][..],
        &["hatchery", "status", "--socket", "/s", "--json"],
        &["hatchery", "--json", "--socket", "/s", "status"],
    ] {
        let cli = parse(args).expect("valid");
        let given = cli
            .command
            .client_args()
            .cloned()
            .expect("a client command");
        assert_eq!(
            given.socket.or(cli.socket),
            Some(PathBuf::from("/s")),
            "{args:?}"
        );
        assert!(given.json || cli.json, "{args:?}");
    }
    for args in [
        &["hatchery", "--socket", "/s", "agent"][..],
        &["hatchery", "agent", "--socket", "/s"],
        &["hatchery", "--json", "demo"],
        &["hatchery", "demo", "--json"],
        &["hatchery", "--json", "completions", "bash"],
    ] {
        let e = parse(args).expect_err("refused");
        assert!(
            e.contains("--socket") || e.contains("--json"),
            "{args:?}: {e}"
        );
    }
    let e = parse(&["hatchery", "--socket", "/s", "agent"]).expect_err("refused");
    assert!(
        e.contains("--socket is not an option of `hatchery agent`"),
        "{e}"
    );
    // `check --json` both ways, and its socket (the agent asked for its file) too; `exec`
    // with its socket before the site.
    assert!(parse(&["hatchery", "--json", "check"]).is_ok());
    assert!(parse(&["hatchery", "check", "--json"]).is_ok());
    assert!(parse(&["hatchery", "--socket", "/s", "check"]).is_ok());
    assert!(parse(&["hatchery", "check", "--socket", "/s"]).is_ok());
    let cli = parse(&["hatchery", "exec", "--socket", "/s", "blog", "--", "id"]).expect("exec");
    assert!(
        matches!(cli.command, Command::Exec { socket: Some(s), site, command } if s == Path::new("/s") && site == "blog" && command == ["id"])
    );
    // The agent starts its fd holder as `fd-holder --socket PATH`.
    let cli = parse(&["hatchery", "fd-holder", "--socket", "/h"]).expect("fd-holder");
    assert!(matches!(cli.command, Command::FdHolder { socket: Some(s) } if s == Path::new("/h")));
}

/// No hidden command is ever suggested for a mistyped one, while visible ones are.
#[test]
fn hidden_commands_are_never_suggested() {
    let attempt = |typed: &str| {
        let e = command()
            .try_get_matches_from(["hatchery", typed])
            .map(|_| ())
            .map_err(without_hidden_suggestions)
            .expect_err("not a command");
        e.render().to_string()
    };
    for name in hidden() {
        let chars: Vec<char> = name.chars().collect();
        let mut typos = vec![
            name[..name.len() - 1].to_string(),
            format!("{name}x"),
            name.trim_start_matches('_').to_string(),
        ];
        // Two neighbouring letters swapped.
        let mut swapped = chars.clone();
        swapped.swap(chars.len() - 2, chars.len() - 3);
        typos.push(swapped.into_iter().collect());
        for typo in typos
            .into_iter()
            .filter(|t| command().find_subcommand(t).is_none())
        {
            let said = attempt(&typo);
            for h in hidden() {
                assert!(!said.contains(&format!("'{h}'")), "{typo}: {said}");
            }
        }
    }
    assert!(
        attempt("stauts").contains("'status'"),
        "{}",
        attempt("stauts")
    );
    assert_eq!(
        attempt("fd-holde"),
        "error: unrecognized subcommand 'fd-holde'\n\nUsage: hatchery [OPTIONS] <COMMAND>\n\n\
         For more information, try '--help'.\n"
    );
}

/// Completion scripts and man pages leave the hidden commands and options out and have
/// every visible one.
#[test]
fn completions_and_man_pages_leave_hidden_commands_out() {
    let cmd = command();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // `docs::visible` keeps the subcommands as they are.
        assert!(
            sub.get_arguments().all(|a| !a.is_hide_set()),
            "{}",
            sub.get_name()
        );
        assert!(
            sub.get_subcommands().all(|s| !s.is_hide_set()),
            "{}",
            sub.get_name()
        );
    }
    let visible = cli::docs::visible(&cmd);
    assert!(visible.get_subcommands().all(|s| !s.is_hide_set()));
    assert!(visible.get_arguments().all(|a| !a.is_hide_set()));
    assert_eq!(
        visible.get_subcommands().count(),
        cmd.get_subcommands().count() - hidden().len()
    );
    for shell in [
        cli::docs::Shell::Bash,
        cli::docs::Shell::Zsh,
        cli::docs::Shell::Fish,
    ] {
        let mut out = Vec::new();
        cli::docs::completions(&cmd, shell, &mut out);
        let script = String::from_utf8(out).expect("utf-8");
        let words: std::collections::BTreeSet<&str> = script
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .collect();
        for h in hidden() {
            assert!(!words.contains(h.as_str()), "{shell:?} offers {h}");
        }
        for v in ["status", "deploy", "completions", "events"] {
            assert!(words.contains(v), "{shell:?} lacks {v}");
        }
        assert!(
            !script.contains("fd-holder") && !script.contains("__probe"),
            "{shell:?}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pages = cli::docs::man_pages(command(), dir.path()).expect("man pages");
    let names: Vec<String> = pages
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(String::from))
        .collect();
    assert!(names.contains(&"hatchery.1".to_string()));
    assert!(names.contains(&"hatchery-status.1".to_string()));
    assert_eq!(
        names.len(),
        1 + visible.get_subcommands().count(),
        "{names:?}"
    );
    for h in hidden() {
        assert!(!names.iter().any(|n| n.contains(&h)), "{names:?}");
    }
    let top = std::fs::read_to_string(dir.path().join("hatchery.1")).expect("read");
    for h in hidden().iter().filter(|h| *h != "man") {
        assert!(!top.contains(h.as_str()), "hatchery.1 names {h}");
    }
    assert!(!top.contains("hatchery\\-man"), "hatchery.1 names man");
    let options = top
        .split(".SH OPTIONS")
        .nth(1)
        .and_then(|o| o.split(".SH").next())
        .unwrap_or_default();
    assert!(options.contains("\\-\\-help"), "{top}");
    assert!(
        !options.contains("\\-\\-socket"),
        "hatchery.1 lists --socket"
    );
    assert!(
        top.contains(".SH EXAMPLES") && top.contains(".SH EXIT CODES"),
        "{top}"
    );
    let status = std::fs::read_to_string(dir.path().join("hatchery-status.1")).expect("read");
    assert!(
        status.contains("\\-\\-socket") && status.contains(".SH EXAMPLES"),
        "{status}"
    );
}

/// `--host` is an option of the top level for the commands that run on an agent (and
/// `check`, which checks that host's configuration), refused with the command's name for
/// those that run here; a bad value is a usage error naming the form.
#[test]
fn host_is_taken_by_the_commands_that_run_on_an_agent_only() {
    use clap::FromArgMatches as _;
    let parse = |args: &[&str]| {
        command()
            .try_get_matches_from(args)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                let cli = Cli::from_arg_matches(&m).map_err(|e| e.to_string())?;
                match misplaced_host(&m, &cli) {
                    Some(e) => Err(e.to_string()),
                    None => Ok(cli),
                }
            })
    };
    for sub in [
        &["status"][..],
        &["deploy", "blog"],
        &["exec", "blog", "--", "id"],
        &["top"],
        &["logs", "blog", "-f"],
        &["check"],
        &["upgrade"],
    ] {
        let mut args = vec!["hatchery", "--host", "ssh://deploy@web1:2222"];
        args.extend_from_slice(sub);
        let cli = parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(
            cli.host.map(|h| h.to_string()).as_deref(),
            Some("ssh://deploy@web1:2222")
        );
        assert!(cli.command.remote_session().is_some(), "{args:?}");
    }
    for (sub, name) in [
        (&["agent"][..], "agent"),
        (&["demo"], "demo"),
        (&["completions", "bash"], "completions"),
        (&["man", "--out", "/tmp/m"], "man"),
        (&["fd-holder", "--socket", "/h"], "fd-holder"),
    ] {
        let mut args = vec!["hatchery", "--host", "ssh://web1"];
        args.extend_from_slice(sub);
        let e = parse(&args).expect_err("refused");
        assert!(
            e.contains(&format!("--host is not an option of `hatchery {name}`")),
            "{args:?}: {e}"
        );
    }
    let e = parse(&["hatchery", "--host", "web1", "status"]).expect_err("refused");
    assert!(e.contains("ssh://[USER@]HOST[:PORT]"), "{e}");
    // An option of the top level: shown there, as the command's own options are not.
    let top = command().render_long_help().to_string();
    assert!(top.contains("--host <ssh://[USER@]HOST[:PORT]>"), "{top}");
}

#[test]
fn json_is_asked_before_a_double_dash_only() {
    let asked = |args: &[&str]| json_asked(args.iter().map(std::ffi::OsString::from));
    assert!(asked(&["scale", "web", "abc", "--json"]));
    assert!(asked(&["--json", "status"]));
    assert!(!asked(&["status"]));
    assert!(!asked(&["exec", "web", "--", "tool", "--json"]));
    assert!(!asked(&["scale", "web", "--jsonx"]));
}

#[test]
fn top_refuses_a_delay_it_would_not_keep() {
    for ok in ["0.2", "1", "60"] {
        assert!(top_delay(ok).is_ok(), "{ok}");
    }
    for bad in ["0.1", "0", "60.5", "-1", "x", "NaN", "inf"] {
        let e = top_delay(bad).expect_err(bad);
        assert!(e.contains("0.2 to 60"), "{e}");
    }
    let e = Cli::try_parse_from(["hatchery", "top", "-d", "0.1"]).expect_err("refused");
    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
}

//! The "Examples:" sections of `hatchery --help` and of its main commands' `--help` (and of
//! their man pages, which print them as they are).
//!
//! Each example is one line that starts with `hatchery` (or with `VAR=value hatchery`),
//! may be followed by `| ...` or `> ...`, and has its explanation on the `#` line above it.
//! A unit test in `main.rs` parses every example line with the CLI's own definition, so an
//! example that stops being a valid command fails the build's tests.

/// `hatchery --help`.
pub const TOP: &str = "\
Examples:
  # Try it: an agent with a demo site of 4 workers on http://127.0.0.1:8080/
  hatchery demo
  # Every site with its state; then one site with its workers
  hatchery status
  hatchery status blog
  # Deploy the release the site's symlink points at (exit 4 if it was rolled back)
  hatchery deploy blog
  # Follow a site's output
  hatchery logs blog -f
  # Talk to an agent on another socket, such as the one `hatchery demo` prints
  hatchery status --socket /tmp/hatchery-demo-4242/control.sock
  HATCHERY_SOCKET=/tmp/hatchery-demo-4242/control.sock hatchery status
  # The same against another host's agent, through ssh (as the SSH user)
  hatchery --host ssh://deploy@web1 status blog
  # Shell completions
  hatchery completions bash > /etc/bash_completion.d/hatchery

Exit codes:
  0  ok
  1  refused or failed (not allowed, no such site, the operation failed)
  2  usage or configuration error
  3  the agent is unreachable
  4  the deploy was rolled back";

/// `hatchery agent --help`.
pub const AGENT: &str = "\
Examples:
  # The agent with the default configuration, /etc/hatchery/hatchery.toml
  hatchery agent
  # Another configuration, with the agent's debug lines on stderr
  HATCHERY_LOG=debug hatchery agent --config ./hatchery.toml
  # The epoll event loop instead of io_uring
  HATCHERY_REACTOR=epoll hatchery agent --config ./hatchery.toml";

/// `hatchery check --help`.
pub const CHECK: &str = "\
Examples:
  # A configuration before the agent runs it: every site file, every default filled in
  hatchery check --config ./hatchery.toml
  # Only the problems, for a script
  hatchery check --config ./hatchery.toml --json | jq .problems";

/// `hatchery status --help`.
pub const STATUS: &str = "\
Examples:
  # Every site: state, generation, workers ready
  hatchery status
  # One site with its workers: pid, state, restarts, uptime, last exit
  hatchery status blog
  # The names and states of every site, for a script
  hatchery status --json | jq '.sites[] | {name, state}'";

/// `hatchery deploy --help`.
pub const DEPLOY: &str = "\
Examples:
  # The release the site's `release` symlink points at now
  hatchery deploy blog
  # A release directory of your choice
  hatchery deploy blog --release /srv/blog/releases/v42
  # A canary with 10% of new connections; then `promote` or `rollback`
  hatchery deploy blog --canary 10%
  hatchery promote blog";

/// `hatchery scale --help`.
pub const SCALE: &str = "\
Examples:
  # Eight workers (a site that follows its load keeps 8 until `scale auto`)
  hatchery scale blog 8
  # Let the site's `workers = \"auto\"` policy decide again
  hatchery scale blog auto";

/// `hatchery signal --help`.
pub const SIGNAL: &str = "\
Examples:
  # Ask every worker to reopen its logs (or whatever SIGHUP means to it)
  hatchery signal blog HUP
  hatchery signal blog SIGUSR1";

/// `hatchery logs --help`.
pub const LOGS: &str = "\
Examples:
  # The last 20 lines of the site's log
  hatchery logs blog
  # The last 200 lines (from the rotated files too), then every new line
  hatchery logs blog -n 200 -f
  # One JSON object per line
  hatchery logs blog --json";

/// `hatchery events --help`.
pub const EVENTS: &str = "\
Examples:
  # The last 20 events of every site you may see
  hatchery events
  # What happened to one site in the last 10 minutes
  hatchery events blog --since 10m -n 1000
  # Since a UTC time
  hatchery events blog --since 2026-11-22T14:41:08Z
  # Every new event as it happens, one JSON object per line
  hatchery events -f --json";

/// `hatchery top --help`.
pub const TOP_VIEW: &str = "\
Examples:
  # Every site, refreshed every second (`?` lists the keys, `q` quits)
  hatchery top
  # One site's generations and workers, twice a second
  hatchery top blog -d 0.5
  # One snapshot as JSON (without a terminal, one snapshot as text)
  hatchery top --json";

/// `hatchery exec --help`.
pub const EXEC: &str = "\
Examples:
  # The site user's shell, in the site's sandbox
  hatchery exec blog
  # Who a worker runs as, and what it sees
  hatchery exec blog -- id
  hatchery exec blog -- ls -la /tmp";

/// `hatchery reload --help`.
pub const RELOAD: &str = "\
Examples:
  # After editing a site file: added sites start, removed ones stop, changed ones restart
  hatchery reload";

/// `hatchery completions --help`.
pub const COMPLETIONS: &str = "\
Examples:
  # bash (bash-completion loads it from there)
  hatchery completions bash > /etc/bash_completion.d/hatchery
  # zsh: a file named _hatchery in a directory of $fpath
  hatchery completions zsh > /usr/local/share/zsh/site-functions/_hatchery
  # fish
  hatchery completions fish > ~/.config/fish/completions/hatchery.fish";

/// Every example section, by the command it belongs to (`None`: `hatchery` itself).
#[cfg(test)]
pub const ALL: &[(Option<&str>, &str)] = &[
    (None, TOP),
    (Some("agent"), AGENT),
    (Some("check"), CHECK),
    (Some("status"), STATUS),
    (Some("deploy"), DEPLOY),
    (Some("scale"), SCALE),
    (Some("signal"), SIGNAL),
    (Some("logs"), LOGS),
    (Some("events"), EVENTS),
    (Some("top"), TOP_VIEW),
    (Some("exec"), EXEC),
    (Some("reload"), RELOAD),
    (Some("completions"), COMPLETIONS),
];

/// The example command lines of a section: each line that runs `hatchery`, as its words
/// from `hatchery` on, without a leading `VAR=value` and without what follows a `|` or `>`
/// (quotes are only used after those).
#[cfg(test)]
pub fn example_commands(section: &str) -> Vec<Vec<String>> {
    section
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let command = l.split(['|', '>']).next().unwrap_or(l);
            let words: Vec<&str> = command.split_whitespace().collect();
            let start = words.iter().position(|w| *w == "hatchery")?;
            words[..start]
                .iter()
                .all(|w| w.contains('='))
                .then(|| words[start..].iter().map(|w| w.to_string()).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_lines_are_found_with_their_words() {
        let found = example_commands(
            "Examples:\n  # a comment naming hatchery status\n  HATCHERY_LOG=debug hatchery agent\n  hatchery status --json | jq '.sites[] | {name}'\n  hatchery completions bash > /tmp/x\n",
        );
        assert_eq!(
            found,
            vec![
                vec!["hatchery", "agent"],
                vec!["hatchery", "status", "--json"],
                vec!["hatchery", "completions", "bash"],
            ]
        );
    }
}

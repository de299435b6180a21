//! `hatchery`: the agent (`hatchery agent`) and the CLI that controls it.
//!
//! Exit codes: 0 ok; 1 refused or failed (not allowed, no such site, the operation
//! failed; for `upgrade`: refused, or the new binary failed and the previous one resumed);
//! 2 usage or configuration error; 3 agent unreachable (for `upgrade`: the connection was
//! lost, the agent may have exited); 4 deploy rolled back.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::render::printable;
use hatchery::control::{Client, ErrorKind, Reply, Request};
use hatchery::event::Agent;
use std::collections::BTreeMap;

use hatchery::status::{CheckReport, Problem, ProblemKind, SandboxCheck};
use hatchery::{config, demo, features};

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_ROLLED_BACK: u8 = 4;
const DEFAULT_SOCKET: &str = "/run/hatchery/control.sock";

#[derive(Parser, Debug)]
#[command(
    name = "hatchery",
    about = "A kernel-assisted process supervisor for hosting many web sites on one Linux host",
    after_help = cli::help::TOP
)]
struct Cli {
    /// `--socket` before the command (`hatchery --socket PATH status`), as it was once
    /// written: hidden, and refused for a command without the option of its own.
    #[arg(long, hide = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// `--json` before the command: hidden, and refused as `socket` is.
    #[arg(long, hide = true)]
    json: bool,
    /// Run the command against another host's agent, through ssh, as the SSH user
    /// (default: $HATCHERY_HOST). Paths in the command are the remote host's.
    #[arg(long, value_name = "ssh://[USER@]HOST[:PORT]")]
    host: Option<cli::remote::Host>,
    #[command(subcommand)]
    command: Command,
}

/// The options of the commands that talk to the agent.
#[derive(clap::Args, Debug, Default, Clone)]
struct ClientArgs {
    /// Control socket of the agent (default: $HATCHERY_SOCKET, else /run/hatchery/control.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON instead of text: one document, or one object per line for what streams
    /// (progress, log lines, events).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    #[command(after_help = cli::help::AGENT)]
    Agent {
        /// The agent configuration file.
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration, print it with every default, and report kernel features.
    #[command(after_help = cli::help::CHECK)]
    Check {
        /// The agent configuration file (default: the running agent's, asked on the
        /// control socket, else /etc/hatchery/hatchery.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Control socket of the agent asked for its configuration file when --config is
        /// not given (default: $HATCHERY_SOCKET, else /run/hatchery/control.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the report as one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Print nothing but the problems (on stderr), as a unit's ExecStartPre wants.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Run an agent with a built-in demo site (4 workers on 127.0.0.1:8080).
    Demo {
        /// Address the demo site listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Number of workers.
        #[arg(long, default_value_t = 4)]
        workers: u32,
    },
    /// Show sites and workers.
    #[command(after_help = cli::help::STATUS)]
    Status {
        /// Only this site (with its workers).
        site: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a site (also clears `failed`); waits until its workers are ready.
    Start {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop every worker of a site; waits until they have exited.
    Stop {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Restart a site's workers one at a time; waits until done.
    Restart {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change the number of workers; waits until they are running and ready.
    #[command(after_help = cli::help::SCALE)]
    Scale {
        /// The site.
        site: String,
        /// The new number of workers (pins a site that follows its load), or `auto` (its
        /// `workers = "auto"` policy decides again).
        workers: hatchery::control::ScaleTo,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send a signal to every worker of a site.
    #[command(after_help = cli::help::SIGNAL)]
    Signal {
        /// The site.
        site: String,
        /// The signal: HUP, SIGUSR1, 10, ...
        signal: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A live full-screen view of every site (`?` lists the keys); without a terminal,
    /// one snapshot as text (`--json`: as JSON).
    #[command(after_help = cli::help::TOP_VIEW)]
    Top {
        /// Open on this site's view (its generations and workers).
        site: Option<String>,
        /// Seconds between snapshots (0.2 to 60).
        #[arg(
            short = 'd',
            long = "delay",
            default_value_t = 1.0,
            value_name = "SECONDS",
            value_parser = top_delay
        )]
        delay: f64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a site's worker output (a stderr line is marked `!` after its writer:
    /// `w-1[4242]! …`; `--json`: one object per line, with `stream`).
    #[command(after_help = cli::help::LOGS)]
    Logs {
        /// The site.
        site: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many past lines.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show what happened: workers started, ready, exited and why, restarts, deploy
    /// steps, scales, reloads, operators' requests (one line each; `--json`: one JSON
    /// object per line). Without SITE, every site the caller may see.
    #[command(after_help = cli::help::EVENTS)]
    Events {
        /// Only this site.
        site: Option<String>,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// Only events since this long ago (`30s`, `10m`, `2h`) or this UTC time
        /// (`2026-11-22T14:41:08Z`).
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// How many past events (at most).
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a site at runtime: the file (named <site>.toml) is validated, written into the
    /// agent's sites_dir and started; an invalid file or a taken name changes nothing.
    /// Root and the agent's user only.
    Add {
        /// The site file.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a site at runtime: stops its workers (waits until they have exited),
    /// deletes its file from sites_dir and forgets it. Root and the agent's user only.
    Remove {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-read the configuration (like SIGHUP); a bad file changes nothing.
    #[command(after_help = cli::help::RELOAD)]
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deploy a new generation from the release symlink's target; waits until the old
    /// generation has retired (exit 4 if the new one was rolled back).
    #[command(after_help = cli::help::DEPLOY)]
    Deploy {
        /// The site.
        site: String,
        /// Deploy this release directory instead of the symlink's target.
        #[arg(long, value_name = "DIR")]
        release: Option<PathBuf>,
        /// Deploy a canary: the new generation starts with this share of the workers and
        /// takes this share of new connections beside the serving one (e.g. `10%`);
        /// returns once it serves. Finish with `promote`, abort with `rollback`.
        #[arg(long, value_name = "PERCENT", value_parser = parse_share)]
        canary: Option<hatchery::supervisor::deploy::Share>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Promote a site's canary: it grows to full size and takes every new connection;
    /// waits until the old generation has retired.
    Promote {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll back the deploy under way (a canary too), or deploy the previous release.
    Rollback {
        /// The site.
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a command in a site's sandbox (its user, root, Landlock, cgroup and limits),
    /// on a new terminal when stdin is one; without CMD, the site user's shell. Exits with
    /// the command's status (128 + N when killed by signal N).
    #[command(after_help = cli::help::EXEC)]
    Exec {
        /// Control socket of the agent (default: $HATCHERY_SOCKET, else
        /// /run/hatchery/control.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The site.
        site: String,
        /// The command and its arguments (after `--` if they start with `-`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Replace the agent's binary in place: same pid, every worker kept running. The new
    /// binary is checked first (it must load the configuration and read the agent's
    /// record); root and the agent's user only; refused while a deploy is under way.
    Upgrade {
        /// The new binary (default: the path the agent runs from, e.g. rebuilt in place).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the shell completion script for bash, zsh or fish (hidden commands left out).
    #[command(after_help = cli::help::COMPLETIONS)]
    Completions {
        /// The shell.
        shell: cli::docs::Shell,
    },
    /// Write the man pages, generated from this command line's definition: hatchery.1 and
    /// hatchery-COMMAND.1 for each command (for packages; `man -l DIR/hatchery.1` reads one).
    #[command(name = "man", hide = true)]
    Man {
        /// The directory to write them in (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// What `upgrade` asks of a new binary: load the configuration, print the version and
    /// the record format read, as one JSON line.
    #[command(name = "__upgrade-check", hide = true)]
    UpgradeCheck {
        /// The agent configuration file.
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The demo site's worker (used by `hatchery demo`).
    #[command(name = "__demo-worker", hide = true)]
    DemoWorker {
        /// Options: --delay-ms N, --behaviour-from DIR.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo zygote (zygote mode's test double): --load-ms N, --load-mib M,
    /// --ready-when PATH, --worker-alloc-mib K, then the demo worker's options for the
    /// workers it forks.
    #[command(name = "__demo-zygote", hide = true)]
    DemoZygote {
        /// Options: --load-ms N, --load-mib M, --ready-when PATH, --worker-alloc-mib K,
        /// then the demo worker's options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A probe worker for tests and diagnostics: info | alloc SIZE | spawn-forever | sleep.
    #[command(name = "__probe", hide = true)]
    Probe {
        /// The mode and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The fd holder: keeps fds by name across the agent's death, at the socket given by
    /// `--socket` (started by the agent).
    #[command(name = "fd-holder", hide = true)]
    FdHolder {
        /// The holder's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

impl Command {
    /// The `--socket` and `--json` of a command that talks to the agent.
    fn client_args(&self) -> Option<&ClientArgs> {
        match self {
            Command::Status { client, .. }
            | Command::Start { client, .. }
            | Command::Stop { client, .. }
            | Command::Restart { client, .. }
            | Command::Scale { client, .. }
            | Command::Signal { client, .. }
            | Command::Top { client, .. }
            | Command::Logs { client, .. }
            | Command::Events { client, .. }
            | Command::Reload { client }
            | Command::Add { client, .. }
            | Command::Remove { client, .. }
            | Command::Deploy { client, .. }
            | Command::Promote { client, .. }
            | Command::Rollback { client, .. }
            | Command::Upgrade { client, .. } => Some(client),
            Command::Agent { .. }
            | Command::Check { .. }
            | Command::Demo { .. }
            | Command::Exec { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::UpgradeCheck { .. }
            | Command::DemoWorker { .. }
            | Command::DemoZygote { .. }
            | Command::Probe { .. }
            | Command::FdHolder { .. } => None,
        }
    }
}

impl Command {
    /// How the command runs with `--host`: what its ssh session needs, or `None` when it
    /// makes no sense on another host (it runs or serves something here, or prints what
    /// this binary knows).
    fn remote_session(&self) -> Option<cli::remote::Session> {
        use cli::remote::Session;
        match self {
            Command::Exec { .. } => Some(Session::Exec),
            Command::Top { .. } => Some(Session::Top),
            Command::Status { .. }
            | Command::Start { .. }
            | Command::Stop { .. }
            | Command::Restart { .. }
            | Command::Scale { .. }
            | Command::Signal { .. }
            | Command::Logs { .. }
            | Command::Events { .. }
            | Command::Reload { .. }
            | Command::Deploy { .. }
            | Command::Promote { .. }
            | Command::Rollback { .. }
            | Command::Upgrade { .. }
            | Command::Add { .. }
            | Command::Remove { .. }
            | Command::Check { .. } => Some(Session::NoInput),
            Command::Agent { .. }
            | Command::Demo { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::UpgradeCheck { .. }
            | Command::DemoWorker { .. }
            | Command::DemoZygote { .. }
            | Command::Probe { .. }
            | Command::FdHolder { .. } => None,
        }
    }
}

/// `--host` given for a command that runs here (`hatchery --host ssh://web1 agent`):
/// refused, naming the command. (`$HATCHERY_HOST` is left alone for those.)
fn misplaced_host(matches: &clap::ArgMatches, cli: &Cli) -> Option<clap::Error> {
    if cli.host.is_none() || cli.command.remote_session().is_some() {
        return None;
    }
    let name = matches.subcommand_name().unwrap_or("?");
    Some(command().error(
        clap::error::ErrorKind::ArgumentConflict,
        format!(
            "--host is not an option of `hatchery {name}`: it runs on this host (run it on the other one, e.g. `ssh HOST hatchery {name}`)"
        ),
    ))
}

/// Clap's "a similar subcommand exists" tip can name a hidden subcommand (`fd-holder`,
/// `__probe`, `man`): the tip keeps only the visible ones (and goes when none is left), so
/// hidden ones are never suggested.
fn without_hidden_suggestions(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let cmd = command();
    let hidden = |name: &str| {
        cmd.get_subcommands()
            .any(|s| s.is_hide_set() && s.get_name() == name)
    };
    let suggested = match e.get(ContextKind::SuggestedSubcommand) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => return e,
    };
    let visible: Vec<String> = suggested.into_iter().filter(|s| !hidden(s)).collect();
    e.remove(ContextKind::SuggestedSubcommand);
    if !visible.is_empty() {
        e.insert(
            ContextKind::SuggestedSubcommand,
            ContextValue::Strings(visible),
        );
    } else if matches!(e.get(ContextKind::Suggested), Some(ContextValue::StyledStrs(v)) if v.is_empty())
    {
        // Without any tip left, an empty list of other tips would print a blank line.
        e.remove(ContextKind::Suggested);
    }
    e
}

/// The command line's definition, with this build's version: what is parsed, and what
/// completions and man pages are generated from.
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().version(hatchery::version())
}

/// `--socket` or `--json` given before a command that has no such option of its own
/// (`hatchery --socket PATH agent`): refused as clap refuses an unknown option.
fn misplaced_option(matches: &clap::ArgMatches) -> Option<clap::Error> {
    use clap::parser::ValueSource;
    let (name, _) = matches.subcommand()?;
    let mut cmd = command();
    let sub = cmd.find_subcommand(name)?;
    let misplaced = ["socket", "json"].into_iter().find(|id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
            && !sub.get_arguments().any(|a| a.get_id() == *id)
    })?;
    Some(cmd.error(
        clap::error::ErrorKind::UnknownArgument,
        format!("--{misplaced} is not an option of `hatchery {name}`"),
    ))
}

/// The agent's control socket: the one given, else `$HATCHERY_SOCKET`, else the default.
fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("HATCHERY_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// `top --delay`: seconds between snapshots, 0.2 to 60 (what the agent sends at).
fn top_delay(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.2..=60.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "use a number of seconds from 0.2 to 60 (got {text:?})"
        )),
    }
}

/// Whether the command line `args` (without the program) asks for `--json`, before any
/// `--` (what follows it is a command's own).
fn json_asked(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.take_while(|a| a != "--").any(|a| a == "--json")
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let parsed = command().try_get_matches().and_then(|m| {
        if let Some(e) = misplaced_option(&m) {
            return Err(e);
        }
        let cli = Cli::from_arg_matches(&m)?;
        if let Some(e) = misplaced_host(&m, &cli) {
            return Err(e);
        }
        Ok(cli)
    });
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let e = without_hidden_suggestions(e);
            if e.use_stderr() && json_asked(std::env::args_os().skip(1)) {
                // Scripts get the refusal in the shape of every other one.
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or_default();
                let why = first.strip_prefix("error: ").unwrap_or(first);
                println!("{}", cli::reply::error_json("usage", why));
            }
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    if let Some(code) = remote(&cli) {
        return code;
    }
    match cli.command {
        Command::Agent { config } => run_agent(&config),
        Command::Check {
            config,
            socket,
            json,
            quiet,
        } => {
            quiet_on_closed_stdout();
            let config =
                config.unwrap_or_else(|| running_config(&socket_path(socket.or(cli.socket))));
            check(&config, json || cli.json, quiet)
        }
        Command::Completions { shell } => {
            quiet_on_closed_stdout();
            let mut out = Vec::new();
            cli::docs::completions(&command(), shell, &mut out);
            say(&String::from_utf8_lossy(&out));
            ExitCode::SUCCESS
        }
        Command::Man { out } => match cli::docs::man_pages(command(), &out) {
            Ok(pages) => {
                for page in pages {
                    say(&format!("{}\n", page.display()));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err(&format!(
                    "hatchery: failed to write the man pages in {}: {e}",
                    out.display()
                ));
                ExitCode::from(EXIT_REFUSED)
            }
        },
        Command::Demo { listen, workers } => run_demo(listen, workers),
        Command::UpgradeCheck { config } => match config::load_each(&config) {
            Ok(_) => {
                let check = hatchery::control::UpgradeCheck {
                    version: hatchery::version().to_string(),
                    record_version: hatchery::event::RECORD_VERSION,
                    cgroup_lock: true,
                };
                println!("{}", serde_json::to_string(&check).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hatchery: invalid configuration: {e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::DemoWorker { args } => match demo::worker_main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo worker: {e}");
                ExitCode::from(1)
            }
        },
        Command::DemoZygote { args } => match demo::zygote_main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo zygote: {e}");
                ExitCode::from(1)
            }
        },
        Command::Probe { args } => ExitCode::from(hatchery::probe::main(&args)),
        Command::FdHolder { socket } => {
            let Some(socket) = socket.or(cli.socket) else {
                eprintln!("hatchery fd-holder: --socket PATH is required");
                return ExitCode::from(EXIT_USAGE);
            };
            match hatchery::fdholder::serve(&socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hatchery fd-holder: {:#}", anyhow::Error::new(e));
                    ExitCode::from(EXIT_REFUSED)
                }
            }
        }
        Command::Top {
            site,
            delay,
            client,
        } => top(
            socket_path(client.socket.or(cli.socket)),
            site,
            delay,
            client.json || cli.json,
        ),
        Command::Exec {
            socket,
            site,
            command,
        } => exec(&socket_path(socket.or(cli.socket)), &site, command),
        command => {
            quiet_on_closed_stdout();
            let given = command.client_args().cloned().unwrap_or_default();
            let socket = socket_path(given.socket.or(cli.socket));
            client(&socket, command, given.json || cli.json)
        }
    }
}

/// With `--host` (or `$HATCHERY_HOST`), a command that makes sense there runs on the
/// other host through ssh: its exit code, or `None` to run the command here.
fn remote(cli: &Cli) -> Option<ExitCode> {
    let session = cli.command.remote_session()?;
    let host = match &cli.host {
        Some(h) => h.clone(),
        None => {
            let value = std::env::var("HATCHERY_HOST")
                .ok()
                .filter(|v| !v.is_empty())?;
            match value.parse::<cli::remote::Host>() {
                Ok(h) => h,
                Err(e) => {
                    say_err(&format!("hatchery: HATCHERY_HOST={value:?}: {e}"));
                    return Some(ExitCode::from(EXIT_USAGE));
                }
            }
        }
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let args = cli::remote::args_without_host(&args);
    match cli::remote::run(&host, &args, session) {
        cli::remote::Ended::Code(code) => Some(ExitCode::from(code)),
        cli::remote::Ended::Unreachable(message) => {
            let json = cli.json
                || cli.command.client_args().is_some_and(|c| c.json)
                || matches!(cli.command, Command::Check { json: true, .. });
            if json {
                println!("{}", cli::reply::error_json("unreachable", &message));
            }
            say_err(&format!("hatchery: {message}"));
            Some(ExitCode::from(EXIT_UNREACHABLE))
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HATCHERY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    hatchery::logs::AgentStderr::setup();
    // Colour only for a person at a terminal: a file, a pipe or the journal gets plain
    // text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Lines about one worker each are folded when they come by the thousand (a mass
    // kill): the first few, then one summary (`event::fold`).
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Under systemd, with stderr connected to the journal: entries with their fields.
    if let Some(journal) = hatchery::journal::Journal::for_stderr() {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(hatchery::event::fold::LogFold::agent().layer())
            .with(journal)
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(hatchery::logs::AgentStderr)
        .log_internal_errors(false)
        .with_target(false)
        .finish()
        .with(hatchery::event::fold::LogFold::agent().layer())
        .try_init();
}

fn print_error(e: &anyhow::Error) {
    say_err(&format!("hatchery: {e:#}"));
}

/// Writes a line to stderr; a stderr that cannot be written is not worth a panic.
fn say_err(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{}", printable(line));
}

/// Writes to stdout; a closed stdout ends the CLI (see `quiet_on_closed_stdout`).
fn say(text: &str) {
    use std::io::Write as _;
    let _ = write!(std::io::stdout(), "{text}");
}

/// The CLI's output goes to pipes (`| head`): like any Unix tool, it ends quietly (killed
/// by `SIGPIPE`) when the reader is gone, instead of failing a write (Rust's runtime
/// ignores `SIGPIPE`, and `println!` panics on the error).
fn quiet_on_closed_stdout() {
    let _ = hatchery::process::set_default_disposition(libc::SIGPIPE);
}

fn run_agent(path: &std::path::Path) -> ExitCode {
    init_tracing();
    if hatchery::keeper::wanted() {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return ExitCode::from(hatchery::keeper::run(&args));
    }
    let agent = match Agent::new(path) {
        Ok(a) => a,
        Err(e) => {
            let code = if matches!(e, hatchery::event::AgentError::Config(_)) {
                EXIT_USAGE
            } else {
                EXIT_REFUSED
            };
            print_error(&anyhow::Error::new(e));
            return ExitCode::from(code);
        }
    };
    match agent.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&anyhow::Error::new(e));
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// The agent file of the agent answering on `socket`; the default file, said on stderr,
/// when none answers.
fn running_config(socket: &std::path::Path) -> PathBuf {
    let asked = Client::connect(socket).and_then(|mut c| c.call(&Request::ConfigPath, |_| {}));
    let why = match asked {
        Ok(Reply::Ok(v)) => match serde_json::from_value::<hatchery::control::ConfigPath>(v) {
            Ok(c) => {
                say_err(&format!(
                    "hatchery: checking the running agent's configuration, {}",
                    c.path.display()
                ));
                return c.path;
            }
            Err(e) => format!("its answer was not understood ({e})"),
        },
        Ok(Reply::Error(e)) => format!("it refused: {}", e.message),
        Ok(_) => "it gave no answer".to_string(),
        Err(e) => e.to_string(),
    };
    say_err(&format!(
        "hatchery: no agent answered on {} ({why}); checking {}",
        socket.display(),
        config::DEFAULT_CONFIG
    ));
    PathBuf::from(config::DEFAULT_CONFIG)
}

fn check(path: &std::path::Path, json: bool, quiet: bool) -> ExitCode {
    let (config, broken) = match config::load_each(path) {
        Ok(c) => c,
        Err(e) => {
            if json {
                let out = CheckReport {
                    valid: false,
                    problems: e.all().map(|p| Problem::of_file("-", p)).collect(),
                    sites: Vec::new(),
                    features: Vec::new(),
                    sandbox: Default::default(),
                    limits_not_enforced: Default::default(),
                };
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
            say_err(&format!("hatchery: invalid configuration: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Every problem at once: invalid files, then what this host would refuse.
    let mut invalid: Vec<(String, String)> = broken
        .iter()
        .flat_map(|b| b.error.all().map(|e| (b.name.clone(), e.one())))
        .collect();
    // The same, with their file, line and key apart, for --json.
    let file_problems: Vec<Problem> = broken
        .iter()
        .flat_map(|b| b.error.all().map(|e| Problem::of_file(&b.name, e)))
        .collect();
    let agent = hatchery::event::running_agent(&config.control_socket);
    let mut refused: Vec<(String, String)> = Vec::new();
    for site in &config.sites {
        let site_now = match &site.release {
            Some(link) => match config::resolve_release(link) {
                Ok(r) => site.for_release(&r),
                Err(e) => {
                    refused.push((site.name.to_string(), format!("release: {e}")));
                    continue;
                }
            },
            None => site.clone(),
        };
        if let Err(e) = hatchery::spawn::check_command(&site_now) {
            invalid.push((
                site.name.to_string(),
                format!("{}: command: {e}", site.file.display()),
            ));
        }
        for l in &site.listen {
            if let Some(why) = address_taken(&l.addr, agent) {
                refused.push((site.name.to_string(), format!("listen: {why}")));
            }
        }
    }
    let mut report = features::probe_kernel();
    let mount = hatchery::cgroup::cgroup2_mount();
    let offered = mount
        .as_ref()
        .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
        .unwrap_or_default();
    // With cgroups off, the agent uses no controller, whatever the mount offers.
    let cgroups_off = config.cgroup_base == config::CgroupBase::Off;
    let offered: Vec<&str> = if cgroups_off {
        Vec::new()
    } else {
        offered.split_whitespace().collect()
    };
    let lacking: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| !offered.contains(c))
        .collect();
    let cgroup = match &mount {
        Some(m) if offered.is_empty() => features::Feature::off(
            "cgroup v2",
            format!(
                "mounted at {} without controllers: no memory, pids or cpu accounting",
                m.display()
            ),
        ),
        Some(m) if lacking.is_empty() => features::Feature::on(
            "cgroup v2",
            format!("{} offers: {}", m.display(), offered.join(" ")),
        ),
        Some(m) => features::Feature::off(
            "cgroup v2",
            format!(
                "{} offers: {}; not {}: no accounting or limits by {}",
                m.display(),
                offered.join(" "),
                lacking.join(", "),
                if lacking.len() == 1 { "it" } else { "them" }
            ),
        ),
        None => features::Feature::off(
            "cgroup v2",
            "not mounted: no accounting, limits or cgroup placement",
        ),
    };
    report.push(cgroup);
    let limits_not_enforced: BTreeMap<String, Vec<String>> = config
        .sites
        .iter()
        .map(|s| {
            let keys = s.limits.needing(&offered);
            (
                s.name.to_string(),
                keys.into_iter().map(String::from).collect::<Vec<_>>(),
            )
        })
        .filter(|(_, keys)| !keys.is_empty())
        .collect();
    report.push(features::steering(&hatchery::steering::probe()));
    let sandboxes = sandbox_reports(&config);
    for (site, v) in &sandboxes {
        if let SandboxCheck::Refused { refused: why } = v {
            refused.push((site.clone(), why.clone()));
        }
    }
    let problems = invalid
        .iter()
        .skip(file_problems.len())
        .map(|(s, m)| (s, ProblemKind::Invalid, m))
        .chain(refused.iter().map(|(s, m)| (s, ProblemKind::Refused, m)))
        .map(|(site, kind, message)| Problem {
            site: site.clone(),
            kind,
            file: None,
            line: None,
            key: None,
            message: message.clone(),
        });
    let problems: Vec<Problem> = file_problems.into_iter().chain(problems).collect();
    if json {
        let out = CheckReport {
            valid: invalid.is_empty(),
            problems,
            sites: config
                .sites
                .iter()
                .map(|s| s.effective.raw().clone())
                .collect(),
            features: report,
            sandbox: sandboxes,
            limits_not_enforced,
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else if !quiet {
        if invalid.is_empty() {
            println!("configuration is valid: {} site(s)\n", config.sites.len());
        } else {
            println!(
                "configuration is NOT valid: {} problem(s) in the site files, see the end\n",
                invalid.len()
            );
        }
        print!("{}", config.effective_toml());
        println!("\nkernel features:");
        print!("{}", features::render(&report));
        println!("\nsandbox:");
        for (site, v) in &sandboxes {
            match v {
                SandboxCheck::Refused { refused: why } => println!("  {site}: REFUSED: {why}"),
                SandboxCheck::Prepared(p) => {
                    for line in &p.enforced {
                        println!("  {site}: [yes] {line}");
                    }
                    for line in &p.not_enforced {
                        println!("  {site}: [NO ] {line}");
                    }
                }
            }
        }
        if !limits_not_enforced.is_empty() {
            println!("\nlimits:");
            for (site, keys) in &limits_not_enforced {
                let mut controllers: Vec<&str> = keys
                    .iter()
                    .map(|k| match k.as_str() {
                        "pids_max" => "pids",
                        "cpu_weight" => "cpu",
                        _ => "memory",
                    })
                    .collect();
                controllers.dedup();
                let why = match &mount {
                    _ if cgroups_off => "cgroup_base = \"off\"".to_string(),
                    None => "no cgroup v2 mount".to_string(),
                    Some(_) => format!(
                        "the cgroup v2 mount offers no {} controller",
                        controllers.join(", ")
                    ),
                };
                println!(
                    "  {site}: [NO ] {}: not enforced here ({why})",
                    keys.join(", ")
                );
            }
        }
        if !problems.is_empty() {
            println!("\nproblems:");
            for (site, m) in invalid.iter().chain(&refused) {
                println!("  {site}: {}", printable(m));
            }
        }
    }
    for (site, m) in invalid.iter().chain(&refused) {
        say_err(&format!("hatchery: {site}: {m}"));
    }
    if !invalid.is_empty() {
        ExitCode::from(EXIT_USAGE)
    } else if !refused.is_empty() {
        ExitCode::from(EXIT_REFUSED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Why `addr` cannot be bound by a site now, if it cannot: another process listens on it
/// (the running agent, `agent`, and its workers do not count).
fn address_taken(addr: &config::ListenAddr, agent: Option<u32>) -> Option<String> {
    match addr {
        config::ListenAddr::Tcp(a) => {
            let holders = hatchery::net::tcp_holder_pids(*a);
            let ours =
                |pid: &u32| agent.is_some_and(|ag| *pid == ag || parent_of(*pid) == Some(ag));
            if holders.is_empty() || holders.iter().any(ours) {
                return None;
            }
            Some(format!(
                "{a}: address in use by {}",
                hatchery::net::describe_pid(holders[0])
            ))
        }
        config::ListenAddr::Unix(path) => {
            let accepting = std::os::unix::net::UnixStream::connect(path).is_ok();
            (accepting && agent.is_none()).then(|| {
                format!(
                    "{}: a unix socket another process accepts on",
                    path.display()
                )
            })
        }
    }
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What each site's sandbox enforces on this host, or why it would be refused.
fn sandbox_reports(config: &config::AgentConfig) -> BTreeMap<String, SandboxCheck> {
    let root = rustix::process::geteuid().is_root();
    config
        .sites
        .iter()
        .map(|site| {
            let v = match hatchery::sandbox::prepare(site, root) {
                Ok(p) => SandboxCheck::Prepared(p.status()),
                Err(why) => SandboxCheck::Refused {
                    refused: why.to_string(),
                },
            };
            (site.name.to_string(), v)
        })
        .collect()
}

fn run_demo(listen: std::net::SocketAddr, workers: u32) -> ExitCode {
    init_tracing();
    let dir = std::env::temp_dir().join(format!("hatchery-demo-{}", std::process::id()));
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("hatchery: cannot find my own executable: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    // After `hatchery upgrade` this is the same agent, and its workers hold the port.
    let upgrading = std::env::var_os("HATCHERY_UPGRADE").is_some();
    if let Err(e) = std::net::TcpListener::bind(listen)
        .map(drop)
        .or_else(|e| if upgrading { Ok(()) } else { Err(e) })
    {
        eprintln!(
            "hatchery: {listen} is not available ({e}); pick another with --listen 127.0.0.1:PORT"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let path = match demo::write_config(&dir, &exe, listen, workers) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "hatchery: cannot write the demo configuration in {}: {e}",
                dir.display()
            );
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let socket = dir.join("control.sock");
    let me = exe.display();
    say(&format!(
        "Hatchery demo: {workers} workers serving http://{listen}/ (state in {dir})\n\
         Try, in another terminal:\n\
         \x20 curl http://{listen}/\n\
         \x20 export HATCHERY_SOCKET={socket}\n\
         \x20 {me} status demo\n\
         \x20 {me} restart demo\n\
         \x20 {me} deploy demo     (a new generation beside the old, then the flip)\n\
         \x20 {me} logs demo -f\n\
         Press Ctrl-C to stop.\n\n",
        dir = dir.display(),
        socket = socket.display(),
    ));
    let code = run_agent(&path);
    let _ = std::fs::remove_dir_all(&dir);
    code
}

fn client(socket: &std::path::Path, command: Command, json: bool) -> ExitCode {
    let request = match command {
        Command::Status { site, .. } => Request::Status { site },
        Command::Start { site, .. } => Request::Start { site },
        Command::Stop { site, .. } => Request::Stop { site },
        Command::Restart { site, .. } => Request::Restart { site },
        Command::Scale { site, workers, .. } => Request::Scale { site, workers },
        Command::Signal { site, signal, .. } => Request::Signal { site, signal },
        Command::Logs {
            site,
            follow,
            lines,
            ..
        } => Request::Logs {
            site,
            lines,
            follow,
        },
        Command::Events {
            site,
            follow,
            since,
            lines,
            ..
        } => {
            let since = match since
                .map(|s| {
                    hatchery::event::history::since_timestamp(&s, std::time::SystemTime::now())
                })
                .transpose()
            {
                Ok(s) => s,
                Err(why) => {
                    if json {
                        println!("{}", cli::reply::error_json("usage", &why.to_string()));
                    }
                    say_err(&format!("hatchery: {why}"));
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            Request::Events {
                site,
                lines,
                follow,
                since,
            }
        }
        Command::Reload { .. } => Request::Reload,
        Command::Add { file, .. } => {
            // The agent's working directory is not the caller's.
            let file = std::path::absolute(&file).unwrap_or(file);
            match std::fs::read_to_string(&file) {
                Ok(text) => Request::Add {
                    file: file.display().to_string(),
                    text,
                },
                Err(e) => {
                    let why = format!("cannot read {}: {e}", file.display());
                    if json {
                        println!("{}", cli::reply::error_json("usage", &why));
                    }
                    say_err(&format!("hatchery: {why}"));
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        Command::Remove { site, .. } => Request::Remove { site },
        Command::Upgrade { binary, .. } => Request::Upgrade {
            // The agent's working directory is not the caller's.
            binary: binary
                .map(|b| std::path::absolute(&b).unwrap_or(b))
                .map(|b| b.display().to_string()),
        },
        Command::Deploy {
            site,
            release,
            canary,
            ..
        } => Request::Deploy {
            site,
            // The agent's working directory is not the caller's.
            release: release
                .map(|r| std::path::absolute(&r).unwrap_or(r))
                .map(|r| r.display().to_string()),
            canary: canary.map(|c| c.to_string()),
        },
        Command::Promote { site, .. } => Request::Promote { site },
        Command::Rollback { site, .. } => Request::Rollback { site },
        Command::Agent { .. }
        | Command::Check { .. }
        | Command::Demo { .. }
        | Command::DemoWorker { .. }
        | Command::DemoZygote { .. }
        | Command::FdHolder { .. }
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::UpgradeCheck { .. }
        | Command::Exec { .. }
        | Command::Top { .. }
        | Command::Probe { .. } => {
            unreachable!("handled in main")
        }
    };
    use cli::reply::JsonShape;
    let mut conn = match Client::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot reach the agent at {}: {e}", socket.display());
            if json {
                println!("{}", cli::reply::error_json("unreachable", &message));
            }
            say_err(&format!("hatchery: {message}"));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let is_status = matches!(request, Request::Status { .. });
    let is_events = matches!(request, Request::Events { .. });
    let is_logs = matches!(request, Request::Logs { .. });
    // One document for an answer alone; JSON lines where lines come before it.
    let shape = match request {
        Request::Status { .. } | Request::Signal { .. } | Request::Reload => JsonShape::Document,
        _ => JsonShape::Lines,
    };
    let mut progress = cli::render::Progress::default();
    let result = conn.call(&request, |r| match r {
        Reply::Line(l) if is_events && !json => println!("{}", printable(&cli::events::text(l))),
        // Each entry of the history is already one JSON object.
        Reply::Line(l) if is_events => println!("{}", printable(l)),
        Reply::Line(l) if is_logs && json => println!("{}", cli::reply::log_line_json(l)),
        Reply::Line(l) => println!("{}", printable(l)),
        Reply::Event(e) if !json => {
            for line in progress.line(std::time::Instant::now(), e) {
                say_err(&format!("  {line}"));
            }
        }
        Reply::Event(e) => println!("{}", cli::reply::progress_json(e)),
        _ => {}
    });
    for line in progress.finish() {
        say_err(&format!("  {line}"));
    }
    match result {
        // The end of a stream: its lines said it all.
        Ok(Reply::Ok(_)) if is_events || (is_logs && json) => ExitCode::SUCCESS,
        Ok(Reply::Ok(value)) => {
            if json {
                println!("{}", cli::reply::json(&value, shape));
            } else if is_status {
                match serde_json::from_value::<hatchery::status::Status>(value) {
                    Ok(status) => print!("{}", printable(&cli::render::status(&status))),
                    Err(e) => {
                        say_err(&format!("hatchery: an answer this CLI cannot read: {e}"));
                        return ExitCode::from(EXIT_REFUSED);
                    }
                }
            } else if let Some(sentence) = cli::reply::sentence(&value) {
                println!("{}", printable(&sentence));
            } else if !is_logs {
                // An answer this CLI does not know (from a newer agent): as it came.
                println!("{}", printable(&value.to_string()));
            }
            ExitCode::SUCCESS
        }
        Ok(Reply::Error(err)) => {
            if json {
                println!("{}", serde_json::json!({ "error": err }));
            }
            say_err(&format!("hatchery: {}", err.message));
            ExitCode::from(match err.kind {
                ErrorKind::BadRequest | ErrorKind::Config => EXIT_USAGE,
                ErrorKind::RolledBack => EXIT_ROLLED_BACK,
                _ => EXIT_REFUSED,
            })
        }
        Ok(_) => ExitCode::from(EXIT_REFUSED),
        Err(e) => {
            let message = format!("lost the connection to the agent: {e}");
            if json {
                println!("{}", cli::reply::error_json("unreachable", &message));
            }
            say_err(&format!("hatchery: {message}"));
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// `hatchery exec`: the command's exit code, or ours (1 refused, 2 bad request, 3
/// unreachable).
fn exec(socket: &std::path::Path, site: &str, command: Vec<String>) -> ExitCode {
    use hatchery::terminal::{self, ExecError};
    let req = terminal::request(site, command);
    match terminal::run(socket, &req) {
        Ok(code) => ExitCode::from(code),
        Err(ExecError::Unreachable { path, source }) => {
            eprintln!("hatchery: cannot reach the agent at {path}: {source}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
        Err(ExecError::Refused { kind, message }) => {
            eprintln!("hatchery: {message}");
            ExitCode::from(match kind {
                ErrorKind::BadRequest | ErrorKind::Config => EXIT_USAGE,
                _ => EXIT_REFUSED,
            })
        }
        Err(ExecError::Io(e)) => {
            eprintln!("hatchery: exec failed: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// `hatchery top`: 0 when quit (or one snapshot printed), 1 refused, 2 bad request, 3
/// unreachable.
fn top(socket: PathBuf, site: Option<String>, delay: f64, json: bool) -> ExitCode {
    use cli::top::{Options, TopError};
    // The agent holds it within its bounds (0.2 to 60 s).
    let interval_ms = std::time::Duration::try_from_secs_f64(delay.clamp(0.0, 3600.0))
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(1000);
    let opts = Options {
        socket,
        site,
        interval_ms,
        json,
    };
    let result = cli::top::run(&opts);
    // With --json, a failure is a JSON document on stdout too.
    if json {
        let error = match &result {
            Ok(()) => None,
            Err(TopError::Unreachable { path, source }) => Some(cli::reply::error_json(
                "unreachable",
                &format!("cannot reach the agent at {path}: {source}"),
            )),
            Err(TopError::Refused(e)) => Some(serde_json::json!({ "error": e }).to_string()),
            Err(e) => {
                let mut message = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    message.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                Some(cli::reply::error_json("failed", &message))
            }
        };
        if let Some(error) = error {
            println!("{error}");
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(TopError::Unreachable { path, source }) => {
            say_err(&format!(
                "hatchery: cannot reach the agent at {path}: {source}"
            ));
            ExitCode::from(EXIT_UNREACHABLE)
        }
        // The terminal was given back; as a shell reports a process a signal ended.
        Err(TopError::Signalled(signal)) => {
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(u8::MAX))
        }
        Err(TopError::Refused(e)) => {
            say_err(&format!("hatchery: {}", e.message));
            ExitCode::from(match e.kind {
                ErrorKind::BadRequest | ErrorKind::Config => EXIT_USAGE,
                _ => EXIT_REFUSED,
            })
        }
        Err(e) => {
            print_error(&anyhow::Error::new(e));
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// `--canary`: a percentage above 0 and below 100.
fn parse_share(s: &str) -> Result<hatchery::supervisor::deploy::Share, String> {
    s.parse()
}

/// Tests of the command line's definition (kept beside the CLI's other parts).
#[cfg(test)]
#[path = "cli/main_tests.rs"]
mod tests;

//! The control protocol, and a client for it: what `hatchery` itself uses, for programs
//! that embed it (see `examples/status.rs`; other languages: the README's "Control
//! protocol" section and `tests/clients/hatchery_client.py`).
//!
//! # Framing
//!
//! A unix stream socket (the agent file's `control_socket`, `$HATCHERY_SOCKET` for the
//! CLI). One request per connection: the client writes one JSON object and a newline (at
//! most [`MAX_REQUEST`] bytes, within 5 s of connecting); the agent answers with zero or
//! more progress lines and one final line, each one JSON object and a newline, then
//! closes the connection:
//!
//! ```text
//! → {"cmd":"restart","site":"blog"}
//! ← {"event":"w-0 stopping"}
//! ← {"event":"w-0 ready (pid 4242)"}
//! ← {"ok":{"site":"blog","message":"restarted 1 worker"}}
//! ```
//!
//! A line is one of [`Reply`]: `{"event":"..."}` (progress, for people),
//! `{"line":"..."}` (a log line or an event-history entry), `{"snapshot":{...}}` (a
//! [`Snapshot`], `watch` only), and the final `{"ok":VALUE}` or
//! `{"error":{"kind":KIND,"message":"..."}}`, where `KIND` is one of [`ErrorKind`]
//! (`refused`, `not_found`, `bad_request`, `config`, `failed`, `rolled_back`). `logs` with
//! `follow`, `events` with `follow` and `watch` stream until the client hangs up.
//!
//! # Versioning
//!
//! [`PROTOCOL_VERSION`] is this protocol's version; the agent says the one it speaks in
//! every `status` answer (`agent.protocol`; [`Client::protocol`]). Within a version,
//! changes are additive only: new requests, new optional request fields (an agent refuses
//! fields it does not know with `bad_request`), new fields in answers (clients ignore
//! fields they do not know). Anything else (a field renamed, removed or retyped, another
//! framing) raises the version.
//!
//! # Authorization
//!
//! The agent identifies the peer with `SO_PEERCRED`: root (and the agent's own user) may
//! do everything, a site's user only what concerns that site (`add` and `remove`
//! excepted), anyone else nothing (`{"error":{"kind":"refused",...}}`).
//!
//! # Requests and their answers
//!
//! Each request is a [`Request`], tagged by `cmd`; fields in brackets are optional.
//!
//! | request | final `ok` value |
//! |---|---|
//! | `{"cmd":"status"[,"site":"blog"]}` | a [`crate::status::Status`]: `{"agent":{"pid":1,"version":"0.1.0","protocol":1,...},"sites":[{"name":"blog","state":"running","desired":4,"ready":4,...}]}` |
//! | `{"cmd":"start","site":"blog"}`, `stop`, `restart`, `promote`, `rollback` | a [`Done`]: `{"site":"blog","message":"..."}`, after progress events |
//! | `{"cmd":"scale","site":"blog","workers":4}` (or `"workers":"auto"`) | a [`Done`] |
//! | `{"cmd":"signal","site":"blog","signal":"HUP"}` | a [`Signalled`]: `{"site":"blog","signal":"SIGHUP","workers":4}` |
//! | `{"cmd":"logs","site":"blog"[,"lines":20][,"follow":true]}` | `{"line":"..."}` lines, then a [`LogsEnded`] (without `follow`) |
//! | `{"cmd":"events"[,"site":"blog"][,"lines":20][,"follow":true][,"since":"2026-11-22T14:41:08Z"]}` | `{"line":"<entry JSON>"}` lines, then a final `ok` (without `follow`) |
//! | `{"cmd":"reload"}` | a [`Reloaded`]: `{"added":[],"changed":["blog"],"removed":[]}` |
//! | `{"cmd":"deploy","site":"blog"[,"release":"/srv/blog/releases/42"][,"canary":"10%"]}` | a [`Done`] with `generation`, `release`, `retired`, `duration_ms`; `rolled_back` if it failed |
//! | `{"cmd":"add","file":"/root/shop.toml","text":"name = \"shop\"\n..."}` | a [`Done`]: `{"site":"shop","message":"added as /etc/hatchery/sites.d/shop.toml"}` |
//! | `{"cmd":"remove","site":"shop"}` | a [`Done`]: `{"site":"shop","message":"site removed"}`, once its workers have exited |
//! | `{"cmd":"upgrade"[,"binary":"/usr/sbin/hatchery"]}` | an [`Upgraded`] |
//! | `{"cmd":"watch"[,"site":"blog"][,"interval_ms":1000]}` | `{"snapshot":{...}}` lines until the client hangs up |
//! | `{"cmd":"exec","site":"blog",...}` | file descriptors over `SCM_RIGHTS`, then an [`ExecEnded`] (see [`Request::Exec`]; not offered by [`Client`]) |
//!
//! # The client
//!
//! [`Client::connect`] opens a connection; each typed method ([`Client::status`],
//! [`Client::scale`], [`Client::deploy`], [`Client::logs`], ...) sends one request on it,
//! consumes it, and returns the typed answer or a [`ClientError`] (the agent's
//! [`ErrorReply`] among them). Progress events and log lines go to a callback.
//!
//! ```no_run
//! use hatchery::control::{Client, ScaleTo};
//!
//! let socket = std::path::Path::new("/run/hatchery/control.sock");
//! let status = Client::connect(socket)?.status(None)?;
//! for site in &status.sites {
//!     println!("{} {} {}/{}", site.name, site.state.name(), site.ready, site.desired);
//! }
//! let done = Client::connect(socket)?.scale("blog", ScaleTo::Count(4), |e| eprintln!("{e}"))?;
//! println!("{}: {}", done.site, done.message);
//! # Ok::<(), hatchery::control::ClientError>(())
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `scale` asks for: a count (which pins a site that follows its load), or
/// `"auto"` (its policy decides again). On the wire, a number or the string `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireScaleTo", into = "WireScaleTo")]
pub enum ScaleTo {
    /// This many workers.
    Count(u32),
    /// The site's `workers = "auto"` policy.
    Auto,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireScaleTo {
    Count(u32),
    Word(String),
}

impl TryFrom<WireScaleTo> for ScaleTo {
    type Error = String;
    fn try_from(w: WireScaleTo) -> Result<ScaleTo, String> {
        match w {
            WireScaleTo::Count(n) => Ok(ScaleTo::Count(n)),
            WireScaleTo::Word(w) if w == "auto" => Ok(ScaleTo::Auto),
            WireScaleTo::Word(w) => Err(format!("invalid workers {w:?}: use a number or \"auto\"")),
        }
    }
}

impl From<ScaleTo> for WireScaleTo {
    fn from(s: ScaleTo) -> WireScaleTo {
        match s {
            ScaleTo::Count(n) => WireScaleTo::Count(n),
            ScaleTo::Auto => WireScaleTo::Word("auto".into()),
        }
    }
}

impl std::str::FromStr for ScaleTo {
    type Err = String;
    fn from_str(s: &str) -> Result<ScaleTo, String> {
        if s == "auto" {
            return Ok(ScaleTo::Auto);
        }
        s.parse().map(ScaleTo::Count).map_err(|_| {
            format!("invalid workers {s:?}: use a number, or auto (let the site's workers = \"auto\" policy decide again)")
        })
    }
}

/// The version of the control protocol this build speaks (see the module's doc).
pub const PROTOCOL_VERSION: u32 = 1;

/// The protocol of an agent whose `status` does not say: the first.
pub fn first_protocol() -> u32 {
    1
}

/// Largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Most concurrent control connections.
pub const MAX_CONNECTIONS: usize = 64;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Everything, or one site.
    Status {
        /// The site, or all.
        #[serde(default)]
        site: Option<String>,
    },
    /// Start a site (clears `failed`).
    Start {
        /// The site.
        site: String,
    },
    /// Stop every worker of a site.
    Stop {
        /// The site.
        site: String,
    },
    /// Restart a site's workers one at a time.
    Restart {
        /// The site.
        site: String,
    },
    /// Run `workers` workers (`"auto"`: let an automatic site's policy decide again).
    Scale {
        /// The site.
        site: String,
        /// How many.
        workers: ScaleTo,
    },
    /// Send a signal to every worker of a site.
    Signal {
        /// The site.
        site: String,
        /// `SIGHUP`, `HUP` or a number.
        signal: String,
    },
    /// The site's log: the last `lines`, then new ones if `follow`.
    Logs {
        /// The site.
        site: String,
        /// How many past lines.
        #[serde(default = "default_lines")]
        lines: usize,
        /// Keep streaming.
        #[serde(default)]
        follow: bool,
    },
    /// The event history (`hatchery events`): the last `lines` entries (of `site`, or of
    /// every site the caller may see), at or after `since` (a UTC time), then new ones if
    /// `follow`. Each entry is a `{"line":"<JSON object>"}` (see
    /// [`crate::event::history::Entry`]).
    Events {
        /// Only this site's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        site: Option<String>,
        /// How many past entries.
        #[serde(default = "default_lines")]
        lines: usize,
        /// Keep streaming.
        #[serde(default)]
        follow: bool,
        /// Only entries at or after this UTC time (`2026-11-22T14:41:08Z`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    /// Re-read the configuration.
    Reload,
    /// The path of the agent file the agent runs from (`hatchery check` without
    /// `--config`): answered with a [`ConfigPath`].
    ConfigPath,
    /// Start a new generation from the release symlink's target (or `release`), flip to
    /// it once ready, drain the old one.
    Deploy {
        /// The site.
        site: String,
        /// A release directory to deploy instead of the symlink's target.
        #[serde(default)]
        release: Option<String>,
        /// Deploy as a canary taking this share of new connections (`"10%"`) until
        /// `promote` or `rollback`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<String>,
    },
    /// Promote the canary: the new generation grows to full size and is flipped to.
    Promote {
        /// The site.
        site: String,
    },
    /// Roll back the deploy under way, or deploy the previous release.
    Rollback {
        /// The site.
        site: String,
    },
    /// Run a command in the site's sandbox (`hatchery exec`); the agent answers with the
    /// event `started pid N` carrying the command's terminal master (or its stdin/stdout
    /// socket and stderr pipe) as `SCM_RIGHTS`, then `{"ok":{"exit_code":N}}`.
    Exec {
        /// The site.
        site: String,
        /// The argv; empty for the site user's shell.
        #[serde(default)]
        command: Vec<String>,
        /// On a new pseudo-terminal (else a socket and a pipe).
        #[serde(default)]
        tty: bool,
        /// Terminal rows.
        #[serde(default)]
        rows: u16,
        /// Terminal columns.
        #[serde(default)]
        cols: u16,
        /// `TERM` for the command.
        #[serde(default)]
        term: Option<String>,
    },
    /// Replace the agent's binary in place (`hatchery upgrade`): same pid, every worker
    /// kept. Root and the agent's user only.
    Upgrade {
        /// The new binary (absolute); the agent's own path if absent.
        #[serde(default)]
        binary: Option<String>,
    },
    /// Subscribe to snapshots (`hatchery top`): one [`Snapshot`] at once, then one every
    /// `interval_ms` (held within [`WATCH_INTERVAL_MS`]), pushed by the agent until the
    /// client hangs up. Without `site`: every site the caller may see, without their
    /// workers (each site's [`SiteSummary`] instead); with `site`: that site and its
    /// workers.
    Watch {
        /// Milliseconds between snapshots.
        #[serde(default = "default_watch_interval")]
        interval_ms: u64,
        /// One site, with its workers.
        #[serde(default)]
        site: Option<String>,
    },
    /// Add a site at runtime (`hatchery add FILE`): `text` is the site file's content,
    /// validated as the configuration loader does (`file`, the path the client read it
    /// from, names it in error messages; it must be called `<name>.toml`), refused if a
    /// site of that name exists; the agent writes it into its `sites_dir` as
    /// `<name>.toml` and starts it as a reload would. Root and the agent's user only: the
    /// file names the user the site runs as. Answers a [`Done`].
    Add {
        /// The path the file was read from (absolute), for messages.
        file: String,
        /// The site file's text.
        text: String,
    },
    /// Remove a site at runtime (`hatchery remove SITE`): its workers are stopped (the
    /// answer comes once they have exited), its file is deleted from `sites_dir`, and the
    /// agent forgets it. Root and the agent's user only. Answers a [`Done`].
    Remove {
        /// The site.
        site: String,
    },
}

/// The fewest and most milliseconds between two `watch` snapshots: a client asking for
/// less or more gets the bound.
pub const WATCH_INTERVAL_MS: std::ops::RangeInclusive<u64> = 200..=60_000;

fn default_watch_interval() -> u64 {
    1000
}

fn default_lines() -> usize {
    20
}

impl Request {
    /// The site a request concerns, if one.
    pub fn site(&self) -> Option<&str> {
        match self {
            Request::Status { site }
            | Request::Events { site, .. }
            | Request::Watch { site, .. } => site.as_deref(),
            Request::Start { site }
            | Request::Stop { site }
            | Request::Restart { site }
            | Request::Scale { site, .. }
            | Request::Signal { site, .. }
            | Request::Logs { site, .. }
            | Request::Deploy { site, .. }
            | Request::Rollback { site }
            | Request::Promote { site }
            | Request::Exec { site, .. } => Some(site),
            Request::Remove { site } => Some(site),
            Request::Reload | Request::Upgrade { .. } | Request::ConfigPath => None,
            Request::Add { .. } => None,
        }
    }
}

/// The answer to [`Request::ConfigPath`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPath {
    /// The agent file, absolute.
    pub path: PathBuf,
}

/// An operation on a site that went through (`start`, `stop`, `restart`, `scale`,
/// `deploy`, `rollback`): which site, what happened in words, and for deploys the
/// generations involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The site.
    pub site: String,
    /// What happened, for people.
    pub message: String,
    /// The generation that serves now (deploys and rollbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// Its release (deploys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<std::path::PathBuf>,
    /// The generation that was retired (deploys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<u32>,
    /// The canary's generation (`deploy --canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    /// How long the deploy took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl Done {
    /// `site` did what `message` says.
    pub fn new(site: impl std::fmt::Display, message: impl Into<String>) -> Done {
        Done {
            site: site.to_string(),
            message: message.into(),
            generation: None,
            release: None,
            retired: None,
            canary: None,
            duration_ms: None,
        }
    }
}

/// The answer to `signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signalled {
    /// The site.
    pub site: String,
    /// The signal's name.
    pub signal: String,
    /// How many workers it was sent to.
    pub workers: u32,
}

/// The end of `logs` (without `follow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsEnded {
    /// The site.
    pub site: String,
    /// Its log file.
    pub log: std::path::PathBuf,
}

/// The answer to `reload`: the sites by what happened to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reloaded {
    /// Started.
    pub added: Vec<String>,
    /// Changed (restarted, or only scaled).
    pub changed: Vec<String>,
    /// Stopped and removed.
    pub removed: Vec<String>,
}

/// The answer to `upgrade`, from the new binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    /// What happened, for people.
    pub message: String,
    /// The version before.
    pub from: String,
    /// The version now.
    pub to: String,
    /// The agent's pid (unchanged).
    pub pid: u32,
    /// Workers kept running across the upgrade.
    pub workers: u32,
}

/// What `hatchery __upgrade-check` prints: the binary's version and the record format it
/// reads (it loaded the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeCheck {
    /// [`crate::version`].
    pub version: String,
    /// The format of the record of live workers it reads.
    pub record_version: u32,
    /// Whether it takes the cgroup base's lock from the agent it replaces (absent from
    /// older binaries' answers: they know no such lock, and run without one).
    #[serde(default)]
    pub cgroup_lock: bool,
}

/// The end of `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnded {
    /// The command's exit code (128 + N when signal N ended it).
    pub exit_code: i32,
}

/// One line of `watch`: the status now, as `status` would answer it (filtered by the
/// caller's authorization the same way), and what the overview shows of each site's
/// workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The agent's `CLOCK_MONOTONIC` when it was taken, in milliseconds: rates (CPU %)
    /// are differences between two snapshots over the difference of this.
    pub monotonic_ms: u64,
    /// The milliseconds between snapshots the agent keeps to (the request's, bounded).
    pub interval_ms: u64,
    /// The status. Without a site in the request, its sites carry no `workers`.
    pub status: crate::status::Status,
    /// Per site (in the order of `status.sites`; a site that could not be started has
    /// none), its workers summed up.
    pub summaries: Vec<SiteSummary>,
}

/// A site's workers in a few numbers, for an overview that does not carry them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSummary {
    /// The site.
    pub site: String,
    /// Worker slots of every generation.
    pub workers: u32,
    /// Those with a process.
    pub live: u32,
    /// Those whose process said `BUSY=1`.
    pub busy: u32,
    /// Restarts after a crash, over every slot.
    pub restarts: u32,
    /// The last exit of the worker that exited most recently, as far as the agent can
    /// tell (the slot started again last): `w-3 exited with code 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not allowed for this peer.
    Refused,
    /// No such site.
    NotFound,
    /// Malformed or invalid request.
    BadRequest,
    /// The configuration is invalid.
    Config,
    /// The operation was attempted and failed.
    Failed,
    /// A deploy failed and was rolled back; the previous generation serves.
    RolledBack,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The kind.
    pub kind: ErrorKind,
    /// A message for people.
    pub message: String,
}

/// One line from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Progress.
    Event(String),
    /// A log line.
    Line(String),
    /// A `watch` snapshot.
    Snapshot(Box<Snapshot>),
    /// Success, with data (as a client reads it).
    Ok(serde_json::Value),
    /// Success, with data serialized already: what the agent sends (read back as
    /// [`Reply::Ok`]).
    #[serde(rename = "ok", skip_deserializing)]
    OkText(RawJson),
    /// Failure.
    Error(ErrorReply),
}

impl Reply {
    /// The reply as one wire line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("replies always serialize");
        v.push(b'\n');
        v
    }

    /// A success carrying `value` (one of the reply types: [`crate::status::Status`],
    /// [`Done`], ...), serialized at once: a `status` of 10,000 workers built as a
    /// `serde_json::Value` tree first took ~30 MB at its peak, which the agent's heap kept.
    pub fn ok(value: &impl Serialize) -> Reply {
        Reply::OkText(RawJson(
            serde_json::value::to_raw_value(value).expect("reply types always serialize"),
        ))
    }

    /// An error reply.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error(ErrorReply {
            kind,
            message: message.into(),
        })
    }
}

/// A JSON text, serialized already, sent as it is.
#[derive(Debug, Clone)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A client connection.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the agent's socket.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    /// Sends the request.
    pub fn send(&mut self, req: &Request) -> io::Result<()> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line)
    }

    /// Reads the next reply; `None` when the agent closed the connection.
    pub fn next_reply(&mut self) -> io::Result<Option<Reply>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Sends `req` and collects replies until the final one, calling `progress` for
    /// events and log lines.
    pub fn call(&mut self, req: &Request, mut progress: impl FnMut(&Reply)) -> io::Result<Reply> {
        self.send(req)?;
        loop {
            match self.next_reply()? {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection without an answer",
                    ));
                }
                Some(r @ (Reply::Ok(_) | Reply::OkText(_) | Reply::Error(_))) => return Ok(r),
                Some(r) => progress(&r),
            }
        }
    }

    /// Sends `req`, hands each progress event and line to `progress` (an event's text,
    /// or a line's), and reads the final answer as a `T`.
    pub fn request<T: serde::de::DeserializeOwned>(
        mut self,
        req: &Request,
        mut progress: impl FnMut(&str),
    ) -> Result<T, ClientError> {
        let reply = self.call(req, |r| match r {
            Reply::Event(e) | Reply::Line(e) => progress(e),
            Reply::Snapshot(_) | Reply::Ok(_) | Reply::OkText(_) | Reply::Error(_) => {}
        })?;
        let cannot_read = |e: serde_json::Error| {
            ClientError::Protocol(format!("an answer this client cannot read: {e}"))
        };
        match reply {
            Reply::Ok(value) => serde_json::from_value(value).map_err(cannot_read),
            Reply::OkText(text) => serde_json::from_str(text.get()).map_err(cannot_read),
            Reply::Error(e) => Err(ClientError::Agent(e)),
            other => Err(ClientError::Protocol(format!(
                "a final answer neither ok nor error: {other:?}"
            ))),
        }
    }

    /// `status`: every site the caller may see, or one (with its workers).
    pub fn status(self, site: Option<&str>) -> Result<crate::status::Status, ClientError> {
        let site = site.map(str::to_string);
        self.request(&Request::Status { site }, |_| {})
    }

    /// The control protocol the agent speaks (from its `status`): compare with
    /// [`PROTOCOL_VERSION`].
    pub fn protocol(self) -> Result<u32, ClientError> {
        Ok(self.status(None)?.agent.protocol)
    }

    /// `start`: once its workers are ready and settled.
    pub fn start(self, site: &str, progress: impl FnMut(&str)) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Start { site }, progress)
    }

    /// `stop`: once its workers have exited.
    pub fn stop(self, site: &str, progress: impl FnMut(&str)) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Stop { site }, progress)
    }

    /// `restart`: once every worker was replaced.
    pub fn restart(self, site: &str, progress: impl FnMut(&str)) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Restart { site }, progress)
    }

    /// `scale`: once the workers asked for are ready (or gone).
    pub fn scale(
        self,
        site: &str,
        workers: ScaleTo,
        progress: impl FnMut(&str),
    ) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Scale { site, workers }, progress)
    }

    /// `signal`: to every worker of the site.
    pub fn signal(self, site: &str, signal: &str) -> Result<Signalled, ClientError> {
        let (site, signal) = (site.to_string(), signal.to_string());
        self.request(&Request::Signal { site, signal }, |_| {})
    }

    /// `deploy`: of the release symlink's target, or of `release` (an absolute path), as
    /// a canary taking `canary` (`"10%"`) if given; once the old generation retired (or
    /// the canary serves). A rolled-back deploy is [`ClientError::Agent`] of kind
    /// [`ErrorKind::RolledBack`].
    pub fn deploy(
        self,
        site: &str,
        release: Option<&Path>,
        canary: Option<&str>,
        progress: impl FnMut(&str),
    ) -> Result<Done, ClientError> {
        let req = Request::Deploy {
            site: site.to_string(),
            release: release.map(|r| r.display().to_string()),
            canary: canary.map(str::to_string),
        };
        self.request(&req, progress)
    }

    /// `rollback`.
    pub fn rollback(self, site: &str, progress: impl FnMut(&str)) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Rollback { site }, progress)
    }

    /// `logs`: the last `lines` lines of the site's log, each to `on_line` as the log
    /// file has it ([`crate::logs::LogLine::parse`] reads one), then, with `follow`, new
    /// ones until the connection ends.
    pub fn logs(
        self,
        site: &str,
        lines: usize,
        follow: bool,
        on_line: impl FnMut(&str),
    ) -> Result<LogsEnded, ClientError> {
        let req = Request::Logs {
            site: site.to_string(),
            lines,
            follow,
        };
        self.request(&req, on_line)
    }

    /// `reload`: what changed.
    pub fn reload(self) -> Result<Reloaded, ClientError> {
        self.request(&Request::Reload, |_| {})
    }

    /// `add`: the site file at `file` (read here, named `<site>.toml`), added and started.
    pub fn add_site(self, file: &Path) -> Result<Done, ClientError> {
        let file = std::path::absolute(file)?;
        let text = std::fs::read_to_string(&file)?;
        let req = Request::Add {
            file: file.display().to_string(),
            text,
        };
        self.request(&req, |_| {})
    }

    /// `remove`: once the site's workers have exited and its file is gone.
    pub fn remove_site(self, site: &str) -> Result<Done, ClientError> {
        let site = site.to_string();
        self.request(&Request::Remove { site }, |_| {})
    }
}

/// Why a [`Client`] call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The agent could not be reached, or the connection broke.
    Io(io::Error),
    /// The agent refused or failed the request.
    Agent(ErrorReply),
    /// The agent's answer is not one this client reads (another protocol version?).
    Protocol(String),
}

impl ClientError {
    /// The agent's error kind, when the agent answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent(e) => Some(e.kind),
            ClientError::Io(_) | ClientError::Protocol(_) => None,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "cannot talk to the agent: {e}"),
            ClientError::Agent(e) => f.write_str(&e.message),
            ClientError::Protocol(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(e),
            ClientError::Agent(_) | ClientError::Protocol(_) => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_defaults() {
        let r: Request = serde_json::from_str(r#"{"cmd":"logs","site":"blog"}"#).expect("parse");
        assert_eq!(
            r,
            Request::Logs {
                site: "blog".into(),
                lines: 20,
                follow: false
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"scale","site":"a","workers":3}"#).expect("parse");
        assert_eq!(r.site(), Some("a"));
        let auto: Request =
            serde_json::from_str(r#"{"cmd":"scale","site":"a","workers":"auto"}"#).expect("parse");
        assert_eq!(
            auto,
            Request::Scale {
                site: "a".into(),
                workers: ScaleTo::Auto
            }
        );
        assert_eq!(
            serde_json::to_string(&auto).expect("ser"),
            r#"{"cmd":"scale","site":"a","workers":"auto"}"#
        );
        let e = serde_json::from_str::<Request>(r#"{"cmd":"scale","site":"a","workers":"lots"}"#)
            .expect_err("not a count");
        assert!(e.to_string().contains("a number or \"auto\""), "{e}");
        let text = serde_json::to_string(&Request::Reload).expect("ser");
        assert_eq!(text, r#"{"cmd":"reload"}"#);
        let watch: Request = serde_json::from_str(r#"{"cmd":"watch"}"#).expect("parse");
        assert_eq!(
            watch,
            Request::Watch {
                interval_ms: 1000,
                site: None
            }
        );
        let watch: Request =
            serde_json::from_str(r#"{"cmd":"watch","site":"a","interval_ms":250}"#).expect("parse");
        assert_eq!(watch.site(), Some("a"));
    }

    #[test]
    fn malformed_requests_are_refused_by_the_parser() {
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"scale","site":"a"}"#,
            r#"{"cmd":"scale","site":"a","workers":-1}"#,
            r#"{"cmd":"stop","site":"a","extra":1}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_are_single_lines() {
        let line = Reply::Line("a\nb".into()).to_line();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Reply = serde_json::from_slice(&line).expect("parse");
        assert_eq!(back, Reply::Line("a\nb".into()));
    }

    /// What the agent sends as text is what a client reads as a value.
    #[test]
    fn an_ok_sent_as_text_reads_back_as_its_value() {
        let done = Done {
            generation: Some(2),
            ..Done::new("blog", "line one\nline \"two\"")
        };
        let line = Reply::ok(&done).to_line();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Reply = serde_json::from_slice(&line).expect("parse");
        assert_eq!(
            back,
            Reply::Ok(serde_json::to_value(&done).expect("a value"))
        );
        assert!(
            line.starts_with(b"{\"ok\":{"),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }
}

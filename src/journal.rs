//! The agent's log in the systemd journal, with its fields: when the agent runs under
//! systemd with its stderr connected to the journal, each line is sent in journald's
//! native protocol instead, so `journalctl HATCHERY_SITE=blog` finds a site's lines and
//! `HATCHERY_WORKER`, `HATCHERY_PID`, `HATCHERY_GEN` (every field a line carries, upper
//! case, prefixed `HATCHERY_`) come with them.
//!
//! Whether stderr is the journal is told by systemd itself: `JOURNAL_STREAM` holds the
//! device and inode of the stream it connected to stderr, which are compared with fd 2
//! (so a child whose stderr was redirected does not take the journal for it). The
//! journal's socket is `/run/systemd/journal/socket` (`HATCHERY_JOURNAL_SOCKET` names
//! another one, as a container that mounts it elsewhere needs). When it cannot be
//! reached, the text goes to stderr as before.
//!
//! Like [`crate::logs::AgentStderr`], this never blocks the loop and never fails: the
//! datagram is sent with `MSG_DONTWAIT`, and one the journal cannot take now (its queue
//! is full: journald stalled or restarting) is dropped and counted in
//! [`crate::logs::AGENT_LOG_DROPPED`]. (This is why it is not `tracing-journald`: its
//! socket blocks, so a stalled journald would stall the agent.)
//!
//! The protocol (systemd.io, "Native Journal Protocol"): one datagram per entry, each
//! field `NAME=value\n`, or, for a value with a newline, `NAME\n`, its length as 64-bit
//! little endian, the value, `\n`.

use std::fmt::{self, Write as _};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};

use crate::logs::AGENT_LOG_DROPPED;

/// Where journald's native socket is.
const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";
/// The prefix of the fields a line carries.
const PREFIX: &str = "HATCHERY_";
/// The identifier `journalctl -t` selects.
const IDENTIFIER: &str = "hatchery";
/// The longest message sent whole; a longer one is cut (a datagram has a size limit, and
/// the agent's lines are short).
const MAX_MESSAGE: usize = 48 * 1024;

/// The agent's log as journal entries (a `tracing` layer).
#[derive(Debug)]
pub struct Journal {
    socket: OwnedFd,
    path: PathBuf,
}

impl Journal {
    /// The journal, when systemd connected the agent's stderr to it and its socket takes
    /// an (empty) entry; `None` otherwise.
    pub fn for_stderr() -> Option<Journal> {
        let stream = std::env::var("JOURNAL_STREAM").ok()?;
        if !stderr_is(&stream) {
            return None;
        }
        let path = std::env::var_os("HATCHERY_JOURNAL_SOCKET")
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        Journal::connect(path).ok()
    }

    /// Opens a socket to send entries to `path`, and checks that the journal is there by
    /// sending an empty datagram (which journald ignores).
    pub fn connect(path: PathBuf) -> std::io::Result<Journal> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let journal = Journal { socket, path };
        journal.send(&[])?;
        Ok(journal)
    }

    /// Sends one entry, without waiting.
    fn send(&self, entry: &[u8]) -> std::io::Result<()> {
        let addr = rustix::net::SocketAddrUnix::new(&self.path)?;
        rustix::net::sendto(
            &self.socket,
            entry,
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            &addr,
        )?;
        Ok(())
    }
}

/// Whether fd 2 is the stream `JOURNAL_STREAM` (`<device>:<inode>`) names.
fn stderr_is(stream: &str) -> bool {
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    rustix::fs::fstat(rustix::stdio::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// The syslog priority of a level (what `journalctl -p` filters on).
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Appends field `name` (already well formed) with `value`.
fn put(entry: &mut Vec<u8>, name: &str, value: &[u8]) {
    entry.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

/// `HATCHERY_` and the field's name in upper case, with anything but letters, digits and
/// `_` left out (journald drops fields with other names).
fn field_name(name: &str) -> String {
    let mut out = String::with_capacity(PREFIX.len() + name.len());
    out.push_str(PREFIX);
    out.extend(
        name.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .map(|c| c.to_ascii_uppercase()),
    );
    out
}

/// Builds the journal entry of one line.
fn entry_of(event: &Event<'_>) -> Vec<u8> {
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut entry = Vec::with_capacity(128 + fields.message.len());
    let mut message = fields.message;
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" [cut]");
    }
    put(&mut entry, "MESSAGE", message.as_bytes());
    put(
        &mut entry,
        "PRIORITY",
        priority(*event.metadata().level()).to_string().as_bytes(),
    );
    put(&mut entry, "SYSLOG_IDENTIFIER", IDENTIFIER.as_bytes());
    for (name, value) in &fields.others {
        put(&mut entry, name, value.as_bytes());
    }
    entry
}

/// A line's message and its other fields (named for the journal).
#[derive(Default)]
struct Fields {
    message: String,
    others: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.others
                .push((field_name(field.name()), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.others
                .push((field_name(field.name()), format!("{value:?}")));
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Journal {
    fn on_event(&self, event: &Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let entry = entry_of(event);
        if self.send(&entry).is_err() {
            AGENT_LOG_DROPPED.fetch_add(entry.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Reads one entry of the native protocol into its fields, in order (`None` when it is
/// malformed). The agent only writes entries; this is the reader its tests check them with.
pub fn parse(mut data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let end = data.iter().position(|&b| b == b'\n' || b == b'=')?;
        let name = String::from_utf8(data[..end].to_vec()).ok()?;
        let rest = &data[end + 1..];
        if data[end] == b'=' {
            let nl = rest.iter().position(|&b| b == b'\n')?;
            fields.push((name, rest[..nl].to_vec()));
            data = &rest[nl + 1..];
        } else {
            let len = usize::try_from(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)).ok()?;
            let value = rest.get(8..8 + len)?;
            if rest.get(8 + len) != Some(&b'\n') {
                return None;
            }
            fields.push((name, value.to_vec()));
            data = &rest[8 + len + 1..];
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests;

//! The output of a site's workers: two [`OutputSocket`]s per site, the sending end of one
//! the stdout of every worker (exec'd or forked by a zygote), of the other their stderr,
//! read by the agent, each chunk attributed to its writer by the pid the kernel attaches,
//! and each line to its stream by the socket it came through. (A zygote's workers have
//! the stdout socket as both: the zygote protocol passes one fd.) Two sockets per site
//! keep the agent at one fd per worker, its pidfd.
//!
//! - The pairs are made at the site's first spawn (or adoption) and handed to the fd
//!   holder under `log/<site>/recv` and `log/<site>/send` (stdout), `log/<site>/err-recv`
//!   and `log/<site>/err-send` (stderr), so that they outlive the agent: workers
//!   never get `SIGPIPE`, what they write while no agent runs waits in the socket (up to
//!   [`crate::logs::OUTPUT_BUFFER`]; a writer blocks beyond it), and the next agent, or
//!   the new image after `hatchery upgrade`, takes the pair back and reads on. The holder
//!   is told to drop it when the site is removed.
//! - A chunk from a worker's pid is that worker's (`w-<K>[<pid>]`). A chunk from another
//!   pid is from a process a worker started: it is attributed to the worker its cgroup leaf
//!   (`w-<K>`) or its line of parents (up to [`MAX_ANCESTORS`]) leads to, remembered until
//!   one of the site's workers exits, else written as `process[<pid>]`.
//! - Lines are split per worker, its processes' bytes joined in the order they came, as
//!   in the pipe each worker had before (a line is shown with the pid that began it); a
//!   process that is nobody's has lines of its own. When a worker exits, what it wrote is
//!   read first (all of it is in the socket by then), and its unfinished line written out.

use std::collections::HashMap;
use std::time::SystemTime;

use tracing::{debug, warn};

use super::reactor::Interest;
use super::{Agent, Source};
use crate::config::SiteName;
use crate::logs::{self, LineSplitter, LogMark, OutputSocket, StdStream, Writer};

/// How far up its parents a process is followed to find the worker it belongs to.
const MAX_ANCESTORS: usize = 8;
/// At most this many reads of one site's socket per wake-up (other sites and events go
/// on; the socket is polled again at once).
const READS_PER_WAKE: usize = 64;
/// The most one read takes.
const READ_BUFFER: usize = 65536;
/// At most this many processes that are not workers are remembered per site.
const MAX_REMEMBERED: usize = 4096;

/// A site's output socket and what the agent keeps about its writers.
#[derive(Debug)]
pub(super) struct SiteOutput {
    /// The socket of the workers' stdout.
    pub socket: OutputSocket,
    /// The socket of their stderr.
    errors: OutputSocket,
    /// Unfinished lines, by writer and stream.
    partial: HashMap<(Stream, StdStream), Partial>,
    /// Writers that are not workers, and whose they are.
    others: HashMap<i32, Writer>,
}

/// Whose bytes make one stream of lines: a worker's and its processes' together (as they
/// shared its pipe before: `printf foo; /bin/echo bar` is one line), or one other process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stream {
    Worker(u32),
    Process(i32),
}

#[derive(Debug, Default)]
struct Partial {
    splitter: LineSplitter,
    /// The process that wrote the start of the unfinished line.
    started_by: Option<i32>,
    /// Whether the sandbox's bind rule was explained after one of its lines.
    hinted: bool,
}

/// The holder's names for a site's pair of a stream.
fn held_names(site: &SiteName, stream: StdStream) -> [String; 2] {
    match stream {
        StdStream::Stdout => [format!("log/{site}/recv"), format!("log/{site}/send")],
        StdStream::Stderr => [
            format!("log/{site}/err-recv"),
            format!("log/{site}/err-send"),
        ],
    }
}

impl SiteOutput {
    /// The socket of a stream.
    fn socket_of(&self, stream: StdStream) -> &OutputSocket {
        match stream {
            StdStream::Stdout => &self.socket,
            StdStream::Stderr => &self.errors,
        }
    }

    /// The end the workers' stderr is.
    pub fn stderr_sender(&self) -> std::os::fd::BorrowedFd<'_> {
        self.errors.sender()
    }
}

/// Whether a name the holder holds is a site's output socket.
pub(super) fn is_output_name(name: &str) -> bool {
    name.starts_with("log/")
}

impl Agent {
    /// Whether the fd holder kept an output socket of the site's (its stdout one: an
    /// agent from before the streams were told apart kept only that one).
    pub(super) fn held_output(&self, name: &SiteName) -> bool {
        held_names(name, StdStream::Stdout)
            .iter()
            .all(|n| self.held.contains_key(n))
    }

    /// The site's socket of a stream: taken back from the fd holder (what the agent before
    /// peeked at and did not take off settled), or made (and handed to it), and watched.
    fn take_or_make_output(
        &mut self,
        name: &SiteName,
        stream: StdStream,
    ) -> std::io::Result<OutputSocket> {
        let [recv_name, send_name] = held_names(name, stream);
        let opened = self.sites.get(name).map(|s| s.io.log.opened());
        let held = match (self.held.remove(&recv_name), self.held.remove(&send_name)) {
            (Some(r), Some(s)) => match OutputSocket::from_parts(r, s) {
                Ok(socket) => {
                    self.settle_output(name, stream, &socket, opened);
                    Some(socket)
                }
                Err(e) => {
                    warn!(site = %name, "the {} socket the fd holder kept cannot be used ({e}): a new one is made", stream.name());
                    None
                }
            },
            _ => None,
        };
        let (socket, fresh) = match held {
            Some(s) => (s, false),
            None => (OutputSocket::new()?, true),
        };
        if fresh {
            self.hold_fds(&[
                (recv_name.as_str(), socket.receiver()),
                (send_name.as_str(), socket.sender()),
            ]);
        }
        if let Err(e) = self.reg.arm(
            socket.receiver(),
            Interest::Readable,
            Source::Output(name.clone(), stream),
        ) {
            warn!(site = %name, "the {} of the site's workers is not read: {e}", stream.name());
        }
        Ok(socket)
    }

    /// What the agent before peeked at on a socket taken back and did not take off: taken
    /// off if its lines are in the log, else read again.
    fn settle_output(
        &mut self,
        name: &SiteName,
        stream: StdStream,
        socket: &OutputSocket,
        opened: Option<LogMark>,
    ) {
        let in_flight = match socket.in_flight() {
            Ok(n) => n,
            Err(e) => {
                warn!(site = %name, "cannot tell what of the {} the agent before read ({e}): read again", stream.name());
                0
            }
        };
        let [recv_name, _] = held_names(name, stream);
        let logged =
            in_flight > 0 && opened.is_some_and(|o| self.inherited_read_logged(&recv_name, o));
        if in_flight > 0 {
            debug!(
                site = %name,
                "{in_flight} bytes of the {} peeked by the agent before: {}",
                stream.name(),
                if logged { "in the log, taken off" } else { "not in the log, read again" }
            );
        }
        if let Err(e) = socket.settle(logged) {
            warn!(site = %name, "cannot settle what the agent before read of the {}: {e}", stream.name());
        }
        self.settled(&recv_name);
    }

    /// Makes sure the site has its output socket: made (or taken back from the fd holder)
    /// and watched if it has none yet. Fails only if a new pair cannot be made.
    pub(super) fn ensure_output(&mut self, name: &SiteName) -> std::io::Result<()> {
        let has = self.sites.get(name).is_some_and(|s| s.io.output.is_some());
        if !has {
            let socket = self.take_or_make_output(name, StdStream::Stdout)?;
            let errors = self.take_or_make_output(name, StdStream::Stderr)?;
            if let Some(site) = self.sites.get_mut(name) {
                site.io.output = Some(SiteOutput {
                    socket,
                    errors,
                    partial: HashMap::new(),
                    others: HashMap::new(),
                });
            }
        }
        Ok(())
    }

    /// One of the site's sockets is readable: reads some of it and watches it again.
    pub(super) fn on_output(&mut self, name: &SiteName, stream: StdStream) {
        self.read_stream(name, stream, READS_PER_WAKE);
        if let Some(o) = self.sites.get(name).and_then(|s| s.io.output.as_ref()) {
            if let Err(e) = self.reg.arm(
                o.socket_of(stream).receiver(),
                Interest::Readable,
                Source::Output(name.clone(), stream),
            ) {
                warn!(site = %name, "stopped reading the {} of the site's workers: {e}", stream.name());
            }
        }
    }

    /// Reads what waits in the site's sockets (at most `reads` reads of each), writes
    /// their complete lines to the site's log. Whether both are drained.
    pub(super) fn read_output(&mut self, name: &SiteName, reads: usize) -> bool {
        let out = self.read_stream(name, StdStream::Stdout, reads);
        let err = self.read_stream(name, StdStream::Stderr, reads);
        out && err
    }

    /// Reads what waits in the site's socket of `stream` (at most `reads` reads), writes
    /// its complete lines to the site's log. Whether the socket is drained.
    fn read_stream(&mut self, name: &SiteName, stream_of: StdStream, reads: usize) -> bool {
        if self.sites.get(name).is_none_or(|s| s.io.output.is_none()) {
            return true;
        }
        // One buffer for every read of every site, kept between calls (a drain at each
        // of ten thousand exits must not allocate each time).
        let mut buf = std::mem::take(&mut self.output_buf);
        buf.resize(READ_BUFFER, 0);
        let mut records = Vec::new();
        let now = SystemTime::now();
        let mut drained = false;
        let mut peeked = 0;
        // What is read for one write of its lines.
        let limit = self
            .sites
            .get(name)
            .map_or(READ_BUFFER, |s| s.io.log.read_limit());
        for _ in 0..reads {
            if peeked >= limit {
                break;
            }
            let Some(output) = self.sites.get(name).and_then(|s| s.io.output.as_ref()) else {
                drained = true;
                break;
            };
            let room = (limit - peeked).min(buf.len());
            let chunk = match output.socket_of(stream_of).peek(&mut buf[..room]) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    warn!(site = %name, "failed to read the output of the site's workers: {e}");
                    drained = true;
                    break;
                }
            };
            peeked += chunk.len;
            let writer = self.writer_of(name, chunk.pid);
            let Some(site) = self.sites.get_mut(name) else {
                drained = true;
                break;
            };
            let sandbox = site.io.sandbox.as_ref();
            let Some(output) = site.io.output.as_mut() else {
                drained = true;
                break;
            };
            let stream = match writer {
                Writer::Worker(k) => Stream::Worker(k),
                _ => Stream::Process(chunk.pid),
            };
            let partial = output.partial.entry((stream, stream_of)).or_default();
            let hinted = &mut partial.hinted;
            // The first line it completes was begun by whoever began it.
            let mut first = partial.started_by.take();
            partial.splitter.feed(&buf[..chunk.len], |line| {
                let pid = first.take().unwrap_or(chunk.pid);
                records.push(logs::record(writer, pid, stream_of, line, now));
                let Writer::Worker(id) = writer else {
                    return;
                };
                // Once per process, right after the line it explains.
                if !*hinted {
                    if let Some(h) = sandbox.and_then(|p| p.bind_refusal_hint(id, line)) {
                        *hinted = true;
                        records.push(
                            format!("{} hatchery: {h}\n", logs::utc_timestamp(now)).into_bytes(),
                        );
                    }
                }
            });
            if !partial.splitter.is_empty() {
                partial.started_by = Some(first.unwrap_or(chunk.pid));
            } else if !partial.hinted {
                output.partial.remove(&(stream, stream_of));
            }
        }
        if !records.is_empty() {
            let [held_as, _] = held_names(name, stream_of);
            super::cursor::test_crash(super::cursor::CrashPoint::Peeked);
            self.write_recorded(name, &held_as, peeked as u64, &records);
            super::cursor::test_crash(super::cursor::CrashPoint::Logged);
        }
        // In the log: off the socket.
        if let Some(socket) = self
            .sites
            .get(name)
            .and_then(|s| s.io.output.as_ref())
            .map(|o| o.socket_of(stream_of))
        {
            if let Err(e) = socket.take(peeked, &mut buf) {
                warn!(site = %name, "failed to take the {} of the site's workers off its socket ({e}): it is read again", stream_of.name());
                let _ = socket.settle(false);
            }
        }
        if !records.is_empty() {
            self.read_done();
        }
        self.output_buf = buf;
        drained
    }

    /// Reads everything that waits in the site's socket: once a worker has exited, all it
    /// wrote is there.
    pub(super) fn drain_output(&mut self, name: &SiteName) {
        while !self.read_output(name, READS_PER_WAKE) {}
    }

    /// Worker `writer` (process `pid`) of the site exited, and its output was drained: its
    /// unfinished line is written out, and the processes remembered as the site's workers'
    /// are forgotten (pids are reused).
    pub(super) fn worker_output_done(&mut self, name: &SiteName, pid: i32, writer: Writer) {
        let now = SystemTime::now();
        let Some(output) = self.sites.get_mut(name).and_then(|s| s.io.output.as_mut()) else {
            return;
        };
        output.others.clear();
        let stream = match writer {
            Writer::Worker(k) => Stream::Worker(k),
            _ => Stream::Process(pid),
        };
        let mut records = Vec::new();
        for stream_of in [StdStream::Stdout, StdStream::Stderr] {
            let Some(mut partial) = output.partial.remove(&(stream, stream_of)) else {
                continue;
            };
            let pid = partial.started_by.unwrap_or(pid);
            partial
                .splitter
                .finish(|line| records.push(logs::record(writer, pid, stream_of, line, now)));
        }
        self.write_records(name, &records);
    }

    /// Who in site `name` process `pid` is.
    fn writer_of(&mut self, name: &SiteName, pid: i32) -> Writer {
        if let Some((site, w)) = self.pids.get(&pid) {
            if site == name {
                return Writer::Worker(w.slot.0);
            }
        }
        if let Some(w) = self
            .sites
            .get(name)
            .and_then(|s| s.io.output.as_ref())
            .and_then(|o| o.others.get(&pid))
        {
            return *w;
        }
        let writer = self.ancestor_worker(name, pid).unwrap_or(Writer::Other);
        if let Some(o) = self.sites.get_mut(name).and_then(|s| s.io.output.as_mut()) {
            if o.others.len() >= MAX_REMEMBERED {
                o.others.clear();
            }
            o.others.insert(pid, writer);
        }
        writer
    }

    /// The worker a process that is not one belongs to: by its cgroup leaf, or by its
    /// parents.
    fn ancestor_worker(&self, name: &SiteName, pid: i32) -> Option<Writer> {
        if pid <= 0 {
            return None;
        }
        if self.cgroups.is_some() {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
                let leaf = text
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .and_then(|p| p.rsplit('/').next())
                    .and_then(|l| l.strip_prefix("w-"))
                    // `w-<K>.<n>` while an older leaf of the slot is being removed.
                    .and_then(|k| k.split('.').next())
                    .and_then(|k| k.parse::<u32>().ok());
                if let Some(k) = leaf {
                    return Some(Writer::Worker(k));
                }
            }
        }
        let mut p = pid;
        for _ in 0..MAX_ANCESTORS {
            p = crate::process::read_stat(p).ok()?.ppid;
            if p <= 1 {
                return None;
            }
            if let Some((site, w)) = self.pids.get(&p) {
                return (site == name).then_some(Writer::Worker(w.slot.0));
            }
        }
        None
    }

    /// The site is gone: the holder lets its output sockets go.
    pub(super) fn drop_output(&mut self, name: &SiteName) {
        let names: Vec<String> = [StdStream::Stdout, StdStream::Stderr]
            .into_iter()
            .flat_map(|s| held_names(name, s))
            .collect();
        if let Some(h) = &mut self.holder {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Err(e) = h.drop_names(&refs) {
                warn!("failed to tell the fd holder to let {name}'s output socket go: {e}");
            }
        }
    }
}

//! Worker output: one log file per site, size-based rotation, tailing; and the writer of
//! the agent's own log ([`AgentStderr`]), which never blocks the loop and never fails.
//!
//! The stdout and stderr of a site's workers go to two pipes per worker, or to two unix
//! stream sockets per site the agent reads ([`OutputSocket`], one per stream; a zygote's go
//! to two pipes of its own); complete lines are written as `<UTC time> w-<id>[<pid>] <line>`
//! (stdout) or `<UTC time> w-<id>[<pid>]! <line>` (stderr, [`STDERR_MARK`]) to
//! `<state_dir>/logs/<site>.log`. When a
//! write would take the file past `max_size`, it is renamed to `<site>.log.1` (older ones
//! shift up to `.<keep>`, the oldest is dropped) and a new file is started. Lines longer
//! than [`MAX_LINE`] are split. Writes are synchronous appends to a regular file, from
//! the event loop (no logging thread).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogPolicy;

/// Bytes of the agent's own log that could not be written (its stderr closed, full, or
/// failing); shown in `status`.
pub static AGENT_LOG_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The agent's own log output, on stderr (fd 2), for `tracing`.
///
/// Logging must never take the agent down or stall it: a write that fails (the reader
/// went away: `EPIPE`) or would block (a pipe or socket nobody drains) is dropped and
/// counted in [`AGENT_LOG_DROPPED`], and reported to the caller as written, so the
/// logging library has no error to report (it would report it on the same stderr, with
/// a panic if that fails too). How a write avoids blocking depends on what stderr is
/// ([`AgentStderr::setup`]): a socket (journald's stream) is written with `MSG_DONTWAIT`;
/// a pipe through a file description of our own with `O_NONBLOCK` (opened again through
/// `/proc/self/fd/2`, so the flag does not change the description we were given, which
/// others may share; `RWF_NOWAIT` would do, but pipes take it only on recent kernels);
/// anything else (a terminal, a file) with a plain write.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentStderr;

/// How [`AgentStderr`] writes, decided once by [`AgentStderr::setup`].
#[derive(Debug)]
enum StderrKind {
    Socket,
    Pipe(std::os::fd::OwnedFd),
    Other,
}

static STDERR_KIND: std::sync::OnceLock<StderrKind> = std::sync::OnceLock::new();

impl AgentStderr {
    /// Looks at what fd 2 is and prepares non-blocking writes to it (see the type).
    pub fn setup() {
        let kind = match rustix::fs::fstat(rustix::stdio::stderr()) {
            Ok(st) => match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::Socket => StderrKind::Socket,
                rustix::fs::FileType::Fifo => rustix::fs::open(
                    "/proc/self/fd/2",
                    rustix::fs::OFlags::WRONLY
                        | rustix::fs::OFlags::NONBLOCK
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_or(StderrKind::Other, StderrKind::Pipe),
                _ => StderrKind::Other,
            },
            Err(_) => StderrKind::Other,
        };
        let _ = STDERR_KIND.set(kind);
    }
}

impl Write for AgentStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = rustix::stdio::stderr();
        let written = match STDERR_KIND.get() {
            Some(StderrKind::Socket) => rustix::net::send(
                fd,
                buf,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ),
            Some(StderrKind::Pipe(own)) => rustix::io::write(own, buf),
            Some(StderrKind::Other) | None => rustix::io::write(fd, buf),
        };
        let done = written.unwrap_or(0);
        let lost = buf.len().saturating_sub(done);
        if lost > 0 {
            AGENT_LOG_DROPPED.fetch_add(lost as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AgentStderr {
    type Writer = AgentStderr;

    fn make_writer(&'a self) -> AgentStderr {
        AgentStderr
    }
}

/// Longest line kept whole; longer ones are split.
pub const MAX_LINE: usize = 16 * 1024;

/// A site's log file.
#[derive(Debug)]
pub struct SiteLog {
    path: PathBuf,
    file: File,
    size: u64,
    policy: LogPolicy,
    /// How many times the file was rotated (a [`Backlog`] reading the old file moves on).
    rotations: u64,
    /// The group that may read the files (the site's), when the agent may set it.
    group: Option<u32>,
    /// The current file's inode (a rotation starts a new one).
    ino: u64,
    /// Where the log stood when this agent opened it.
    opened: LogMark,
    /// Complete lines in the current file.
    lines: u64,
    /// `marks[i]`: where line `i * MARK_EVERY` of the current file starts, so the last N
    /// lines are found without reading the file backwards.
    marks: Vec<u64>,
}

/// Lines between two entries of a log's line index.
const MARK_EVERY: u64 = 256;

/// A site's log files: written by the agent (root), read by the site's group.
const LOG_MODE: u32 = 0o640;
/// Rotated files looked at when fixing permissions, beyond the configured `keep`.
const MAX_KEEP_FIXED: u32 = 10;

/// Gives `file` the log mode and, when the agent may, the site's group.
fn protect(file: &File, group: Option<u32>) -> io::Result<()> {
    use std::os::fd::AsFd;
    file.set_permissions(fs::Permissions::from_mode(LOG_MODE))?;
    if let Some(gid) = group {
        match rustix::fs::fchown(file.as_fd(), None, Some(rustix::fs::Gid::from_raw(gid))) {
            // An agent that is not root may not give its files away: they stay its own,
            // which is the only user its sites run as then.
            Ok(()) | Err(rustix::io::Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl SiteLog {
    /// Opens (appending) `<dir>/<site>.log`, readable by root and `group` only (the site's
    /// group; `None` leaves the group as it is), its rotated files too. `dir` is made
    /// traversable but not listable by others (0711).
    pub fn open(
        dir: &Path,
        site: &str,
        policy: LogPolicy,
        group: Option<u32>,
    ) -> io::Result<SiteLog> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
        let path = dir.join(format!("{site}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(LOG_MODE)
            .open(&path)?;
        let meta = file.metadata()?;
        let size = meta.len();
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        let mut log = SiteLog {
            path,
            file,
            size: 0,
            policy,
            rotations: 0,
            ino,
            opened: LogMark { ino, size },
            group,
            lines: 0,
            marks: vec![0],
        };
        log.protect_all()?;
        // Index what an earlier agent wrote.
        log.index_file(size)?;
        Ok(log)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the log stands now.
    pub fn mark(&self) -> LogMark {
        LogMark {
            ino: self.ino,
            size: self.size,
        }
    }

    /// Where the log stood when this agent opened it, before it wrote anything.
    pub fn opened(&self) -> LogMark {
        self.opened
    }

    /// Changes the rotation policy and the group that may read the files (on reload).
    pub fn set_policy(&mut self, policy: LogPolicy, group: Option<u32>) -> io::Result<()> {
        self.policy = policy;
        if group != self.group {
            self.group = group;
            self.protect_all()?;
        }
        Ok(())
    }

    /// Sets the mode and group of the file and its rotated ones (files an older agent
    /// created world-readable are fixed too).
    fn protect_all(&self) -> io::Result<()> {
        protect(&self.file, self.group)?;
        for i in 1..=self.policy.keep.max(MAX_KEEP_FIXED) {
            if let Ok(f) = File::open(format!("{}.{i}", self.path.display())) {
                protect(&f, self.group)?;
            }
        }
        Ok(())
    }

    /// Appends one formatted record, rotating first if it would not fit.
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + record.len() as u64 > self.policy.max_size {
            self.rotate()?;
        }
        self.write_indexed(record)
    }

    /// Writes `bytes` at the end of the file and counts them; after a failed write, the
    /// size is the file's again (part may have been written: the output cursor's marks
    /// must say where the file ends).
    fn write_indexed(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Err(e) = self.file.write_all(bytes) {
            if let Ok(meta) = self.file.metadata() {
                self.size = meta.len();
            }
            return Err(e);
        }
        self.index(bytes);
        Ok(())
    }

    /// Appends records, as few writes as rotation allows: those that fit in the file
    /// together are one write (the lines of one turn of the loop), and the file is rotated
    /// before the first that would not fit, as [`SiteLog::append`] would.
    pub fn append_all(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let mut batch: Vec<u8> = Vec::new();
        for r in records {
            let total = self.size + (batch.len() + r.len()) as u64;
            if !batch.is_empty() && total > self.policy.max_size {
                self.append(&batch)?;
                batch.clear();
            }
            batch.extend_from_slice(r);
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.append(&batch)
    }

    /// Appends records in one write, the file rotated first if they would not fit (a
    /// batch larger than `max_size` alone makes a file that large): what an agent killed
    /// meanwhile leaves is all of them, none, or a cut that [`SiteLog::truncate_to`]
    /// removes. Where the log stands before the write, for the cursor, is
    /// [`SiteLog::mark`] after [`SiteLog::make_room`].
    pub fn append_whole(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let batch = records.concat();
        self.make_room(batch.len() as u64)?;
        self.write_indexed(&batch)
    }

    /// The most bytes of a worker's output read at once for one write of their lines
    /// ([`SiteLog::append_whole`]): an eighth of `max_size` (at least 1 KiB, at most 64
    /// KiB), so that the files rotate close to their size.
    pub fn read_limit(&self) -> usize {
        usize::try_from(self.policy.max_size / 8)
            .unwrap_or(usize::MAX)
            .clamp(1 << 10, 64 << 10)
    }

    /// Rotates the file if `len` more bytes would not fit in it.
    pub fn make_room(&mut self, len: u64) -> io::Result<()> {
        if self.size > 0 && self.size + len > self.policy.max_size {
            self.rotate()?;
        }
        Ok(())
    }

    /// Cuts the file back to `size` bytes (a write an agent died inside), and counts its
    /// lines again.
    pub fn truncate_to(&mut self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.lines = 0;
        self.marks = vec![0];
        self.index_file(size)?;
        self.opened = self.mark();
        Ok(())
    }

    /// Counts the lines of the file's first `size` bytes, from the start (its size is
    /// then `size`).
    fn index_file(&mut self, size: u64) -> io::Result<()> {
        self.size = 0;
        let mut old = File::open(&self.path)?;
        let mut buf = vec![0u8; BACKLOG_CHUNK];
        while self.size < size {
            let n = old.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let n = n.min(usize::try_from(size - self.size).unwrap_or(usize::MAX));
            self.index(&buf[..n]);
        }
        self.size = size;
        Ok(())
    }

    /// Counts the lines of `bytes`, just written at the end of the file.
    fn index(&mut self, bytes: &[u8]) {
        for at in memchr::memchr_iter(b'\n', bytes) {
            self.lines += 1;
            if self.lines % MARK_EVERY == 0 {
                self.marks.push(self.size + at as u64 + 1);
            }
        }
        self.size += bytes.len() as u64;
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        if self.policy.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(name(self.policy.keep));
            for i in (1..self.policy.keep).rev() {
                let _ = fs::rename(name(i), name(i + 1));
            }
            fs::rename(&self.path, name(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(LOG_MODE)
            .open(&self.path)?;
        protect(&self.file, self.group)?;
        self.ino = std::os::unix::fs::MetadataExt::ino(&self.file.metadata()?);
        self.size = 0;
        self.rotations += 1;
        self.lines = 0;
        self.marks = vec![0];
        Ok(())
    }
}

/// Where a site's log stands: its current file (by inode: a rotation starts a new one)
/// and that file's size. Only the agent appends to it, so a log past a mark was written
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMark {
    pub ino: u64,
    pub size: u64,
}

/// What the agent was reading when it last wrote the [`OutputCursor`]: an output socket
/// or pipe (by the name the fd holder keeps it under), where the site's log stood before
/// the read, and, for a pipe, how many bytes it read and where in the cursor's journal
/// they go once taken off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorRecord {
    pub name: String,
    pub mark: LogMark,
    pub len: u64,
    pub journal_at: u64,
    /// The log's size once the read's lines are written (one write, after `mark`).
    pub expected: u64,
}

impl CursorRecord {
    /// Whether the read's lines are all in the log, which the next agent opened at
    /// `opened`: the same file, grown to at least where the write ended. (A file rotated
    /// by someone else since says no: the read is done again, twice rather than lost.)
    pub fn logged(&self, opened: LogMark) -> bool {
        opened.ino == self.mark.ino && opened.size >= self.expected
    }

    /// Whether the write of the read's lines was cut short in the log opened at
    /// `opened` (the agent died inside it): then the log is cut back to `mark`.
    pub fn torn(&self, opened: LogMark) -> bool {
        opened.ino == self.mark.ino && opened.size > self.mark.size && opened.size < self.expected
    }
}

/// How the agent's reads of its workers' output stay exactly-once across its own death:
/// a memfd the fd holder keeps (so it outlives the agent), holding one [`CursorRecord`]
/// (the agent reads one socket or pipe at a time, so only the last read can be unfinished)
/// and, after it, a journal that only grows, into which a pipe's bytes are spliced as
/// they are taken off it (its size counts what was taken; the pages are freed).
///
/// A read goes: where the log stands is recorded; the bytes are looked at without being
/// taken (`MSG_PEEK` for a socket, `tee` for a pipe); their lines are written; only then
/// are they taken off (a `recv`; for a pipe, a `splice` into the journal). A new agent
/// that finds the last read unfinished compares: if the log went past the recorded mark,
/// the lines are written and only the taking was left (done now, nothing logged twice);
/// if not, the bytes are still there and are read again (nothing lost). For a pipe, the
/// journal's size says how much of the taking was done; for a socket, its peek offset.
#[derive(Debug)]
pub struct OutputCursor {
    fd: std::os::fd::OwnedFd,
    /// The file's size: where the journal ends.
    size: u64,
    /// Up to where the journal's pages were freed.
    freed: u64,
}

/// Where the journal of an [`OutputCursor`] starts; the record is before it.
const JOURNAL_START: u64 = 4096;
/// Where a record's name starts: after its length (2 bytes) and five 8-byte words.
const RECORD_NAME_AT: usize = 42;
/// The journal's pages are freed once this much was spliced in.
const JOURNAL_FREE_EVERY: u64 = 1 << 20;

impl OutputCursor {
    /// A new cursor with no record.
    pub fn new() -> io::Result<OutputCursor> {
        let fd =
            rustix::fs::memfd_create("hatchery-output-cursor", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, JOURNAL_START)?;
        Ok(OutputCursor {
            fd,
            size: JOURNAL_START,
            freed: JOURNAL_START,
        })
    }

    /// The cursor an earlier agent made (kept by the fd holder), checked to be one.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<OutputCursor> {
        let stat = rustix::fs::fstat(&fd)?;
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile
            || size < JOURNAL_START
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an output cursor",
            ));
        }
        Ok(OutputCursor {
            fd,
            size,
            freed: JOURNAL_START,
        })
    }

    /// The memfd, for the fd holder.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Where the journal ends (what a pipe read now is spliced to).
    pub fn journal_end(&self) -> u64 {
        self.size
    }

    /// Records a read about to be made.
    pub fn record(&self, r: &CursorRecord) -> io::Result<()> {
        let name = r.name.as_bytes();
        let mut slot = Vec::with_capacity(RECORD_NAME_AT + name.len());
        slot.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_le_bytes());
        for w in [r.mark.ino, r.mark.size, r.len, r.journal_at, r.expected] {
            slot.extend_from_slice(&w.to_le_bytes());
        }
        slot.extend_from_slice(name);
        if slot.len() as u64 > JOURNAL_START {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
        }
        let n = rustix::io::pwrite(&self.fd, &slot, 0)?;
        if n != slot.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        Ok(())
    }

    /// The last read recorded; `None` if there was none.
    pub fn recorded(&self) -> io::Result<Option<CursorRecord>> {
        let mut slot = vec![0u8; JOURNAL_START as usize];
        let n = rustix::io::pread(&self.fd, &mut slot, 0)?;
        let slot = &slot[..n];
        let word = |i: usize| {
            slot.get(2 + 8 * i..10 + 8 * i)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        let (Some(len), Some(ino), Some(size), Some(read), Some(at), Some(expected)) = (
            slot.get(..2)
                .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))),
            word(0),
            word(1),
            word(2),
            word(3),
            word(4),
        ) else {
            return Ok(None);
        };
        let Some(name) = slot
            .get(RECORD_NAME_AT..RECORD_NAME_AT + len)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            return Ok(None);
        };
        // No file has inode 0: a cursor never written.
        Ok((ino != 0 && len > 0).then(|| CursorRecord {
            name: name.to_string(),
            mark: LogMark { ino, size },
            len: read,
            journal_at: at,
            expected,
        }))
    }

    /// Says no read is under way: the last one is settled (written and taken off).
    pub fn clear(&self) -> io::Result<()> {
        let n = rustix::io::pwrite(&self.fd, &[0u8; RECORD_NAME_AT], 0)?;
        if n != RECORD_NAME_AT {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        Ok(())
    }

    /// Takes `len` bytes off the pipe `from` (bytes already written to the log), into the
    /// journal, and frees the journal's pages now and then.
    pub fn take_from_pipe(
        &mut self,
        from: std::os::fd::BorrowedFd<'_>,
        mut len: usize,
    ) -> io::Result<()> {
        while len > 0 {
            let mut at = self.size;
            match rustix::pipe::splice(
                from,
                None,
                &self.fd,
                Some(&mut at),
                len,
                rustix::pipe::SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the pipe ended before what was looked at",
                    ));
                }
                Ok(n) => {
                    len -= n;
                    self.size += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.size - self.freed >= JOURNAL_FREE_EVERY {
            rustix::fs::fallocate(
                &self.fd,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                self.freed,
                self.size - self.freed,
            )?;
            self.freed = self.size;
        }
        Ok(())
    }

    /// How many of the `len` bytes a read recorded at `journal_at` are still to be taken
    /// off its pipe.
    pub fn untaken(&self, r: &CursorRecord) -> u64 {
        (r.journal_at + r.len).saturating_sub(self.size.max(r.journal_at))
    }
}

/// The part of a site's log a `logs` client still has to receive: read from the file a
/// chunk at a time, as the client's connection drains, so a client that asks for many
/// lines and reads slowly (or never) costs the agent one chunk, not the whole tail.
/// More lines than the current file holds are taken from the end of the rotated files
/// (`<site>.log.1`, …), read first, oldest first. Reading goes on until the end of the
/// file as it grows, and onto the new file when the log was rotated meanwhile; then the
/// client is caught up (and, with `-f`, follows).
#[derive(Debug)]
pub struct Backlog {
    /// Rotated files to read before `file`, oldest first: each with where to start and
    /// where it ends.
    earlier: std::collections::VecDeque<(File, u64, u64)>,
    file: File,
    pos: u64,
    rotations: u64,
    /// Where to stop (the end of the file when it was asked for), unless following.
    until: Option<u64>,
}

/// Most bytes a [`Backlog`] reads at once.
pub const BACKLOG_CHUNK: usize = 64 * 1024;

impl Backlog {
    /// Starts at the beginning of the last `lines` lines of `log`: from the nearest
    /// entry of the log's line index, at most `MARK_EVERY` lines are skipped by reading.
    /// Without `follow`, it ends where the file ends now (the last `lines` lines, as
    /// `tail` shows them); with it, it goes on until caught up.
    pub fn start(log: &SiteLog, lines: usize, follow: bool) -> io::Result<Backlog> {
        let mut file = File::open(&log.path)?;
        let first = log.lines.saturating_sub(lines as u64);
        let mark = usize::try_from(first / MARK_EVERY).unwrap_or(usize::MAX);
        let pos = log.marks.get(mark).copied().unwrap_or(0);
        let pos = skip_lines(&mut file, pos, first % MARK_EVERY)?;
        // The rest from the rotated files, newest first, counted (rotated files are at
        // most `max_size` each, and only as many are read as the lines asked for need).
        let mut earlier = std::collections::VecDeque::new();
        let mut need = (lines as u64).saturating_sub(log.lines);
        let mut i = 1;
        while need > 0 && i <= log.policy.keep {
            let Ok(mut old) = File::open(format!("{}.{i}", log.path.display())) else {
                break;
            };
            let len = old.metadata()?.len();
            let count = count_lines(&mut old)?;
            let start = if count > need {
                skip_lines(&mut old, 0, count - need)?
            } else {
                0
            };
            earlier.push_front((old, start, len));
            need = need.saturating_sub(count);
            i += 1;
        }
        Ok(Backlog {
            earlier,
            file,
            pos,
            rotations: log.rotations,
            until: (!follow).then_some(log.size),
        })
    }

    /// The next complete lines (at most about [`BACKLOG_CHUNK`] bytes), without their
    /// newlines; `None` once caught up with `log`.
    pub fn next_lines(&mut self, log: &SiteLog) -> io::Result<Option<Vec<String>>> {
        while let Some((old, pos, end)) = self.earlier.front_mut() {
            let want = usize::try_from(*end - *pos).map_or(BACKLOG_CHUNK, |n| n.min(BACKLOG_CHUNK));
            let mut buf = vec![0u8; want];
            old.seek(SeekFrom::Start(*pos))?;
            let n = read_full(old, &mut buf)?;
            buf.truncate(n);
            let upto = match memchr::memrchr(b'\n', &buf) {
                Some(i) => i + 1,
                None if n == BACKLOG_CHUNK => n,
                None => 0,
            };
            if upto == 0 {
                // Read to its end (a rotated file ends with a whole line).
                self.earlier.pop_front();
                continue;
            }
            *pos += upto as u64;
            let text = String::from_utf8_lossy(&buf[..upto]);
            return Ok(Some(text.lines().map(str::to_string).collect()));
        }
        loop {
            let want = match self.until {
                Some(end) if self.pos >= end => return Ok(None),
                Some(end) => {
                    usize::try_from(end - self.pos).map_or(BACKLOG_CHUNK, |n| n.min(BACKLOG_CHUNK))
                }
                None => BACKLOG_CHUNK,
            };
            let mut buf = vec![0u8; want];
            self.file.seek(SeekFrom::Start(self.pos))?;
            let n = read_full(&mut self.file, &mut buf)?;
            buf.truncate(n);
            // Complete lines only; a line longer than the chunk (not written by us:
            // records are at most MAX_LINE plus a prefix) is cut at the chunk's end.
            let upto = match memchr::memrchr(b'\n', &buf) {
                Some(i) => i + 1,
                None if n == BACKLOG_CHUNK => n,
                None => 0,
            };
            if upto > 0 {
                self.pos += upto as u64;
                let text = String::from_utf8_lossy(&buf[..upto]);
                return Ok(Some(text.lines().map(str::to_string).collect()));
            }
            if self.rotations == log.rotations || self.until.is_some() {
                return Ok(None);
            }
            // Rotated while we read: what was written since is in the new file.
            self.file = File::open(&log.path)?;
            self.pos = 0;
            self.rotations = log.rotations;
        }
    }
}

/// Where the line `skip` lines after `pos` starts (the end of the file if it has fewer).
fn skip_lines(file: &mut File, mut pos: u64, mut skip: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; BACKLOG_CHUNK];
    while skip > 0 {
        file.seek(SeekFrom::Start(pos))?;
        let n = read_full(file, &mut buf)?;
        if n == 0 {
            break;
        }
        let mut consumed = n;
        for at in memchr::memchr_iter(b'\n', &buf[..n]) {
            skip -= 1;
            if skip == 0 {
                consumed = at + 1;
                break;
            }
        }
        pos += consumed as u64;
    }
    Ok(pos)
}

/// The complete lines in a file.
fn count_lines(file: &mut File) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; BACKLOG_CHUNK];
    let mut count = 0;
    loop {
        let n = read_full(file, &mut buf)?;
        if n == 0 {
            return Ok(count);
        }
        count += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The send buffer asked for a site's output socket: what the site's workers may have
/// written and the agent not yet read, all together (a writer blocks beyond it, as on a
/// full pipe). Forced past `net.core.wmem_max` where the agent may (`CAP_NET_ADMIN`).
pub const OUTPUT_BUFFER: usize = 1 << 20;

/// One of a site's output sockets: every worker of the site has the same `send` end as its
/// stdout (or, the site's other one, as its stderr), and the agent reads the other end.
/// Two pairs per site instead of pipes per worker keep the agent at one fd per worker (its
/// pidfd), which is what lets ten thousand workers fit in the usual fd limit.
///
/// It is a `SOCK_STREAM` socket pair, not a datagram one: a stream has no message size
/// limit and is what programs expect of their stdout (Node.js writes to a unix stream
/// socket as to a pipe, but would drop everything written to a datagram socket). Lines stay
/// attributed to their writer because the receiving end has `SO_PASSCRED`: the kernel then
/// never joins data from two senders in one `recvmsg`, and tells the sending process of
/// each (`SCM_CREDENTIALS`, its pid in the agent's pid namespace). Writes of different
/// workers interleave only between whole writes (or the kernel's chunks of a large one),
/// and each chunk is still told apart by its pid.
///
/// What differs from a pipe: `open("/dev/stdout")` fails with `ENXIO` on a socket (as under
/// journald); programs that write to `/dev/stdout` by path should write to fd 1 instead,
/// or the site can ask for pipes (`output = "pipe"`).
#[derive(Debug)]
pub struct OutputSocket {
    recv: std::os::fd::OwnedFd,
    send: std::os::fd::OwnedFd,
    /// Whether reads peek (`SO_PEEK_OFF` set): if the kernel refused it, they take the
    /// bytes at once, as before the cursor (an agent that dies may then lose a read).
    peeking: std::cell::Cell<bool>,
}

/// One read from an [`OutputSocket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputChunk {
    /// The process that wrote it (0 if the kernel did not say).
    pub pid: i32,
    /// How many bytes of the buffer it filled.
    pub len: usize,
}

impl OutputSocket {
    /// A new pair: the receiving end non-blocking with `SO_PASSCRED`, the sending end
    /// blocking (workers share it, and the flag belongs to the shared file description).
    pub fn new() -> io::Result<OutputSocket> {
        let (recv, send) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        // Workers only write, the agent only reads.
        rustix::net::shutdown(&recv, rustix::net::Shutdown::Write)?;
        rustix::net::shutdown(&send, rustix::net::Shutdown::Read)?;
        if rustix::net::sockopt::set_socket_send_buffer_size_force(&send, OUTPUT_BUFFER).is_err() {
            // Capped at `net.core.wmem_max` without `CAP_NET_ADMIN`; the default will do.
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&send, OUTPUT_BUFFER);
        }
        let socket = OutputSocket::from_parts(recv, send)?;
        // Refused only by a kernel without a peek offset: its reads take the bytes at once.
        let _ = socket.settle(false);
        Ok(socket)
    }

    /// A pair an earlier agent made (kept by the fd holder), checked to be unix stream
    /// sockets, and set up to be read again. What that agent peeked and did not take
    /// ([`OutputSocket::in_flight`]) is still to be settled ([`OutputSocket::settle`]).
    pub fn from_parts(
        recv: std::os::fd::OwnedFd,
        send: std::os::fd::OwnedFd,
    ) -> io::Result<OutputSocket> {
        for fd in [&recv, &send] {
            if rustix::net::sockopt::socket_type(fd)? != rustix::net::SocketType::STREAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a stream socket",
                ));
            }
        }
        rustix::net::sockopt::set_socket_passcred(&recv, true)?;
        rustix::io::ioctl_fionbio(&recv, true)?;
        Ok(OutputSocket {
            recv,
            send,
            peeking: std::cell::Cell::new(false),
        })
    }

    /// The end the agent reads.
    pub fn receiver(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.recv.as_fd()
    }

    /// The end the workers write to (their fd 1, or 2, by the socket's stream).
    pub fn sender(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.send.as_fd()
    }

    /// Bytes peeked and not yet taken off the socket: by the agent that had it before, if
    /// it died between a [`OutputSocket::peek`] and the [`OutputSocket::take`] after it.
    pub fn in_flight(&self) -> io::Result<usize> {
        let off = crate::sys::peek::peek_offset(self.receiver())?;
        Ok(usize::try_from(off).unwrap_or(0))
    }

    /// Settles what was peeked and not taken: taken off the socket if it is in the log
    /// (`logged`), else left to be read again; peeking starts again at the front. If the
    /// kernel refuses a peek offset, reads take the bytes at once from then on (said in
    /// the returned error).
    pub fn settle(&self, logged: bool) -> io::Result<()> {
        let taken = if logged {
            self.in_flight()
                .and_then(|n| self.take_now(n, &mut [0u8; 4096]))
        } else {
            Ok(())
        };
        let peeking = crate::sys::peek::set_peek_offset(self.receiver(), 0);
        self.peeking.set(peeking.is_ok());
        taken.and(peeking)
    }

    /// Peeks at what one process wrote next, into `buf`, without taking it off the socket
    /// (the next peek reads on after it); `None` once nothing more is waiting. What was
    /// peeked is taken off with [`OutputSocket::take`] once it is in the log, so an agent
    /// that dies in between loses none of it: the socket's peek offset tells the next one.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<Option<OutputChunk>> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let flags = if self.peeking.get() {
                RecvFlags::CMSG_CLOEXEC | RecvFlags::PEEK
            } else {
                RecvFlags::CMSG_CLOEXEC
            };
            let msg = match rustix::net::recvmsg(
                &self.recv,
                &mut [io::IoSliceMut::new(buf)],
                &mut control,
                flags,
            ) {
                Ok(m) => m,
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if msg.bytes == 0 {
                // Every sending end closed (the agent keeps one, so only when it let go).
                return Ok(None);
            }
            let mut pid = 0;
            for cmsg in control.drain() {
                if let RecvAncillaryMessage::ScmCredentials(cred) = cmsg {
                    pid = cred.pid.as_raw_nonzero().get();
                }
            }
            return Ok(Some(OutputChunk {
                pid,
                len: msg.bytes,
            }));
        }
    }

    /// Takes the first `n` bytes off the socket (those peeked), read into `scratch` (a
    /// socket that does not peek took them already).
    pub fn take(&self, n: usize, scratch: &mut [u8]) -> io::Result<()> {
        if !self.peeking.get() {
            return Ok(());
        }
        self.take_now(n, scratch)
    }

    fn take_now(&self, mut n: usize, scratch: &mut [u8]) -> io::Result<()> {
        while n > 0 {
            let want = n.min(scratch.len());
            match rustix::io::read(&self.recv, &mut scratch[..want]) {
                // A read stops where the writer changes (`SO_PASSCRED`): read on.
                Ok(got) if got > 0 => n -= got,
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the output socket ended before what was peeked",
                    ));
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Who wrote a line of a site's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// The worker of this slot (`w-<K>`).
    Worker(u32),
    /// A generation's zygote (`zygote`).
    Zygote,
    /// A process of the site's that is none of these, and descends from none of its
    /// workers any more (`process`).
    Other,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::Worker(k) => write!(f, "w-{k}"),
            Writer::Zygote => f.write_str("zygote"),
            Writer::Other => f.write_str("process"),
        }
    }
}

/// Which of a process's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdStream {
    /// Its fd 1.
    Stdout,
    /// Its fd 2.
    Stderr,
}

impl StdStream {
    /// The stream's name (`stdout`, `stderr`).
    pub fn name(self) -> &'static str {
        match self {
            StdStream::Stdout => "stdout",
            StdStream::Stderr => "stderr",
        }
    }
}

/// What follows `<writer>[<pid>]` in a stderr line's record (nothing in a stdout one's):
/// inside the prefix, so no line a process writes can look like the other stream's.
pub const STDERR_MARK: &str = "!";

/// Formats one log record: `<time> <writer>[<pid>] <line>` for a stdout line,
/// `<time> <writer>[<pid>]! <line>` for a stderr one.
pub fn record(
    writer: Writer,
    pid: i32,
    stream: StdStream,
    line: &[u8],
    now: SystemTime,
) -> Vec<u8> {
    let mark = match stream {
        StdStream::Stdout => "",
        StdStream::Stderr => STDERR_MARK,
    };
    let mut out = format!("{} {writer}[{pid}]{mark} ", utc_timestamp(now)).into_bytes();
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// One line of a site's log, taken apart (what `hatchery logs --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// When it was written (`2026-11-22T14:41:08.123Z`), if the line has a time.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub time: Option<String>,
    /// Who wrote it: `w-<K>`, `zygote`, `process`, or `hatchery` (the agent).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    /// The writing process (not for the agent's lines).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<i32>,
    /// `stdout` or `stderr` (not for the agent's lines).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stream: Option<StdStream>,
    /// The line as it was written (the whole line if it is not in the log's format).
    pub text: String,
}

impl LogLine {
    /// Takes a line of a site's log apart; a line that is not in the format (written by
    /// an older agent, or cut) is all `text`.
    pub fn parse(line: &str) -> LogLine {
        let whole = || LogLine {
            time: None,
            source: None,
            pid: None,
            stream: None,
            text: line.to_string(),
        };
        let Some((time, rest)) = line.split_once(' ') else {
            return whole();
        };
        if !(time.ends_with('Z') && time.contains('T')) {
            return whole();
        }
        if let Some(text) = rest.strip_prefix("hatchery: ") {
            return LogLine {
                time: Some(time.to_string()),
                source: Some("hatchery".into()),
                pid: None,
                stream: None,
                text: text.to_string(),
            };
        }
        let (head, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let (head, stream) = match head.strip_suffix(STDERR_MARK) {
            Some(h) => (h, StdStream::Stderr),
            None => (head, StdStream::Stdout),
        };
        let Some((writer, pid)) = head
            .strip_suffix(']')
            .and_then(|h| h.split_once('['))
            .and_then(|(w, p)| Some((w, p.parse::<i32>().ok()?)))
        else {
            return whole();
        };
        LogLine {
            time: Some(time.to_string()),
            source: Some(writer.to_string()),
            pid: Some(pid),
            stream: Some(stream),
            text: text.to_string(),
        }
    }
}

/// Splits a byte stream into lines, keeping the unfinished tail between reads.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `data`; calls `emit` with each complete line (without its newline), a line
    /// longer than [`MAX_LINE`] in pieces of `MAX_LINE` (its last piece the rest), however
    /// the reads cut it.
    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = data;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            let end = self.cut(&rest[..pos], &mut emit);
            self.emit_with(end, &mut emit);
            rest = &rest[pos + 1..];
        }
        let end = self.cut(rest, &mut emit);
        self.partial.extend_from_slice(end);
    }

    /// Emits pieces of `MAX_LINE` of the unfinished line followed by `bytes` for as long
    /// as more than `MAX_LINE` is left; returns the rest of `bytes` (which, after the
    /// unfinished line, is at most `MAX_LINE`).
    fn cut<'a>(&mut self, mut bytes: &'a [u8], emit: &mut impl FnMut(&[u8])) -> &'a [u8] {
        while self.partial.len() + bytes.len() > MAX_LINE {
            let (head, tail) = bytes.split_at(MAX_LINE - self.partial.len());
            self.emit_with(head, emit);
            bytes = tail;
        }
        bytes
    }

    /// Emits the unfinished line followed by `bytes` as one piece, and forgets it.
    fn emit_with(&mut self, bytes: &[u8], emit: &mut impl FnMut(&[u8])) {
        if self.partial.is_empty() {
            emit(bytes);
        } else {
            self.partial.extend_from_slice(bytes);
            emit(&self.partial);
            self.partial.clear();
        }
    }

    /// Whether no unfinished line waits.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Emits what is left (the stream ended without a final newline).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

/// `2026-11-22T14:41:08.123Z`, computed without a time-zone database.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, rem) = civil(d.as_secs());
    // Written digit by digit: every history entry and record line takes one, a thousand in
    // a stop of a thousand workers, and `format!` with widths was a tenth of an exit's
    // handling.
    let mut out = String::with_capacity(24);
    push_digits(
        &mut out,
        year,
        year.checked_ilog10().map_or(1, |l| l + 1).max(4),
    );
    for (sep, value, width) in [
        ('-', month, 2),
        ('-', day, 2),
        ('T', rem / 3600, 2),
        (':', rem % 3600 / 60, 2),
        (':', rem % 60, 2),
        ('.', u64::from(d.subsec_millis()), 3),
    ] {
        out.push(sep);
        push_digits(&mut out, value, width);
    }
    out.push('Z');
    out
}

/// The date of `secs` after the epoch (year, month, day) and the seconds into that day.
fn civil(secs: u64) -> (u64, u64, u64, u64) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // None of them is negative after the epoch.
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    (
        unsigned(year),
        unsigned(month),
        unsigned(day),
        secs % 86_400,
    )
}

/// The last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut String, value: u64, width: u32) {
    for k in (0..width).rev() {
        let digit = value / 10u64.pow(k) % 10;
        out.push(char::from_digit(digit as u32, 10).unwrap_or('0'));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_358_468_123);
        assert_eq!(utc_timestamp(t), "2026-11-22T14:41:08.123Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(utc_timestamp(leap).starts_with("2000-02-29T"));
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800); // 10000-01-01
        assert_eq!(utc_timestamp(far), "10000-01-01T00:00:00.000Z");
    }

    /// The timestamp as `format!` with widths writes it.
    fn formatted(t: SystemTime) -> String {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (year, month, day, rem) = civil(d.as_secs());
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }

    proptest::proptest! {
        /// Written digit by digit, as `format!` with widths writes it.
        #[test]
        fn timestamps_are_written_as_format_writes_them(ms in 0u64..400_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            proptest::prop_assert_eq!(utc_timestamp(t), formatted(t));
        }
    }

    #[test]
    fn records_say_their_stream_and_parse_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_358_468_123);
        let out = record(Writer::Worker(3), 42, StdStream::Stdout, b"hello", t);
        assert_eq!(out, b"2026-11-22T14:41:08.123Z w-3[42] hello\n");
        let err = record(Writer::Worker(3), 42, StdStream::Stderr, b"boom! x", t);
        assert_eq!(err, b"2026-11-22T14:41:08.123Z w-3[42]! boom! x\n");
        let parsed = LogLine::parse("2026-11-22T14:41:08.123Z w-3[42]! boom! x");
        assert_eq!(parsed.source.as_deref(), Some("w-3"));
        assert_eq!(parsed.pid, Some(42));
        assert_eq!(parsed.stream, Some(StdStream::Stderr));
        assert_eq!(parsed.text, "boom! x");
        let parsed = LogLine::parse("2026-11-22T14:41:08.123Z zygote[7] ");
        assert_eq!(parsed.stream, Some(StdStream::Stdout));
        assert_eq!(parsed.text, "");
        let agent = LogLine::parse("2026-11-22T14:41:08.123Z hatchery: gen-1 w-3 started");
        assert_eq!(agent.source.as_deref(), Some("hatchery"));
        assert_eq!(agent.stream, None);
        assert_eq!(agent.text, "gen-1 w-3 started");
        let other = LogLine::parse("not a record");
        assert_eq!(other.text, "not a record");
        assert_eq!(other.source, None);
        let json = serde_json::to_value(LogLine::parse("2026-11-22T14:41:08.123Z w-1[5]! e"))
            .expect("json");
        assert_eq!(json["stream"], "stderr");
    }

    #[test]
    fn lines_are_split_across_reads() {
        let mut s = LineSplitter::default();
        let mut got: Vec<String> = Vec::new();
        s.feed(b"hel", |l| got.push(String::from_utf8_lossy(l).into()));
        s.feed(b"lo\nwor", |l| got.push(String::from_utf8_lossy(l).into()));
        s.feed(b"ld\n\nend", |l| {
            got.push(String::from_utf8_lossy(l).into())
        });
        s.finish(|l| got.push(String::from_utf8_lossy(l).into()));
        assert_eq!(got, vec!["hello", "world", "", "end"]);
        let mut long = Vec::new();
        s.feed(&vec![b'x'; MAX_LINE * 2 + 5], |l| long.push(l.len()));
        assert_eq!(long, vec![MAX_LINE, MAX_LINE]);
    }

    /// A long line comes out in pieces of at most `MAX_LINE`, every byte once and in
    /// order, whatever the reads' sizes: a read that ends the line after an unfinished
    /// part (or holds more than `MAX_LINE` of it) does not make a longer piece.
    #[test]
    fn a_long_line_is_cut_into_pieces_of_max_line_however_it_is_read() {
        let line: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut data = line.clone();
        data.extend_from_slice(b"\nnext\n");
        for read in [
            1,
            7,
            4096,
            MAX_LINE - 1,
            MAX_LINE,
            MAX_LINE + 1,
            65536,
            70_000,
            400_000,
        ] {
            let mut s = LineSplitter::default();
            let mut pieces: Vec<Vec<u8>> = Vec::new();
            for chunk in data.chunks(read) {
                s.feed(chunk, |l| pieces.push(l.to_vec()));
            }
            assert!(s.is_empty(), "read {read}");
            let last = pieces.pop().expect("the next line");
            assert_eq!(last, b"next", "read {read}");
            assert!(
                pieces.iter().all(|p| p.len() <= MAX_LINE),
                "read {read}: {:?}",
                pieces.iter().map(Vec::len).collect::<Vec<_>>()
            );
            assert_eq!(pieces.concat(), line, "read {read}");
            assert_eq!(pieces.len(), line.len().div_ceil(MAX_LINE), "read {read}");
        }
        // A line of exactly two pieces ends with the second: no empty line after it.
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        s.feed(&vec![b'y'; MAX_LINE * 2], |l| got.push(l.len()));
        s.feed(b"\n\n", |l| got.push(l.len()));
        assert_eq!(got, vec![MAX_LINE, MAX_LINE, 0]);
    }

    #[test]
    fn rotation_keeps_the_configured_number_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 4096,
            keep: 2,
        };
        let mut log = SiteLog::open(dir.path(), "blog", policy, None).expect("open");
        let line = vec![b'a'; 1023];
        for i in 0..20u8 {
            let mut l = line.clone();
            l[0] = b'0' + (i % 10);
            l.push(b'\n');
            log.append(&l).expect("append");
        }
        let size = |p: &str| fs::metadata(dir.path().join(p)).map(|m| m.len()).ok();
        assert!(size("blog.log").is_some_and(|s| s <= 4096));
        assert_eq!(size("blog.log.1"), Some(4096));
        assert_eq!(size("blog.log.2"), Some(4096));
        assert_eq!(size("blog.log.3"), None, "keep = 2");
        let last = backlog(&log, 1);
        assert!(last[0].starts_with('9'), "the newest line is last");
    }

    #[test]
    fn records_appended_together_rotate_as_one_by_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 4096,
            keep: 2,
        };
        let mut log = SiteLog::open(dir.path(), "many", policy, None).expect("open");
        let mut line = vec![b'a'; 1023];
        line.push(b'\n');
        let many: Vec<Vec<u8>> = (0..10).map(|_| line.clone()).collect();
        log.append_all(&many).expect("append");
        let size = |p: &str| fs::metadata(dir.path().join(p)).map(|m| m.len()).ok();
        assert_eq!(size("many.log.2"), Some(4096));
        assert_eq!(size("many.log.1"), Some(4096));
        assert_eq!(size("many.log"), Some(2048));
        assert_eq!(backlog(&log, 100).len(), 10);
    }

    /// Everything a backlog of `n` lines yields, chunk by chunk.
    fn backlog(log: &SiteLog, n: usize) -> Vec<String> {
        let mut b = Backlog::start(log, n, false).expect("start");
        let mut out = Vec::new();
        while let Some(lines) = b.next_lines(log).expect("read") {
            out.extend(lines);
        }
        out
    }

    #[test]
    fn a_backlog_streams_the_last_lines_in_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 1 << 30,
            keep: 1,
        };
        let mut log = SiteLog::open(dir.path(), "x", policy, None).expect("open");
        let text: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
        log.append(text.as_bytes()).expect("append");
        assert_eq!(backlog(&log, 2), vec!["line 99998", "line 99999"]);
        let many = backlog(&log, 20_000);
        assert_eq!(many.len(), 20_000);
        assert_eq!(many[0], "line 80000");
        assert_eq!(backlog(&log, 200_000).len(), 100_000, "all there is");
        // An agent that opens the file again indexes what is there.
        let again = SiteLog::open(dir.path(), "x", policy, None).expect("reopen");
        assert_eq!(backlog(&again, 20_000)[0], "line 80000");
        assert_eq!(backlog(&again, 1), vec!["line 99999"]);
        assert!(backlog(&log, 0).is_empty());
        // Without a final newline the last line is still a line, once complete.
        log.append(b"partial").expect("append");
        assert_eq!(
            backlog(&log, 1),
            vec!["line 99999"],
            "an unfinished line waits"
        );
        log.append(b" done\n").expect("append");
        assert_eq!(backlog(&log, 1), vec!["partial done"]);
        let empty = SiteLog::open(dir.path(), "empty", policy, None).expect("open");
        assert!(backlog(&empty, 5).is_empty());
    }

    #[test]
    fn a_backlog_reads_the_rotated_files_for_more_lines_than_the_current_one_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 1000,
            keep: 2,
        };
        let mut log = SiteLog::open(dir.path(), "n", policy, None).expect("open");
        // 100-byte lines: 10 per file; 35 lines leave 5 in the current file, 10 in each
        // of .1 and .2 (the 10 oldest are gone).
        for i in 0..35 {
            log.append(format!("{i:099}\n").as_bytes()).expect("append");
        }
        let numbers = |n| -> Vec<u32> {
            backlog(&log, n)
                .iter()
                .map(|l| l.parse().expect("number"))
                .collect()
        };
        assert_eq!(numbers(3), vec![32, 33, 34]);
        assert_eq!(numbers(12), (23..35).collect::<Vec<_>>());
        assert_eq!(numbers(25), (10..35).collect::<Vec<_>>());
        assert_eq!(numbers(1000), (10..35).collect::<Vec<_>>(), "all there is");
    }

    #[test]
    fn a_backlog_follows_the_log_across_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 4096,
            keep: 2,
        };
        let mut log = SiteLog::open(dir.path(), "r", policy, None).expect("open");
        for i in 0..10 {
            log.append(format!("old {i}\n").as_bytes()).expect("append");
        }
        let mut b = Backlog::start(&log, 3, true).expect("start");
        // Rotated (and written on) before the client read anything.
        let big = vec![b'x'; 4000];
        let mut line = big.clone();
        line.push(b'\n');
        log.append(&line).expect("append");
        log.append(b"new 1\n").expect("append");
        let mut got = Vec::new();
        while let Some(lines) = b.next_lines(&log).expect("read") {
            got.extend(lines);
        }
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(&got[..3], &["old 7", "old 8", "old 9"]);
        assert_eq!(got[4], "new 1");
    }

    /// A peek moves on past what it peeked; what is taken off is what was peeked; a
    /// socket left with bytes peeked and not taken says how many (as a dead agent's would),
    /// and settling either takes them off or reads them again.
    #[test]
    fn output_socket_peeks_then_takes_and_settles_what_a_reader_left() {
        let socket = OutputSocket::new().expect("socket");
        let send = |b: &[u8]| rustix::io::write(socket.sender(), b).expect("write");
        send(b"one\n");
        // Another writer: a chunk of its own.
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "printf 'two\\n'"])
            .stdin(std::process::Stdio::null())
            .stdout(socket.sender().try_clone_to_owned().expect("dup"))
            .status()
            .expect("sh");
        assert!(child.success());
        send(b"three\n");
        let mut buf = [0u8; 64];
        let a = socket.peek(&mut buf).expect("peek").expect("a chunk");
        assert_eq!(&buf[..a.len], b"one\n");
        let b = socket.peek(&mut buf).expect("peek").expect("a chunk");
        assert_eq!(&buf[..b.len], b"two\n");
        assert_ne!(a.pid, b.pid, "two writers");
        assert_eq!(socket.in_flight().expect("offset"), 8);
        socket.take(a.len, &mut buf).expect("take");
        assert_eq!(socket.in_flight().expect("offset"), 4, "peeked, not taken");
        // As a new reader: not logged, so read again from the front.
        socket.settle(false).expect("settle");
        assert_eq!(socket.in_flight().expect("offset"), 0);
        let again = socket.peek(&mut buf).expect("peek").expect("a chunk");
        assert_eq!(&buf[..again.len], b"two\n");
        // Logged: taken off.
        socket.settle(true).expect("settle");
        let last = socket.peek(&mut buf).expect("peek").expect("a chunk");
        assert_eq!(&buf[..last.len], b"three\n");
        socket.take(last.len, &mut buf).expect("take");
        assert_eq!(socket.peek(&mut buf).expect("peek"), None);
    }

    /// The cursor keeps its record (a new cursor has none), and its journal counts what
    /// was taken off pipes: a read is untaken until its bytes are spliced in.
    #[test]
    fn output_cursor_records_a_read_and_counts_what_was_taken() {
        let mut cursor = OutputCursor::new().expect("cursor");
        assert_eq!(cursor.recorded().expect("read"), None);
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        rustix::io::write(&w, b"hello\nworld\n").expect("write");
        let record = CursorRecord {
            name: "out/blog/g1/w-0/42".into(),
            mark: LogMark { ino: 7, size: 100 },
            len: 12,
            journal_at: cursor.journal_end(),
            expected: 150,
        };
        cursor.record(&record).expect("record");
        assert_eq!(cursor.untaken(&record), 12);
        cursor.take_from_pipe(r.as_fd(), 6).expect("take");
        assert_eq!(cursor.untaken(&record), 6, "half taken");
        use std::os::fd::AsFd;
        let again = OutputCursor::from_fd(cursor.fd().try_clone_to_owned().expect("dup"))
            .expect("a cursor");
        assert_eq!(again.recorded().expect("read"), Some(record.clone()));
        assert_eq!(again.untaken(&record), 6, "the journal is in the file");
        cursor.take_from_pipe(r.as_fd(), 6).expect("take");
        assert_eq!(cursor.untaken(&record), 0);
        let mut rest = [0u8; 8];
        rustix::io::write(&w, b"next\n").expect("write");
        assert_eq!(
            rustix::io::read(&r, &mut rest).expect("read"),
            5,
            "only what was taken is gone"
        );
        let at = |ino, size| LogMark { ino, size };
        assert!(record.logged(at(7, 150)) && record.logged(at(7, 200)));
        assert!(
            !record.logged(at(7, 100)) && !record.torn(at(7, 100)),
            "not written"
        );
        assert!(
            !record.logged(at(7, 120)) && record.torn(at(7, 120)),
            "cut short"
        );
        assert!(
            !record.logged(at(8, 500)) && !record.torn(at(8, 500)),
            "another file: read again"
        );
        again.clear().expect("clear");
        assert_eq!(cursor.recorded().expect("read"), None, "cleared");
    }
}

//! The agent's side of the [`OutputCursor`]: each read of a held output socket or pipe is
//! recorded before it is made, its bytes are looked at without being taken, their lines
//! written to the site's log, and only then taken off; a new agent settles the read the
//! one before it left unfinished. So a line a worker wrote is in its site's log exactly
//! once, whenever the agent dies. (A line a worker had not finished when the agent died,
//! kept in the dead agent's memory, is logged from where the new agent reads on.)

use std::os::fd::{BorrowedFd, OwnedFd};

use tracing::{debug, warn};

use super::Agent;
use crate::config::SiteName;
use crate::logs::{CursorRecord, LogMark, OutputCursor};

/// The name the fd holder keeps the cursor under.
pub(super) const CURSOR_NAME: &str = "output-cursor";

/// The cursor, what the agent before left in it, and a pipe to `tee` into.
#[derive(Debug, Default)]
pub(super) struct Cursor {
    file: Option<OutputCursor>,
    /// Whether making a new cursor failed (it is not tried again).
    failed: bool,
    /// Whether the file holds a record not yet cleared.
    recorded: bool,
    /// The last read of the agent before, if it left one unsettled.
    inherited: Option<CursorRecord>,
    /// A pipe a held pipe's bytes are copied into (`tee`) to be looked at.
    scratch: Option<(OwnedFd, OwnedFd)>,
}

impl Cursor {
    /// The cursor the agent before left (taken back from the fd holder), if any.
    pub(super) fn inherit(fd: Option<OwnedFd>) -> Cursor {
        let Some(fd) = fd else {
            return Cursor::default();
        };
        match OutputCursor::from_fd(fd) {
            Ok(file) => {
                let inherited = file
                    .recorded()
                    .inspect_err(|e| warn!("cannot read the output cursor the fd holder kept: {e}"))
                    .ok()
                    .flatten();
                Cursor {
                    recorded: inherited.is_some(),
                    inherited,
                    file: Some(file),
                    ..Cursor::default()
                }
            }
            Err(e) => {
                warn!(
                    "the output cursor the fd holder kept cannot be used ({e}): a new one is made"
                );
                Cursor::default()
            }
        }
    }

    /// The agent before's last read, if it was of `name`.
    fn inherited(&self, name: &str) -> Option<&CursorRecord> {
        self.inherited.as_ref().filter(|r| r.name == name)
    }
}

impl Agent {
    /// The cursor, made (and handed to the fd holder) at the first read that needs it.
    fn cursor_file(&mut self) -> Option<&mut OutputCursor> {
        if self.cursor.file.is_none() && !self.cursor.failed {
            match OutputCursor::new() {
                Ok(file) => {
                    self.hold_fds(&[(CURSOR_NAME, file.fd())]);
                    self.cursor.file = Some(file);
                }
                Err(e) => {
                    warn!(
                        "no output cursor ({e}): lines read when the agent dies may be lost or logged twice"
                    );
                    self.cursor.failed = true;
                }
            }
        }
        self.cursor.file.as_mut()
    }

    /// Writes the lines (`records`) of a read of `len` bytes of the output socket or pipe
    /// held as `held_as` to the site's log, in one write, recorded first in the cursor:
    /// where the log stands (after a rotation, if they would not fit) and where the write
    /// will end. After this, the caller takes the bytes off and calls
    /// [`Agent::read_done`].
    pub(super) fn write_recorded(
        &mut self,
        site: &SiteName,
        held_as: &str,
        len: u64,
        records: &[Vec<u8>],
    ) {
        let total: u64 = records.iter().map(|r| r.len() as u64).sum();
        let Some(s) = self.sites.get_mut(site) else {
            return;
        };
        if let Err(e) = s.io.log.make_room(total) {
            warn!(site = %site, "failed to rotate {}: {e}", s.io.log.path().display());
        }
        let mark = s.io.log.mark();
        if let Some(file) = self.cursor_file() {
            let record = CursorRecord {
                name: held_as.to_string(),
                mark,
                len,
                journal_at: file.journal_end(),
                expected: mark.size + total,
            };
            match file.record(&record) {
                Ok(()) => self.cursor.recorded = true,
                Err(e) => warn!("cannot write the output cursor: {e}"),
            }
        }
        if test_crash_armed(CrashPoint::Torn) {
            // Half the write, then death.
            let bytes = records.concat();
            if let Some(s) = self.sites.get_mut(site) {
                let _ = s.io.log.append_whole(&[bytes[..bytes.len() / 2].to_vec()]);
            }
            test_crash(CrashPoint::Torn);
        }
        self.write_records_whole(site, records);
    }

    /// The read recorded last is settled (its lines written, its bytes taken off).
    pub(super) fn read_done(&mut self) {
        if !self.cursor.recorded {
            return;
        }
        if let Some(file) = &self.cursor.file {
            match file.clear() {
                Ok(()) => self.cursor.recorded = false,
                Err(e) => warn!("cannot clear the output cursor: {e}"),
            }
        }
    }

    /// Whether the agent before wrote all the lines of its last read, of the socket or
    /// pipe held as `name`, to the log (which this agent opened at `opened`).
    pub(super) fn inherited_read_logged(&self, name: &str, opened: LogMark) -> bool {
        self.cursor
            .inherited(name)
            .is_some_and(|r| r.logged(opened))
    }

    /// A site's log, just opened: if the agent before died inside the write of the lines
    /// of a read of one of the site's sockets or pipes, the part it wrote is cut off (the
    /// read is done again).
    pub(super) fn repair_log(&self, site: &SiteName, log: &mut crate::logs::SiteLog) {
        let Some(r) = &self.cursor.inherited else {
            return;
        };
        let ours = [format!("out/{site}/"), format!("log/{site}/")]
            .iter()
            .any(|p| r.name.starts_with(p.as_str()));
        if ours && r.torn(log.opened()) {
            warn!(
                site = %site,
                "the agent before died writing lines to {}: the {} bytes it wrote of them are cut off and read again",
                log.path().display(),
                log.opened().size - r.mark.size
            );
            if let Err(e) = log.truncate_to(r.mark.size) {
                warn!(site = %site, "failed to cut {} back: {e}", log.path().display());
            }
        }
    }

    /// The agent before's last read, if any, is settled for every socket and pipe taken
    /// back (or was of none still here): the cursor says so.
    pub(super) fn inherited_settled(&mut self) {
        if self.cursor.inherited.take().is_some() {
            self.read_done();
        }
    }

    /// The socket or pipe held as `name` was taken back and settled: if the agent
    /// before's last read was of it, the cursor says it is settled (before anything else
    /// is written to the site's log, which would make a later agent judge it written).
    pub(super) fn settled(&mut self, name: &str) {
        if self.cursor.inherited(name).is_some() {
            self.inherited_settled();
        }
    }

    /// Copies what waits in the held pipe `from` into `buf` without taking it off
    /// (`tee`, then a read of the copy): how many bytes; 0 at the end of the pipe.
    pub(super) fn look_at_pipe(
        &mut self,
        from: BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> rustix::io::Result<usize> {
        if self.cursor.scratch.is_none() {
            let (r, w) = rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )?;
            self.cursor.scratch = Some((r, w));
        }
        let (r, w) = self.cursor.scratch.as_ref().expect("made above");
        let n = rustix::pipe::tee(from, w, buf.len(), rustix::pipe::SpliceFlags::NONBLOCK)?;
        let mut got = 0;
        while got < n {
            match rustix::io::read(r, &mut buf[got..n]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Takes `len` bytes (looked at, and their lines written) off the held pipe `from`,
    /// into the cursor's journal (pipes are read through the cursor only when it exists).
    pub(super) fn take_from_pipe(
        &mut self,
        from: BorrowedFd<'_>,
        len: usize,
    ) -> std::io::Result<()> {
        match self.cursor.file.as_mut() {
            Some(file) => file.take_from_pipe(from, len),
            None => Err(std::io::Error::other("no output cursor")),
        }
    }

    /// Whether the pipes are read through the cursor (held, and the cursor exists).
    pub(super) fn reads_through_cursor(&mut self) -> bool {
        self.cursor_file().is_some()
    }

    /// Settles the agent before's last read if it was of the pipe held as `name`, now
    /// taken back: if its lines are all in the log (as this agent opened it), what of it
    /// is still in the pipe is taken off; otherwise it is read again.
    pub(super) fn settle_pipe(
        &mut self,
        site: &SiteName,
        name: &str,
        pipe: BorrowedFd<'_>,
        opened: LogMark,
    ) {
        let Some(r) = self.cursor.inherited(name).filter(|r| r.len > 0).cloned() else {
            return;
        };
        let logged = r.logged(opened);
        let untaken = self.cursor.file.as_ref().map_or(0, |f| f.untaken(&r));
        debug!(
            site = %site,
            "the agent before read {} bytes of {name}: {}",
            r.len,
            if !logged {
                "not all in the log, read again".to_string()
            } else {
                format!("in the log, {untaken} still to take off")
            }
        );
        if logged && untaken > 0 {
            let len = usize::try_from(untaken).unwrap_or(usize::MAX);
            if let Err(e) = self.take_from_pipe(pipe, len) {
                warn!(site = %site, "cannot take off {name} what the agent before logged ({e}): it may be logged twice");
            }
        }
        self.settled(name);
    }
}

/// Set to `<point> <file>` (`peeked`, `torn` or `logged`), makes the agent kill itself
/// with `SIGKILL` at that point of a read of its workers' output that has complete lines
/// (after peeking; in the middle of writing the lines to the log, half of them written;
/// or after writing them, before taking them off), once `<file>` exists (it is removed
/// first, so it happens once): the tests' way to crash the agent exactly there.
pub(super) const CRASH_ENV: &str = "HATCHERY_TEST_CRASH_OUTPUT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CrashPoint {
    Peeked,
    Torn,
    Logged,
}

/// Where [`CRASH_ENV`] says to die, and the file that arms it.
fn crash_point() -> Option<&'static (CrashPoint, std::path::PathBuf)> {
    static ARMED: std::sync::OnceLock<Option<(CrashPoint, std::path::PathBuf)>> =
        std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(CRASH_ENV).ok()?;
            let (point, file) = value.split_once(' ')?;
            let point = match point {
                "peeked" => CrashPoint::Peeked,
                "torn" => CrashPoint::Torn,
                "logged" => CrashPoint::Logged,
                _ => return None,
            };
            Some((point, file.into()))
        })
        .as_ref()
}

/// Whether [`test_crash`] at `at` would die now.
fn test_crash_armed(at: CrashPoint) -> bool {
    crash_point().is_some_and(|(point, file)| *point == at && file.exists())
}

/// Dies here if [`CRASH_ENV`] says so.
pub(super) fn test_crash(at: CrashPoint) {
    if let Some((point, file)) = crash_point() {
        if *point == at && std::fs::remove_file(file).is_ok() {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

//! Worker output: one log file per site, size-based rotation, tailing; and the writer of
//! the agent's own log ([`AgentStderr`]), which never blocks the loop and never fails.
//!
//! Each worker's stdout and stderr go to one pipe the agent reads; complete lines are
//! written as `<UTC time> w-<id>[<pid>] <line>` to `<state_dir>/logs/<site>.log`. When a
//! write would take the file past `max_size`, it is renamed to `<site>.log.1` (older ones
//! shift up to `.<keep>`, the oldest is dropped) and a new file is started. Lines longer
//! than [`MAX_LINE`] are split. Writes are synchronous appends to a regular file, from
//! the event loop (no logging thread).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
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
/// a panic if that fails too). Writes use `RWF_NOWAIT` (pipes, sockets, most files);
/// where the file does not support it (a terminal), a plain write.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentStderr;

impl Write for AgentStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = rustix::stdio::stderr();
        let slice = [io::IoSlice::new(buf)];
        // Offset -1: at the current position, as write(2) would.
        let written =
            match rustix::io::pwritev2(fd, &slice, u64::MAX, rustix::io::ReadWriteFlags::NOWAIT) {
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
                    rustix::io::write(fd, buf)
                }
                other => other,
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
}

impl SiteLog {
    /// Opens (appending) `<dir>/<site>.log`.
    pub fn open(dir: &Path, site: &str, policy: LogPolicy) -> io::Result<SiteLog> {
        fs::create_dir_all(dir)?;
        let path = dir.join(format!("{site}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(SiteLog {
            path,
            file,
            size,
            policy,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the rotation policy (on reload).
    pub fn set_policy(&mut self, policy: LogPolicy) {
        self.policy = policy;
    }

    /// Appends one formatted record, rotating first if it would not fit.
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + record.len() as u64 > self.policy.max_size {
            self.rotate()?;
        }
        self.file.write_all(record)?;
        self.size += record.len() as u64;
        Ok(())
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
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Formats one log record.
pub fn record(worker: u32, pid: i32, line: &[u8], now: SystemTime) -> Vec<u8> {
    let mut out = format!("{} w-{worker}[{pid}] ", utc_timestamp(now)).into_bytes();
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// Splits a byte stream into lines, keeping the unfinished tail between reads.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `data`; calls `emit` with each complete line (without its newline).
    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            if self.partial.is_empty() {
                emit(line);
            } else {
                self.partial.extend_from_slice(line);
                emit(&self.partial);
                self.partial.clear();
            }
            rest = &tail[1..];
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_LINE {
            let tail = self.partial.split_off(MAX_LINE);
            emit(&self.partial);
            self.partial = tail;
        }
    }

    /// Emits what is left (the stream ended without a final newline).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

/// The last `n` lines of `path` (reading at most the last 8 MiB).
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let window = len.min(8 << 20);
    let mut start = len - window;
    let mut chunk = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(chunk).max(start);
        file.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        Read::by_ref(&mut file)
            .take(len - from)
            .read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.lines().collect();
        // The first line may be cut in the middle unless we read from the start.
        if from > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        if lines.len() >= n || from == start {
            let skip = lines.len().saturating_sub(n);
            return Ok(lines[skip..].iter().map(|s| s.to_string()).collect());
        }
        chunk *= 4;
        start = start.min(from);
    }
}

/// `2026-11-22T14:41:08.123Z`, computed without a time-zone database.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
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
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
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

    #[test]
    fn rotation_keeps_the_configured_number_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = LogPolicy {
            max_size: 4096,
            keep: 2,
        };
        let mut log = SiteLog::open(dir.path(), "blog", policy).expect("open");
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
        let last = tail(&dir.path().join("blog.log"), 1).expect("tail");
        assert!(last[0].starts_with('9'), "the newest line is last");
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let text: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).expect("write");
        assert_eq!(
            tail(&path, 2).expect("tail"),
            vec!["line 99998", "line 99999"]
        );
        assert_eq!(tail(&path, 20_000).expect("tail").len(), 20_000);
        assert!(
            tail(&dir.path().join("missing"), 5)
                .expect("tail")
                .is_empty()
        );
    }
}

//! Processes are referenced by pidfd from birth ([`PidRef`]).
//!
//! Kernel requirements: `pidfd_send_signal` (5.1), pidfd poll (5.3), `waitid(P_PIDFD)`
//! (5.4). A pid is only ever signalled through its pidfd, so a recycled pid can never be
//! hit by mistake; the process group kill (for workers without a cgroup) goes through
//! `kill(-pgid)` only while the pidfd shows the group leader has not been reaped.
//!
//! A process that is not our child (a worker of an earlier agent) is opened with
//! [`PidRef::open_verified`]: `pidfd_open` (5.3) first, then its start time is compared
//! with the recorded one (field 22 of `/proc/<pid>/stat`), then the pidfd is confirmed
//! with the null signal. The pidfd pins the process, not the number, so a recycled pid
//! with another start time is never signalled. Such a process cannot be waited for
//! (`waitid` gives `ECHILD`), but its pidfd polls readable once it has exited.
//!
//! Also this process's own signal dispositions: [`set_default_disposition`] (the CLI's
//! `SIGPIPE`), and blocked signals read from a signalfd ([`block_signals`],
//! [`signalfd`], [`read_signal`]: `hatchery top`'s `SIGTERM`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::process::{Pid, Signal as RSignal, WaitId, WaitIdOptions};

use crate::supervisor::slots::ExitReason;

pub use crate::sys::signals::set_default as set_default_disposition;
pub use crate::sys::signals::{SigSet, block as block_signals, read_signal, signalfd};

/// A live (or not yet reaped) child: its pid and its pidfd.
#[derive(Debug)]
pub struct PidRef {
    pid: i32,
    pidfd: OwnedFd,
}

impl PidRef {
    /// Wraps a pid and the pidfd `clone3` returned for it.
    pub fn new(pid: i32, pidfd: OwnedFd) -> PidRef {
        PidRef { pid, pidfd }
    }

    /// Opens a pidfd for `pid` if it is still the process that started at `start_time`
    /// (clock ticks since boot, as in `/proc/<pid>/stat`); `None` if it is gone, or the
    /// number now belongs to another process.
    pub fn open_verified(pid: i32, start_time: u64) -> Option<PidRef> {
        PidRef::open_verified_stat(pid, start_time).map(|(p, _)| p)
    }

    /// As [`PidRef::open_verified`], with what `/proc/<pid>/stat` said of it then (its
    /// parent, its process group).
    pub fn open_verified_stat(pid: i32, start_time: u64) -> Option<(PidRef, ProcStat)> {
        let p = Pid::from_raw(pid)?;
        // 1. Pin the process the number names now.
        let pidfd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()?;
        // 2. Is it the one recorded? Read after the pin: the number cannot move on while
        // the pidfd's process is unreaped, and step 3 checks that it is.
        let stat = read_stat(pid).ok()?;
        if stat.start_time != start_time {
            return None;
        }
        let pidref = PidRef { pid, pidfd };
        // 3. Still unreaped, so what /proc showed was this pidfd's process.
        pidref.is_unreaped().then_some((pidref, stat))
    }

    /// Whether the process is alive or an unreaped zombie (the null signal through the
    /// pidfd): while it is, its pid and the process group it leads cannot be reused.
    pub fn is_unreaped(&self) -> bool {
        crate::sys::pidfd::test_signal(self.pidfd.as_fd()).is_ok()
    }

    /// Whether the process has exited (its pidfd polls readable), without waiting and
    /// without reaping: this works for processes that are not our children too.
    pub fn has_exited(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
    }

    /// The pid, for display and credential matching.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` through the pidfd. `ESRCH` (already exited) is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let sig = RSignal::from_named_raw(signal)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match rustix::process::pidfd_send_signal(&self.pidfd, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `signal` to the process group the worker leads (it called `setpgid` or
    /// `setsid`), while the leader is not yet reaped, so the group id cannot have been reused.
    pub fn signal_group(&self, signal: i32) -> io::Result<()> {
        let sig = RSignal::from_named_raw(signal)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let pid =
            Pid::from_raw(self.pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        match rustix::process::kill_process_group(pid, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reaps the process if it has exited (`waitid(P_PIDFD, WNOHANG)`).
    ///
    /// `Ok(None)`: still running. `ECHILD` means someone else reaped it, which cannot
    /// happen in the agent (it is the only reaper).
    pub fn try_wait(&self) -> io::Result<Option<ExitReason>> {
        self.wait_with(WaitIdOptions::empty())
    }

    /// How the process ended if it has, leaving it a zombie (`WNOWAIT`): reaped later with
    /// [`PidRef::try_wait`]. Reaping is most of an exit's cost (the kernel frees the
    /// process and its `/proc` entries); telling how it ended is not.
    pub fn exit_status(&self) -> io::Result<Option<ExitReason>> {
        self.wait_with(WaitIdOptions::NOWAIT)
    }

    fn wait_with(&self, more: WaitIdOptions) -> io::Result<Option<ExitReason>> {
        let status = rustix::process::waitid(
            WaitId::PidFd(self.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | more,
        )?;
        Ok(status.and_then(|st| {
            if let Some(code) = st.exit_status() {
                if st.exited() {
                    return Some(ExitReason::Exited { code });
                }
            }
            st.terminating_signal()
                .map(|signal| ExitReason::Signaled { signal })
        }))
    }
}

impl PidRef {
    /// How a process that is not our child ended, once its pidfd polls readable: the
    /// kernel records it when the parent reaps it, and tells others from 6.15 on
    /// (`PIDFD_INFO_EXIT`). `None` where it does not (older kernels, or not reaped yet).
    pub fn foreign_exit(&self) -> Option<ExitReason> {
        let status = crate::sys::pidfd::exit_status(self.pidfd.as_fd()).ok()??;
        Some(decode_wait_status(status))
    }
}

impl PidRef {
    /// A duplicate of the process's open socket whose inode is `ino` (`pidfd_getfd`, Linux
    /// 5.6, which needs ptrace rights over it: root has them), e.g. a listener the agent
    /// passed to a worker of an earlier agent. `Ok(None)` when the process holds no such
    /// socket (any more).
    pub fn socket_by_inode(&self, ino: u64) -> io::Result<Option<OwnedFd>> {
        let want = format!("socket:[{ino}]");
        let mut found = None;
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.flatten() {
            let is_it =
                std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == want.as_str());
            if is_it {
                found = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok());
                break;
            }
        }
        // What /proc showed was this pidfd's process only if it is still unreaped.
        let (Some(target), true) = (found, self.is_unreaped()) else {
            return Ok(None);
        };
        let fd = rustix::process::pidfd_getfd(
            &self.pidfd,
            target,
            rustix::process::PidfdGetfdFlags::empty(),
        )?;
        // The number may have been closed and reused in between: check what came.
        let st = rustix::fs::fstat(&fd)?;
        Ok((st.st_ino == ino).then_some(fd))
    }
}

/// A wait status (`waitpid`'s `wstatus`) as an exit reason.
pub fn decode_wait_status(status: i32) -> ExitReason {
    // WIFEXITED: the low seven bits (the signal) are 0; WEXITSTATUS is the next byte.
    if status & 0x7f == 0 {
        ExitReason::Exited {
            code: (status >> 8) & 0xff,
        }
    } else {
        ExitReason::Signaled {
            signal: status & 0x7f,
        }
    }
}

/// What the agent reads of another process in `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its parent (field 4).
    pub ppid: i32,
    /// Its process group (field 5).
    pub pgid: i32,
    /// When it started, in clock ticks since boot (field 22).
    pub start_time: u64,
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock of a process's start time
/// (`/proc/<pid>/stat` field 22, in clock ticks).
pub fn boottime_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The start time, in clock ticks after boot as `/proc/<pid>/stat` gives it, of a process
/// created between two readings of [`boottime_ns`]: known without reading `/proc` when
/// both fall in the same tick (the kernel truncates the nanoseconds it took at the fork
/// to ticks), `None` when a tick ended between them.
///
/// Reading `/proc/<pid>/stat` instead has two costs at 10,000 workers: the read at every
/// start, and the `/proc/<pid>` entries it makes, which the kernel must then invalidate
/// when the process is reaped (a quarter of the agent's time in a graceful stop).
pub fn start_time_between(before_ns: u64, after_ns: u64) -> Option<u64> {
    let ticks = rustix::param::clock_ticks_per_second();
    if ticks == 0 || 1_000_000_000 % ticks != 0 || after_ns < before_ns {
        return None;
    }
    let tick_ns = 1_000_000_000 / ticks;
    let (a, b) = (before_ns / tick_ns, after_ns / tick_ns);
    (a == b).then_some(a)
}

/// Reads `/proc/<pid>/stat`.
pub fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat"),
        )
    })
}

/// The parent of process `pid` (`/proc/<pid>/stat` field 4), if it can be read.
pub fn parent_pid(pid: i32) -> Option<i32> {
    read_stat(pid).ok().map(|s| s.ppid)
}

/// Parses a `/proc/<pid>/stat` line: the fields after the command name, which is in
/// parentheses and may itself hold spaces and parentheses, hence after the last `)`
/// (proc(5)).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 (state) on: pgid is field 5, start time field 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        ppid: fields.get(4 - 3)?.parse().ok()?,
        pgid: fields.get(5 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// Every process in process group `pgid` other than `except`, each opened by pidfd and
/// checked to be in the group after it was pinned.
pub fn group_members(pgid: i32, except: i32) -> Vec<PidRef> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != except)
        .filter(|&pid| read_stat(pid).is_ok_and(|s| s.pgid == pgid))
        .filter_map(|pid| {
            let p = Pid::from_raw(pid)?;
            let pidfd =
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()?;
            let pidref = PidRef { pid, pidfd };
            (read_stat(pid).is_ok_and(|s| s.pgid == pgid) && pidref.is_unreaped()).then_some(pidref)
        })
        .collect()
}

impl AsFd for PidRef {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_this_process_is_its_parent() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        assert_eq!(parent_pid(me), Some(parent));
        assert_eq!(parent_pid(-1), None);
    }

    #[test]
    fn a_start_time_bracketed_by_the_boot_clock_is_the_one_proc_gives() {
        // The kernel's own start times against the ones derived from the clock around
        // the fork, until 50 were known (each must equal /proc's); a bracket across a
        // tick's end must give none (checked on the children that had one, and below on
        // fixed readings, since a run may have none).
        let (mut known, mut unknown) = (0, 0);
        for _ in 0..2000 {
            let before = boottime_ns();
            let mut child = std::process::Command::new("true")
                .spawn()
                .expect("spawn true");
            let after = boottime_ns();
            let pid = i32::try_from(child.id()).expect("pid");
            let real = read_stat(pid)
                .expect("stat of the unreaped child")
                .start_time;
            child.wait().expect("wait");
            match start_time_between(before, after) {
                Some(t) => {
                    assert_eq!(t, real, "bracket {before}..{after} ns");
                    known += 1;
                }
                None => {
                    let tick = 1_000_000_000 / rustix::param::clock_ticks_per_second();
                    assert_ne!(before / tick, after / tick);
                    unknown += 1;
                }
            }
            if known >= 50 {
                break;
            }
        }
        assert!(
            known >= 50,
            "{known} start times known of {}",
            known + unknown
        );
        // Across a tick's end the answer is None, never a guess.
        let tick = 1_000_000_000 / rustix::param::clock_ticks_per_second();
        assert_eq!(start_time_between(5 * tick - 1, 5 * tick), None);
        assert_eq!(start_time_between(5 * tick, 6 * tick - 1), Some(5));
    }

    #[test]
    fn the_stat_line_is_read_after_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615\n";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                ppid: 1,
                pgid: 4240,
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("4242 (sh) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn our_own_process_is_opened_only_with_its_start_time() {
        let me = i32::try_from(std::process::id()).expect("a pid fits");
        let stat = read_stat(me).expect("our own stat");
        let pidref = PidRef::open_verified(me, stat.start_time).expect("ourselves");
        assert!(pidref.is_unreaped());
        assert!(!pidref.has_exited());
        assert!(PidRef::open_verified(me, stat.start_time + 1).is_none());
        assert!(PidRef::open_verified(me, stat.start_time.saturating_sub(1)).is_none());
    }

    #[test]
    fn an_exited_process_polls_readable_and_is_unreaped_until_waited_for() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = i32::try_from(child.id()).expect("a pid fits");
        let start = read_stat(pid).expect("stat").start_time;
        let pidref = PidRef::open_verified(pid, start).expect("the child");
        let mut fds = [rustix::event::PollFd::new(
            &pidref,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, None).expect("poll");
        assert!(pidref.has_exited());
        assert!(
            pidref.is_unreaped(),
            "a zombie can still take the null signal"
        );
        child.wait().expect("reap");
        assert!(!pidref.is_unreaped());
    }

    #[test]
    fn a_socket_is_taken_from_another_process_by_its_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ino = rustix::fs::fstat(&listener).expect("fstat").st_ino;
        // A child holding the socket (as a worker holds its listeners).
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).expect("inheritable");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exec sleep 30"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("a pid fits");
        let pidref = PidRef::new(
            pid,
            rustix::process::pidfd_open(
                Pid::from_raw(pid).expect("a pid"),
                rustix::process::PidfdFlags::empty(),
            )
            .expect("pidfd_open"),
        );
        drop(listener);
        // Wait until the shell has moved it and exec'd (its fd table is sleep's then).
        let fd = loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break pidref.socket_by_inode(ino).expect("pidfd_getfd");
            }
            std::thread::yield_now();
        };
        let fd = fd.expect("the child holds it");
        let taken = std::net::TcpListener::from(fd);
        assert_eq!(taken.local_addr().expect("addr"), addr);
        assert!(pidref.socket_by_inode(ino + 1).expect("scan").is_none());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn wait_statuses_are_decoded_as_waitpid_encodes_them() {
        assert_eq!(decode_wait_status(42 << 8), ExitReason::Exited { code: 42 });
        assert_eq!(decode_wait_status(0), ExitReason::Exited { code: 0 });
        assert_eq!(decode_wait_status(9), ExitReason::Signaled { signal: 9 });
        // A core dump sets 0x80 beside the signal.
        assert_eq!(
            decode_wait_status(0x80 | 11),
            ExitReason::Signaled { signal: 11 }
        );
    }

    /// The kernel tells anyone holding a pidfd how its process ended from 6.15 on, once it
    /// has been reaped; before 6.13 the ioctl does not exist, and in between the exit is
    /// not part of it. Which applies is read from the kernel's release.
    #[test]
    fn the_exit_of_a_reaped_process_is_told_through_its_pidfd_from_6_15() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 42"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("a pid fits");
        // Opened before it can have exited and been reaped: it is our child.
        let pidfd = rustix::process::pidfd_open(
            Pid::from_raw(pid).expect("a pid"),
            rustix::process::PidfdFlags::empty(),
        )
        .expect("pidfd_open");
        let pidref = PidRef::new(pid, pidfd);
        assert_eq!(child.wait().expect("reap").code(), Some(42));
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).expect("major");
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).expect("minor");
        if (major, minor) >= (6, 15) {
            assert_eq!(pidref.foreign_exit(), Some(ExitReason::Exited { code: 42 }));
        } else {
            assert_eq!(pidref.foreign_exit(), None, "{release}");
        }
    }
}

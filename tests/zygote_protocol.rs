//! Zygote mode's protocol, end to end: this test plays the agent with `ZygoteLink` against
//! the real `hatchery __demo-zygote` (and once against the Python helper), as the child
//! subreaper that the double fork re-parents workers to.
//!
//! The subreaper flag is process-wide and stays set on this test binary (a forked child
//! would need `unsafe` here): harmless to the other tests of this file, whose orphans
//! would only stay zombies until the binary exits. Waits are on pidfds, sockets and
//! pipes; the one bounded negative wait (300 ms) checks that a worker answers nothing
//! before its go.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use hatchery::zygote::{Reply, ZygoteLink};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{WaitId, WaitIdOptions};

/// Clearing close-on-exec and spawning happen under this lock, so that no other test's
/// child inherits one zygote's fds.
static SPAWN: Mutex<()> = Mutex::new(());

/// A started zygote and what the test (as its agent) keeps of it.
struct Zygote {
    child: Child,
    link: ZygoteLink,
    listener: TcpListener,
    notify: UnixDatagram,
    _dir: tempfile::TempDir,
}

/// Waits (at most 10 s) until `pid` is our child: the zygote may answer before its
/// intermediate child has exited.
fn reparented(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hatchery::process::parent_pid(pid) != Some(my_pid()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(hatchery::process::parent_pid(pid), Some(my_pid()));
}

/// Waits at most `timeout` for `fd` to be readable (or hung up).
fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let t = Timespec::try_from(left).expect("a small timeout");
        match rustix::event::poll(&mut fds, Some(&t)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// Starts `argv` as a zygote: the listener at fd 3 (`LISTEN_FDS=1`), the link at fd 4
/// (`HATCHERY_ZYGOTE_FD=4`), `NOTIFY_SOCKET` and `HATCHERY_GENERATION=7`. bash places the
/// fds (std's `Command` cannot without `pre_exec`).
fn start(argv: &[&str], env: &[(&str, &str)]) -> Zygote {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("become a child subreaper");
    let (link, zygote_end) = ZygoteLink::pair().expect("socketpair");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let _spawning = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    // Numbers above 9, not close-on-exec, for the shell to move to 3 and 4.
    let high = |fd: BorrowedFd<'_>| {
        let d = rustix::io::fcntl_dupfd_cloexec(fd, 10).expect("dup");
        rustix::io::fcntl_setfd(&d, rustix::io::FdFlags::empty()).expect("clear cloexec");
        d
    };
    let l = high(listener.as_fd());
    let z = high(zygote_end.as_fd());
    let (l, z): (OwnedFd, OwnedFd) = (l, z);
    let script = format!(
        "exec 3<&{l} 4<&{z} {l}<&- {z}<&-; exec \"$@\"",
        l = l.as_raw_fd(),
        z = z.as_raw_fd()
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("zygote")
        .args(argv)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env("HATCHERY_ZYGOTE_FD", "4")
        .env(
            hatchery::zygote::PROTOCOL_ENV,
            hatchery::zygote::PROTOCOL_VERSION.to_string(),
        )
        .env("NOTIFY_SOCKET", &notify_path)
        .env("HATCHERY_GENERATION", "7")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the zygote through bash");
    drop((l, z, zygote_end));
    Zygote {
        child,
        link,
        listener,
        notify,
        _dir: dir,
    }
}

/// A failing test leaves no zygote behind.
impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker's pidfd; a failing test leaves no worker behind (after a clean stop, the
/// kill and the wait fail harmlessly: ESRCH, ECHILD).
struct KillOnDrop(OwnedFd);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = rustix::process::pidfd_send_signal(&self.0, rustix::process::Signal::KILL);
        let _ = rustix::process::waitid(WaitId::PidFd(self.0.as_fd()), WaitIdOptions::EXITED);
    }
}

impl Zygote {
    /// The zygote's pid (bash exec'd it).
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid")
    }

    /// Waits for `READY` of this version (the agent's, given in the environment).
    fn wait_ready(&mut self) {
        assert!(
            readable(self.link.fd(), Duration::from_secs(30)),
            "no READY from the zygote"
        );
        assert_eq!(
            self.link.read_ready().expect("READY"),
            Some(hatchery::zygote::PROTOCOL_VERSION)
        );
    }

    /// The pid of the next `SPARE` (at most 10 s).
    fn wait_spare(&mut self) -> i32 {
        assert!(
            readable(self.link.fd(), Duration::from_secs(10)),
            "no SPARE from the zygote"
        );
        match self.link.read_answer().expect("a message") {
            Some(Reply::Spare { pid }) => pid,
            other => panic!("expected a SPARE, got {other:?}"),
        }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().expect("local addr").port()
    }

    /// Waits for the zygote's exit (at most 10 s), through its pidfd.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits i32"))
                .expect("a pid");
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .expect("pidfd_open");
        assert!(
            readable(pidfd.as_fd(), Duration::from_secs(10)),
            "the zygote did not exit"
        );
        self.child.wait().expect("wait")
    }
}

/// Reads `fd` until `needle` shows up (at most 10 s); everything read.
fn read_until(fd: &OwnedFd, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while !text.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            readable(fd.as_fd(), left),
            "no {needle:?} in the output: {text:?}"
        );
        let mut buf = [0u8; 4096];
        let n = rustix::io::read(fd, &mut buf).expect("read");
        assert!(n > 0, "end of output without {needle:?}: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

/// Sends a request on a new connection, without reading the answer.
fn request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    s
}

/// The whole answer on `s` (at most 10 s).
fn answer(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the answer");
    body
}

/// The exit status of our child behind `pidfd`, waiting for it.
fn exit_code(pidfd: &OwnedFd) -> Option<i32> {
    let status = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED)
        .expect("waitid on our child")
        .expect("a status");
    status.exit_status()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
}

fn my_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

fn stop(pidfd: &OwnedFd) -> Option<i32> {
    rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::TERM).expect("SIGTERM");
    exit_code(pidfd)
}

#[test]
fn demo_zygote_forks_gated_workers_that_are_our_children_and_outlive_it() {
    let mut z = start(
        &[BIN, "__demo-zygote", "--load-ms", "20", "--load-mib", "8"],
        &[],
    );
    z.wait_ready();

    // Worker 0: our child, silent and serving nothing until its go.
    let (out, out_w) = pipe();
    let worker = z
        .link
        .fork(0, out_w.as_fd(), Duration::from_secs(10), Some(z.pid()))
        .expect("FORKED");
    drop(out_w);
    reparented(worker.pid);
    let pending = request(z.port());
    assert!(
        !readable(pending.as_fd(), Duration::from_millis(300)),
        "a worker answered before its go"
    );
    z.notify.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    assert!(z.notify.recv(&mut buf).is_err(), "READY=1 before the go");
    assert!(
        !readable(out.as_fd(), Duration::ZERO),
        "output before the go"
    );
    let pid = worker.pid;
    let pidfd = KillOnDrop(worker.pidfd.try_clone().expect("dup the pidfd"));
    worker.proceed().expect("go");
    z.notify.set_nonblocking(false).expect("blocking");
    z.notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = z.notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(answer(pending).contains("hello from worker 0, generation 7"));
    read_until(&out, "demo worker 0 of generation 7 serving");

    // Worker 1: its go pipe closed unwritten, it exits 1 having served and said nothing.
    let (out1, out1_w) = pipe();
    let refused = z
        .link
        .fork(1, out1_w.as_fd(), Duration::from_secs(10), Some(z.pid()))
        .expect("FORKED");
    drop(out1_w);
    assert_ne!(refused.pid, pid);
    let refused_pidfd = refused.pidfd;
    drop(refused.go);
    assert_eq!(exit_code(&refused_pidfd), Some(1));
    let mut rest = [0u8; 64];
    assert_eq!(rustix::io::read(&out1, &mut rest), Ok(0), "it wrote output");

    // The zygote killed, worker 0 serves on.
    z.child.kill().expect("kill the zygote");
    z.child.wait().expect("reap the zygote");
    assert!(answer(request(z.port())).contains("hello from worker 0, generation 7"));
    assert_eq!(stop(&pidfd.0), Some(0));
}

#[test]
fn the_zygote_exits_when_its_link_is_closed() {
    let mut z = start(&[BIN, "__demo-zygote"], &[]);
    z.wait_ready();
    let (out, out_w) = pipe();
    let worker = z
        .link
        .fork(3, out_w.as_fd(), Duration::from_secs(10), Some(z.pid()))
        .expect("FORKED");
    drop(out_w);
    let pidfd = KillOnDrop(worker.pidfd.try_clone().expect("dup the pidfd"));
    worker.proceed().expect("go");
    read_until(&out, "demo worker 3 of generation 7 serving");
    let (link, _) = ZygoteLink::pair().expect("socketpair");
    drop(std::mem::replace(&mut z.link, link));
    assert!(z.wait_exit().success());
    assert!(answer(request(z.port())).contains("hello from worker 3"));
    assert_eq!(stop(&pidfd.0), Some(0));
}

#[test]
fn the_python_zygote_speaks_the_same_protocol() {
    let python = Command::new("python3")
        .args(["-c", "import sys; assert sys.version_info >= (3, 9)"])
        .status();
    if !python.is_ok_and(|s| s.success()) {
        skip("python3 (3.9 or later) is not installed");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("zygote/python");
    let path = format!("{}:{}", root.display(), root.join("tests").display());
    let mut z = start(
        &["python3", "-m", "hatchery_zygote", "tiny_app:app"],
        &[("PYTHONPATH", path.as_str())],
    );
    z.wait_ready();
    // Version 3: the worker it forked ahead is named before any FORK, and the FORK gets
    // that one (checked by the agent like a FORKED's: our child-to-be, alive).
    let spare = z.wait_spare();
    hatchery::zygote::check_spare(spare, Some(z.pid())).expect("a spare of ours");
    let (out, out_w) = pipe();
    let worker = z
        .link
        .fork(2, out_w.as_fd(), Duration::from_secs(10), Some(z.pid()))
        .expect("FORKED");
    drop(out_w);
    assert_eq!(worker.pid, spare, "the FORK took the spare it named");
    reparented(worker.pid);
    let pid = worker.pid;
    let pidfd = KillOnDrop(worker.pidfd.try_clone().expect("dup the pidfd"));
    worker.proceed().expect("go");
    let mut buf = [0u8; 256];
    z.notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = z.notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    let body = answer(request(z.port()));
    assert!(
        body.contains(&format!("tiny app: worker 2, pid {pid}, generation 7")),
        "{body}"
    );
    read_until(&out, "serving");
    let (link, _) = ZygoteLink::pair().expect("socketpair");
    drop(std::mem::replace(&mut z.link, link));
    assert!(z.wait_exit().success());
    assert_eq!(stop(&pidfd.0), Some(0));
}

#[test]
fn a_fork_without_its_output_fd_fails_and_the_zygote_forks_on() {
    let mut z = start(&[BIN, "__demo-zygote"], &[]);
    z.wait_ready();
    // Behind ZygoteLink's back, on a duplicate of its socket: a FORK without its fd, with
    // a request id the link will not use.
    let raw =
        UnixDatagram::from(rustix::io::fcntl_dupfd_cloexec(z.link.fd(), 3).expect("dup the link"));
    raw.send(b"FORK 5 1000000").expect("send");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 600];
    let n = raw.recv(&mut buf).expect("an answer");
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "FAILED 1000000 FORK needs 1 or 2 fds, got 0"
    );
    let (out, out_w) = pipe();
    let worker = z
        .link
        .fork(5, out_w.as_fd(), Duration::from_secs(10), Some(z.pid()))
        .expect("FORKED");
    drop(out_w);
    let pidfd = KillOnDrop(worker.pidfd.try_clone().expect("dup the pidfd"));
    worker.proceed().expect("go");
    read_until(&out, "demo worker 5 of generation 7 serving");
    assert_eq!(stop(&pidfd.0), Some(0));
}

/// Version 2: a `FORK` with two fds gives the worker the first as its stdout and the
/// second as its stderr (what lets `hatchery logs` tell a forked worker's streams apart).
#[test]
fn a_fork_with_two_output_fds_gives_the_worker_its_stdout_and_stderr_apart() {
    let mut z = start(&[BIN, "__demo-zygote", "--load-ms", "20"], &[]);
    z.wait_ready();
    let (out, out_w) = pipe();
    let (err, err_w) = pipe();
    let request = z
        .link
        .request_fork(4, out_w.as_fd(), Some(err_w.as_fd()))
        .expect("FORK");
    drop(out_w);
    drop(err_w);
    let answer = loop {
        assert!(
            readable(z.link.fd(), Duration::from_secs(10)),
            "no answer to FORK"
        );
        if let Some(Reply::Answer(a)) = z.link.read_answer().expect("an answer") {
            break a;
        }
    };
    assert_eq!(answer.request, request);
    let worker = answer.into_forked(4, Some(z.pid())).expect("FORKED");
    reparented(worker.pid);
    let pid = worker.pid;
    let _pidfd = KillOnDrop(worker.pidfd.try_clone().expect("dup the pidfd"));
    worker.proceed().expect("go");
    z.notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    let n = z.notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    let pipe_of = |fd: &OwnedFd| {
        format!(
            "pipe:[{}]",
            rustix::fs::fstat(fd).expect("fstat the pipe").st_ino
        )
    };
    let fd_of = |n: u32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
            .expect("the worker's fd")
            .display()
            .to_string()
    };
    assert_eq!(fd_of(1), pipe_of(&out), "its stdout");
    assert_eq!(fd_of(2), pipe_of(&err), "its stderr");
}

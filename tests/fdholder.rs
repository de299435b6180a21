//! The fd holder as the agent uses it: the real `hatchery fd-holder` process started by
//! `HolderClient::connect_or_start`, holding a worker's pipe across a client's departure,
//! and gone after `EXIT`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

mod common;

use hatchery::fdholder::HolderClient;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// The holder's process, from the credentials of a connection to it, as a pidfd.
fn holder_pidfd(path: &Path) -> (Pid, OwnedFd) {
    let conn = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    rustix::net::connect(&conn, &SocketAddrUnix::new(path).expect("addr")).expect("connect");
    let pid = sockopt::socket_peercred(&conn).expect("peercred").pid;
    // Our child, not yet reaped: the pid cannot have been reused.
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
    (pid, pidfd)
}

#[test]
fn the_holder_keeps_a_pipe_across_clients_and_exits_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fdholder.sock");
    let exe = Path::new(env!("CARGO_BIN_EXE_hatchery"));

    assert!(HolderClient::connect(&path).expect("connect").is_none());
    let (mut client, started) = HolderClient::connect_or_start(&path, exe).expect("start");
    assert!(started);
    let (pid, pidfd) = holder_pidfd(&path);
    // Its own session, so a hang-up of ours does not reach it.
    assert_eq!(rustix::process::getsid(Some(pid)).expect("getsid"), pid);

    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    client.put(&[("blog/w-1.out", r.as_fd())]).expect("put");
    drop(r);
    drop(client);
    // Only the holder reads... never, but holds a reader: no EPIPE (SIGPIPE is ignored in
    // tests, so a missing reader would show as EPIPE here).
    assert_eq!(rustix::io::write(&w, b"line 1\n"), Ok(7));

    // A hang-up does not end it: were SIGHUP fatal, it would be delivered before the
    // holder answers anything more, and the next connection would fail.
    rustix::process::kill_process(pid, Signal::HUP).expect("kill");

    let (mut client, started) = HolderClient::connect_or_start(&path, exe).expect("connect");
    assert!(!started, "a second holder was started beside the first");
    let dump = client.dump().expect("dump");
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].0, "blog/w-1.out");
    let mut buf = [0u8; 64];
    let n = rustix::io::read(&dump[0].1, &mut buf).expect("read");
    assert_eq!(&buf[..n], b"line 1\n");
    drop(dump);

    let again = HolderClient::connect(&path)
        .expect("connect")
        .expect("it listens");
    drop(again);
    client.exit().expect("exit");
    assert!(!path.exists(), "EXIT left the socket file");
    let status = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED)
        .expect("waitid")
        .expect("a status");
    assert!(status.exited(), "the holder did not exit by itself");
    assert_eq!(status.exit_status(), Some(0));
    assert!(HolderClient::connect(&path).expect("connect").is_none());
    // With the holder gone, nothing reads the pipe.
    assert_eq!(rustix::io::write(&w, b"x"), Err(rustix::io::Errno::PIPE));
}

#[test]
fn a_missing_executable_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fdholder.sock");
    let err = HolderClient::connect_or_start(&path, &dir.path().join("no-such-hatchery"))
        .expect_err("started nothing");
    assert!(err.to_string().starts_with("failed to start"), "{err}");
}

#[test]
fn the_subcommand_is_hidden_and_never_suggested() {
    let exe = env!("CARGO_BIN_EXE_hatchery");
    let help = std::process::Command::new(exe)
        .arg("--help")
        .output()
        .expect("run");
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains("fd-holder"));
    let typo = std::process::Command::new(exe)
        .arg("fd-holde")
        .output()
        .expect("run");
    assert_eq!(typo.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(
        stderr.contains("unrecognized subcommand 'fd-holde'"),
        "{stderr}"
    );
    assert!(!stderr.contains("fd-holder"), "{stderr}");
    // Without its socket, a usage error.
    let bare = std::process::Command::new(exe)
        .arg("fd-holder")
        .output()
        .expect("run");
    assert_eq!(bare.status.code(), Some(2));
}

/// Another user is refused by the holder itself (`SO_PEERCRED`), even when the socket's
/// mode lets it connect, and what is held stays held.
#[test]
fn another_uid_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !common::is_root() && common::skip("needs root to connect as another uid") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fdholder.sock");
    let exe = env!("CARGO_BIN_EXE_hatchery");
    let (mut client, _) = HolderClient::connect_or_start(&path, Path::new(exe)).expect("start");
    let (_pid, pidfd) = holder_pidfd(&path);
    let (r, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    client.put(&[("a", r.as_fd())]).expect("put");
    // Only the peer check stands in the way now.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let probe = |uid: Option<u32>| {
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["__probe", "holder-dump"]).arg(&path);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().expect("probe");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // The same probe as the holder's user is served: the refusal below is the peer check.
    assert_eq!(probe(None), (Some(0), "{\"dumped\":1}\n".to_string()));
    let (code, out) = probe(Some(65534));
    assert_eq!(code, Some(1), "{out}");
    // Closed at once, its HELLO unread (a reset) or unanswered.
    assert!(out.contains("HELLO"), "{out}");
    assert_eq!(client.dump().expect("dump").len(), 1);
    client.exit().expect("exit");
    rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED).expect("waitid");
}

//! The eBPF steering program on the running kernel: real SO_REUSEPORT listeners on
//! 127.0.0.1, real connections. Needs CAP_BPF/CAP_NET_ADMIN (root); skips otherwise.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use hatchery::steering::{self, Steering, SteeringError, SteeringSupport};
use rustix::net::{AddressFamily, SocketType, bind, listen, socket, sockopt};

const CONNECTIONS: usize = 50;
const DEADLINE: Duration = Duration::from_secs(10);

/// Whether steering can load here; skips with the reason otherwise.
fn available() -> bool {
    match steering::probe() {
        SteeringSupport::Unavailable(why) => !common::skip(&format!("steering unavailable: {why}")),
        _ => true,
    }
}

/// A TCP socket with SO_REUSEPORT bound to `addr` (not yet listening).
fn bound(addr: SocketAddr, reuseport: bool) -> OwnedFd {
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_reuseport(&fd, reuseport).expect("SO_REUSEPORT");
    bind(&fd, &addr).expect("bind");
    fd
}

/// A listening, non-blocking SO_REUSEPORT member of the group at `addr`.
fn member(addr: SocketAddr) -> TcpListener {
    let fd = bound(addr, true);
    listen(&fd, 128).expect("listen");
    let l = TcpListener::from(fd);
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// A pair of listeners in one fresh group on 127.0.0.1.
fn pair() -> (TcpListener, TcpListener, SocketAddr) {
    let a = member("127.0.0.1:0".parse().expect("addr"));
    let addr = a.local_addr().expect("local addr");
    let b = member(addr);
    (a, b, addr)
}

/// Accepts everything that arrives on `l` until `want` have been accepted or the
/// deadline passes.
fn accept_n(l: &TcpListener, want: usize) -> Vec<TcpStream> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < want && start.elapsed() < DEADLINE {
        match l.accept() {
            Ok((s, _)) => out.push(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    out
}

/// Accepts whatever is queued on `l` right now.
fn accept_queued(l: &TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect_timeout(&addr, DEADLINE).expect("connect"))
        .collect()
}

#[test]
fn steering_new_connections_go_to_the_steered_listener() {
    if !available() {
        return;
    }
    let (a, b, addr) = pair();
    let mut steering = Steering::attach(a.as_fd()).expect("attach");

    steering.steer_to(a.as_fd()).expect("steer to A");
    let clients = connect(addr, CONNECTIONS);
    assert_eq!(accept_n(&a, CONNECTIONS).len(), CONNECTIONS, "all on A");
    assert_eq!(accept_queued(&b), 0, "none on B");
    drop(clients);

    steering.steer_to(b.as_fd()).expect("steer to B");
    let clients = connect(addr, CONNECTIONS);
    assert_eq!(accept_n(&b, CONNECTIONS).len(), CONNECTIONS, "all on B");
    assert_eq!(accept_queued(&a), 0, "none on A");
    drop(clients);

    // Back to A, which already sits in a slot.
    steering.steer_to(a.as_fd()).expect("steer back to A");
    let clients = connect(addr, 5);
    assert_eq!(accept_n(&a, 5).len(), 5, "all on A again");
    assert_eq!(accept_queued(&b), 0, "none on B again");
    drop(clients);
}

#[test]
fn steering_queued_connections_of_a_closed_listener_migrate() {
    if !available() {
        return;
    }
    let (a, b, addr) = pair();
    let mut steering = Steering::attach(a.as_fd()).expect("attach");
    if !steering.migrates() {
        common::skip("SELECT_OR_MIGRATE not available (Linux 5.14)");
        return;
    }
    steering.steer_to(a.as_fd()).expect("steer to A");
    let queued: usize = 8; // also the accept-queue length waited for below
    let mut clients = connect(addr, queued);
    let start = Instant::now();
    while hatchery::net::accept_queue_len(a.as_fd()).expect("TCP_INFO") < 8 {
        assert!(start.elapsed() < DEADLINE, "connections did not queue on A");
        std::thread::sleep(Duration::from_millis(5));
    }

    steering.steer_to(b.as_fd()).expect("steer to B");
    drop(a);

    let mut accepted = accept_n(&b, queued);
    assert_eq!(
        accepted.len(),
        queued,
        "every queued connection migrated to B"
    );
    for (server, client) in accepted.iter_mut().zip(clients.iter_mut()) {
        server.set_nonblocking(false).expect("blocking");
        server.set_read_timeout(Some(DEADLINE)).expect("timeout");
        client.set_read_timeout(Some(DEADLINE)).expect("timeout");
        client.write_all(b"q").expect("client send");
        server.write_all(b"r").expect("server send");
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).expect("client recv (no reset)");
        assert_eq!(&buf, b"r");
    }
    // Each migrated connection carries its own client's byte (order is the kernel's).
    for server in &mut accepted {
        let mut buf = [0u8; 1];
        server.read_exact(&mut buf).expect("server recv");
        assert_eq!(&buf, b"q");
    }
}

/// A client socket on 127.0.0.1 bound to a port of its own (before it connects), and
/// that port.
fn client_from_own_port() -> (OwnedFd, u16) {
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &"127.0.0.1:0".parse::<SocketAddr>().expect("addr")).expect("bind");
    let local = rustix::net::getsockname(&fd).expect("getsockname");
    let port = SocketAddr::try_from(local).expect("an IP address").port();
    (fd, port)
}

#[test]
fn steering_a_probe_port_reaches_a_listener_that_is_not_serving() {
    if !available() {
        return;
    }
    let (a, b, addr) = pair();
    let mut steering = Steering::attach(a.as_fd()).expect("attach");
    steering.steer_to(a.as_fd()).expect("steer to A");

    // A probe from port P goes to B, which is not serving; everything else stays on A.
    let (probe, port) = client_from_own_port();
    steering.probe_from(port, b.as_fd()).expect("probe B");
    rustix::net::connect(&probe, &addr).expect("probe connect");
    let others = connect(addr, CONNECTIONS);
    assert_eq!(accept_n(&b, 1).len(), 1, "the probe reached B");
    assert_eq!(
        accept_n(&a, CONNECTIONS).len(),
        CONNECTIONS,
        "the rest on A"
    );
    assert_eq!(accept_queued(&b), 0, "nothing else on B");
    drop((probe, others));

    // Once cleared, a connection from a probe port is steered like any other.
    let (late, port) = client_from_own_port();
    steering.probe_from(port, b.as_fd()).expect("probe B");
    steering.clear_probe().expect("clear");
    rustix::net::connect(&late, &addr).expect("connect");
    assert_eq!(accept_n(&a, 1).len(), 1, "a cleared probe's port goes to A");
    assert_eq!(accept_queued(&b), 0, "none on B");

    // The flip to the probed listener reuses its slot.
    steering.steer_to(b.as_fd()).expect("steer to B");
    let clients = connect(addr, 5);
    assert_eq!(accept_n(&b, 5).len(), 5, "all on B after the flip");
    assert_eq!(accept_queued(&a), 0, "none on A after the flip");
    drop(clients);
}

/// Connects `n` clients in batches the listen backlog holds, accepting each batch from
/// both listeners; returns how many `a` and `b` accepted.
fn split(addr: SocketAddr, a: &TcpListener, b: &TcpListener, n: usize) -> (usize, usize) {
    const BATCH: usize = 100;
    let (mut on_a, mut on_b) = (0, 0);
    let mut left = n;
    while left > 0 {
        let batch = left.min(BATCH);
        let clients = connect(addr, batch);
        let start = Instant::now();
        let mut got = 0;
        while got < batch && start.elapsed() < DEADLINE {
            let (x, y) = (accept_queued(a), accept_queued(b));
            (on_a, on_b, got) = (on_a + x, on_b + y, got + x + y);
            if x + y == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert_eq!(got, batch, "every connection of the batch was accepted");
        drop(clients);
        left -= batch;
    }
    (on_a, on_b)
}

#[test]
fn steering_a_canary_takes_its_share_of_new_connections() {
    if !available() {
        return;
    }
    let (a, b, addr) = pair();
    let mut steering = Steering::attach(a.as_fd()).expect("attach");
    steering.steer_to(a.as_fd()).expect("steer to A");

    // 10 % of the hash space: 6554 of 65536.
    steering.canary(b.as_fd(), 6554).expect("canary B");
    let (on_a, on_b) = split(addr, &a, &b, 2000);
    assert_eq!(on_a + on_b, 2000);
    assert!(
        (140..=260).contains(&on_b),
        "B took {on_b} of 2000 connections, not 10 % ± 3 %"
    );

    // Cleared: none on B.
    steering.clear_canary().expect("clear");
    assert_eq!(
        split(addr, &a, &b, 200),
        (200, 0),
        "a cleared canary gets nothing"
    );

    // The flip to the canary's listener reuses its slot; clearing afterwards changes
    // nothing.
    steering.canary(b.as_fd(), 6554).expect("canary B again");
    steering.steer_to(b.as_fd()).expect("steer to B");
    steering.clear_canary().expect("clear");
    assert_eq!(
        split(addr, &a, &b, 200),
        (0, 200),
        "all on B after the flip"
    );
}

#[test]
fn steering_attach_needs_a_reuseport_socket() {
    let l = bound("127.0.0.1:0".parse().expect("addr"), false);
    listen(&l, 16).expect("listen");
    let err = Steering::attach(l.as_fd()).expect_err("no SO_REUSEPORT");
    assert!(matches!(err, SteeringError::NotReuseport), "{err:?}");
    assert!(err.to_string().contains("SO_REUSEPORT"), "{err}");
}

#[test]
fn steering_sockarray_refuses_a_bound_but_not_listening_socket() {
    if !available() {
        return;
    }
    let a = member("127.0.0.1:0".parse().expect("addr"));
    let not_listening = bound(a.local_addr().expect("addr"), true);
    let mut steering = Steering::attach(a.as_fd()).expect("attach");
    let err = steering
        .steer_to(not_listening.as_fd())
        .expect_err("sockarray takes listening sockets only");
    assert!(matches!(err, SteeringError::Insert { .. }), "{err:?}");
    // The group still works, steered to A.
    steering.steer_to(a.as_fd()).expect("steer to A");
    let _c = connect(a.local_addr().expect("addr"), 3);
    assert_eq!(accept_n(&a, 3).len(), 3);
}

#[test]
fn steering_a_staged_listener_shut_down_since_is_refused_at_the_flip() {
    if !available() {
        return;
    }
    let (a, b, addr) = pair();
    let mut steering = Steering::attach(a.as_fd()).expect("attach");
    steering.steer_to(a.as_fd()).expect("steer to A");
    // B is put in the other slot by a probe (as a deploy's ready check does), then shut
    // down by a process holding it: it leaves its reuseport group and the sockarray.
    let (_client, port) = client_from_own_port();
    steering.probe_from(port, b.as_fd()).expect("probe B");
    rustix::net::shutdown(&b, rustix::net::Shutdown::Both).expect("shutdown B");
    let err = steering
        .steer_to(b.as_fd())
        .expect_err("B is no longer in the group");
    assert!(matches!(err, SteeringError::Insert { .. }), "{err:?}");
    // New connections still go to A.
    let _c = connect(addr, 3);
    assert_eq!(accept_n(&a, 3).len(), 3);
}

#[test]
fn steering_a_rejected_program_carries_the_verifier_log() {
    if !available() {
        return;
    }
    // r0 = 1 without an exit: the verifier refuses to fall off the end.
    let insns = [[0xb7, 0, 0, 0, 1, 0, 0, 0]];
    let err = hatchery::steering::load_select_program(&insns).expect_err("no exit instruction");
    assert!(!err.log.is_empty(), "{err}");
    assert!(err.to_string().contains("verifier log"), "{err}");
    eprintln!("{err}");
}

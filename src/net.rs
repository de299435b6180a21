//! Sockets the agent owns: site listeners and the notify socket.
//!
//! Listeners are bound by the agent, never by workers, and passed to every worker with
//! the systemd socket-activation protocol (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`), so any server that supports socket activation works unchanged. They are
//! created blocking (the flag is shared with the workers through the open file
//! description, and servers expect what systemd gives them), close-on-exec in the agent,
//! with `SO_REUSEADDR` and `SO_REUSEPORT` (for generations to bind beside each other).
//!
//! The notify socket is one unix datagram socket per agent (`NOTIFY_SOCKET`) with
//! `SO_PASSCRED`, so every message carries the sender's pid as checked by the kernel.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix,
    SocketFlags, SocketType, sockopt,
};

use crate::config::{ListenAddr, ListenSpec};

pub use crate::sys::tcp::accept_queue_len;

/// Errors binding sockets.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Creating, configuring, binding or listening failed.
    #[error("failed to bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something else exists at a unix socket's path.
    #[error("refusing to replace {}: it exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Another process listens there already.
    #[error("{addr}: address in use by {by}")]
    InUse {
        /// The address.
        addr: String,
        /// Who holds it, as far as can be told (`pid 4242 (nginx)`).
        by: String,
    },
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    /// Its configuration.
    pub spec: ListenSpec,
    /// The socket.
    pub fd: OwnedFd,
}

impl Listener {
    /// Binds and listens on `spec`'s address; a unix socket is made owned by `uid:gid`.
    ///
    /// A site's first listener on an address must not share it with anyone: with
    /// `SO_REUSEPORT`, a bind beside another process of the same user that also set it
    /// succeeds, and the two would split the connections. So an address on which another
    /// process listens (the kernel's socket tables, overlapping wildcards included) or a
    /// unix path someone still accepts on is refused, naming the holder when it can be
    /// found. [`Listener::bind_beside`] is for a new generation joining the agent's own
    /// group.
    pub fn bind(spec: &ListenSpec, uid: u32, gid: u32) -> Result<Listener, NetError> {
        match &spec.addr {
            ListenAddr::Tcp(addr) => {
                if let Some(by) = tcp_holder(*addr) {
                    return Err(NetError::InUse {
                        addr: spec.addr.to_string(),
                        by,
                    });
                }
            }
            ListenAddr::Unix(path) => {
                let socket =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
                if socket && std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(NetError::InUse {
                        addr: spec.addr.to_string(),
                        by: "another process (it accepts connections)".into(),
                    });
                }
            }
        }
        Listener::bind_beside(spec, uid, gid)
    }

    /// Binds and listens on `spec`'s address beside the agent's own socket of the same
    /// address (`SO_REUSEPORT`: a new generation's listener in the same group).
    pub fn bind_beside(spec: &ListenSpec, uid: u32, gid: u32) -> Result<Listener, NetError> {
        let bind_err = |source: io::Error| match source.raw_os_error() {
            Some(libc::EADDRINUSE) => NetError::InUse {
                addr: spec.addr.to_string(),
                by: match &spec.addr {
                    ListenAddr::Tcp(a) => tcp_holder(*a),
                    ListenAddr::Unix(_) => None,
                }
                .unwrap_or_else(|| "another process".into()),
            },
            _ => NetError::Bind {
                addr: spec.addr.to_string(),
                source,
            },
        };
        let fd = match &spec.addr {
            ListenAddr::Tcp(addr) => {
                let family = if addr.is_ipv4() {
                    AddressFamily::INET
                } else {
                    AddressFamily::INET6
                };
                let fd = rustix::net::socket_with(
                    family,
                    SocketType::STREAM,
                    SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| bind_err(e.into()))?;
                sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| bind_err(e.into()))?;
                sockopt::set_socket_reuseport(&fd, true).map_err(|e| bind_err(e.into()))?;
                rustix::net::bind(&fd, addr).map_err(|e| bind_err(e.into()))?;
                fd
            }
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(NetError::NotASocket(path.clone()));
                    }
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                let fd = rustix::net::socket_with(
                    AddressFamily::UNIX,
                    SocketType::STREAM,
                    SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| bind_err(e.into()))?;
                let addr = SocketAddrUnix::new(path).map_err(|e| bind_err(e.into()))?;
                rustix::net::bind(&fd, &addr).map_err(|e| bind_err(e.into()))?;
                if rustix::process::geteuid().is_root() {
                    // Not following a symlink: if the directory is the site user's, it
                    // could have replaced the socket with a link to any file by now.
                    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(bind_err)?;
                }
                fd
            }
        };
        let backlog = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
        rustix::net::listen(&fd, backlog).map_err(|e| bind_err(e.into()))?;
        Ok(Listener {
            spec: spec.clone(),
            fd,
        })
    }

    /// The accept-queue length (TCP only; `None` for unix sockets).
    pub fn queued(&self) -> Option<u32> {
        match self.spec.addr {
            ListenAddr::Tcp(_) => accept_queue_len(self.fd.as_fd()).ok(),
            ListenAddr::Unix(_) => None,
        }
    }

    /// Whether the socket was shut down (`shutdown(2)`, by any process holding it): it
    /// accepts no connection and never will. A TCP listener shut down is closed (its
    /// poll says `POLLHUP`); a unix one still says it listens, but refuses connections
    /// (its poll says `POLLRDHUP`, or `POLLHUP` when shut both ways).
    pub fn shut_down(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.fd, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&now)) {
            Ok(_) => fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR),
            Err(_) => false,
        }
    }

    /// Removes a unix listener's socket file (after the socket is closed for good).
    pub fn unlink(&self) {
        if let ListenAddr::Unix(path) = &self.spec.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Who else listens on `addr` (or an address overlapping it), if anyone: read from
/// `/proc/net/tcp` and `/proc/net/tcp6` (sockets in `LISTEN`), the owner found by its
/// socket inode among the fds in `/proc/*/fd`. The agent's own sockets do not count.
pub fn tcp_holder(addr: std::net::SocketAddr) -> Option<String> {
    let inodes = tcp_listeners(addr);
    let inode = *inodes.first()?;
    Some(
        holders_of_socket(inode)
            .first()
            .map_or_else(|| "another process".into(), |pid| describe_pid(*pid)),
    )
}

/// The processes (other than this one) holding a socket that listens on `addr` or an
/// address overlapping it.
pub fn tcp_holder_pids(addr: std::net::SocketAddr) -> Vec<u32> {
    tcp_listeners(addr)
        .into_iter()
        .flat_map(holders_of_socket)
        .collect()
}

/// `pid N (comm)`.
pub fn describe_pid(pid: u32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("pid {pid} ({})", comm.trim())
}

/// Inodes of listening TCP sockets on `addr` (or overlapping it), not this process's.
fn tcp_listeners(addr: std::net::SocketAddr) -> Vec<u64> {
    let ours = socket_inodes_of("self");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_listener)
                .collect::<Vec<_>>()
        })
        .filter(|(a, _)| ListenAddr::Tcp(*a).overlaps(&ListenAddr::Tcp(addr)))
        .map(|(_, inode)| inode)
        .filter(|i| !ours.contains(i))
        .collect()
}

/// A `LISTEN` line of `/proc/net/tcp{,6}`: its local address and socket inode.
fn parse_listener(line: &str) -> Option<(std::net::SocketAddr, u64)> {
    let s = parse_tcp_line(line)?;
    (s.state == 0x0A).then_some((s.local, s.inode))
}

/// The socket inode of the server's end of the TCP connection from `client` to `server`
/// (local address `server`, remote `client`), once a process accepted it; `None` while it
/// waits in an accept queue (no file yet), or when there is no such connection.
///
/// One `sock_diag` request for that exact socket (`SOCK_DIAG_BY_FAMILY` without
/// `NLM_F_DUMP`: the kernel looks it up in its established hash), so the cost does not
/// grow with the host's connections. Where the kernel cannot answer it (`tcp_diag` is a
/// module on Debian's kernels, and a host may not load it), `/proc/net/tcp{,6}` is read
/// instead, which lists every socket of the host (`TIME_WAIT` ones too).
pub fn accepted_socket(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<u64> {
    if sock_diag_answers() {
        return diag_lookup(server, client).ok().flatten();
    }
    proc_lookup(server, client)
}

/// [`accepted_socket`] of several connections (server, client), with one read of
/// `/proc/net/tcp{,6}` for all of them where the kernel does not answer `sock_diag`.
pub fn accepted_sockets(
    conns: &[(std::net::SocketAddr, std::net::SocketAddr)],
) -> Vec<Option<u64>> {
    if conns.is_empty() {
        return Vec::new();
    }
    if sock_diag_answers() {
        return conns
            .iter()
            .map(|(s, c)| diag_lookup(*s, *c).ok().flatten())
            .collect();
    }
    let mut found: std::collections::HashMap<(std::net::SocketAddr, std::net::SocketAddr), u64> =
        std::collections::HashMap::new();
    for text in ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
    {
        for s in text.lines().skip(1).filter_map(parse_tcp_line) {
            if s.inode != 0 && conns.contains(&(s.local, s.remote)) {
                found.insert((s.local, s.remote), s.inode);
            }
        }
    }
    conns.iter().map(|k| found.get(k).copied()).collect()
}

/// [`accepted_socket`] by reading `/proc/net/tcp{,6}`.
fn proc_lookup(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_tcp_line)
                .find(|s| s.local == server && s.remote == client && s.inode != 0)
                .map(|s| s.inode)
        })
}

/// Whether `sock_diag` finds TCP sockets here: asked once, of a connection of our own.
fn sock_diag_answers() -> bool {
    static ANSWERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWERS.get_or_init(|| {
        let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return false;
        };
        let Ok(server) = l.local_addr() else {
            return false;
        };
        let Ok(c) = std::net::TcpStream::connect(server) else {
            return false;
        };
        let Ok(client) = c.local_addr() else {
            return false;
        };
        // Not accepted yet: found, with no inode.
        let answers = diag_lookup(server, client).is_ok();
        if !answers {
            tracing::debug!("sock_diag does not answer for TCP here (no tcp_diag?): reading /proc/net/tcp instead");
        }
        answers
    })
}

/// The inode of the socket `server`–`client` by `sock_diag`: `Err` when the kernel did not
/// answer with the socket (no such socket, or no `tcp_diag` to ask).
fn diag_lookup(
    server: std::net::SocketAddr,
    client: std::net::SocketAddr,
) -> Result<Option<u64>, ()> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const IPPROTO_TCP: u8 = 6;
    let family = match (server, client) {
        (std::net::SocketAddr::V4(_), std::net::SocketAddr::V4(_)) => libc::AF_INET,
        (std::net::SocketAddr::V6(_), std::net::SocketAddr::V6(_)) => libc::AF_INET6,
        _ => return Err(()),
    };
    let addr = |ip: std::net::IpAddr| -> [u8; 16] {
        let mut a = [0u8; 16];
        match ip {
            std::net::IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => a = v6.octets(),
        }
        a
    };
    // struct nlmsghdr, then struct inet_diag_req_v2 with the socket's id as it sees itself.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(u8::try_from(family).map_err(|_| ())?);
    req.push(IPPROTO_TCP);
    req.extend_from_slice(&[0, 0]); // idiag_ext, pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any
    req.extend_from_slice(&server.port().to_be_bytes());
    req.extend_from_slice(&client.port().to_be_bytes());
    req.extend_from_slice(&addr(server.ip()));
    req.extend_from_slice(&addr(client.ip()));
    req.extend_from_slice(&0u32.to_ne_bytes()); // interface
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )
    .map_err(|_| ())?;
    rustix::net::sendto(
        &fd,
        &req,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )
    .map_err(|_| ())?;
    // The kernel answers within the send: nothing to wait for.
    let mut buf = [0u8; 512];
    let (n, _) = rustix::net::recv(&fd, &mut buf, RecvFlags::DONTWAIT).map_err(|_| ())?;
    let reply = buf.get(..n).ok_or(())?;
    let kind = u16::from_ne_bytes(reply.get(4..6).ok_or(())?.try_into().map_err(|_| ())?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(());
    }
    // struct inet_diag_msg: family, state, timer, retrans, id (48), expires, rqueue,
    // wqueue, uid, inode.
    let inode = reply.get(16 + 68..16 + 72).ok_or(())?;
    let inode = u32::from_ne_bytes(inode.try_into().map_err(|_| ())?);
    Ok((inode != 0).then_some(u64::from(inode)))
}

/// The socket inodes among the fds of process `pid`.
pub fn sockets_of(pid: u32) -> Vec<u64> {
    socket_inodes_of(&pid.to_string())
}

/// A socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpLine {
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    /// `TCP_ESTABLISHED` (1) … `TCP_LISTEN` (0x0A).
    state: u8,
    /// 0 when no file holds it.
    inode: u64,
}

fn parse_tcp_line(line: &str) -> Option<TcpLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    Some(TcpLine {
        local: parse_proc_addr(f.get(1)?)?,
        remote: parse_proc_addr(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90`: the in-kernel address bytes printed as 32-bit words in host order,
/// and the port; IPv4-mapped IPv6 addresses as IPv4.
fn parse_proc_addr(text: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).into(),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some((ip, port).into())
}

/// The socket inodes among the fds of process `pid` (`self` for the agent).
fn socket_inodes_of(pid: &str) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The processes holding socket `inode`.
fn holders_of_socket(inode: u64) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| socket_inodes_of(&pid.to_string()).contains(&inode))
        .collect()
}

/// The agent's `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct NotifySocket {
    /// Its path.
    pub path: PathBuf,
    fd: OwnedFd,
}

/// One message received on the notify socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's pid, as the kernel vouches for it.
    pub pid: i32,
    /// `READY=1` was in the message.
    pub ready: bool,
    /// `STATUS=...`, if any.
    pub status: Option<String>,
    /// `BUSY=1` (handling requests) or `BUSY=0` (idle), if either: a Hatchery extension
    /// that lets the agent stop idle workers first when it must stop some.
    pub busy: Option<bool>,
}

impl NotifySocket {
    /// Binds a datagram socket at `path` (replacing a stale socket) with `SO_PASSCRED`.
    pub fn bind(path: &Path) -> Result<NotifySocket, NetError> {
        let bind_err = |source: io::Error| NetError::Bind {
            addr: format!("unix {}", path.display()),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(NetError::NotASocket(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| bind_err(e.into()))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| bind_err(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| bind_err(e.into()))?;
        sockopt::set_socket_passcred(&fd, true).map_err(|e| bind_err(e.into()))?;
        // Workers may run as other users: anyone may send; the kernel-checked pid decides
        // which worker a message is from.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
        Ok(NotifySocket {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The socket an earlier image of this agent bound at `path` (`hatchery upgrade`).
    pub fn inherited(path: &Path, fd: OwnedFd) -> NotifySocket {
        NotifySocket {
            path: path.to_path_buf(),
            fd,
        }
    }

    /// Binds a datagram socket with `SO_PASSCRED` at the abstract address `name` (no file;
    /// shown as `@name`, which is what `NOTIFY_SOCKET` then names).
    pub fn bind_abstract(name: &str) -> Result<NotifySocket, NetError> {
        let bind_err = |source: io::Error| NetError::Bind {
            addr: format!("unix @{name}"),
            source,
        };
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| bind_err(e.into()))?;
        let addr =
            SocketAddrUnix::new_abstract_name(name.as_bytes()).map_err(|e| bind_err(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| bind_err(e.into()))?;
        sockopt::set_socket_passcred(&fd, true).map_err(|e| bind_err(e.into()))?;
        Ok(NotifySocket {
            path: PathBuf::from(format!("@{name}")),
            fd,
        })
    }

    /// Receives one pending message; `None` when drained.
    pub fn recv(&self) -> io::Result<Option<Notification>> {
        Ok(self
            .recv_text()?
            .map(|(pid, text)| parse_notification(pid, &text)))
    }

    /// Receives one pending message as its sender's pid (as the kernel vouches for it) and
    /// text; `None` when drained.
    pub fn recv_text(&self) -> io::Result<Option<(i32, String)>> {
        let mut buf = [0u8; 4096];
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1), ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg =
            match rustix::net::recvmsg(&self.fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(m) => m,
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
        let mut pid = 0;
        for cmsg in control.drain() {
            match cmsg {
                RecvAncillaryMessage::ScmCredentials(cred) => pid = cred.pid.as_raw_nonzero().get(),
                // Fds sent to us (FDSTORE) are not supported; dropping closes them.
                RecvAncillaryMessage::ScmRights(fds) => drop(fds.collect::<Vec<_>>()),
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes.min(buf.len())]);
        Ok(Some((pid, text.into_owned())))
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sends `state` to the socket `NOTIFY_SOCKET` names (a path, or `@name` for an abstract
/// address), as sd_notify(3) does; `Ok(false)` when the variable is not set.
pub fn sd_notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))?;
    }
    Ok(true)
}

/// Parses an `sd_notify` message (newline-separated `KEY=VALUE` pairs).
pub fn parse_notification(pid: i32, text: &str) -> Notification {
    let mut n = Notification {
        pid,
        ready: false,
        status: None,
        busy: None,
    };
    for line in text.lines() {
        if line == "READY=1" {
            n.ready = true;
        } else if line == "BUSY=1" {
            n.busy = Some(true);
        } else if line == "BUSY=0" {
            n.busy = Some(false);
        } else if let Some(s) = line.strip_prefix("STATUS=") {
            n.status = Some(s.chars().take(200).collect());
        }
    }
    n
}

/// Environment variables of the socket-activation protocol for these listeners
/// (`LISTEN_PID` is filled in by the child itself).
pub fn activation_env(listeners: &[Listener]) -> Vec<String> {
    if listeners.is_empty() {
        return Vec::new();
    }
    let names: Vec<&str> = listeners.iter().map(|l| l.spec.name.as_str()).collect();
    vec![
        format!("LISTEN_FDS={}", listeners.len()),
        format!("LISTEN_FDNAMES={}", names.join(":")),
    ]
}

/// Accepts one connection waiting on `listener`, non-blocking and close-on-exec; `None`
/// when none waits. A connection aborted before it was taken, or an interrupted call, is
/// retried.
pub fn accept_waiting(listener: impl AsFd) -> rustix::io::Result<Option<OwnedFd>> {
    use rustix::io::Errno;
    loop {
        match rustix::net::accept_with(
            &listener,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        ) {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::AGAIN) => return Ok(None),
            Err(Errno::INTR | Errno::CONNABORTED) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads and drops what a peer sent that was not read (at most `reads` reads of 4 KiB,
/// without waiting), before the socket is closed: a socket closed with unread data resets
/// the connection (TCP) or the peer's reads (unix), and the peer would lose the answer
/// already sent.
pub fn drain_before_close(fd: impl AsFd, reads: usize) {
    let mut scratch = [0u8; 4096];
    for _ in 0..reads {
        if !matches!(rustix::io::read(&fd, &mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_end_of_a_connection_is_found_once_a_process_holds_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = l.local_addr().expect("addr");
        let c = std::net::TcpStream::connect(server).expect("connect");
        let client = c.local_addr().expect("client addr");
        assert_eq!(accepted_socket(server, client), None, "queued: no file yet");
        assert_eq!(proc_lookup(server, client), None);
        let (s, _) = l.accept().expect("accept");
        let inode = accepted_socket(server, client).expect("accepted");
        // Both ways of asking agree (sock_diag where the kernel answers it, as here on a
        // kernel with tcp_diag; /proc/net/tcp where it does not).
        assert_eq!(proc_lookup(server, client), Some(inode));
        assert_eq!(
            accepted_sockets(&[(server, client), (client, server)]),
            vec![Some(inode), accepted_socket(client, server)]
        );
        if sock_diag_answers() {
            assert_eq!(diag_lookup(server, client), Ok(Some(inode)));
        }
        assert!(sockets_of(std::process::id()).contains(&inode));
        let fd = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            s.as_raw_fd()
        }))
        .expect("fd link");
        assert_eq!(
            fd.to_string_lossy(),
            format!("socket:[{inode}]"),
            "that very socket"
        );
        assert_ne!(
            accepted_socket(client, server),
            Some(inode),
            "the client's end is another"
        );
        drop(s);
        // A child another test is starting may hold a copy of our fds between its fork and
        // its exec, and the socket is closed when the last copy goes: wait for that.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while accepted_socket(server, client).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(accepted_socket(server, client), None, "closed");
        assert_eq!(proc_lookup(server, client), None, "closed");
    }

    #[test]
    fn notifications_are_parsed() {
        let n = parse_notification(7, "STATUS=warming up\nREADY=1\n");
        assert_eq!(
            n,
            Notification {
                pid: 7,
                ready: true,
                status: Some("warming up".into()),
                busy: None,
            }
        );
        assert!(!parse_notification(7, "READY=0").ready);
        assert_eq!(parse_notification(7, "BUSY=1").busy, Some(true));
        assert_eq!(parse_notification(7, "READY=1\nBUSY=0").busy, Some(false));
        assert_eq!(parse_notification(7, "BUSY=yes").busy, None);
    }

    #[test]
    fn tcp_listener_reports_its_queue() {
        let spec = ListenSpec {
            name: "http".into(),
            addr: ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")),
            backlog: 16,
            mode: crate::config::ListenMode::Agent,
        };
        let l = Listener::bind(&spec, 0, 0).expect("bind");
        assert_eq!(l.queued(), Some(0));
        let local = rustix::net::getsockname(&l.fd).expect("name");
        let addr = std::net::SocketAddr::try_from(local).expect("inet");
        let _c = std::net::TcpStream::connect(addr).expect("connect");
        assert_eq!(
            l.queued(),
            Some(1),
            "one connection waits in the accept queue"
        );
    }

    #[test]
    fn a_listener_shut_down_by_another_holder_says_so_and_one_with_a_queue_does_not() {
        use rustix::net::Shutdown;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = |name: &str, addr: ListenAddr| ListenSpec {
            name: name.into(),
            addr,
            backlog: 16,
            mode: crate::config::ListenMode::Agent,
        };
        let tcp = || ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"));
        for (addr, how) in [
            (tcp(), Shutdown::Both),
            (tcp(), Shutdown::Read),
            (ListenAddr::Unix(dir.path().join("a.sock")), Shutdown::Both),
            (ListenAddr::Unix(dir.path().join("b.sock")), Shutdown::Read),
        ] {
            let what = format!("{addr} {how:?}");
            let l = Listener::bind(&spec("http", addr.clone()), 0, 0).expect("bind");
            // A connection waiting to be accepted makes it readable, not shut.
            let _waiting = match &addr {
                ListenAddr::Tcp(_) => {
                    let local = rustix::net::getsockname(&l.fd).expect("name");
                    let a = std::net::SocketAddr::try_from(local).expect("inet");
                    Box::new(std::net::TcpStream::connect(a).expect("connect")) as Box<dyn Send>
                }
                ListenAddr::Unix(p) => {
                    Box::new(std::os::unix::net::UnixStream::connect(p).expect("connect"))
                }
            };
            assert!(!l.shut_down(), "{what}: not shut yet");
            // As a worker does with the copy it inherited. Shut for writing only, a
            // listener still accepts.
            let copy = l.fd.try_clone().expect("dup");
            rustix::net::shutdown(&copy, Shutdown::Write).expect("shutdown");
            assert!(!l.shut_down(), "{what}: shut for writing only");
            rustix::net::shutdown(&copy, how).expect("shutdown");
            assert!(l.shut_down(), "{what}: shut through another fd");
        }
    }

    #[test]
    fn notify_socket_receives_ready_with_the_sender_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).expect("bind");
        let tx = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        tx.send_to(b"READY=1", &path).expect("send");
        let n = sock.recv().expect("recv").expect("a message");
        assert!(n.ready);
        assert_eq!(n.pid, i32::try_from(std::process::id()).expect("pid"));
        assert_eq!(sock.recv().expect("recv"), None);
    }
}

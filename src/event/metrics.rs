//! The metrics listener (`metrics = "127.0.0.1:9464"` in the agent file): `GET /metrics`
//! over HTTP/1.x, on the agent's own loop, encoded by [`crate::metrics`] from the report
//! `status` gives root.
//!
//! The least HTTP that a Prometheus server (or `curl`) needs, and limits on all a client
//! controls:
//! - one request per connection, answered with `Connection: close`; the request is read
//!   up to its blank line, at most [`MAX_REQUEST`] bytes (no body is read);
//! - at most [`MAX_CONNECTIONS`] connections at once: one more is answered `503` and
//!   closed at once;
//! - [`DEADLINE`] for the whole exchange from the accept: a client that sends nothing,
//!   or does not read its answer, is closed then, and the loop never waits for it;
//! - `/metrics` (any query string) answers `200`, `HEAD` as well as `GET`; another path
//!   `404`, another method `405`, what is not HTTP/1.x `400`.
//!
//! The listener has `SO_REUSEPORT` as well as `SO_REUSEADDR`: an agent that starts right
//! after another (an upgrade in place, a restart after a crash) binds again at once even
//! while the kernel still holds the old listener (an io_uring ring is torn down
//! asynchronously, and its poll keeps the old socket alive for a while). A port held by
//! another program (without `SO_REUSEPORT`, or as another user) is an error at startup.
//! A reload that changes `metrics` says the change waits for a restart.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
use tracing::{debug, error, info, warn};

use super::reactor::Interest;
use super::{Agent, AgentError, Source, setup_err};
use crate::metrics::{self, Snapshot};

/// Most bytes of a request (its line and headers).
pub(super) const MAX_REQUEST: usize = 8 << 10;
/// Most connections at once.
pub(super) const MAX_CONNECTIONS: usize = 16;
/// How long one exchange may take, from the accept to the last byte of the answer.
pub(super) const DEADLINE: Duration = Duration::from_secs(5);
/// Backlog of the listener.
const BACKLOG: i32 = 64;

/// The listener and its connections.
#[derive(Debug)]
pub(super) struct MetricsServer {
    /// The listening socket.
    listener: OwnedFd,
    /// Its address, as configured.
    pub(super) addr: SocketAddr,
    conns: HashMap<u64, HttpConn>,
    next_conn: u64,
}

/// One scrape under way.
#[derive(Debug)]
struct HttpConn {
    fd: OwnedFd,
    /// The request read so far.
    inbuf: Vec<u8>,
    /// The answer, and how much of it is written.
    outbuf: Vec<u8>,
    written: usize,
    /// The token it is armed under, if it is.
    token: Option<u64>,
    /// When it is closed, answered or not.
    deadline: Instant,
}

impl MetricsServer {
    /// Binds `addr` (non-blocking, close-on-exec) and listens.
    pub(super) fn bind(addr: SocketAddr, file: &std::path::Path) -> Result<Self, AgentError> {
        let what = || {
            format!(
                "bind the metrics address {addr} (metrics in {})",
                file.display()
            )
        };
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::INET,
            SocketAddr::V6(_) => AddressFamily::INET6,
        };
        let fd = rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| setup_err(what(), io::Error::from(e)))?;
        sockopt::set_socket_reuseaddr(&fd, true)
            .and_then(|()| sockopt::set_socket_reuseport(&fd, true))
            .and_then(|()| rustix::net::bind(&fd, &addr))
            .and_then(|()| rustix::net::listen(&fd, BACKLOG))
            .map_err(|e| setup_err(what(), io::Error::from(e)))?;
        Ok(MetricsServer {
            listener: fd,
            addr,
            conns: HashMap::new(),
            next_conn: 0,
        })
    }

    /// The earliest deadline of a connection.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.deadline).min()
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `GET /metrics` (`head`: without the body).
    Metrics { head: bool },
    /// Another path.
    NotFound,
    /// Another method.
    NotAllowed,
    /// Not HTTP/1.x.
    BadRequest,
}

/// Where a request's line and headers end, if they have.
fn header_end(buf: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

/// What the request line asks for.
fn answer_for(request: &[u8]) -> Answer {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::BadRequest;
    };
    if !matches!(version, b"HTTP/1.0" | b"HTTP/1.1") || !target.starts_with(b"/") {
        return Answer::BadRequest;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let head = match method {
        b"GET" => false,
        b"HEAD" => true,
        _ => return Answer::NotAllowed,
    };
    if path == b"/metrics" {
        Answer::Metrics { head }
    } else {
        Answer::NotFound
    }
}

/// An HTTP/1.1 answer with `Connection: close`.
fn response(status: &str, content_type: &str, extra: &str, body: &[u8], head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    out
}

/// A short plain-text answer.
fn plain(status: &str, extra: &str, text: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        extra,
        format!("{text}\n").as_bytes(),
        false,
    )
}

impl Agent {
    /// Binds the metrics address, if the agent file names one.
    pub(super) fn bind_metrics(
        config: &crate::config::AgentConfig,
    ) -> Result<Option<MetricsServer>, AgentError> {
        config
            .metrics
            .map(|addr| MetricsServer::bind(addr, &config.file))
            .transpose()
    }

    /// Starts watching the metrics listener.
    pub(super) fn arm_metrics(&mut self) -> Result<(), AgentError> {
        let Some(server) = &self.metrics else {
            return Ok(());
        };
        self.reg
            .arm(server.listener.as_fd(), Interest::Readable, Source::Metrics)
            .map_err(AgentError::Reactor)?;
        info!(address = %server.addr, "serving metrics on http://{}/metrics", server.addr);
        Ok(())
    }

    /// A reload: a changed `metrics` takes effect at the next start.
    pub(super) fn metrics_reloaded(&self, new: &crate::config::AgentConfig) {
        // As the file had it at the start (not served where a site runs: `Agent::start`).
        let now = self.config.metrics;
        if new.metrics != now {
            let show = |a: Option<SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
            warn!(
                "metrics changed from {} to {}: this takes effect when the agent restarts",
                show(now),
                show(new.metrics)
            );
        }
    }

    /// The encoded metrics now.
    fn scrape(&mut self) -> Result<String, std::fmt::Error> {
        self.counters.scrapes += 1;
        let snapshot = Snapshot {
            status: self.status_of_sites(),
            counters: self.counters.clone(),
            uptime: SystemTime::now()
                .duration_since(self.started)
                .unwrap_or_default(),
        };
        metrics::encode(snapshot)
    }

    /// The listener is readable: accepts what waits.
    pub(super) fn on_metrics_accept(&mut self) {
        loop {
            let Some(server) = &mut self.metrics else {
                return;
            };
            let fd = match crate::net::accept_waiting(&server.listener) {
                Ok(Some(fd)) => fd,
                Ok(None) => break,
                Err(e) => {
                    error!("failed to accept a metrics connection: {e}");
                    break;
                }
            };
            if server.conns.len() >= MAX_CONNECTIONS {
                // Best effort, without waiting: the socket's buffer takes this at once.
                let busy = plain(
                    "503 Service Unavailable",
                    "",
                    &format!("too many metrics connections (limit {MAX_CONNECTIONS})"),
                );
                let _ = rustix::io::write(&fd, &busy);
                debug!("refused a metrics connection: {MAX_CONNECTIONS} are open");
                continue;
            }
            let id = server.next_conn;
            server.next_conn += 1;
            server.conns.insert(
                id,
                HttpConn {
                    fd,
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    written: 0,
                    token: None,
                    deadline: Instant::now() + DEADLINE,
                },
            );
            self.arm_metrics_conn(id, Interest::Readable);
        }
        self.rearm_metrics();
    }

    fn rearm_metrics(&mut self) {
        let Some(server) = &self.metrics else {
            return;
        };
        if let Err(e) = self
            .reg
            .arm(server.listener.as_fd(), Interest::Readable, Source::Metrics)
        {
            error!("failed to watch the metrics listener again: {e}");
        }
    }

    fn arm_metrics_conn(&mut self, id: u64, interest: Interest) {
        let Some(conn) = self.metrics.as_mut().and_then(|s| s.conns.get_mut(&id)) else {
            return;
        };
        match self
            .reg
            .arm(conn.fd.as_fd(), interest, Source::MetricsConn(id))
        {
            Ok(t) => conn.token = Some(t),
            Err(e) => {
                warn!("failed to watch a metrics connection: {e}");
                self.close_metrics_conn(id);
            }
        }
    }

    /// A connection is readable (its request) or writable (the rest of its answer).
    pub(super) fn on_metrics_conn(&mut self, id: u64) {
        let Some(conn) = self.metrics.as_mut().and_then(|s| s.conns.get_mut(&id)) else {
            return;
        };
        conn.token = None;
        if !conn.outbuf.is_empty() {
            return self.write_metrics_conn(id);
        }
        let mut buf = [0u8; 2048];
        let mut closed = false;
        loop {
            let room = MAX_REQUEST + 1 - conn.inbuf.len();
            match rustix::io::read(&conn.fd, &mut buf[..room.min(2048)]) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if conn.inbuf.len() > MAX_REQUEST || header_end(&conn.inbuf).is_some() {
                        break;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let answer = match header_end(&conn.inbuf) {
            Some(end) => Some(answer_for(&conn.inbuf[..end])),
            None if conn.inbuf.len() > MAX_REQUEST => None,
            None if closed => return self.close_metrics_conn(id),
            None => return self.arm_metrics_conn(id, Interest::Readable),
        };
        let out = match answer {
            None => plain(
                "431 Request Header Fields Too Large",
                "",
                &format!("request larger than {MAX_REQUEST} bytes"),
            ),
            Some(Answer::Metrics { head }) => match self.scrape() {
                Ok(body) => response("200 OK", metrics::CONTENT_TYPE, "", body.as_bytes(), head),
                Err(e) => {
                    error!("failed to encode the metrics: {e}");
                    plain(
                        "500 Internal Server Error",
                        "",
                        "failed to encode the metrics",
                    )
                }
            },
            Some(Answer::NotFound) => plain("404 Not Found", "", "not found: try /metrics"),
            Some(Answer::NotAllowed) => plain(
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "method not allowed: use GET",
            ),
            Some(Answer::BadRequest) => plain("400 Bad Request", "", "not an HTTP/1.x request"),
        };
        let Some(conn) = self.metrics.as_mut().and_then(|s| s.conns.get_mut(&id)) else {
            return;
        };
        conn.inbuf = Vec::new();
        conn.outbuf = out;
        self.write_metrics_conn(id);
    }

    /// Writes what is left of a connection's answer; closes it once all is written.
    fn write_metrics_conn(&mut self, id: u64) {
        let Some(conn) = self.metrics.as_mut().and_then(|s| s.conns.get_mut(&id)) else {
            return;
        };
        while conn.written < conn.outbuf.len() {
            match rustix::io::write(&conn.fd, &conn.outbuf[conn.written..]) {
                Ok(n) => conn.written += n,
                Err(rustix::io::Errno::AGAIN) => {
                    return self.arm_metrics_conn(id, Interest::Writable);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => break,
            }
        }
        // All of it in the socket's buffer: the kernel sends it after the close.
        let _ = rustix::net::shutdown(&conn.fd, rustix::net::Shutdown::Write);
        self.close_metrics_conn(id);
    }

    fn close_metrics_conn(&mut self, id: u64) {
        let Some(conn) = self.metrics.as_mut().and_then(|s| s.conns.remove(&id)) else {
            return;
        };
        if let Some(t) = conn.token {
            self.reg.tokens.remove(&t);
            let _ = self.reg.reactor.disarm(conn.fd.as_fd(), t);
        }
        // A TCP socket closed with unread data sends a reset, and the client may lose the
        // answer already sent (a 405 to a request with a body): drain a little first.
        crate::net::drain_before_close(&conn.fd, 4);
    }

    /// Closes the connections whose time is up.
    pub(super) fn expire_metrics(&mut self, now: Instant) {
        let Some(server) = &self.metrics else {
            return;
        };
        let late: Vec<u64> = server
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            debug!("a metrics client took longer than {DEADLINE:?}: closed");
            self.close_metrics_conn(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_by_method_and_path() {
        let a = |r: &str| answer_for(r.as_bytes());
        assert_eq!(
            a("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Answer::Metrics { head: false }
        );
        assert_eq!(
            a("GET /metrics?x=1 HTTP/1.0\n\n"),
            Answer::Metrics { head: false }
        );
        assert_eq!(
            a("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Answer::Metrics { head: true }
        );
        assert_eq!(a("GET / HTTP/1.1\r\n\r\n"), Answer::NotFound);
        assert_eq!(a("GET /metricsx HTTP/1.1\r\n\r\n"), Answer::NotFound);
        assert_eq!(a("POST /metrics HTTP/1.1\r\n\r\n"), Answer::NotAllowed);
        assert_eq!(a("GET /metrics HTTP/2.0\r\n\r\n"), Answer::BadRequest);
        assert_eq!(a("GET /metrics\r\n\r\n"), Answer::BadRequest);
        assert_eq!(a("GET  /metrics HTTP/1.1\r\n\r\n"), Answer::BadRequest);
        assert_eq!(a("\r\n\r\n"), Answer::BadRequest);
    }

    #[test]
    fn a_request_ends_at_its_blank_line() {
        assert_eq!(header_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(header_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(header_end(b"GET / HTTP/1.0\n\n"), Some(16));
    }

    #[test]
    fn answers_say_their_length_and_close() {
        let r =
            String::from_utf8(response("200 OK", "text/plain", "", b"abc", false)).expect("utf-8");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 3\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nabc"), "{r}");
        let h =
            String::from_utf8(response("200 OK", "text/plain", "", b"abc", true)).expect("utf-8");
        assert!(
            h.contains("Content-Length: 3\r\n") && h.ends_with("\r\n\r\n"),
            "{h}"
        );
    }
}

//! The control socket: connections (accepted within per-user limits, framed as JSON
//! lines, timed out, buffered with back-pressure), authorization of each request, and
//! what each request asks of a site machine or of the agent; answers are rendered from
//! typed outcomes (`render.rs`).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use rustix::net::sockopt;
use tracing::{debug, error, info, warn};

use super::reactor::Interest;
use super::{
    Agent, AgentError, Conn, LogStream, MAX_CONN_BUFFER, MAX_CONNECTIONS_PER_UID, MAX_LOG_LINES,
    REQUEST_TIMEOUT, RESERVED_FOR_ADMIN, Source, exec, generations,
};
use crate::config::{self, SiteName};
use crate::control::{ErrorKind, MAX_CONNECTIONS, MAX_REQUEST, Reply, Request, ScaleTo};
use crate::logs;
use crate::supervisor::deploy::Share;
use crate::supervisor::ids::ClientId;
use crate::supervisor::machine::{CancelReason, Input};

impl Agent {
    /// Whether the agent's fds hold site `name` at `workers` workers beside every other
    /// site (`config::check_fds`); the refusal says the numbers.
    fn fds_fit(&self, name: &SiteName, workers: u32) -> Result<(), String> {
        let Some(limit) = config::fd_limit() else {
            return Ok(());
        };
        let mut sites: Vec<config::SiteConfig> = self
            .sites
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(_, s)| s.config().clone())
            .collect();
        let Some(site) = self.sites.get(name) else {
            return Ok(());
        };
        let mut this = site.config().clone();
        this.workers = workers;
        sites.push(this);
        config::check_fds(&sites, limit).map_err(|e| e.message)
    }

    pub(super) fn on_accept(&mut self) {
        loop {
            let fd = match crate::net::accept_waiting(&self.control) {
                Ok(Some(fd)) => fd,
                Ok(None) => break,
                Err(e) => {
                    error!("failed to accept a control connection: {e}");
                    break;
                }
            };
            let uid = match sockopt::socket_peercred(&fd) {
                Ok(cred) => cred.uid.as_raw(),
                Err(e) => {
                    warn!("no peer credentials on a control connection, closing it: {e}");
                    continue;
                }
            };
            let refusal = self.connection_refusal(uid);
            let id = self.next_conn;
            self.next_conn += 1;
            let conn = Conn::new(fd, uid, Some(Instant::now() + REQUEST_TIMEOUT));
            self.conns.insert(id, conn);
            if let Some(why) = refusal {
                warn!(uid, "refused a control connection: {why}");
                self.finish(id, &Reply::error(ErrorKind::Refused, why));
                continue;
            }
            self.arm_conn_read(id);
        }
        self.rearm(Source::Control);
    }

    /// Why a new connection from `uid` is refused, if it is: the total limit, or, for
    /// anyone but root and the agent's user, a share of it (`MAX_CONNECTIONS_PER_UID`
    /// each, and never the last `RESERVED_FOR_ADMIN`), so that no burst of local clients
    /// can keep root from `status`, `stop` or `reload`.
    pub(super) fn connection_refusal(&self, uid: u32) -> Option<String> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Some(format!("too many connections (limit {MAX_CONNECTIONS})"));
        }
        if self.is_admin(uid) {
            return None;
        }
        let others = self
            .conns
            .values()
            .filter(|c| !self.is_admin(c.uid))
            .count();
        if others >= MAX_CONNECTIONS - RESERVED_FOR_ADMIN {
            return Some(format!(
                "too many connections from users other than root (limit {})",
                MAX_CONNECTIONS - RESERVED_FOR_ADMIN
            ));
        }
        let mine = self.conns.values().filter(|c| c.uid == uid).count();
        if mine >= MAX_CONNECTIONS_PER_UID {
            return Some(format!(
                "too many connections from uid {uid} (limit {MAX_CONNECTIONS_PER_UID})"
            ));
        }
        None
    }

    /// Closes connections that did not send their request in time.
    pub(super) fn expire_connections(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let uid = self.conns.get(&id).map(|c| c.uid);
            debug!(?uid, "a control connection sent no request in time: closed");
            self.finish(
                id,
                &Reply::error(
                    ErrorKind::BadRequest,
                    format!(
                        "no complete request within {}",
                        config::format_duration(REQUEST_TIMEOUT)
                    ),
                ),
            );
        }
    }

    pub(super) fn arm_conn_read(&mut self, id: u64) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        match self
            .reg
            .arm(conn.fd.as_fd(), Interest::Readable, Source::ConnRead(id))
        {
            Ok(t) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.read_token = Some(t);
                }
            }
            Err(e) => {
                warn!("failed to watch a control connection: {e}");
                self.close_conn(id);
            }
        }
    }

    pub(super) fn on_conn_read(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.read_token = None;
        let mut buf = [0u8; 8192];
        let mut closed = false;
        loop {
            match rustix::io::read(&conn.fd, &mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    if conn.held || conn.done {
                        // A streaming or waiting client only ever hangs up.
                        continue;
                    }
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if conn.inbuf.len() > MAX_REQUEST {
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
        if conn.held || conn.done {
            if closed {
                self.close_conn(id);
            } else {
                self.arm_conn_read(id);
            }
            return;
        }
        let uid = conn.uid;
        if let Some(pos) = conn.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.inbuf.drain(..=pos).collect();
            conn.inbuf = Vec::new();
            conn.deadline = None;
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => self.handle_request(id, uid, req),
                Err(e) => self.finish(
                    id,
                    &Reply::error(ErrorKind::BadRequest, format!("invalid request: {e}")),
                ),
            }
        } else if conn.inbuf.len() > MAX_REQUEST {
            self.finish(
                id,
                &Reply::error(
                    ErrorKind::BadRequest,
                    format!("request larger than {MAX_REQUEST} bytes"),
                ),
            );
        } else if closed {
            self.close_conn(id);
        } else {
            self.arm_conn_read(id);
        }
    }

    pub(super) fn send(&mut self, id: u64, reply: &Reply) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.outbuf.len() > MAX_CONN_BUFFER {
            warn!("a control client is not reading: dropping it");
            self.close_conn(id);
            return;
        }
        conn.outbuf.extend_from_slice(&reply.to_line());
        // Written before the loop waits again (a final reply at once: `finish`): the
        // progress lines of ten thousand exits handled in one turn of the loop are a few
        // writes, not ten thousand.
        if !conn.to_flush {
            conn.to_flush = true;
            self.to_flush.push(id);
        }
    }

    /// Writes what `send` buffered.
    pub(super) fn flush_pending(&mut self) {
        for id in std::mem::take(&mut self.to_flush) {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.to_flush = false;
                self.flush(id);
            }
        }
    }

    /// Sends the final reply and closes the connection once it is flushed.
    pub(super) fn finish(&mut self, id: u64, reply: &Reply) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.done = true;
            conn.held = false;
            conn.deadline = None;
            conn.backlog = None;
        }
        self.forget_conn(id);
        self.send(id, reply);
        // Written (and the connection closed) at once: a refused connection must not
        // count against the limits of the next ones accepted in the same turn.
        self.flush(id);
    }

    /// Writes what the connection has buffered; a `logs` client whose buffer ran empty
    /// gets its next chunk of backlog, one chunk per event (the next one when the socket
    /// is writable again), so no client's backlog delays the others' requests for long.
    pub(super) fn flush(&mut self, id: u64) {
        let mut pumped = false;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            while !conn.outbuf.is_empty() {
                match rustix::io::write(&conn.fd, &conn.outbuf) {
                    Ok(n) => {
                        conn.outbuf.drain(..n);
                    }
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => {
                        self.close_conn(id);
                        return;
                    }
                }
            }
            let querying = self.history.querying(id);
            if conn.outbuf.is_empty() && (conn.backlog.is_some() || querying) {
                if pumped {
                    // More when the loop comes back to this connection.
                    if conn.write_token.is_none() {
                        match self.reg.arm(
                            conn.fd.as_fd(),
                            Interest::Writable,
                            Source::ConnWrite(id),
                        ) {
                            Ok(t) => conn.write_token = Some(t),
                            Err(_) => self.close_conn(id),
                        }
                    }
                    return;
                }
                pumped = true;
                let more = if querying {
                    self.pump_events(id)
                } else {
                    self.pump_backlog(id)
                };
                if more {
                    continue;
                }
                return;
            }
            if conn.outbuf.is_empty() {
                if conn.done {
                    self.close_conn(id);
                }
            } else if conn.write_token.is_none() {
                match self
                    .reg
                    .arm(conn.fd.as_fd(), Interest::Writable, Source::ConnWrite(id))
                {
                    Ok(t) => conn.write_token = Some(t),
                    Err(_) => self.close_conn(id),
                }
            }
            return;
        }
    }

    /// Moves the next chunk of a `logs` client's backlog into its buffer. Once the
    /// backlog is done the client follows the log (`-f`) or gets its final answer. Returns
    /// whether anything was buffered.
    pub(super) fn pump_backlog(&mut self, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let Some(stream) = conn.backlog.as_mut() else {
            return false;
        };
        let Some(site) = self.sites.get_mut(&stream.site).map(|s| &mut s.io) else {
            conn.backlog = None;
            return false;
        };
        match stream.backlog.next_lines(&site.log) {
            Ok(Some(lines)) => {
                for l in lines {
                    conn.outbuf.extend_from_slice(&Reply::Line(l).to_line());
                }
                true
            }
            Ok(None) => {
                let stream = conn.backlog.take().expect("checked above");
                if stream.follow {
                    site.followers.push(id);
                    false
                } else {
                    let path = site.log.path().to_path_buf();
                    let name = stream.site;
                    self.finish(
                        id,
                        &Reply::ok(&crate::control::LogsEnded {
                            site: name.to_string(),
                            log: path,
                        }),
                    );
                    true
                }
            }
            Err(e) => {
                let path = site.log.path().display().to_string();
                self.finish(
                    id,
                    &Reply::error(ErrorKind::Failed, format!("failed to read {path}: {e}")),
                );
                true
            }
        }
    }

    pub(super) fn close_conn(&mut self, id: u64) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        for t in [conn.read_token, conn.write_token].into_iter().flatten() {
            self.reg.tokens.remove(&t);
            let _ = self.reg.reactor.disarm(conn.fd.as_fd(), t);
        }
        // A unix socket closed with unread data resets the peer's reads, and the client
        // would lose the answer already sent (a refusal, a timeout): drain first.
        crate::net::drain_before_close(&conn.fd, 16);
        self.forget_conn(id);
        self.forget_watch(id);
        self.hang_up_execs(Some(id));
    }

    pub(super) fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || uid == rustix::process::geteuid().as_raw()
    }

    pub(super) fn handle_request(&mut self, conn: u64, uid: u32, req: Request) {
        self.counters.control_requests += 1;
        let admin = self.is_admin(uid);
        // Authorization first: a site request needs root, the agent's user, or the
        // site's own user; the answer for someone else's site does not reveal whether
        // it exists.
        if let Some(site) = req.site() {
            let owner = self
                .sites
                .iter()
                .find(|(n, _)| n.as_str() == site)
                .map(|(_, s)| s.config().uid)
                .or_else(|| {
                    // A broken site: its owner if its file said, else root's alone.
                    self.broken
                        .get(site)
                        .map(|b| b.config.as_ref().map_or(0, |c| c.uid))
                });
            if !admin && owner != Some(uid) {
                warn!(uid, site, "refused a control request");
                return self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Refused,
                        format!("uid {uid} may not control site {site}"),
                    ),
                );
            }
            if owner.is_none() {
                return self.finish(
                    conn,
                    &Reply::error(ErrorKind::NotFound, format!("no such site: {site}")),
                );
            }
        } else if !admin {
            let owns_any = self.sites.values().any(|s| s.config().uid == uid);
            let allowed = matches!(
                req,
                Request::Status { .. } | Request::Events { .. } | Request::Watch { .. }
            ) && owns_any
                || matches!(req, Request::ConfigPath);
            if !allowed {
                warn!(uid, "refused a control request");
                return self.finish(
                    conn,
                    &Reply::error(ErrorKind::Refused, format!("uid {uid} may not do this")),
                );
            }
        }
        // Authorized: the workers that came and went before the request are in the record
        // first, so what the client is told of them (a pid, that a start happened) survives
        // an agent that crashes after answering.
        self.save_workers_now();
        if let Some(site) = req.site().filter(|s| self.broken.contains_key(*s)) {
            let site = site.to_string();
            return self.broken_site_request(conn, uid, admin, &site, req);
        }
        let name = req
            .site()
            .map(|s| SiteName::new(s).expect("an existing site's name is valid"));
        let client = ClientId(conn);
        match req {
            Request::Status { .. } => {
                let status = self.status(name.as_ref(), uid, admin);
                self.finish(conn, &Reply::ok(&status));
            }
            Request::Start { .. } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "start", None, None);
                self.forget_rulesets(&name);
                self.feed_request(&name, conn, Input::Start(Some(client)));
            }
            Request::Stop { .. } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "stop", None, None);
                let input = Input::Stop {
                    client: Some(client),
                    why: CancelReason::SiteStopped,
                };
                self.feed_request(&name, conn, input);
            }
            Request::Restart { .. } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "restart", None, None);
                self.forget_rulesets(&name);
                self.feed_request(&name, conn, Input::Restart(client));
            }
            Request::Deploy {
                release, canary, ..
            } => {
                let name = name.expect("site request");
                let canary = match canary.map(|c| c.parse::<Share>()).transpose() {
                    Ok(c) => c,
                    Err(why) => {
                        return self.finish(conn, &Reply::error(ErrorKind::BadRequest, why));
                    }
                };
                // A site's owner deploys only what it can reach itself: a directory it
                // names, or what its `release` symlink (which it may repoint) resolves to.
                let config = self.sites[&name].config();
                let asked = match (release.map(PathBuf::from), &config.release) {
                    (Some(dir), _) if !admin => {
                        Some(generations::release_for_owner(config, &dir, true))
                    }
                    (None, Some(link)) if !admin => {
                        Some(generations::release_for_owner(config, link, false))
                    }
                    (other, _) => other.map(Ok),
                };
                let release = match asked.transpose() {
                    Ok(r) => r,
                    Err(why) => {
                        warn!(uid, site = %name, "refused a deploy: {why}");
                        return self.finish(conn, &Reply::error(ErrorKind::Refused, why));
                    }
                };
                let detail = match (&release, canary) {
                    (Some(r), Some(c)) => Some(format!("of {} as a {c} canary", r.display())),
                    (Some(r), None) => Some(format!("of {}", r.display())),
                    (None, Some(c)) => Some(format!("as a {c} canary")),
                    (None, None) => None,
                };
                self.emit_operator(Some(&name), uid, "deploy", detail, None);
                let input = Input::Deploy {
                    client,
                    release,
                    canary,
                };
                self.feed_request(&name, conn, input);
            }
            Request::Rollback { .. } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "rollback", None, None);
                self.feed_request(&name, conn, Input::Rollback(client));
            }
            Request::Promote { .. } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "promote", None, None);
                self.feed_request(&name, conn, Input::Promote(client));
            }
            Request::Scale {
                workers: ScaleTo::Auto,
                ..
            } => {
                let name = name.expect("site request");
                self.emit_operator(Some(&name), uid, "scale", Some("to auto".into()), None);
                self.feed_request(&name, conn, Input::ScaleAuto(client));
            }
            Request::Scale {
                workers: ScaleTo::Count(workers),
                ..
            } => {
                let name = name.expect("site request");
                if let Err(why) = self.fds_fit(&name, workers) {
                    warn!(uid, site = %name, workers, "refused a scale: {why}");
                    return self.finish(conn, &Reply::error(ErrorKind::Refused, why));
                }
                let owner = (!admin).then_some(uid);
                if owner.is_some() {
                    let c = self.sites[&name].config();
                    let allowed = c.auto.map_or(c.workers, |a| a.max);
                    if workers > allowed {
                        warn!(uid, site = %name, workers, "refused a scale beyond the configuration");
                    }
                }
                self.emit_operator(
                    Some(&name),
                    uid,
                    "scale",
                    Some(format!("to {workers} workers")),
                    Some(workers),
                );
                let input = Input::Scale {
                    client,
                    workers,
                    owner,
                };
                self.feed_request(&name, conn, input);
            }
            Request::Signal { signal, .. } => {
                let name = name.expect("site request");
                let sig = match config::Signal::parse(&signal) {
                    Ok(s) => s,
                    Err(m) => return self.finish(conn, &Reply::error(ErrorKind::BadRequest, m)),
                };
                self.emit_operator(Some(&name), uid, "signal", Some(sig.name()), None);
                let site = &self.sites[&name];
                let mut sent = 0;
                for (g, gn) in &site.io.gens {
                    for (id, w) in &gn.workers {
                        match w.pidref.signal(sig.0) {
                            Ok(()) => sent += 1,
                            Err(e) => {
                                warn!(site = %name, gen = g.0, worker = %id, "failed to send {}: {e}", sig.name())
                            }
                        }
                    }
                }
                self.finish(
                    conn,
                    &Reply::ok(&crate::control::Signalled {
                        site: name.to_string(),
                        signal: sig.name(),
                        workers: sent,
                    }),
                );
            }
            Request::Logs { lines, follow, .. } => {
                let name = name.expect("site request");
                let log = &self.sites[&name].io.log;
                match logs::Backlog::start(log, lines.min(MAX_LOG_LINES), follow) {
                    Ok(backlog) => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.held = true;
                            c.backlog = Some(LogStream {
                                site: name,
                                backlog,
                                follow,
                            });
                        }
                        // Reads now only notice a hang-up.
                        self.arm_conn_read(conn);
                        self.flush(conn);
                    }
                    Err(e) => {
                        let path = log.path().display().to_string();
                        self.finish(
                            conn,
                            &Reply::error(ErrorKind::Failed, format!("failed to read {path}: {e}")),
                        );
                    }
                }
            }
            Request::Exec {
                command,
                tty,
                rows,
                cols,
                term,
                ..
            } => {
                let name = name.expect("site request");
                let params = exec::ExecParams {
                    command,
                    tty,
                    rows,
                    cols,
                    term,
                };
                self.start_exec(conn, &name, params);
            }
            Request::Events {
                site,
                lines,
                follow,
                since,
            } => self.start_events(conn, admin, uid, site, lines, follow, since),
            Request::Upgrade { binary } => {
                let detail = binary.as_ref().map(|b| format!("to {b}"));
                self.emit_operator(None, uid, "upgrade", detail, None);
                self.upgrade(conn, binary);
            }
            Request::Watch { interval_ms, site } => {
                self.start_watch(conn, uid, admin, site.as_deref(), interval_ms);
            }
            Request::ConfigPath => {
                // Absolute, so that a client in another directory finds the same file.
                let path = std::fs::canonicalize(&self.config.file)
                    .unwrap_or_else(|_| self.config.file.clone());
                self.finish(conn, &Reply::ok(&crate::control::ConfigPath { path }));
            }
            Request::Add { file, text } => self.add_site(conn, uid, &file, &text),
            Request::Remove { .. } => {
                let name = name.expect("site request");
                self.remove_site(conn, uid, admin, &name);
            }
            Request::Reload => {
                self.emit_operator(None, uid, "reload", None, None);
                match self.reload() {
                    Ok(summary) => self.finish(conn, &Reply::ok(&summary)),
                    Err(e) => {
                        let text = match &e {
                            AgentError::Config(_) => e.to_string(),
                            _ => format!("{e}: {}", super::error_chain(&e)),
                        };
                        error!("reload refused, nothing changed: {text}");
                        // A bad file is a configuration error; a port taken is the host's.
                        let kind = match e {
                            AgentError::Config(_) => ErrorKind::Config,
                            _ => ErrorKind::Failed,
                        };
                        self.finish(
                            conn,
                            &Reply::error(kind, format!("reload refused, nothing changed: {text}")),
                        );
                    }
                }
            }
        }
    }

    /// A request for a site that could not be started: `status` shows why, `start` tries
    /// again (when the file was valid), anything else is refused with the reason.
    pub(super) fn broken_site_request(
        &mut self,
        conn: u64,
        uid: u32,
        admin: bool,
        site: &str,
        req: Request,
    ) {
        match req {
            Request::Status { .. } => {
                let name = SiteName::new(site).ok();
                let status = self.status(name.as_ref(), uid, admin);
                self.finish(conn, &Reply::ok(&status));
            }
            Request::Watch { interval_ms, site } => {
                self.start_watch(conn, uid, admin, site.as_deref(), interval_ms);
            }
            Request::Remove { .. } => self.remove_broken_site(conn, uid, admin, site),
            Request::Start { .. } => {
                let Some(config) = self.broken.get(site).and_then(|b| b.config.clone()) else {
                    let reason = self
                        .broken
                        .get(site)
                        .map(|b| b.reason.clone())
                        .unwrap_or_default();
                    return self.finish(
                        conn,
                        &Reply::error(
                            ErrorKind::Config,
                            format!("site {site} is not valid: {reason}; fix its file and reload"),
                        ),
                    );
                };
                let name = config.name.clone();
                match self.make_site(config) {
                    Ok(s) => {
                        info!(site = %name, "started after an earlier failure");
                        self.broken.remove(site);
                        self.sites.insert(name.clone(), s);
                        self.watch_listeners(&name, None);
                        self.feed_request(&name, conn, Input::Start(Some(ClientId(conn))));
                    }
                    Err(e) => {
                        let reason = format!("{e}: {}", super::error_chain(&e));
                        if let Some(b) = self.broken.get_mut(site) {
                            b.reason = reason.clone();
                        }
                        self.finish(
                            conn,
                            &Reply::error(
                                ErrorKind::Failed,
                                format!("site {site} could not be started: {reason}"),
                            ),
                        );
                    }
                }
            }
            _ => {
                let reason = self
                    .broken
                    .get(site)
                    .map(|b| b.reason.clone())
                    .unwrap_or_default();
                self.finish(
                    conn,
                    &Reply::error(
                        ErrorKind::Failed,
                        format!("site {site} is not running: it could not be started: {reason}"),
                    ),
                );
            }
        }
    }
}

//! The sandbox as the event loop sees it: preparing a site's sandbox once, reporting it,
//! and `hatchery exec`: a command started in the site's sandbox and cgroup on a new
//! pseudo-terminal (or a socket and a pipe), whose master side goes to the client with
//! `SCM_RIGHTS`; the client's connection is answered with the exit code.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{debug, warn};

use super::reactor::Interest;
use super::{Agent, Source};
use crate::config::SiteName;
use crate::control::{ErrorKind, Reply};
use crate::process::PidRef;
use crate::sandbox::SandboxError;
use crate::sys::spawn::SandboxPlan;

impl Agent {
    /// The site's sandbox plan, prepared at its first spawn (and again after a reload
    /// replaced the site). A refusal (a `required` feature missing, a bad root) is a
    /// permanent spawn failure with the message.
    pub(super) fn site_sandbox(
        &mut self,
        name: &SiteName,
    ) -> Result<Arc<SandboxPlan>, SandboxError> {
        let privileged = rustix::process::geteuid().is_root();
        let site = self
            .sites
            .get_mut(name)
            .expect("the sandbox is asked for a site that exists");
        if let Some(p) = &site.io.sandbox {
            return Ok(p.plan.clone());
        }
        let prepared = crate::sandbox::prepare(site.config(), privileged)?;
        for line in prepared.not_enforced() {
            warn!(site = %name, "not enforced: {line}");
            let record = format!(
                "{} hatchery: sandbox not enforced: {line}\n",
                crate::logs::utc_timestamp(std::time::SystemTime::now())
            );
            let _ = site.io.log.append(record.as_bytes());
        }
        // Said once, where the app's own errors are: which ports it may bind.
        if let Some(line) = prepared.bind_rule_line() {
            let record = format!(
                "{} hatchery: {line}\n",
                crate::logs::utc_timestamp(std::time::SystemTime::now())
            );
            let _ = site.io.log.append(record.as_bytes());
        }
        let plan = prepared.plan.clone();
        site.io.sandbox = Some(prepared);
        Ok(plan)
    }
}

/// A running `hatchery exec` command.
#[derive(Debug)]
pub(super) struct ExecSession {
    /// The control connection waiting for its exit code.
    conn: u64,
    pidref: PidRef,
    token: u64,
    cgroup: Option<PathBuf>,
}

/// What `hatchery exec` asked for.
pub(super) struct ExecParams {
    pub command: Vec<String>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    pub term: Option<String>,
}

impl Agent {
    /// Starts `params.command` in the sandbox of `name` for control connection `conn`.
    /// Authorization (root, or the site's user) was checked by the caller.
    pub(super) fn start_exec(&mut self, conn: u64, name: &SiteName, params: ExecParams) {
        self.reap_held();
        match self.try_start_exec(conn, name, params) {
            Ok(pid) => {
                debug!(site = %name, pid, "exec started");
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.held = true;
                }
                self.arm_conn_read(conn);
            }
            Err(e) => {
                warn!(site = %name, "exec failed: {e}");
                self.finish(conn, &Reply::error(ErrorKind::Failed, e));
            }
        }
    }

    fn try_start_exec(
        &mut self,
        conn: u64,
        name: &SiteName,
        params: ExecParams,
    ) -> Result<i32, String> {
        if !self.sites.contains_key(name) {
            return Err("no such site".into());
        }
        let plan = self.site_sandbox(name).map_err(|e| e.to_string())?;
        let site = self.sites.get(name).expect("looked up above");
        // The serving generation's configuration: its release fills `{release}`.
        let config = &site.machine.current().config;
        if let Some(root) = &config.sandbox.root {
            crate::sandbox::check_root_path(root).map_err(|e| SandboxError::Root(e).to_string())?;
        }
        let mut image = crate::spawn::exec_image(config, params.command, params.term.as_deref())
            .map_err(|e| e.describe())?;
        image.set_sandbox(plan);

        // The command's stdio, and what the client gets.
        let (child_fds, client_fds): (Vec<OwnedFd>, Vec<OwnedFd>) = if params.tty {
            let (master, slave) = open_pty(config.uid, config.gid, params.rows, params.cols)
                .map_err(|e| format!("failed to create a pseudo-terminal: {e}"))?;
            image.set_controlling_tty();
            (vec![slave], vec![master])
        } else {
            let (ours, theirs) = rustix::net::socketpair(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| format!("failed to create a socket pair: {e}"))?;
            let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| format!("failed to create a pipe: {e}"))?;
            (vec![theirs, err_w], vec![ours, err_r])
        };
        let stdio: Vec<BorrowedFd<'_>> = match child_fds.len() {
            1 => vec![child_fds[0].as_fd(); 3],
            _ => vec![
                child_fds[0].as_fd(),
                child_fds[0].as_fd(),
                child_fds[1].as_fd(),
            ],
        };
        self.next_exec = self.next_exec.wrapping_add(1);
        let leaf = match (&self.cgroups, &mut self.graveyard) {
            (Some(tree), Some(graveyard)) => Some(crate::spawn::Leaf {
                tree,
                graveyard,
                site: name.as_str(),
                generation: site.machine.serving().0,
                name: format!("exec-{}", self.next_exec),
                limits: None,
            }),
            _ => None,
        };
        let spawned = crate::spawn::launch(&mut image, &stdio, leaf, &mut self.fd_block);
        drop(stdio);
        drop(child_fds);
        let spawned = spawned.map_err(|e| e.describe())?;
        let pid = spawned.pid;
        let pidref = PidRef::new(pid, spawned.pidfd);
        let token = self
            .reg
            .arm(pidref.as_fd(), Interest::Readable, Source::Exec(pid))
            .map_err(|e| {
                let _ = pidref.signal(libc::SIGKILL);
                format!("failed to watch the command: {e}")
            })?;
        self.execs.insert(
            pid,
            ExecSession {
                conn,
                pidref,
                token,
                cgroup: spawned.leaf,
            },
        );
        // The start event carries the client's ends; the connection's buffer is empty
        // (its request was just read), so this small message is sent whole.
        let Some(c) = self.conns.get(&conn) else {
            return Ok(pid);
        };
        let line = Reply::Event(format!("started pid {pid}")).to_line();
        let fds: Vec<BorrowedFd<'_>> = client_fds.iter().map(|f| f.as_fd()).collect();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut anc = rustix::net::SendAncillaryBuffer::new(&mut space);
        anc.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            &c.fd,
            &[std::io::IoSlice::new(&line)],
            &mut anc,
            rustix::net::SendFlags::NOSIGNAL,
        );
        if !matches!(sent, Ok(n) if n == line.len()) {
            let _ = self.execs.get(&pid).map(|s| s.pidref.signal(libc::SIGKILL));
            return Err("failed to pass the terminal to the client".into());
        }
        Ok(pid)
    }

    /// A command started by `exec` exited (pidfd readable, or found by `reap`): reap it,
    /// remove its cgroup leaf, and answer its client with the exit code.
    pub(super) fn exec_exited(&mut self, pid: i32) {
        let Some(session) = self.execs.remove(&pid) else {
            return;
        };
        self.reg.tokens.remove(&session.token);
        let _ = self
            .reg
            .reactor
            .disarm(session.pidref.as_fd(), session.token);
        let status = rustix::process::waitid(
            rustix::process::WaitId::PidFd(session.pidref.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        );
        let code = match status {
            Ok(Some(st)) => st
                .exit_status()
                .or_else(|| st.terminating_signal().map(|s| 128 + s))
                .unwrap_or(1),
            _ => 1,
        };
        if let (Some(dir), Some(tree), Some(graveyard)) =
            (&session.cgroup, &self.cgroups, &mut self.graveyard)
        {
            tree.retire(dir, graveyard);
        }
        debug!(pid, code, "exec exited");
        self.finish(
            session.conn,
            &Reply::ok(&crate::control::ExecEnded { exit_code: code }),
        );
    }
}

impl Agent {
    /// Sends `SIGHUP` to the `exec` commands of connection `conn` (its client is gone, as
    /// a terminal hangup would), or to all of them (`None`: the agent is stopping).
    pub(super) fn hang_up_execs(&mut self, conn: Option<u64>) {
        for (pid, s) in &self.execs {
            if conn.is_none_or(|c| c == s.conn) {
                if let Err(e) = s.pidref.signal(libc::SIGHUP) {
                    debug!(pid, "failed to hang up an exec command: {e}");
                }
            }
        }
    }
}

/// A new pseudo-terminal: (master, slave), the slave owned by the site's user (as login
/// does) and sized like the caller's terminal.
fn open_pty(uid: u32, gid: u32, rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::fs::fchown(
        &slave,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    if rows > 0 && cols > 0 {
        rustix::termios::tcsetwinsize(
            &master,
            rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )?;
    }
    Ok((master, slave))
}

//! The agent's side of the fd holder (`crate::fdholder`): the read ends of every worker's
//! output pipes are handed to it as the worker starts, under the names
//! `out/<site>/<gen>/<slot>/<pid>` (its stdout) and `err/<site>/<gen>/<slot>/<pid>` (its
//! stderr), so that the pipe keeps a reader when the agent dies and
//! the worker never gets `SIGPIPE`; what it writes meanwhile waits in the pipe (64 KiB; a
//! worker that fills it blocks until a reader is back). A new agent takes the pipes of the
//! workers it adopts back from the holder and reads on. The holder drops a pipe by itself
//! once the worker is gone (hang-up), so the agent never has to tell it.
//!
//! The holder is started at the agent's start (or found running, an earlier agent's) and
//! told to exit at a clean shutdown. If it cannot be started, or dies, workers run as
//! before (their output is lost with the agent); the agent starts it again at the next
//! spawn, at most once a minute.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Agent;
use crate::config::SiteName;
use crate::fdholder::HolderClient;
use crate::supervisor::ids::{GenId, Slot};

/// How often a holder that is gone is started again.
const RESTART_INTERVAL: Duration = Duration::from_secs(60);

/// The name a worker's output pipe is held under.
pub(super) fn pipe_name(site: &SiteName, g: GenId, slot: Slot, pid: i32) -> String {
    format!("out/{site}/{g}/{slot}/{pid}")
}

/// The name a worker's stderr pipe is held under (its stdout pipe's is [`pipe_name`]).
pub(super) fn err_pipe_name(site: &SiteName, g: GenId, slot: Slot, pid: i32) -> String {
    format!("err/{site}/{g}/{slot}/{pid}")
}

/// Connects to the holder at `path`, starting it if none runs; returns it and, if it was
/// running already, what it holds.
pub(super) fn start_holder(path: &Path) -> (Option<HolderClient>, HashMap<String, OwnedFd>) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            warn!(
                "no fd holder (the agent's own binary cannot be found: {e}): worker output pipes close with the agent"
            );
            return (None, HashMap::new());
        }
    };
    match HolderClient::connect_or_start(path, &exe) {
        Ok((mut client, false)) => match client.dump() {
            Ok(held) => {
                if !held.is_empty() {
                    info!(
                        "the fd holder of an earlier agent holds {} output pipes",
                        held.len()
                    );
                }
                (Some(client), held.into_iter().collect())
            }
            Err(e) => {
                warn!("failed to take back what the fd holder holds: {e}");
                (Some(client), HashMap::new())
            }
        },
        Ok((client, true)) => (Some(client), HashMap::new()),
        Err(e) => {
            warn!(
                "no fd holder ({e}: {}): worker output pipes close with the agent",
                super::error_chain(&e)
            );
            (None, HashMap::new())
        }
    }
}

impl Agent {
    /// Hands a new worker's output pipe (its read end) to the holder.
    pub(super) fn hold_pipe(&mut self, name: &str, fd: BorrowedFd<'_>) {
        self.hold_fds(&[(name, fd)]);
    }

    /// Hands fds to the holder, by name (a site's output socket, a worker's pipe).
    pub(super) fn hold_fds(&mut self, fds: &[(&str, BorrowedFd<'_>)]) {
        if self.holder.is_none() {
            let due = self
                .holder_retry
                .is_none_or(|t| t.elapsed() >= RESTART_INTERVAL);
            if !due {
                return;
            }
            self.holder_retry = Some(Instant::now());
            self.holder = start_holder(&self.holder_path).0;
        }
        let Some(h) = &mut self.holder else {
            return;
        };
        if let Err(e) = h.put(fds) {
            warn!(
                "the fd holder is gone ({e}): worker output pipes close with the agent until it is started again"
            );
            self.holder = None;
            self.holder_retry = Some(Instant::now());
        }
    }

    /// The held output pipe of an adopted worker, if the holder had it.
    pub(super) fn take_held_pipe(&mut self, name: &str) -> Option<OwnedFd> {
        self.held.remove(name)
    }

    /// A clean shutdown: the holder exits (every worker is gone).
    pub(super) fn stop_holder(&mut self) {
        if let Some(h) = self.holder.take() {
            if let Err(e) = h.exit() {
                warn!("failed to stop the fd holder: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_names_say_whose_pipe_it_is() {
        let site = SiteName::new("blog").expect("name");
        assert_eq!(
            pipe_name(&site, GenId(3), Slot(1), 4242),
            "out/blog/3/1/4242"
        );
        assert_eq!(
            err_pipe_name(&site, GenId(3), Slot(1), 4242),
            "err/blog/3/1/4242"
        );
        assert!(crate::fdholder::valid_name(&pipe_name(
            &site,
            GenId(3),
            Slot(1),
            4242
        )));
    }
}

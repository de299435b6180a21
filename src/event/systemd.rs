//! What the agent tells systemd when it runs as a `Type=notify` unit (`NOTIFY_SOCKET` set):
//!
//! - `READY=1` once every site has settled at start: each running site has as many ready
//!   workers in its serving generation as it asks for, or it failed, or it is stopped
//!   (a failed site does not hold the unit in `activating`: `status` says why it failed).
//!   So `systemctl start hatchery` returns once the sites serve.
//! - `STATUS=` with a one-line summary (`2 sites, 8 workers, deploying blog`), whenever it
//!   changes, at most once a second (the last change is always sent).
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC` (`WatchdogSec=` in the unit), from the
//!   event loop: an agent stuck in a turn stops pinging and systemd acts.
//!
//! Nothing is sent, and no timer is armed, when the agent does not run under systemd.

use std::time::{Duration, Instant};

use super::Agent;
use super::setup::notify_systemd;
use crate::status::SiteState;

/// The shortest time between two `STATUS=` messages.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The agent's side of systemd's notification protocol.
#[derive(Debug, Default)]
pub(super) struct Systemd {
    /// Whether `NOTIFY_SOCKET` is set: nothing is done otherwise.
    enabled: bool,
    /// `READY=1` was sent.
    ready_sent: bool,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    ping_every: Option<Duration>,
    /// When the next `WATCHDOG=1` is due.
    next_ping: Option<Instant>,
    /// The last `STATUS=` text sent.
    status: String,
    /// When it was sent.
    status_sent: Option<Instant>,
    /// A changed status waits until this instant (the rate limit).
    status_due: Option<Instant>,
}

impl Systemd {
    /// Reads the environment systemd gives a service.
    pub(super) fn from_env() -> Systemd {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Systemd {
            enabled,
            ping_every: enabled.then(watchdog_interval).flatten(),
            ..Systemd::default()
        }
    }

    /// When the loop must wake for systemd: the next ping, a pending status.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [self.next_ping, self.status_due]
            .into_iter()
            .flatten()
            .min()
    }
}

/// Half of `WATCHDOG_USEC` if it is set for this process (`WATCHDOG_PID` absent or ours),
/// as sd_watchdog_enabled(3) reads it.
fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        let ours = std::process::id().to_string();
        if pid.to_str() != Some(ours.as_str()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

impl Agent {
    /// At the end of each turn of the loop: `READY=1` once the sites have settled, the
    /// watchdog's ping when due, the status line when it changed.
    pub(super) fn tell_systemd(&mut self) {
        if !self.systemd.enabled {
            return;
        }
        let now = Instant::now();
        let mut message = String::new();
        if let Some(every) = self.systemd.ping_every {
            if self.systemd.next_ping.is_none_or(|t| t <= now) {
                message.push_str("WATCHDOG=1\n");
                self.systemd.next_ping = Some(now + every);
            }
        }
        if !self.systemd.ready_sent && self.sites_settled() {
            self.systemd.ready_sent = true;
            message.push_str("READY=1\n");
        }
        let status = self.systemd_status();
        if status != self.systemd.status {
            let due = self.systemd.status_sent.map_or(now, |t| t + STATUS_EVERY);
            if due <= now || message.contains("READY=1") {
                message.push_str("STATUS=");
                message.push_str(&status);
                message.push('\n');
                self.systemd.status = status;
                self.systemd.status_sent = Some(now);
                self.systemd.status_due = None;
            } else {
                self.systemd.status_due = Some(due);
            }
        } else {
            self.systemd.status_due = None;
        }
        if !message.is_empty() {
            notify_systemd(&message);
        }
    }

    /// Whether every site has settled after the agent's start (see the module's doc).
    fn sites_settled(&self) -> bool {
        self.sites.values().all(|s| {
            let m = &s.machine;
            let cur = m.current();
            match cur.slots.run.state() {
                SiteState::Running => {
                    m.deploy().is_none() && cur.slots.ready() >= cur.slots.desired as usize
                }
                SiteState::Failed | SiteState::Stopped => true,
                SiteState::Stopping => false,
            }
        })
    }

    /// `2 sites, 8 workers, deploying blog` (the failed sites named, then the deploys).
    fn systemd_status(&self) -> String {
        let sites = self.sites.len() + self.broken.len();
        let workers: usize = self
            .sites
            .values()
            .flat_map(|s| s.machine.generations())
            .map(|g| g.slots.live())
            .sum();
        let mut text = format!(
            "{sites} site{}, {workers} worker{}",
            if sites == 1 { "" } else { "s" },
            if workers == 1 { "" } else { "s" }
        );
        let failed: Vec<&str> = self
            .sites
            .iter()
            .filter(|(_, s)| s.machine.current().slots.run.state() == SiteState::Failed)
            .map(|(n, _)| n.as_str())
            .chain(self.broken.keys().map(String::as_str))
            .collect();
        if !failed.is_empty() {
            text.push_str(", failed: ");
            text.push_str(&failed.join(" "));
        }
        // Running as recorded (`Agent::not_loading`).
        if !self.not_loading.is_empty() {
            text.push_str(", file not loading: ");
            let names: Vec<&str> = self.not_loading.keys().map(String::as_str).collect();
            text.push_str(&names.join(" "));
        }
        let deploying: Vec<&str> = self
            .sites
            .iter()
            .filter(|(_, s)| s.machine.deploy().is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        if !deploying.is_empty() {
            text.push_str(", deploying ");
            text.push_str(&deploying.join(" "));
        }
        text
    }
}

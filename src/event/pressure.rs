//! CPU pressure triggers of sites that follow their load: the kernel wakes the agent when
//! a site's serving generation goes without a CPU (a PSI trigger on its cgroup's
//! `cpu.pressure`, see [`crate::cgroup::cpu_pressure_trigger`]), and its load is sampled
//! at once instead of at the next interval (growth waits while the CPU, not workers, is
//! what it lacks). A trigger exists while the site's load is sampled; it follows the
//! serving generation, and closing its fd removes it from the kernel.

use std::os::fd::{AsFd, OwnedFd};

use tracing::debug;

use super::reactor::Interest;
use super::{Agent, Source};
use crate::config::SiteName;
use crate::supervisor::ids::GenId;
use crate::supervisor::machine::Input;

/// A site's trigger.
#[derive(Debug)]
pub(super) struct Trigger {
    generation: GenId,
    /// `None` where the kernel refused one (no PSI, or before 5.13): not asked again for
    /// this generation.
    fd: Option<OwnedFd>,
    token: Option<u64>,
}

impl Agent {
    /// Arms, moves or drops site `name`'s trigger to match its machine: one on the
    /// serving generation's cgroup while its load is sampled.
    pub(super) fn watch_pressure(&mut self, name: &SiteName) {
        let wanted = self
            .sites
            .get(name)
            .filter(|s| s.machine.load_sampling())
            .map(|s| s.machine.serving())
            .filter(|_| self.cgroups.is_some());
        let current = self.pressure.get(name).map(|t| t.generation);
        if current == wanted {
            return;
        }
        if let Some(old) = self.pressure.remove(name) {
            self.drop_trigger(old);
        }
        let (Some(g), Some(tree)) = (wanted, &self.cgroups) else {
            return;
        };
        let dir = tree.site_dir(name.as_str()).join(format!("gen-{}", g.0));
        if !dir.exists() {
            // Its first worker's start makes it (a start can be put off until the end of
            // a batch of events: `Agent::start_deferred`); watched from the next input on.
            return;
        }
        let mut t = Trigger {
            generation: g,
            fd: None,
            token: None,
        };
        match crate::cgroup::cpu_pressure_trigger(&dir) {
            Ok(fd) => t.fd = Some(fd),
            Err(e) => debug!(site = %name, "no cpu pressure trigger: {e}"),
        }
        self.pressure.insert(name.clone(), t);
        self.arm_trigger(name);
    }

    /// Waits for site `name`'s trigger to fire, unless it is waited for already.
    fn arm_trigger(&mut self, name: &SiteName) {
        let Some(t) = self.pressure.get_mut(name) else {
            return;
        };
        if let (Some(fd), None) = (&t.fd, t.token) {
            t.token = self
                .reg
                .arm(
                    fd.as_fd(),
                    Interest::Priority,
                    Source::Pressure(name.clone()),
                )
                .ok();
        }
    }

    /// Whether site `name` has a trigger the kernel accepted.
    pub(super) fn pressure_armed(&self, name: &SiteName) -> bool {
        self.pressure.get(name).is_some_and(|t| t.fd.is_some())
    }

    fn drop_trigger(&mut self, t: Trigger) {
        if let (Some(fd), Some(token)) = (&t.fd, t.token) {
            let _ = self.reg.reactor.disarm(fd.as_fd(), token);
            self.reg.tokens.remove(&token);
        }
    }

    /// Site `name`'s trigger fired (`token`): sample now, and wait for the next one.
    pub(super) fn on_pressure(&mut self, name: &SiteName, token: u64) {
        match self.pressure.get_mut(name) {
            Some(t) if t.token == Some(token) => t.token = None,
            // A trigger dropped since: nothing to sample for.
            _ => return,
        }
        self.feed(name, Input::Pressure);
        self.arm_trigger(name);
    }
}

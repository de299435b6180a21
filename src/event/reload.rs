//! `reload` (and `SIGHUP`): the configuration read again and applied all at once or not
//! at all. What is new is bound first (listeners of added or changed sites); a site that
//! cannot take a change now (a deploy under way) refuses the whole reload. Then added
//! sites start, removed ones stop and go, and changed ones are reconfigured by their
//! machine (a scale, or a rolling restart with the new policies).

use std::io;

use tracing::{error, info, warn};

use super::sites::{GenIo, Site};
use super::{Agent, AgentError, generations, setup_err};
use crate::config::{self, AgentConfig, SiteConfig, SiteName};
use crate::net::Listener;
use crate::supervisor::machine::Input;

impl Agent {
    /// Re-reads the configuration. On any error nothing changes. Added sites start,
    /// removed sites stop, changed sites restart their workers one at a time (or only
    /// scale, if only `workers` changed).
    pub(super) fn reload(&mut self) -> Result<crate::control::Reloaded, AgentError> {
        // Sites that run with the same listeners keep their addresses: a conflict is the
        // other file's fault.
        let holds = |sc: &SiteConfig| {
            self.sites
                .get(&sc.name)
                .is_some_and(|s| s.config().listen == sc.listen)
        };
        let new = config::load_keeping(&self.config.file, &holds)?;
        // The file's own addresses were checked by the load; those the agent serves until
        // its restart (a changed `control_socket`, `state_dir` or `metrics`) are held too.
        let serving = self.metrics.as_ref().map(|m| m.addr);
        if (&new.control_socket, &new.state_dir, new.metrics)
            != (&self.config.control_socket, &self.config.state_dir, serving)
        {
            let served = config::AgentAddrs::served(&self.config, serving);
            for sc in &new.sites {
                served.check(sc)?;
            }
        }
        self.metrics_reloaded(&new);
        if new.control_socket != self.config.control_socket
            || new.state_dir != self.config.state_dir
            || new.cgroup_base != self.config.cgroup_base
        {
            warn!(
                "control_socket, state_dir and cgroup_base changes take effect when the agent restarts"
            );
        }
        for sc in &new.sites {
            let busy = self
                .sites
                .get(&sc.name)
                .is_some_and(|s| s.machine.reconfigure_refusal(sc).is_some());
            if busy {
                return Err(setup_err(
                    format!("reload site {}", sc.name),
                    io::Error::other("a deploy is under way: reload once it is done"),
                ));
            }
        }
        // Bind what is new first: if anything fails, drop it all and change nothing.
        let mut prepared: Vec<(SiteConfig, Option<Vec<Listener>>, Option<Site>)> = Vec::new();
        for sc in &new.sites {
            match self.sites.get(&sc.name) {
                None => prepared.push((sc.clone(), None, Some(self.make_site(sc.clone())?))),
                Some(old) if old.config().listen != sc.listen => {
                    let listeners = rebind(old.cur_io(), sc)?;
                    prepared.push((sc.clone(), Some(listeners), None));
                }
                Some(_) => prepared.push((sc.clone(), None, None)),
            }
        }
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let new_names: Vec<SiteName> = new.sites.iter().map(|s| s.name.clone()).collect();
        for name in self.sites.keys().cloned().collect::<Vec<_>>() {
            if !new_names.contains(&name) {
                removed.push(name.to_string());
                self.feed(&name, Input::Remove);
            }
        }
        for (sc, listeners, fresh) in prepared {
            let name = sc.name.clone();
            if let Some(site) = fresh {
                added.push(name.to_string());
                self.sites.insert(name.clone(), site);
                self.watch_listeners(&name, None);
                self.feed(&name, Input::Start(None));
                continue;
            }
            let Some(site) = self.sites.get_mut(&name) else {
                continue;
            };
            if *site.config() == sc {
                continue;
            }
            changed.push(name.to_string());
            self.apply_change(&name, sc, listeners);
        }
        // What takes effect at a restart stays as it runs until then: the record, the logs
        // and the sockets are where this agent put them, and the next reload holds a site
        // off the agent's own addresses as they are.
        self.config = AgentConfig {
            sites: Vec::new(),
            control_socket: std::mem::take(&mut self.config.control_socket),
            state_dir: std::mem::take(&mut self.config.state_dir),
            cgroup_base: std::mem::replace(&mut self.config.cgroup_base, config::CgroupBase::Off),
            metrics: self.config.metrics,
            ..new
        };
        // Every site is valid and started now, with its file's configuration.
        self.broken.clear();
        self.not_loading.clear();
        info!(?added, ?changed, ?removed, "configuration reloaded");
        self.emit_reload(&added, &changed, &removed);
        Ok(crate::control::Reloaded {
            added,
            changed,
            removed,
        })
    }
}

impl Agent {
    /// Applies a changed configuration to a running site, whose new listeners, if its
    /// `listen` changed, are bound already (`listeners`: the full new set).
    fn apply_change(&mut self, name: &SiteName, sc: SiteConfig, listeners: Option<Vec<Listener>>) {
        if listeners.is_some() {
            let serving = self.sites.get(name).map(|s| s.machine.serving());
            self.forget_listeners(name, serving);
        }
        let Some(site) = self.sites.get_mut(name) else {
            return;
        };
        let rebound = listeners.is_some();
        if let Some(ls) = listeners {
            let serving = site.machine.serving();
            if let Some(cur) = site.io.gens.get_mut(&serving) {
                for old in &cur.listeners {
                    if !ls.iter().any(|l| l.spec.addr == old.spec.addr) {
                        old.unlink();
                    }
                }
                site.io.steering = generations::attach_steering(&self.steering_support, name, &ls);
                cur.listeners = ls;
            }
        }
        if let Err(e) = site.io.log.set_policy(sc.logs, Some(sc.gid)) {
            warn!(site = %name, "failed to set the permissions of {}: {e}", site.io.log.path().display());
        }
        site.io.config_text = std::fs::read_to_string(&sc.file).ok();
        // Prepared again, from the new configuration, at the next spawn.
        site.io.sandbox = None;
        if rebound {
            let serving = site.machine.serving();
            self.watch_listeners(name, Some(serving));
        }
        self.feed(name, Input::Reconfigure(Box::new(sc)));
    }

    /// A site's file changed while no agent ran: applied as a reload would, now or, while
    /// a generation of the earlier agent is still stopping, once it is gone.
    pub(super) fn apply_missed_change(&mut self, name: &SiteName, sc: SiteConfig) {
        self.missed_changes.insert(name.clone(), sc);
        self.apply_missed_changes();
    }

    /// Applies the changes that missed the agent that sites can take now.
    pub(super) fn apply_missed_changes(&mut self) {
        let names: Vec<SiteName> = self.missed_changes.keys().cloned().collect();
        for name in names {
            let Some(site) = self.sites.get(&name) else {
                self.missed_changes.remove(&name);
                continue;
            };
            let Some(sc) = self.missed_changes.get(&name) else {
                continue;
            };
            if site.machine.reconfigure_refusal(sc).is_some() {
                continue;
            }
            let Some(sc) = self.missed_changes.remove(&name) else {
                continue;
            };
            let listeners = if site.config().listen == sc.listen {
                None
            } else {
                match rebind(site.cur_io(), &sc) {
                    Ok(ls) => Some(ls),
                    Err(e) => {
                        error!(site = %name, "the site's file changed while the agent was down, and its new listeners cannot be bound ({e}: {}): it keeps running as before; fix the file and reload", super::error_chain(&e));
                        continue;
                    }
                }
            };
            info!(site = %name, "the site's file changed while the agent was down: applying it as a reload would");
            self.apply_change(&name, sc, listeners);
        }
    }
}

/// The listeners of a site whose `listen` changed: the new addresses bound, the unchanged
/// ones shared with what runs (their fds duplicated), unless shut down (bound anew).
fn rebind(cur: &GenIo, sc: &SiteConfig) -> Result<Vec<Listener>, AgentError> {
    let mut full = Vec::new();
    for spec in sc.agent_listeners() {
        match cur
            .listeners
            .iter()
            .find(|l| l.spec == *spec && !l.shut_down())
        {
            Some(old) => {
                let fd = old
                    .fd
                    .try_clone()
                    .map_err(|e| setup_err("duplicate a listener", e))?;
                full.push(Listener {
                    spec: spec.clone(),
                    fd,
                });
            }
            None => {
                full.push(Listener::bind(spec, sc.uid, sc.gid).map_err(|e| {
                    setup_err(format!("set up the listeners of site {}", sc.name), e)
                })?)
            }
        }
    }
    Ok(full)
}

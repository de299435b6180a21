//! Sites added and removed at runtime (`hatchery add FILE`, `hatchery remove SITE`).
//!
//! `add` validates the file's text as the configuration loader does, refuses a name
//! already taken, writes it into `sites_dir` as `<name>.toml` (a temporary file renamed
//! into place) and reloads: the new site starts as a reload starts any added site, and if
//! the reload is refused the file is taken back out, so nothing changed. `remove` deletes
//! the site's file, has its machine stop every worker, and answers once they have exited
//! and the site is dropped. Both are for root and the agent's user only: a site file
//! names the user its workers run as, and removing a site deletes the administrator's
//! file.

use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::{Agent, AgentError};
use crate::config::{self, SiteName};
use crate::control::{Done, ErrorKind, Reply};
use crate::supervisor::machine::Input;

impl Agent {
    /// `add`: see the module's doc.
    pub(super) fn add_site(&mut self, conn: u64, uid: u32, file: &str, text: &str) {
        let refuse = |kind: ErrorKind, message: String| Reply::error(kind, message);
        // Validated as the loader validates a site file, with the agent file's defaults.
        let site = match config::site_from_text(&self.config.file, Path::new(file), text) {
            Ok(site) => site,
            Err(e) => {
                let reply = refuse(
                    ErrorKind::Config,
                    format!("site not added, nothing changed: {e}"),
                );
                return self.finish(conn, &reply);
            }
        };
        let name = site.name.clone();
        let target = self.config.sites_dir.join(format!("{name}.toml"));
        if self.sites.contains_key(&name)
            || self.broken.contains_key(name.as_str())
            || target.exists()
        {
            let reply = refuse(
                ErrorKind::Refused,
                format!(
                    "site {name} exists (its file is {}): remove it first, or edit its file and reload",
                    target.display()
                ),
            );
            return self.finish(conn, &reply);
        }
        self.emit_operator(Some(&name), uid, "add", Some(format!("from {file}")), None);
        if let Err(e) = write_atomically(&target, text) {
            error!(site = %name, "could not write {}: {e}", target.display());
            let reply = refuse(
                ErrorKind::Failed,
                format!(
                    "site {name} not added, nothing changed: cannot write {}: {e}",
                    target.display()
                ),
            );
            return self.finish(conn, &reply);
        }
        match self.reload() {
            Ok(summary) if summary.added.iter().any(|a| a == name.as_str()) => {
                info!(site = %name, "site added from {file}");
                let done = Done::new(&name, format!("added as {}", target.display()));
                self.finish(conn, &Reply::ok(&done));
            }
            Ok(_) => {
                // The reload went through without it: it was put aside (a conflict with
                // another site, a budget, a release that does not resolve).
                let reason = self
                    .broken
                    .get(name.as_str())
                    .map(|b| b.reason.clone())
                    .unwrap_or_else(|| "the reload did not start it".into());
                warn!(site = %name, "added site could not be started: {reason}");
                let reply = refuse(
                    ErrorKind::Failed,
                    format!(
                        "site {name} was written to {} but could not be started: {reason}",
                        target.display()
                    ),
                );
                self.finish(conn, &reply);
            }
            Err(e) => {
                if let Err(re) = std::fs::remove_file(&target) {
                    error!(site = %name, "could not take back {}: {re}", target.display());
                }
                let text = match &e {
                    AgentError::Config(_) => e.to_string(),
                    _ => format!("{e}: {}", super::error_chain(&e)),
                };
                error!(site = %name, "add refused, nothing changed: {text}");
                let kind = match e {
                    AgentError::Config(_) => ErrorKind::Config,
                    _ => ErrorKind::Failed,
                };
                let reply = refuse(
                    kind,
                    format!("site {name} not added, nothing changed: {text}"),
                );
                self.finish(conn, &reply);
            }
        }
    }

    /// `remove` of a running (or stopped) site: see the module's doc.
    pub(super) fn remove_site(&mut self, conn: u64, uid: u32, admin: bool, name: &SiteName) {
        if !admin {
            return self.refuse_remove(conn, uid, name.as_str());
        }
        let file = match self.sites.get(name) {
            Some(site) => site.config().file.clone(),
            None => {
                let reply = Reply::error(ErrorKind::NotFound, format!("no such site: {name}"));
                return self.finish(conn, &reply);
            }
        };
        if let Err(message) = delete_file(name.as_str(), &file) {
            return self.finish(conn, &Reply::error(ErrorKind::Failed, message));
        }
        self.emit_operator(Some(name), uid, "remove", None, None);
        info!(site = %name, "removing the site: {} deleted", file.display());
        // Answered when the site is dropped (`drop_site`), its workers gone.
        if let Some(site) = self.sites.get_mut(name) {
            site.io.removers.push(conn);
        }
        self.feed(name, Input::Remove);
    }

    /// `remove` of a site that could not be started: its file goes, and so does it.
    pub(super) fn remove_broken_site(&mut self, conn: u64, uid: u32, admin: bool, site: &str) {
        if !admin {
            return self.refuse_remove(conn, uid, site);
        }
        let Some(file) = self.broken.get(site).map(|b| b.file.clone()) else {
            let reply = Reply::error(ErrorKind::NotFound, format!("no such site: {site}"));
            return self.finish(conn, &reply);
        };
        if let Err(message) = delete_file(site, &file) {
            return self.finish(conn, &Reply::error(ErrorKind::Failed, message));
        }
        self.broken.remove(site);
        if let Ok(name) = SiteName::new(site) {
            self.emit_operator(Some(&name), uid, "remove", None, None);
        }
        info!(
            site,
            "removed the site that could not be started: {} deleted",
            file.display()
        );
        self.finish(conn, &Reply::ok(&Done::new(site, "site removed")));
    }

    fn refuse_remove(&mut self, conn: u64, uid: u32, site: &str) {
        warn!(uid, site, "refused to remove a site");
        let reply = Reply::error(
            ErrorKind::Refused,
            format!("uid {uid} may not remove site {site}: only root and the agent's user may"),
        );
        self.finish(conn, &reply);
    }
}

/// Deletes a site's file; a file already gone is fine.
fn delete_file(site: &str, file: &Path) -> Result<(), String> {
    match std::fs::remove_file(file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "site {site} not removed, nothing changed: cannot delete {}: {e}",
            file.display()
        )),
    }
}

/// Writes `text` to `target` all at once: a temporary file beside it (not `*.toml`, so a
/// reload meanwhile does not read it), synced, then renamed over.
fn write_atomically(target: &Path, text: &str) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let stem = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{stem}.adding"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

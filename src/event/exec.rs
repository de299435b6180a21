//! The sandbox as the event loop sees it: preparing a site's sandbox once, reporting it.

use std::sync::Arc;

use tracing::warn;

use super::Agent;
use crate::config::SiteName;
use crate::sandbox::Prepared;
use crate::sys::spawn::SandboxPlan;

impl Agent {
    /// The site's sandbox plan, prepared at its first spawn (and again after a reload
    /// replaced the site). A refusal (a `required` feature missing, a bad root) is a
    /// permanent spawn failure with the message.
    pub(super) fn site_sandbox(&mut self, name: &SiteName) -> Result<Arc<SandboxPlan>, String> {
        let privileged = rustix::process::geteuid().is_root();
        let site = self
            .sites
            .get_mut(name)
            .ok_or_else(|| "no such site".to_string())?;
        if let Some(p) = &site.sandbox {
            return Ok(p.plan.clone());
        }
        let prepared = crate::sandbox::prepare(&site.config, privileged)?;
        for line in prepared.not_enforced() {
            warn!(site = %name, "not enforced: {line}");
            let record = format!(
                "{} hatchery: sandbox not enforced: {line}\n",
                crate::logs::utc_timestamp(std::time::SystemTime::now())
            );
            let _ = site.log.append(record.as_bytes());
        }
        let plan = prepared.plan.clone();
        site.sandbox = Some(prepared);
        Ok(plan)
    }
}

/// The `sandbox` field of a site in `status`.
pub(super) fn sandbox_status(p: &Prepared) -> serde_json::Value {
    serde_json::json!({
        "enforced": p.report.iter().filter(|(on, _)| *on).map(|(_, s)| s).collect::<Vec<_>>(),
        "not_enforced": p.not_enforced(),
    })
}

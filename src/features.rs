//! What this kernel and this agent provide, and what is not enforced: the report shown
//! by `hatchery check` and in `hatchery status`.
//!
//! Every feature is probed (never inferred from `uname`).

use serde::Serialize;

/// One line of the report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Feature {
    /// What it is.
    pub name: String,
    /// Whether it is in use.
    pub in_use: bool,
    /// How, or what happens without it.
    pub detail: String,
}

impl Feature {
    /// A feature in use.
    pub fn on(name: &'static str, detail: impl Into<String>) -> Feature {
        Feature {
            name: name.to_string(),
            in_use: true,
            detail: detail.into(),
        }
    }

    /// A feature not in use, and what that means.
    pub fn off(name: &'static str, detail: impl Into<String>) -> Feature {
        Feature {
            name: name.to_string(),
            in_use: false,
            detail: detail.into(),
        }
    }
}

/// Renders the report for people.
pub fn render(features: &[Feature]) -> String {
    let mut out = String::new();
    for f in features {
        let mark = if f.in_use { "yes" } else { "NO " };
        out.push_str(&format!("  [{mark}] {:<22} {}\n", f.name, f.detail));
    }
    out
}

/// Probes that do not need a running agent.
pub fn probe_kernel() -> Vec<Feature> {
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    out.push(Feature::on("kernel", release.trim().to_string()));
    match rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::NONBLOCK,
    ) {
        Ok(_) => out.push(Feature::on(
            "pidfd",
            "workers are tracked by pidfd (pidfd_open, waitid P_PIDFD)",
        )),
        Err(e) => out.push(Feature::off(
            "pidfd",
            format!("unavailable ({e}): Linux 5.10 or later is required"),
        )),
    }
    match crate::sys::uring::Uring::new(512) {
        Ok(ring) => out.push(Feature::on(
            "io_uring",
            format!(
                "event loop on io_uring, {} (HATCHERY_REACTOR=epoll to use epoll)",
                ring.taskrun().name()
            ),
        )),
        Err(e) => out.push(Feature::off(
            "io_uring",
            format!("unavailable ({e}): the event loop uses epoll"),
        )),
    }
    let root = rustix::process::geteuid().is_root();
    out.push(if root {
        Feature::on("root", "running as root")
    } else {
        Feature::off(
            "root",
            "not root: workers run as the agent's user; cgroups need delegation",
        )
    });
    let abi = crate::sys::landlock::abi_version();
    out.push(match abi {
        0 => Feature::off(
            "landlock",
            "unavailable (needs 5.13 and landlock in lsm=): sandbox.landlock rules are not enforced",
        ),
        1..=3 => Feature::on(
            "landlock",
            format!("ABI {abi}: filesystem rules; no TCP bind/connect rules (ABI 4, Linux 6.7)"),
        ),
        _ => Feature::on(
            "landlock",
            format!("ABI {abi}: filesystem and TCP bind/connect rules"),
        ),
    });
    out
}

/// How connections reach the serving generation on this host.
pub fn steering(support: &crate::steering::SteeringSupport) -> Feature {
    use crate::steering::SteeringSupport;
    match support {
        SteeringSupport::Migrate => Feature::on(
            "connection steering",
            "eBPF sk_reuseport program per listener: new connections go to the serving generation; queued ones migrate off a closing listener (SELECT_OR_MIGRATE)",
        ),
        SteeringSupport::Select => Feature::on(
            "connection steering",
            "eBPF sk_reuseport program per listener: new connections go to the serving generation; old listeners drain before their workers stop (no SELECT_OR_MIGRATE before 5.14)",
        ),
        SteeringSupport::Unavailable(why) => Feature::off(
            "connection steering",
            format!(
                "generations share one listener per address ({why}): a new generation takes connections before it is ready, and a broken release may fail some before it is rolled back"
            ),
        ),
    }
}

//! The kernel's side of health checks (`[health]`): an HTTP request to the site's first TCP
//! listener, steered like any client's (so it reaches the serving generation), and, when
//! it fails, the worker that had accepted its connection: the socket inode of the
//! connection's server end (`/proc/net/tcp`) found among the fds of the worker's processes
//! (its cgroup leaf's, or the worker and its descendants without cgroups). What to do
//! about it is the site machine's (`supervisor::machine::health`).

use tracing::debug;

use super::generations::{Look, Probe};
use super::sites::SiteIo;
use crate::config::{HealthPolicy, ListenAddr, SiteName};
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::{HealthAnswer, HealthResult};

/// Starts the check, looks at it, or (`give_up`) ends it: `None` while it is under way.
pub(super) fn check(
    io: &mut SiteIo,
    site: &SiteName,
    g: GenId,
    policy: &HealthPolicy,
    give_up: bool,
) -> Option<HealthResult> {
    let Some(probe) = io.health.as_mut() else {
        let target = io.gens.get(&g).and_then(|x| {
            x.listeners.iter().find_map(|l| match l.spec.addr {
                ListenAddr::Tcp(a) => Some(a),
                ListenAddr::Unix(_) => None,
            })
        });
        let Some(target) = target else {
            return Some(failed(
                HealthAnswer::Refused("no TCP listener".into()),
                None,
            ));
        };
        return match Probe::http(target, &policy.http, "hatchery-health-check") {
            Ok(p) => {
                io.health = Some(p);
                None
            }
            Err(e) => Some(failed(HealthAnswer::Refused(e), None)),
        };
    };
    let answer = match probe.look() {
        Look::Status(code) if policy.http.accepts(code) => {
            io.health = None;
            return Some(HealthResult::Healthy);
        }
        Look::Status(code) => HealthAnswer::Status(code),
        Look::NotHttp => HealthAnswer::NotHttp,
        Look::Failed(e) => HealthAnswer::Refused(e),
        Look::Waiting if give_up => HealthAnswer::TimedOut,
        Look::Waiting => return None,
    };
    // Who had it, looked up while the connection is still open.
    let worker = probe
        .ends()
        .and_then(|(local, peer)| holder(io, None, peer, local));
    debug!(site = %site, gen = g.0, ?answer, ?worker, "health check failed");
    io.health = None;
    Some(failed(answer, worker))
}

fn failed(answer: HealthAnswer, worker: Option<(GenId, Slot, i32)>) -> HealthResult {
    HealthResult::Failed { answer, worker }
}

/// The worker (generation, slot, pid) one of whose processes holds the server end of the
/// connection from `client` to `server` (among generation `only`'s, if given).
pub(super) fn holder(
    io: &SiteIo,
    only: Option<GenId>,
    server: std::net::SocketAddr,
    client: std::net::SocketAddr,
) -> Option<(GenId, Slot, i32)> {
    let inode = crate::net::accepted_socket(server, client)?;
    sockets_by_worker(io, only).remove(&inode)
}

/// The sockets the workers' processes hold (of generation `only`, if given), by inode.
pub(super) fn sockets_by_worker(
    io: &SiteIo,
    only: Option<GenId>,
) -> std::collections::HashMap<u64, (GenId, Slot, i32)> {
    let mut out = std::collections::HashMap::new();
    for (g, gen_io) in io
        .gens
        .iter()
        .filter(|(g, _)| only.is_none_or(|o| o == **g))
    {
        for (slot, w) in &gen_io.workers {
            let pid = w.pidref.pid();
            for p in processes_of(pid, w.cgroup.as_deref()) {
                for inode in crate::net::sockets_of(p) {
                    out.insert(inode, (*g, *slot, pid));
                }
            }
        }
    }
    out
}

/// The processes of a worker: its cgroup leaf's, or without one the worker and its
/// descendants.
fn processes_of(pid: i32, leaf: Option<&std::path::Path>) -> Vec<u32> {
    if let Some(procs) = leaf.and_then(|l| std::fs::read_to_string(l.join("cgroup.procs")).ok()) {
        return procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
    }
    let Ok(root) = u32::try_from(pid) else {
        return Vec::new();
    };
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

//! Usage where cgroup v2 accounting is missing: read from `/proc` instead.
//!
//! Without the memory controller (or without cgroups at all, `cgroup_base = "off"`),
//! `memory.current` and `pids.current` do not exist, and without cgroups neither does
//! `cpu.stat`. Rather than show `-`, `status` (and what reads it: `top`, the metrics)
//! adds up the processes of each worker's tree from `/proc`: their resident memory
//! (`statm`: RSS, which counts a page shared by two processes in both, so a tree of
//! forked workers looks bigger than it is), their number, and their CPU time (`stat`:
//! `utime + stime` of the live processes, so CPU time of processes that already exited is
//! missing). Such a [`Usage`] says so: its `source` is [`UsageSource::Proc`].
//!
//! A worker's tree is the processes of its cgroup leaf where it has one (a cgroup without
//! controllers still lists its processes), else the worker and its descendants through
//! `/proc/<pid>/task/<tid>/children`.

use std::path::Path;

use crate::cgroup::{Usage, UsageSource, read_small};

/// Fills what `usage` lacks (memory, processes, CPU) from the processes of the tree of
/// worker `pid`, whose cgroup leaf is `leaf` (if it has one). Nothing is read when the
/// cgroup had it all.
pub fn complete(usage: &mut Usage, pid: i32, leaf: Option<&Path>) {
    if usage.memory_current.is_some() && usage.pids.is_some() && usage.cpu_usec.is_some() {
        return;
    }
    let pids = tree(pid, leaf);
    let from_proc = of_processes(&pids, usage.cpu_usec.is_none());
    fill(usage, &from_proc);
}

/// What was read of each worker lately (its leaf's files and [`complete`]'s `/proc`
/// files), so that what looks often (`top`'s subscription, metrics scrapes) reads each
/// worker at most once per [`UsageCache::MAX_AGE`]: at 1000 workers, one reading of all of
/// them costs the agent ~15-25 ms, most of it the kernel's path lookups.
#[derive(Debug)]
pub struct UsageCache {
    /// By worker pid: when read, and what.
    read: std::cell::RefCell<std::collections::HashMap<i32, (std::time::Instant, Usage)>>,
    /// When old readings were last dropped.
    pruned: std::cell::Cell<std::time::Instant>,
}

impl Default for UsageCache {
    fn default() -> UsageCache {
        UsageCache {
            read: std::cell::RefCell::default(),
            pruned: std::cell::Cell::new(std::time::Instant::now()),
        }
    }
}

impl UsageCache {
    /// How old a reading may be when it is not asked for fresh.
    pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

    /// Worker `pid`'s usage: `read()` of it, or what that gave less than
    /// [`UsageCache::MAX_AGE`] ago unless `fresh` (`status` asked by a person reads anew,
    /// and refreshes the cache).
    pub fn worker(&self, pid: i32, fresh: bool, read: impl FnOnce() -> Usage) -> Usage {
        let now = std::time::Instant::now();
        if !fresh {
            if let Some((at, cached)) = self.read.borrow().get(&pid) {
                if now.saturating_duration_since(*at) < Self::MAX_AGE {
                    return *cached;
                }
            }
        }
        let usage = read();
        let mut cache = self.read.borrow_mut();
        cache.insert(pid, (now, usage));
        // Readings of workers long gone are dropped, at most once per `MAX_AGE`.
        if now.saturating_duration_since(self.pruned.get()) >= Self::MAX_AGE {
            self.pruned.set(now);
            cache.retain(|_, (at, _)| now.saturating_duration_since(*at) < 2 * Self::MAX_AGE);
        }
        usage
    }
}

/// Takes the figures `usage` lacks from `other` (and its source, when it takes memory).
pub fn fill(usage: &mut Usage, other: &Usage) {
    if usage.memory_current.is_none() && other.memory_current.is_some() {
        usage.memory_current = other.memory_current;
        usage.source = other.source;
    }
    if usage.pids.is_none() {
        usage.pids = other.pids;
    }
    if usage.cpu_usec.is_none() {
        usage.cpu_usec = other.cpu_usec;
    }
}

/// The sum of several workers' usage from `/proc` (a site's, from its workers'): memory,
/// processes and CPU where each has them.
pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage {
        source: UsageSource::Proc,
        ..Usage::default()
    };
    let add = |a: &mut Option<u64>, b: Option<u64>| {
        if let Some(b) = b {
            *a = Some(a.unwrap_or(0).saturating_add(b));
        }
    };
    for u in parts {
        add(&mut total.memory_current, u.memory_current);
        add(&mut total.pids, u.pids);
        add(&mut total.cpu_usec, u.cpu_usec);
    }
    total
}

/// The processes of worker `pid`'s tree.
fn tree(pid: i32, leaf: Option<&Path>) -> Vec<i32> {
    if let Some(procs) = leaf.and_then(|l| read_small(&l.join("cgroup.procs"))) {
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if !pids.is_empty() {
            return pids;
        }
    }
    let mut pids = vec![pid];
    let mut i = 0;
    // Breadth first; bounded, as a fork bomb's tree would be.
    while i < pids.len() && pids.len() < MAX_TREE {
        let p = pids[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(children) = read_small(&task.path().join("children")) else {
                continue;
            };
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    pids.truncate(MAX_TREE);
    pids
}

/// The most processes of one worker's tree read from `/proc`.
const MAX_TREE: usize = 4096;

/// Memory (RSS), count and (if `cpu`) CPU time of `pids`, from `/proc` (processes that
/// are gone count for nothing).
fn of_processes(pids: &[i32], cpu_wanted: bool) -> Usage {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static TICK_USEC: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let page = *PAGE.get_or_init(|| rustix::param::page_size() as u64);
    let tick_usec =
        *TICK_USEC.get_or_init(|| 1_000_000 / rustix::param::clock_ticks_per_second().max(1));
    let (mut rss, mut count, mut cpu) = (0u64, 0u64, 0u64);
    for pid in pids {
        let Some(statm) = read_small(Path::new(&format!("/proc/{pid}/statm"))) else {
            continue;
        };
        let Some(resident) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        count += 1;
        rss = rss.saturating_add(resident.saturating_mul(page));
        if !cpu_wanted {
            continue;
        }
        if let Some(ticks) = read_small(Path::new(&format!("/proc/{pid}/stat")))
            .as_deref()
            .and_then(cpu_ticks)
        {
            cpu = cpu.saturating_add(ticks.saturating_mul(tick_usec));
        }
    }
    Usage {
        memory_current: (count > 0).then_some(rss),
        pids: Some(count),
        cpu_usec: (cpu_wanted && count > 0).then_some(cpu),
        source: UsageSource::Proc,
        ..Usage::default()
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses: fields are counted after its
/// last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is the 12th field after it.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests;

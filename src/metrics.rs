//! Prometheus metrics: what `GET /metrics` answers, in the text exposition format
//! (version 0.0.4), encoded with the `prometheus-client` crate.
//!
//! The series are built from a [`Status`], the very report `hatchery status` shows, so
//! the two cannot disagree, plus the few counters the agent keeps only for metrics
//! ([`Counters`]: turns of the event loop, control requests, deploys, rollbacks and
//! crashes by cause). Nothing is kept between scrapes: each one encodes a fresh
//! snapshot, and an idle agent that is not scraped does no work for metrics.
//!
//! Every per-site series has a `site` label. Series whose value is not known on this host
//! (memory, pids and CPU without cgroup v2 controllers; the accept queue of a site that
//! does not follow its load) are left out, not written as zero. There are no per-worker
//! series: their number would follow the workers' (and their pids), which a scrape
//! should not.
//!
//! The HTTP side (a listener on the agent's loop, with its limits) is in
//! `event/metrics.rs`; this module does no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::cgroup::UsageSource;
use crate::status::{SiteStatus, Status};
use crate::supervisor::slots::ExitReason;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The worker states `hatchery_site_workers` always has a series for (0 when none is in
/// it), as `status` names them.
const WORKER_STATES: [&str; 6] = [
    "starting", "ready", "stopping", "backoff", "failed", "stopped",
];

/// How a worker ended without being asked to: the `cause` label of
/// `hatchery_site_worker_crashes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It exited by itself (any exit code).
    Exited,
    /// A signal killed it (not the OOM killer).
    Killed,
    /// The kernel's OOM killer killed it.
    Oom,
    /// It could not be started.
    SpawnFailed,
    /// It ended, but how is not known (adopted from an earlier agent).
    Unknown,
}

impl Cause {
    /// Every cause, in the order of the counters.
    pub const ALL: [Cause; 5] = [
        Cause::Exited,
        Cause::Killed,
        Cause::Oom,
        Cause::SpawnFailed,
        Cause::Unknown,
    ];

    /// The cause of an exit the agent did not ask for. A worker that did not become ready
    /// in time has none: the agent stopped it (its slot's restart counts it).
    pub fn of(reason: &ExitReason) -> Option<Cause> {
        match reason {
            ExitReason::Exited { .. } => Some(Cause::Exited),
            ExitReason::Signaled { .. } => Some(Cause::Killed),
            ExitReason::OomKilled => Some(Cause::Oom),
            ExitReason::SpawnFailed { .. } => Some(Cause::SpawnFailed),
            ExitReason::ReadyTimeout => None,
            ExitReason::Unknown => Some(Cause::Unknown),
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Exited => "exited",
            Cause::Killed => "killed",
            Cause::Oom => "oom",
            Cause::SpawnFailed => "spawn_failed",
            Cause::Unknown => "unknown",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one site that `status` does not show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteCounters {
    /// Deploys that went through.
    pub deploys: u64,
    /// Deploys rolled back (or steered back).
    pub rollbacks: u64,
    /// Workers that ended without being asked to, by [`Cause`].
    pub crashes: [u64; Cause::ALL.len()],
}

/// The counters the agent keeps for metrics alone: plain integers, bumped where the
/// event happens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Turns of the event loop (each wait for events and what it handled).
    pub loop_iterations: u64,
    /// Control requests read (well-formed or not).
    pub control_requests: u64,
    /// Scrapes of `/metrics` answered (this one included).
    pub scrapes: u64,
    /// Per site, by name.
    pub sites: BTreeMap<String, SiteCounters>,
}

impl Counters {
    /// Site `site`'s counters, made on first use.
    pub fn site(&mut self, site: &str) -> &mut SiteCounters {
        if !self.sites.contains_key(site) {
            self.sites.insert(site.to_string(), SiteCounters::default());
        }
        self.sites.get_mut(site).expect("inserted above")
    }

    /// A worker of `site` ended without being asked to.
    pub fn crashed(&mut self, site: &str, reason: &ExitReason) {
        if let Some(cause) = Cause::of(reason) {
            self.count(site, cause);
        }
    }

    /// A worker of `site` ended (or could not start) for `cause`.
    pub fn count(&mut self, site: &str, cause: Cause) {
        self.site(site).crashes[cause.index()] += 1;
    }
}

/// What one scrape encodes.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The report `status` would give root now.
    pub status: Status,
    /// The agent's own counters.
    pub counters: Counters,
    /// How long the agent has run.
    pub uptime: Duration,
}

/// The snapshot in the Prometheus text format.
pub fn encode(snapshot: Snapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One family of series: its name (without the unit and `_total` the encoder adds), help
/// and type.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
}

const fn gauge(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        unit: None,
        kind: MetricType::Gauge,
    }
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        unit: None,
        kind: MetricType::Counter,
    }
}

const fn info(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        unit: None,
        kind: MetricType::Info,
    }
}

impl Family {
    fn bytes(self) -> Family {
        Family {
            unit: Some(Unit::Bytes),
            ..self
        }
    }

    fn seconds(self) -> Family {
        Family {
            unit: Some(Unit::Seconds),
            ..self
        }
    }

    /// Writes the family with `samples` (nothing at all when there is none); `value`
    /// writes one sample's value in the family's type.
    fn write<L: EncodeLabelSet, V>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[(L, V)],
        value: impl Fn(&mut MetricEncoder<'_>, &V) -> fmt::Result,
    ) -> fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut m =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, v) in samples {
            value(&mut m.encode_family(labels)?, v)?;
        }
        Ok(())
    }

    /// A gauge (or info) family of integers.
    fn gauges<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[(L, u64)],
    ) -> fmt::Result {
        self.write(encoder, samples, |m, v| m.encode_gauge(v))
    }

    /// A gauge family of fractions (seconds).
    fn gauges_f64<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[(L, f64)],
    ) -> fmt::Result {
        self.write(encoder, samples, |m, v| m.encode_gauge(v))
    }

    /// A counter family of integers.
    fn counters<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[(L, u64)],
    ) -> fmt::Result {
        self.write(encoder, samples, |m, v| {
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(v, None)
        })
    }

    /// A counter family of fractions (seconds).
    fn counters_f64<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[(L, f64)],
    ) -> fmt::Result {
        self.write(encoder, samples, |m, v| {
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(v, None)
        })
    }

    /// An info family: each label set with the value 1.
    fn infos<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: &[L],
    ) -> fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut m =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for labels in samples {
            m.encode_info(labels)?;
        }
        Ok(())
    }
}

/// A `site` label.
type SiteLabel<'a> = [(&'static str, &'a str); 1];
/// A `site` label and one more.
type SiteAnd<'a> = [(&'static str, &'a str); 2];

/// One value per site, where `f` knows it.
fn per_site<'a, V>(
    sites: &'a [SiteStatus],
    f: impl Fn(&'a SiteStatus) -> Option<V>,
) -> Vec<(SiteLabel<'a>, V)> {
    sites
        .iter()
        .filter_map(|s| f(s).map(|v| ([("site", s.name.as_str())], v)))
        .collect()
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let agent = &self.status.agent;
        let sites = self.status.sites.as_slice();
        let none: [(&str, &str); 0] = [];
        let c = &self.counters;

        info("hatchery_agent", "The agent's version.")
            .infos(&mut e, &[[("version", agent.version.as_str())]])?;
        gauge("hatchery_agent_uptime", "How long the agent has run.")
            .seconds()
            .gauges_f64(&mut e, &[(none, self.uptime.as_secs_f64())])?;
        counter(
            "hatchery_agent_loop_iterations",
            "Turns of the agent's event loop.",
        )
        .counters(&mut e, &[(none, c.loop_iterations)])?;
        counter(
            "hatchery_agent_control_requests",
            "Requests read on the control socket.",
        )
        .counters(&mut e, &[(none, c.control_requests)])?;
        counter(
            "hatchery_agent_metrics_scrapes",
            "Scrapes of /metrics answered, this one included.",
        )
        .counters(&mut e, &[(none, c.scrapes)])?;
        counter(
            "hatchery_agent_log_dropped",
            "Bytes of the agent's own log it could not write.",
        )
        .bytes()
        .counters(&mut e, &[(none, agent.log_bytes_dropped)])?;

        let states: Vec<SiteAnd<'_>> = sites
            .iter()
            .map(|s| [("site", s.name.as_str()), ("state", s.state.name())])
            .collect();
        info(
            "hatchery_site_state",
            "The site's state (running, failed, stopping, stopped).",
        )
        .infos(&mut e, &states)?;
        gauge(
            "hatchery_site_generation",
            "The number of the generation that serves.",
        )
        .gauges(&mut e, &per_site(sites, |s| s.generation.map(u64::from)))?;
        let mut by_state: Vec<(SiteAnd<'_>, u64)> = Vec::new();
        for s in sites {
            let mut tally: BTreeMap<&str, u64> = WORKER_STATES.iter().map(|&n| (n, 0)).collect();
            for w in &s.workers {
                *tally.entry(w.state.as_str()).or_default() += 1;
            }
            by_state.extend(
                tally
                    .into_iter()
                    .map(|(state, n)| ([("site", s.name.as_str()), ("state", state)], n)),
            );
        }
        gauge(
            "hatchery_site_workers",
            "Worker slots of every live generation, by state.",
        )
        .gauges(&mut e, &by_state)?;
        gauge(
            "hatchery_site_workers_ready",
            "Ready workers of the serving generation.",
        )
        .gauges(&mut e, &per_site(sites, |s| Some(u64::from(s.ready))))?;
        gauge(
            "hatchery_site_workers_desired",
            "Workers the serving generation runs (the memory cap may hold it below the requested count).",
        )
        .gauges(&mut e, &per_site(sites, |s| Some(u64::from(s.desired))))?;
        gauge(
            "hatchery_site_workers_requested",
            "Workers asked for, by the configuration or scale.",
        )
        .gauges(&mut e, &per_site(sites, |s| Some(u64::from(s.requested))))?;
        gauge(
            "hatchery_site_workers_busy",
            "Workers that said BUSY=1 (until BUSY=0).",
        )
        .gauges(
            &mut e,
            &per_site(sites, |s| {
                Some(count(s.workers.iter().filter(|w| w.busy).count()))
            }),
        )?;
        gauge(
            "hatchery_site_capacity_workers",
            "Most workers the site's memory budget holds (sites with a budget).",
        )
        .gauges(
            &mut e,
            &per_site(sites, |s| s.capacity.as_ref().map(|c| u64::from(c.workers))),
        )?;
        counter(
            "hatchery_site_worker_restarts",
            "Restarts after a crash of the live generations' worker slots, as status shows them (a deploy starts the new generation's at zero).",
        )
        .counters(
            &mut e,
            &per_site(sites, |s| {
                Some(s.workers.iter().map(|w| u64::from(w.restarts)).sum())
            }),
        )?;
        let mut crashes: Vec<(SiteAnd<'_>, u64)> = Vec::new();
        for s in sites {
            let kept = c.sites.get(&s.name);
            for cause in Cause::ALL {
                let n = kept.map_or(0, |k| k.crashes[cause.index()]);
                crashes.push(([("site", s.name.as_str()), ("cause", cause.name())], n));
            }
        }
        counter(
            "hatchery_site_worker_crashes",
            "Workers that ended without being asked to, or could not be started, by cause (exited, killed, oom, spawn_failed, unknown).",
        )
        .counters(&mut e, &crashes)?;
        counter(
            "hatchery_site_oom_kills",
            "OOM kills in the site's cgroup (memory.events oom_kill).",
        )
        .counters(
            &mut e,
            &per_site(sites, |s| s.usage.as_ref().and_then(|u| u.oom_kills)),
        )?;
        let memory: Vec<(SiteAnd<'_>, u64)> = sites
            .iter()
            .filter_map(|s| {
                let u = s.usage.as_ref()?;
                let source = match u.source {
                    UsageSource::Cgroup => "cgroup",
                    UsageSource::Proc => "proc",
                };
                u.memory_current
                    .map(|v| ([("site", s.name.as_str()), ("source", source)], v))
            })
            .collect();
        gauge(
            "hatchery_site_memory",
            "Memory the site uses now: its cgroup's memory.current (source cgroup), or without the memory controller the resident memory of its processes from /proc (source proc).",
        )
        .bytes()
        .gauges(&mut e, &memory)?;
        gauge(
            "hatchery_site_memory_peak",
            "The most memory the site's cgroup has used (memory.peak).",
        )
        .bytes()
        .gauges(
            &mut e,
            &per_site(sites, |s| s.usage.as_ref().and_then(|u| u.memory_peak)),
        )?;
        gauge(
            "hatchery_site_memory_budget",
            "The site's memory budget (memory, its cgroup's memory.max).",
        )
        .bytes()
        .gauges(
            &mut e,
            &per_site(sites, |s| s.limits.as_ref().and_then(|l| l.memory)),
        )?;
        gauge(
            "hatchery_site_worker_memory_max",
            "The memory cap of each worker (memory_max).",
        )
        .bytes()
        .gauges(
            &mut e,
            &per_site(sites, |s| s.limits.as_ref().and_then(|l| l.memory_max)),
        )?;
        gauge(
            "hatchery_site_capacity_per_worker",
            "Memory the cap counts per worker (estimate or measured peak).",
        )
        .bytes()
        .gauges(
            &mut e,
            &per_site(sites, |s| s.capacity.as_ref().map(|c| c.per_worker)),
        )?;
        counter(
            "hatchery_site_cpu",
            "CPU time of the site's cgroup (cpu.stat usage_usec).",
        )
        .seconds()
        .counters_f64(
            &mut e,
            &per_site(sites, |s| {
                s.usage
                    .as_ref()
                    .and_then(|u| u.cpu_usec)
                    .map(|us| us as f64 / 1e6)
            }),
        )?;
        gauge(
            "hatchery_site_pids",
            "Processes in the site's cgroup (pids.current).",
        )
        .gauges(
            &mut e,
            &per_site(sites, |s| s.usage.as_ref().and_then(|u| u.pids)),
        )?;
        let kept =
            |s: &SiteStatus, f: fn(&SiteCounters) -> u64| Some(c.sites.get(&s.name).map_or(0, f));
        counter("hatchery_site_deploys", "Deploys that went through.")
            .counters(&mut e, &per_site(sites, |s| kept(s, |k| k.deploys)))?;
        counter(
            "hatchery_site_rollbacks",
            "Deploys rolled back (or steered back).",
        )
        .counters(&mut e, &per_site(sites, |s| kept(s, |k| k.rollbacks)))?;
        gauge(
            "hatchery_site_deploy_in_progress",
            "Whether a deploy is under way (1) or not (0).",
        )
        .gauges(
            &mut e,
            &per_site(sites, |s| Some(u64::from(s.deploy.is_some()))),
        )?;
        gauge(
            "hatchery_site_last_deploy_duration",
            "How long the last deploy that went through took.",
        )
        .seconds()
        .gauges_f64(
            &mut e,
            &per_site(sites, |s| {
                s.last_deploy
                    .as_ref()
                    .and_then(|d| d.duration_ms)
                    .map(|ms| ms as f64 / 1e3)
            }),
        )?;
        let steering: Vec<SiteAnd<'_>> = sites
            .iter()
            .filter_map(|s| {
                s.steering
                    .as_deref()
                    .map(|m| [("site", s.name.as_str()), ("mode", m)])
            })
            .collect();
        info(
            "hatchery_site_steering",
            "How new connections reach the serving generation (ebpf, shared listener).",
        )
        .infos(&mut e, &steering)?;
        gauge(
            "hatchery_site_accept_queue",
            "Connections waiting in the accept queues at the last load sample (sites that follow their load).",
        )
        .gauges(
            &mut e,
            &per_site(sites, |s| {
                s.scale
                    .as_ref()
                    .and_then(|sc| sc.signals.as_ref())
                    .and_then(|sig| sig.queued)
                    .map(u64::from)
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status with one site: two workers (one ready after a restart, one backing off),
    /// a cgroup with memory accounting and none of pids, a budget, a finished deploy.
    fn status() -> Status {
        serde_json::from_value(serde_json::json!({
            "agent": {
                "pid": 1, "version": "1.2.3", "started_at": "2026-01-01T00:00:00Z",
                "log_bytes_dropped": 7, "config": "/etc/hatchery/hatchery.toml", "features": []
            },
            "sites": [{
                "name": "blog", "state": "running", "generation": 4, "desired": 3,
                "requested": 5, "ready": 1, "steering": "ebpf",
                "limits": { "memory": 1073741824u64, "pids_max": null, "cpu_weight": null,
                            "memory_max": 268435456u64, "memory_high": null, "not_enforced": [] },
                "usage": { "memory_current": 1000, "memory_peak": 2000, "memory_max": null,
                           "oom_kills": 2, "pids": null, "cpu_usec": 1500000 },
                "last_deploy": { "result": "done", "from": 3, "to": 4, "release": null,
                                 "duration_ms": 2500, "finished_at": "2026-01-01T00:00:00Z" },
                "workers": [
                    { "id": 0, "generation": 4, "pid": 10, "state": "ready", "busy": true,
                      "restarts": 2, "started_at": null, "uptime_ms": null, "last_exit": null,
                      "cgroup": null, "usage": null },
                    { "id": 1, "generation": 4, "pid": null, "state": "backoff", "busy": false,
                      "restarts": 1, "started_at": null, "uptime_ms": null, "last_exit": null,
                      "cgroup": null, "usage": null }
                ]
            }]
        }))
        .expect("a status")
    }

    fn encoded(counters: Counters) -> String {
        encode(Snapshot {
            status: status(),
            counters,
            uptime: Duration::from_millis(1500),
        })
        .expect("encoded")
    }

    #[test]
    fn series_come_from_the_status_with_a_site_label() {
        let text = encoded(Counters::default());
        for line in [
            "hatchery_agent_info{version=\"1.2.3\"} 1",
            "hatchery_agent_uptime_seconds 1.5",
            "hatchery_agent_log_dropped_bytes_total 7",
            "hatchery_site_state_info{site=\"blog\",state=\"running\"} 1",
            "hatchery_site_generation{site=\"blog\"} 4",
            "hatchery_site_workers{site=\"blog\",state=\"ready\"} 1",
            "hatchery_site_workers{site=\"blog\",state=\"backoff\"} 1",
            "hatchery_site_workers{site=\"blog\",state=\"starting\"} 0",
            "hatchery_site_workers_ready{site=\"blog\"} 1",
            "hatchery_site_workers_desired{site=\"blog\"} 3",
            "hatchery_site_workers_requested{site=\"blog\"} 5",
            "hatchery_site_workers_busy{site=\"blog\"} 1",
            "hatchery_site_worker_restarts_total{site=\"blog\"} 3",
            "hatchery_site_oom_kills_total{site=\"blog\"} 2",
            "hatchery_site_memory_bytes{site=\"blog\",source=\"cgroup\"} 1000",
            "hatchery_site_memory_peak_bytes{site=\"blog\"} 2000",
            "hatchery_site_memory_budget_bytes{site=\"blog\"} 1073741824",
            "hatchery_site_worker_memory_max_bytes{site=\"blog\"} 268435456",
            "hatchery_site_cpu_seconds_total{site=\"blog\"} 1.5",
            "hatchery_site_last_deploy_duration_seconds{site=\"blog\"} 2.5",
            "hatchery_site_steering_info{site=\"blog\",mode=\"ebpf\"} 1",
            "# TYPE hatchery_site_worker_restarts_total counter",
            "# TYPE hatchery_site_memory_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // What is not known is left out, not written as zero.
        for name in [
            "hatchery_site_pids",
            "hatchery_site_accept_queue",
            "hatchery_site_capacity_workers",
        ] {
            assert!(!text.contains(name), "{name} in\n{text}");
        }
        // Every sample of a site has its label.
        for l in text.lines().filter(|l| l.starts_with("hatchery_site_")) {
            assert!(l.contains("site=\"blog\""), "{l}");
        }
    }

    #[test]
    fn the_agents_counters_are_written_per_site_and_cause() {
        let mut c = Counters {
            loop_iterations: 42,
            control_requests: 3,
            scrapes: 1,
            ..Counters::default()
        };
        c.crashed("blog", &ExitReason::Signaled { signal: 9 });
        c.crashed("blog", &ExitReason::OomKilled);
        c.crashed("blog", &ExitReason::OomKilled);
        c.crashed("blog", &ExitReason::ReadyTimeout);
        c.count("blog", Cause::SpawnFailed);
        c.site("blog").deploys = 4;
        c.site("blog").rollbacks = 1;
        // A site no longer in the status is not written.
        c.crashed("gone", &ExitReason::Exited { code: 1 });
        let text = encoded(c);
        for line in [
            "hatchery_agent_loop_iterations_total 42",
            "hatchery_agent_control_requests_total 3",
            "hatchery_agent_metrics_scrapes_total 1",
            "hatchery_site_worker_crashes_total{site=\"blog\",cause=\"killed\"} 1",
            "hatchery_site_worker_crashes_total{site=\"blog\",cause=\"oom\"} 2",
            "hatchery_site_worker_crashes_total{site=\"blog\",cause=\"spawn_failed\"} 1",
            "hatchery_site_worker_crashes_total{site=\"blog\",cause=\"exited\"} 0",
            "hatchery_site_deploys_total{site=\"blog\"} 4",
            "hatchery_site_rollbacks_total{site=\"blog\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("gone"), "{text}");
        assert!(!text.contains("ready_timeout"), "{text}");
    }

    /// Every series name of a scrape where everything is known.
    fn every_name() -> std::collections::BTreeSet<String> {
        let mut st = status();
        let site = &mut st.sites[0];
        site.capacity = serde_json::from_value(serde_json::json!({
            "workers": 4, "per_worker": 100, "basis": "measured", "budget": 400,
            "derivation": "x"
        }))
        .expect("capacity");
        site.scale = serde_json::from_value(serde_json::json!({
            "pinned": false, "target_percent": 70, "interval_ms": 1000,
            "grow_cooldown_ms": 0, "shrink_cooldown_ms": 0, "sampling": true,
            "signals": { "busy": null, "cpu": null, "queued": 5, "cpu_stall": null,
                         "memory_events": null, "ready": 1, "wanted": 2 }
        }))
        .expect("scale");
        if let Some(u) = site.usage.as_mut() {
            u.pids = Some(3);
        }
        let text = encode(Snapshot {
            status: st,
            counters: Counters::default(),
            uptime: Duration::ZERO,
        })
        .expect("encoded");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_readme_and_the_dashboard_name_the_series_there_are() {
        let names = every_name();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
        let table: std::collections::BTreeSet<String> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `hatchery_"))
            .filter_map(|l| l.split('`').next())
            .map(|n| format!("hatchery_{n}"))
            .collect();
        assert_eq!(table, names, "the README's table of metrics");
        let dashboard = std::fs::read_to_string(root.join("packaging/grafana/hatchery.json"))
            .expect("dashboard");
        let json: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
        let mut used = std::collections::BTreeSet::new();
        for p in json["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                for (i, _) in expr.match_indices("hatchery_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(names.contains(&name), "the dashboard's {name} is no series");
                    used.insert(name);
                }
            }
        }
        for name in [
            "hatchery_site_workers",
            "hatchery_site_memory_bytes",
            "hatchery_site_memory_budget_bytes",
            "hatchery_site_worker_restarts_total",
            "hatchery_site_cpu_seconds_total",
            "hatchery_site_deploys_total",
        ] {
            assert!(used.contains(name), "the dashboard shows no {name}");
        }
    }
}

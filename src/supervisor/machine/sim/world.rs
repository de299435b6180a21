//! The simulated world: its processes, and the machine's read-only window onto it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::SiteConfig;
use crate::supervisor::ids::{GenId, Slot};
use crate::supervisor::machine::Observe;

use super::*;

impl Observe for World {
    fn resolve_release(
        &self,
        site: &SiteConfig,
        asked: Option<&Path>,
    ) -> Result<Option<PathBuf>, String> {
        match asked {
            Some(p) if p.to_string_lossy().contains("missing") => {
                Err(format!("{} does not resolve", p.display()))
            }
            Some(p) => Ok(Some(p.to_path_buf())),
            None if site.release.is_none() => Ok(None),
            None if self.link_dangles => Err("/srv/web/current does not resolve".into()),
            None => Ok(Some(self.link.clone())),
        }
    }

    fn measured_memory(&self, generation: GenId, slots: &[Slot]) -> Option<u64> {
        if !self.accounted {
            return None;
        }
        slots
            .iter()
            .filter_map(|s| self.procs.get(&(generation, *s)).map(|p| p.mem))
            .max()
    }

    fn queues_empty(&self, _old: GenId, _new: GenId) -> bool {
        self.queues_empty
    }

    fn load(&self, _generation: GenId) -> crate::supervisor::load::Counters {
        self.load
    }

    fn probe_alone(&self) -> Result<(), String> {
        self.probe_alone.clone()
    }
}

impl World {
    /// The earliest thing a zygote will do by itself: become ready (`true`) or end.
    pub(super) fn next_zygote_event(&self) -> Option<(Instant, GenId, bool)> {
        let mut best: Option<(Instant, GenId, bool)> = None;
        for (g, z) in &self.zygotes {
            let ready = z.ready_at.filter(|_| !z.ready).map(|t| (t, *g, true));
            let exit = z.exit_at.as_ref().map(|(t, _)| (*t, *g, false));
            for e in [ready, exit].into_iter().flatten() {
                if best.is_none_or(|b| e.0 < b.0) {
                    best = Some(e);
                }
            }
        }
        best
    }

    /// The earliest thing that will happen by itself.
    pub(super) fn next_event(&self) -> Option<(Instant, (GenId, Slot), Happens)> {
        let mut best: Option<(Instant, (GenId, Slot), Happens)> = None;
        let mut consider = |t: Instant, k: (GenId, Slot), h: Happens| {
            if best.is_none_or(|b| t < b.0) {
                best = Some((t, k, h));
            }
        };
        for (k, p) in &self.procs {
            if let (Some(t), false) = (p.ready_at, p.ready) {
                consider(t, *k, Happens::Ready);
            }
            if let Some((t, _)) = &p.crash_at {
                consider(*t, *k, Happens::Crash);
            }
            if let Some((t, _)) = &p.exit_at {
                consider(*t, *k, Happens::Exit);
            }
        }
        best
    }
}

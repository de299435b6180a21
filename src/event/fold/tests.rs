use super::*;

const MS: Duration = Duration::from_millis(1);

fn fold() -> Fold<&'static str> {
    Fold::new(LIMITS)
}

/// Offers `n` lines of `kind`, one every `every`, from `t`; the verdicts.
fn burst(
    f: &mut Fold<&'static str>,
    kind: &'static str,
    t: Instant,
    n: u32,
    every: Duration,
) -> Vec<Verdict> {
    (0..n)
        .map(|i| {
            let o = f.offer(t + every * i, &kind, i);
            assert_eq!(o.ended, None, "line {i}: no burst ended");
            o.verdict
        })
        .collect()
}

#[test]
fn a_single_line_is_shown_and_needs_no_summary_nor_wake_up() {
    let mut f = fold();
    let t = Instant::now();
    let o = f.offer(t, &"killed by SIGKILL", 3);
    assert_eq!(o.verdict, Verdict::Shown);
    assert_eq!(o.ended, None);
    assert_eq!(f.next_deadline(), None, "nothing folded: no wake-up");
    assert_eq!(f.due(t + Duration::from_secs(10)), vec![]);
    assert_eq!(f.drain(), vec![]);
}

#[test]
fn a_burst_shows_five_lines_then_one_summary_after_the_quiet_gap() {
    let mut f = fold();
    let t = Instant::now();
    let verdicts = burst(
        &mut f,
        "killed by SIGKILL",
        t,
        1000,
        Duration::from_micros(200),
    );
    assert!(verdicts[..5].iter().all(|v| *v == Verdict::Shown));
    assert!(verdicts[5..].iter().all(|v| *v == Verdict::Folded));
    let last = t + Duration::from_micros(200) * 999;
    assert_eq!(f.next_deadline(), Some(last + 250 * MS));
    assert_eq!(f.due(last + 249 * MS), vec![], "not quiet long enough");
    let due = f.due(last + 250 * MS);
    assert_eq!(
        due,
        vec![Summary {
            kind: "killed by SIGKILL",
            folded: 995,
            total: 1000,
            span: last - t,
            lowest: 5,
            highest: 999,
        }]
    );
    assert_eq!(
        due[0].describe("killed by SIGKILL"),
        "995 more workers killed by SIGKILL (1000 in 0.20 s; w-5 … w-999)"
    );
    assert_eq!(f.next_deadline(), None, "said once");
    // The next burst shows its first lines again.
    let later = last + Duration::from_secs(5);
    assert_eq!(
        f.offer(later, &"killed by SIGKILL", 7).verdict,
        Verdict::Shown
    );
}

#[test]
fn kinds_are_folded_apart() {
    let mut f = fold();
    let t = Instant::now();
    burst(&mut f, "killed by SIGKILL", t, 7, MS);
    let v = burst(&mut f, "exited with code 1", t, 6, MS);
    assert_eq!(v[5], Verdict::Folded);
    let due = f.due(t + Duration::from_secs(1));
    let counts: Vec<(&str, u64)> = due.iter().map(|s| (s.kind, s.folded)).collect();
    assert_eq!(
        counts,
        vec![("exited with code 1", 1), ("killed by SIGKILL", 2)]
    );
    assert_eq!(due[0].describe("x"), "1 more worker x (6 in 0.01 s; w-5)");
}

#[test]
fn a_line_after_the_quiet_gap_says_the_summary_it_follows() {
    // The loop had not flushed yet: the summary comes with the next line, before it.
    let mut f = fold();
    let t = Instant::now();
    burst(&mut f, "k", t, 8, MS);
    let o = f.offer(t + Duration::from_millis(600), &"k", 40);
    assert_eq!(
        o.verdict,
        Verdict::Shown,
        "a new burst shows its first lines"
    );
    let s = o.ended.expect("the first burst's summary");
    assert_eq!((s.folded, s.total), (3, 8));
    assert_eq!(f.next_deadline(), None);
}

#[test]
fn a_long_storm_is_cut_at_longest_and_goes_on_folded() {
    let mut f = fold();
    let t = Instant::now();
    // One line every 10 ms for 2.5 s: never quiet.
    let every = 10 * MS;
    let mut summaries = Vec::new();
    let mut shown = 0;
    for i in 0..250u32 {
        let now = t + every * i;
        summaries.extend(f.due(now));
        let o = f.offer(now, &"k", i);
        summaries.extend(o.ended);
        if o.verdict == Verdict::Shown {
            shown += 1;
        }
        // Once something is folded, its summary is due within `longest`.
        assert!(
            i < 5
                || f.next_deadline()
                    .is_some_and(|d| d <= now + Duration::from_secs(1)),
            "line {i}: a summary is due within `longest`"
        );
    }
    let end = t + every * 249;
    summaries.extend(f.due(end + 250 * MS));
    assert_eq!(shown, 5, "only the storm's first lines are shown");
    assert_eq!(summaries.len(), 3, "one summary per second: {summaries:?}");
    assert_eq!(
        summaries.iter().map(|s| s.folded).sum::<u64>() + shown,
        250,
        "every line is counted once"
    );
    assert_eq!(summaries[0].total, 100, "cut after one second");
    assert_eq!(
        summaries[1].total, 200,
        "a continuation counts from the start"
    );
    assert_eq!(summaries[2].total, 250);
    assert_eq!(summaries[2].span, end - t);
    assert_eq!(
        (summaries[1].lowest, summaries[1].highest),
        (100, 199),
        "its own workers"
    );
}

#[test]
fn drain_says_every_summary_owed() {
    let mut f = fold();
    let t = Instant::now();
    burst(&mut f, "a", t, 9, MS);
    burst(&mut f, "b", t, 2, MS);
    let owed = f.drain();
    assert_eq!(owed.len(), 1);
    assert_eq!((owed[0].kind, owed[0].folded), ("a", 4));
    assert_eq!(f.next_deadline(), None);
}

#[test]
fn progress_lines_of_one_worker_have_a_kind_and_failures_none() {
    let k = |l: &str| progress_kind(l).map(|(k, w)| (k.prefix, k.what, w));
    assert_eq!(
        k("w-473 killed by SIGTERM"),
        Some(("".into(), "killed by SIGTERM".into(), 473))
    );
    assert_eq!(
        k("w-0 started (pid 25263)"),
        Some(("".into(), "started".into(), 0))
    );
    assert_eq!(
        k("gen-3: w-12 ready"),
        Some(("gen-3: ".into(), "ready".into(), 12))
    );
    // Failures need attention: never folded.
    assert_eq!(
        k("w-2 failed: not restarted until `hatchery start web`"),
        None
    );
    // Lines about no single worker.
    assert_eq!(k("all workers stopped"), None);
    assert_eq!(
        k("restart stopped at w-3: its new process did not stay up"),
        None
    );
    assert_eq!(k("gen-2 retired"), None);
    assert_eq!(k("workers 4 -> 8 (fixed)"), None);
}

#[test]
fn the_agents_words_for_one_worker_are_folded_by_kind() {
    use crate::config::SiteName;
    use crate::supervisor::ids::Slot;
    use crate::supervisor::slots::{ExitReason, Note};
    let site = SiteName::new("web").expect("a site name");
    let kind = |n: &Note| progress_kind(&super::super::render::note(&site, n)).map(|k| k.0.what);
    let sigterm = ExitReason::Signaled {
        signal: libc::SIGTERM,
    };
    assert_eq!(
        kind(&Note::Exited(Slot(7), sigterm)),
        Some("killed by SIGTERM".into())
    );
    assert_eq!(kind(&Note::Started(Slot(7), 4242)), Some("started".into()));
    assert_eq!(kind(&Note::Ready(Slot(7))), Some("ready".into()));
    assert_eq!(
        kind(&Note::Killed(Slot(7))),
        Some("did not stop in time: killed".into())
    );
    assert_eq!(
        kind(&Note::Failed(Slot(7))),
        None,
        "a failure is never folded"
    );
    assert_eq!(kind(&Note::RestartFailed(Slot(7))), None);
    assert_eq!(kind(&Note::AllStopped), None);
}

#[test]
fn progress_summaries_keep_the_generation() {
    let s = Summary {
        kind: ProgressKind {
            prefix: "gen-4: ".into(),
            what: "ready".into(),
        },
        folded: 3995,
        total: 4000,
        span: Duration::from_millis(1500),
        lowest: 5,
        highest: 3999,
    };
    assert_eq!(
        progress_summary(&s),
        "gen-4: 3995 more workers ready (4000 in 1.50 s; w-5 … w-3999)"
    );
}

/// A writer into a shared buffer, for a subscriber of the test's own.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn the_log_layer_folds_worker_lines_and_never_errors() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let out = Captured::default();
    let fold = LogFold::new(LIMITS);
    let subscriber = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false)
        .with_target(false)
        .finish()
        .with(fold.layer());
    tracing::subscriber::with_default(subscriber, || {
        for w in 0..200 {
            tracing::warn!(site = "bench", gen = 1, worker = w, pid = 1000 + w, "worker killed by SIGKILL");
        }
        for w in 0..20 {
            tracing::error!(
                site = "bench",
                worker = w,
                "site failed: worker flapping or unstartable"
            );
        }
        for _ in 0..20 {
            tracing::info!(site = "bench", "a line about no worker");
        }
        assert!(fold.next_deadline().is_some(), "a summary is owed");
        fold.flush(Instant::now() + Duration::from_secs(2));
        assert_eq!(fold.next_deadline(), None);
    });
    let text = String::from_utf8(out.0.lock().expect("not poisoned").clone()).expect("utf-8");
    assert_eq!(
        text.matches("worker killed by SIGKILL").count(),
        5,
        "{text}"
    );
    assert_eq!(
        text.matches("site failed").count(),
        20,
        "errors are never folded"
    );
    assert_eq!(text.matches("a line about no worker").count(), 20);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("more workers"))
        .collect();
    assert_eq!(summary.len(), 1, "{text}");
    assert!(summary[0].contains(" WARN "), "{}", summary[0]);
    assert!(
        summary[0].contains("195 more workers killed by SIGKILL (200 in ")
            && summary[0].contains("; w-5 … w-199) site=bench"),
        "{}",
        summary[0]
    );
}

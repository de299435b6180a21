//! What the client commands print of the agent's final answer: a sentence for people, or
//! with `--json` the answer itself.
//!
//! `--json` output is always valid JSON, in one of two shapes (the README's "Commands"
//! section says which command prints which):
//! - one document (pretty-printed): `status`, `signal`, `reload` (and `check`, `top`);
//! - JSON lines, one compact object per line, for the commands that stream: `logs`
//!   (one `hatchery::logs::LogLine` object per log line), `events` (one entry per line), and the commands that
//!   report progress while they wait (`start`, `stop`, `restart`, `scale`, `deploy`,
//!   `promote`, `rollback`, `upgrade`: `{"event": ...}` per step, then the answer).
//!
//! An error is one object, `{"error": {"kind": ..., "message": ...}}`, on stdout as well
//! (and its message on stderr).

use hatchery::control::{Done, Reloaded, Signalled, Upgraded};

/// How a command's `--json` output is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonShape {
    /// One pretty-printed document.
    Document,
    /// One compact object per line.
    Lines,
}

/// The final answer as `--json` prints it in `shape` (without the final newline).
pub fn json(value: &serde_json::Value, shape: JsonShape) -> String {
    match shape {
        JsonShape::Document => serde_json::to_string_pretty(value),
        JsonShape::Lines => serde_json::to_string(value),
    }
    .unwrap_or_else(|_| "null".to_string())
}

/// A log line as `logs --json` prints it: `{"time", "source", "pid", "stream", "text"}`
/// (`hatchery::logs::LogLine`).
pub fn log_line_json(line: &str) -> String {
    serde_json::to_string(&hatchery::logs::LogLine::parse(line)).unwrap_or_default()
}

/// A progress step as `--json` prints it: `{"event": "..."}`.
pub fn progress_json(event: &str) -> String {
    serde_json::json!({ "event": event }).to_string()
}

/// An error as `--json` prints it: `{"error": {"kind": ..., "message": ...}}`. `kind` is
/// one of the protocol's error kinds, or `unreachable` (the agent could not be reached,
/// or the connection was lost) or `usage` (the command line was refused before asking).
pub fn error_json(kind: &str, message: &str) -> String {
    serde_json::json!({ "error": { "kind": kind, "message": message } }).to_string()
}

/// What the client commands answer for people: the sentence for the final answer of a
/// request, when it has one. `None` for answers that have nothing to add to what was
/// printed before them (the end of `logs` and `events`), and for an answer this CLI does
/// not know (printed as it came).
pub fn sentence(value: &serde_json::Value) -> Option<String> {
    if let Ok(up) = serde_json::from_value::<Upgraded>(value.clone()) {
        return Some(up.message);
    }
    if let Ok(done) = serde_json::from_value::<Done>(value.clone()) {
        return Some(format!("{}: {}", done.site, done.message));
    }
    if let Ok(s) = serde_json::from_value::<Signalled>(value.clone()) {
        return Some(signalled(&s));
    }
    if let Ok(r) = serde_json::from_value::<Reloaded>(value.clone()) {
        return Some(reloaded(&r));
    }
    None
}

/// `signal`: `blog: SIGHUP sent to 4 workers`.
pub fn signalled(s: &Signalled) -> String {
    match s.workers {
        0 => format!(
            "{}: no worker is running, {} was sent to none",
            s.site, s.signal
        ),
        1 => format!("{}: {} sent to 1 worker", s.site, s.signal),
        n => format!("{}: {} sent to {n} workers", s.site, s.signal),
    }
}

/// `reload`: `configuration reloaded: shop added; blog, wiki changed; old removed`, or
/// `configuration reloaded: nothing changed`.
pub fn reloaded(r: &Reloaded) -> String {
    let parts: Vec<String> = [
        (&r.added, "added"),
        (&r.changed, "changed"),
        (&r.removed, "removed"),
    ]
    .iter()
    .filter(|(sites, _)| !sites.is_empty())
    .map(|(sites, what)| format!("{} {what}", sites.join(", ")))
    .collect();
    if parts.is_empty() {
        "configuration reloaded: nothing changed".to_string()
    } else {
        format!("configuration reloaded: {}", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_and_reload_answers_are_sentences() {
        let s = |workers| Signalled {
            site: "blog".into(),
            signal: "SIGHUP".into(),
            workers,
        };
        assert_eq!(signalled(&s(4)), "blog: SIGHUP sent to 4 workers");
        assert_eq!(signalled(&s(1)), "blog: SIGHUP sent to 1 worker");
        assert_eq!(
            signalled(&s(0)),
            "blog: no worker is running, SIGHUP was sent to none"
        );
        assert_eq!(
            reloaded(&Reloaded::default()),
            "configuration reloaded: nothing changed"
        );
        let r = Reloaded {
            added: vec!["shop".into()],
            changed: vec!["blog".into(), "wiki".into()],
            removed: vec![],
        };
        assert_eq!(
            reloaded(&r),
            "configuration reloaded: shop added; blog, wiki changed"
        );
        // The answers as they come from the agent.
        let value = serde_json::to_value(s(2)).expect("json");
        assert_eq!(
            sentence(&value).as_deref(),
            Some("blog: SIGHUP sent to 2 workers")
        );
        let value = serde_json::to_value(&r).expect("json");
        assert_eq!(
            sentence(&value).as_deref(),
            Some("configuration reloaded: shop added; blog, wiki changed")
        );
        let done = serde_json::json!({"site": "blog", "message": "all workers stopped"});
        assert_eq!(
            sentence(&done).as_deref(),
            Some("blog: all workers stopped")
        );
        // The end of `logs` says nothing more.
        let ended = serde_json::json!({"site": "blog", "log": "/var/log/hatchery/blog.log"});
        assert_eq!(sentence(&ended), None);
    }

    #[test]
    fn json_is_one_document_or_one_object_per_line() {
        let v = serde_json::json!({"site": "blog", "workers": [1, 2]});
        let doc = json(&v, JsonShape::Document);
        assert!(doc.lines().count() > 1, "{doc}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&doc).ok(),
            Some(v.clone())
        );
        let line = json(&v, JsonShape::Lines);
        assert_eq!(line.lines().count(), 1, "{line}");
        for l in [
            log_line_json("a \"quoted\"\nline\x1b[31m"),
            progress_json("w-0 ready"),
            error_json("unreachable", "cannot reach the agent"),
        ] {
            assert_eq!(l.lines().count(), 1, "{l}");
            assert!(serde_json::from_str::<serde_json::Value>(&l).is_ok(), "{l}");
        }
    }
}

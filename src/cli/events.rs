//! How `hatchery events` shows the agent's history entries.

use hatchery::event::history::Entry;

/// One entry (a JSON object from the agent) as a line for people: time, site, who, what.
/// A line this CLI cannot read is shown as it came.
pub fn text(line: &str) -> String {
    match serde_json::from_str::<Entry>(line) {
        Ok(entry) => entry.text(),
        Err(_) => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_shown_as_text_and_unknown_lines_as_they_came() {
        let line = r#"{"time":"2026-11-22T14:41:08.123Z","site":"blog","gen":2,"worker":3,"pid":1234,"kind":"exited","message":"killed by SIGKILL","exit":"signal","signal":"SIGKILL","crash":true}"#;
        assert_eq!(
            text(line),
            "2026-11-22T14:41:08.123Z blog gen-2 w-3[1234] killed by SIGKILL"
        );
        let reload = r#"{"time":"2026-11-22T14:41:08.123Z","kind":"reload","message":"configuration reloaded"}"#;
        assert_eq!(
            text(reload),
            "2026-11-22T14:41:08.123Z - configuration reloaded"
        );
        assert_eq!(text("not json"), "not json");
    }
}

use std::path::Path;

use super::*;
use crate::config::raw::{RawAgent, RawSite};

fn problems(text: &str) -> Vec<(Option<u32>, String, String)> {
    let e = parse_toml::<RawSite>(Path::new("/etc/hatchery/sites.d/web.toml"), text)
        .expect_err("problems");
    e.all()
        .map(|p| (p.line, p.key.clone(), p.message.clone()))
        .collect()
}

#[test]
fn every_problem_of_a_file_is_reported_with_its_line_and_key() {
    let text = "name = \"web\"\ncommand = [\"x\"]\nwrokers = 3\n[stop]\ntimeout = 5\nsignall = \"TERM\"\n[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:1\"\n[[listen]]\nname = \"b\"\ntpc = \"127.0.0.1:2\"\n";
    let found = problems(text);
    assert_eq!(
        found,
        vec![
            (
                Some(3),
                "wrokers".to_string(),
                "unknown key `wrokers`; did you mean `workers`?".to_string()
            ),
            (
                Some(5),
                "stop.timeout".to_string(),
                "expected a duration like \"30s\", found integer 5".to_string()
            ),
            (
                Some(6),
                "stop.signall".to_string(),
                "unknown key `signall`; did you mean `signal`?".to_string()
            ),
            (
                Some(12),
                "listen[1].tpc".to_string(),
                "unknown key `tpc`; did you mean `tcp`?".to_string()
            ),
        ],
    );
}

#[test]
fn a_file_without_problems_parses_as_before() {
    let site: RawSite = parse_toml(
        Path::new("web.toml"),
        "name = \"web\"\ncommand = [\"x\"]\nworkers = 3\n",
    )
    .expect("valid");
    assert_eq!(site.name.as_deref(), Some("web"));
    let agent: RawAgent = parse_toml(Path::new("h.toml"), "").expect("empty agent file");
    assert_eq!(agent, RawAgent::default());
}

#[test]
fn a_syntax_error_is_one_problem_with_its_line() {
    let found = problems("name = \"web\"\ncommand = [\"x\"\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, Some(2), "{found:?}");
    assert_eq!(found[0].1, "-");
}

#[test]
fn a_key_far_from_every_known_one_lists_them() {
    let found = problems("name = \"web\"\ncommand = [\"x\"]\nzzzzzzzz = 1\n");
    assert!(
        found[0]
            .2
            .starts_with("unknown key `zzzzzzzz`; known keys: name, command"),
        "{found:?}"
    );
}

#[test]
fn the_display_is_one_line_per_problem_without_rust_forms() {
    let e = parse_toml::<RawSite>(
        Path::new("/s/web.toml"),
        "name = \"web\"\ncommand = [\"x\"]\nwrokers = 3\nmemmory = \"1G\"\n",
    )
    .expect_err("problems");
    assert_eq!(
        e.to_string(),
        "/s/web.toml:3: wrokers: unknown key `wrokers`; did you mean `workers`?\n\
         /s/web.toml:4: memmory: unknown key `memmory`; did you mean `memory`?"
    );
}

#[test]
fn edit_distance_counts_a_swap_as_one() {
    assert_eq!(distance("wrokers", "workers"), 1);
    assert_eq!(distance("", "abc"), 3);
    assert_eq!(distance("kitten", "sitting"), 3);
    assert_eq!(closest("timout", &["timeout", "signal"]), Some("timeout"));
    assert_eq!(closest("x", &["timeout"]), None);
}

#[test]
fn a_raw_site_travels_as_json_with_nulls() {
    let site: RawSite = parse_toml(
        Path::new("web.toml"),
        "name = \"web\"\ncommand = [\"x\"]\n[stop]\ntimeout = \"5s\"\n",
    )
    .expect("valid");
    let json = serde_json::to_string(&site).expect("json");
    assert!(json.contains("\"memory\":null"), "{json}");
    let back: RawSite = serde_json::from_str(&json).expect("back");
    assert_eq!(back, site);
}

//! Reading a TOML file into its `raw` struct with every problem reported at once: each
//! with its line and the path of its key (`stop.timeout`, `listen[1].tcp`), and for a key
//! that does not exist the closest one that does.
//!
//! `serde` stops at the first problem. So the file is parsed once into a table that keeps
//! where each key and value were written ([`DeTable`]), deserialized, and on an error the
//! entry the error points at is taken out and the rest deserialized again, until it
//! deserializes or an error points at nothing that can be taken out (a missing key), at
//! most [`MAX_PROBLEMS`] times. The known keys come from `serde` itself (its error for an
//! unknown field lists them), so they cannot drift from the structs.

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{ConfigError, err};

/// The most problems reported for one file.
const MAX_PROBLEMS: usize = 50;

/// Parses `text` (the contents of `file`) into `T`; on failure, the first problem, with the
/// others in its `also`.
pub(super) fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let mut root = DeTable::parse(text).map_err(|e| {
        let mut error = err(file, "-", e.message().trim().to_string());
        error.line = e.span().map(|s| line_of(text, s.start));
        error
    })?;
    let mut problems: Vec<ConfigError> = Vec::new();
    while problems.len() < MAX_PROBLEMS {
        let e = match T::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(value) if problems.is_empty() => return Ok(value),
            Ok(_) => break,
            Err(e) => e,
        };
        let at = e.span();
        let path = at.clone().and_then(|s| {
            let start = root.span().start;
            take_out(root.get_mut(), &s, "").or_else(|| (s.start == start).then(String::new))
        });
        let message = describe(e.message());
        let taken = path.as_ref().is_some_and(|p| !p.is_empty());
        // A key left missing by an earlier problem's removal is not a new problem.
        let follows = problems.iter().any(|p| missing_of(&message, p));
        if !follows {
            let key = path.filter(|p| !p.is_empty()).unwrap_or_else(|| "-".into());
            let mut error = err(file, &key, message);
            error.line = at.map(|s| line_of(text, s.start));
            problems.push(error);
        }
        if !taken {
            break;
        }
    }
    // In the file's order (serde meets keys in its own).
    problems.sort_by_key(|p| p.line);
    let mut first = problems.remove(0);
    first.also = problems;
    Err(first)
}

/// Takes out of `table` the entry whose key or value covers `at` (the deepest one, inside
/// tables and arrays of tables), and returns its path below `prefix`. Tables are searched
/// whatever their span says: the span of an array of tables (`[[listen]]`) does not cover
/// its later elements.
fn take_out(table: &mut DeTable<'_>, at: &Range<usize>, prefix: &str) -> Option<String> {
    if let Some(key) = table.keys().find(|k| covers(&k.span(), at)).cloned() {
        table.remove(&key);
        return Some(join(prefix, key.get_ref()));
    }
    let keys: Vec<_> = table.keys().cloned().collect();
    for key in keys {
        let path = join(prefix, key.get_ref());
        let value = table.get_mut(&key)?;
        if let Some(inner) = take_out_below(value, at, &path) {
            return Some(inner);
        }
        if covers(&value.span(), at) {
            table.remove(&key);
            return Some(path);
        }
    }
    None
}

/// [`take_out`] inside a value that is a table or an array holding tables.
fn take_out_below(
    value: &mut Spanned<DeValue<'_>>,
    at: &Range<usize>,
    path: &str,
) -> Option<String> {
    match value.get_mut() {
        DeValue::Table(t) => take_out(t, at, path),
        DeValue::Array(items) => items.iter_mut().enumerate().find_map(|(i, item)| {
            let DeValue::Table(t) = item.get_mut() else {
                return None;
            };
            take_out(t, at, &format!("{path}[{i}]"))
        }),
        _ => None,
    }
}

fn covers(span: &Range<usize>, at: &Range<usize>) -> bool {
    span.start <= at.start && at.start < span.end.max(span.start + 1)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The line (from 1) of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> u32 {
    let upto = &text.as_bytes()[..offset.min(text.len())];
    u32::try_from(upto.iter().filter(|&&b| b == b'\n').count() + 1).unwrap_or(u32::MAX)
}

/// Whether `message` is serde's "missing field" for the key of an earlier problem.
fn missing_of(message: &str, earlier: &ConfigError) -> bool {
    let name = earlier.key.rsplit('.').next().unwrap_or(&earlier.key);
    message == format!("missing field `{name}`")
}

/// serde's message, said for people: an unknown key with the closest known one, a wrong
/// type without Rust's words.
fn describe(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            return match closest(name, &known) {
                Some(k) => format!("unknown key `{name}`; did you mean `{k}`?"),
                None if known.is_empty() => format!("unknown key `{name}`"),
                None => format!("unknown key `{name}`; known keys: {}", known.join(", ")),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        // "integer `5`, expected a string" -> "expected a string, found integer 5"
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {expected}, found {}", found.replace('`', ""));
        }
    }
    message.to_string()
}

/// The known key closest to `name` by edit distance, if close enough to be a typo (at
/// most a third of its length, at least 1).
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (distance(name, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The edit distance of `a` and `b` (insertions, deletions, substitutions, and swaps of
/// two neighbours: `wrokers` is one step from `workers`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests;

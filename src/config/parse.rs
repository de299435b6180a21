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
    let (value, mut problems) = parse_lenient(file, text);
    match value {
        Some(v) if problems.is_empty() => Ok(v),
        _ if problems.is_empty() => Err(err(file, "-", "the file could not be read as TOML")),
        _ => {
            let mut first = problems.remove(0);
            first.also = problems;
            Err(first)
        }
    }
}

/// Parses `text` (the contents of `file`) into `T` as far as it can: every problem, in the
/// file's order, and the value of what is left once the keys at fault are taken out (if
/// that deserializes), so that validation can report its own problems beside these.
pub(super) fn parse_lenient<T: DeserializeOwned>(
    file: &Path,
    text: &str,
) -> (Option<T>, Vec<ConfigError>) {
    let mut root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let mut error = err(file, "-", e.message().trim().to_string());
            error.line = e.span().map(|s| line_of(text, s.start));
            return (None, vec![error]);
        }
    };
    let mut problems: Vec<ConfigError> = Vec::new();
    let mut value = None;
    while problems.len() < MAX_PROBLEMS {
        let e = match T::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(v) => {
                value = Some(v);
                break;
            }
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
    (value, problems)
}

/// Gives each problem of `error` that has no line the line of its key in `text` (the
/// file's contents): where the key is written, or for a key the file leaves out (a
/// default that conflicts with something), the line of the deepest table on its path.
pub(super) fn locate(text: &str, error: &mut ConfigError) {
    let Ok(root) = DeTable::parse(text) else {
        return;
    };
    let fill = |e: &mut ConfigError| {
        if e.line.is_none() && e.key != "-" {
            e.line = key_offset(&root, &e.key).map(|at| line_of(text, at));
        }
    };
    fill(error);
    error.also.iter_mut().for_each(fill);
}

/// The byte offset where the deepest existing part of the dotted `path` (`listen[1].tcp`,
/// `env.FOO`) is written, if any part is.
fn key_offset(root: &Spanned<DeTable<'_>>, path: &str) -> Option<usize> {
    let mut table = root.get_ref();
    let mut found = None;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (key, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        found = Some(key.span().start);
        let value = match (value.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => {
                let item = items.get(i)?;
                found = Some(item.span().start);
                item
            }
            _ => value,
        };
        match value.get_ref() {
            DeValue::Table(t) if parts.peek().is_some() => table = t,
            _ => break,
        }
    }
    found
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
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // "integer `5`, expected a string" -> "expected a string, found integer 5"
            if let Some((found, expected)) = rest.split_once(", expected ") {
                return format!(
                    "expected {}, found {}",
                    expected_for_people(expected),
                    found.replace('`', "")
                );
            }
        }
    }
    message.to_string()
}

/// What serde says a key expects, in the file's words: `u32` is a whole number, a
/// struct is a table.
fn expected_for_people(expected: &str) -> String {
    let integer = |bits: u32| format!("a whole number from 0 to {}", (1u64 << bits) - 1);
    match expected {
        "u8" => integer(8),
        "u16" => integer(16),
        "u32" => integer(32),
        "u64" => "a whole number from 0".to_string(),
        "i32" | "i64" => "a whole number".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a string" => "a string in double quotes".to_string(),
        "path string" => "a path in double quotes".to_string(),
        "a sequence" => "an array like [\"...\"]".to_string(),
        "a map" => "a table".to_string(),
        e if e.starts_with("struct ") => "a table".to_string(),
        e => e.to_string(),
    }
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

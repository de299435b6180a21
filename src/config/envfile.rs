//! `env_file`: a site's environment variables kept in a file of their own, one
//! `KEY=VALUE` per line, as systemd's `EnvironmentFile=` and most `.env` files write them.
//!
//! The format, line by line: blank lines and lines starting with `#` are skipped; an
//! optional `export ` before the name is ignored; the name is letters, digits and `_`, not
//! starting with a digit; the value is the rest of the line with surrounding blanks
//! removed, or a quoted string: `"..."` (with `\"`, `\\`, `\n`, `\t` escapes) or `'...'`
//! (taken as written). Anything else is an error naming the file and the line.

use std::collections::BTreeMap;
use std::path::Path;

use super::{ConfigError, Problems, err, quoted};

/// A variable of an environment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLine {
    /// Its value.
    pub value: String,
    /// The line it is on (from 1).
    pub line: u32,
}

/// Reads the environment file at `path`, named by the site file `site_file`: its good
/// lines' variables, and every bad line reported (each with its line), so that what is
/// wrong with the good ones can be said beside them.
pub fn read(
    site_file: &Path,
    path: &Path,
) -> Result<(BTreeMap<String, EnvLine>, Option<ConfigError>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(
            site_file,
            "env_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let (vars, bad) = parse_all(path, &text);
    Ok((vars, bad.into_error()))
}

/// Parses `text`, the contents of the environment file `path`.
#[cfg(test)]
fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, EnvLine>, ConfigError> {
    let (vars, bad) = parse_all(path, text);
    bad.finish(vars)
}

/// The variables of `text`'s good lines, and the problems of its bad ones.
fn parse_all(path: &Path, text: &str) -> (BTreeMap<String, EnvLine>, Problems) {
    let mut vars = BTreeMap::new();
    let mut p = Problems::default();
    for (i, line) in text.lines().enumerate() {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some((k, value))) => {
                vars.insert(
                    k,
                    EnvLine {
                        value,
                        line: number,
                    },
                );
            }
            Err(message) => {
                let mut e = err(path, "env_file", message);
                e.line = Some(number);
                p.push(e);
            }
        }
    }
    (vars, p)
}

/// One line: `None` for a blank line or a comment.
fn parse_line(line: &str) -> Result<Option<(String, String)>, String> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return Ok(None);
    }
    let t = t.strip_prefix("export ").map_or(t, str::trim_start);
    let Some((name, value)) = t.split_once('=') else {
        return Err(format!(
            "expected NAME=VALUE, found {}",
            quoted(line.trim())
        ));
    };
    let name = name.trim_end();
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        return Err(format!(
            "invalid name {}: use letters, digits and _, not starting with a digit",
            quoted(name)
        ));
    }
    let value = value.trim();
    let value = if let Some(rest) = value.strip_prefix('"') {
        double_quoted(rest)?
    } else if let Some(rest) = value.strip_prefix('\'') {
        match rest.strip_suffix('\'') {
            Some(v) if !v.contains('\'') => v.to_string(),
            _ => return Err(format!("{name}: a value opened with ' must end with '")),
        }
    } else if value.contains('\0') {
        return Err(format!("{name}: the value holds a NUL byte"));
    } else {
        value.to_string()
    };
    Ok(Some((name.to_string(), value)))
}

/// The rest of a `"..."` value after its opening quote, its escapes replaced.
fn double_quoted(rest: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.as_str().trim().is_empty() {
                    Ok(out)
                } else {
                    Err("text after the closing \" of a value".to_string())
                };
            }
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                Some(c) => {
                    out.push('\\');
                    out.push(c);
                }
                None => break,
            },
            '\0' => return Err("the value holds a NUL byte".to_string()),
            c => out.push(c),
        }
    }
    Err("a value opened with \" must end with \" on the same line".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_quotes_and_export() {
        let text = "# settings\n\nA=1\nexport B = two words \nC=\"quoted \\\"x\\\" \\n\"\nD='$HOME as is'\nE=\nF=a=b\n";
        let vars = parse(Path::new("/srv/blog.env"), text).expect("valid");
        let got: Vec<(&str, &str)> = vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.value.as_str()))
            .collect();
        assert_eq!(vars["B"].line, 4);
        assert_eq!(
            got,
            [
                ("A", "1"),
                ("B", "two words"),
                ("C", "quoted \"x\" \n"),
                ("D", "$HOME as is"),
                ("E", ""),
                ("F", "a=b"),
            ]
        );
    }

    #[test]
    fn every_bad_line_is_reported_with_its_line() {
        let text = "A=1\njust words\n9X=1\nB=\"open\nC='open\nD=\"x\" y\n";
        let e = parse(Path::new("/srv/blog.env"), text).expect_err("bad lines");
        let lines: Vec<String> = e.all().map(ConfigError::one).collect();
        assert_eq!(
            lines,
            [
                "/srv/blog.env:2: env_file: expected NAME=VALUE, found \"just words\"",
                "/srv/blog.env:3: env_file: invalid name \"9X\": use letters, digits and _, not starting with a digit",
                "/srv/blog.env:4: env_file: a value opened with \" must end with \" on the same line",
                "/srv/blog.env:5: env_file: C: a value opened with ' must end with '",
                "/srv/blog.env:6: env_file: text after the closing \" of a value",
            ]
        );
    }
}

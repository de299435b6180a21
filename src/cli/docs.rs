//! Shell completions and man pages, generated from the CLI's clap definition: what
//! `hatchery completions SHELL` prints and `hatchery man --out DIR` writes.
//!
//! Hidden subcommands (the agent's own helpers: `fd-holder`, `__probe`, `__demo-worker`,
//! ...) and hidden options are left out of both: `clap_mangen` skips them itself, and the
//! completion generators are given the command without them ([`visible`]), since
//! `clap_complete` lists every subcommand.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;

/// The shells `hatchery completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    /// bash, with the bash-completion package or `source`d.
    Bash,
    /// zsh: a `_hatchery` file in a directory of `$fpath`.
    Zsh,
    /// fish: `~/.config/fish/completions/hatchery.fish`.
    Fish,
}

impl Shell {
    /// The generator of `clap_complete` for this shell.
    fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// `cmd` (the top-level command) without its hidden subcommands and hidden options: what
/// a person may be offered. Its subcommands are kept as they are (none has a hidden
/// option or subcommand of its own: a unit test in `main.rs` holds that).
pub fn visible(cmd: &Command) -> Command {
    let mut out = Command::new("hatchery")
        .bin_name("hatchery")
        .version(hatchery::version());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out.args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// Writes the completion script of `shell` for `cmd` (the top-level command) to `out`.
pub fn completions(cmd: &Command, shell: Shell, out: &mut dyn Write) {
    let mut cmd = visible(cmd);
    clap_complete::generate(shell.generator(), &mut cmd, "hatchery", out);
}

/// Writes the man pages of `cmd` (the top-level command) in `dir`, which is created if
/// missing: `hatchery.1`, and `hatchery-<command>.1` for each command that is not hidden.
/// Returns the files written.
pub fn man_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    // Built, so that each command knows its display name (`hatchery-status`).
    cmd.build();
    let mut written = vec![man_page(&cmd, dir)?];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(man_page(sub, dir)?);
    }
    Ok(written)
}

/// Writes the man page of one command in `dir`: clap_mangen's sections, with the
/// paragraphs of its `after_help` (`Examples:`, `Exit codes:`) as sections of their own,
/// their lines kept as they are.
fn man_page(cmd: &Command, dir: &Path) -> io::Result<PathBuf> {
    let man = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(man.get_filename());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)?;
    }
    if let Some(after) = cmd.get_after_help() {
        out.extend_from_slice(after_help_sections(&after.to_string()).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    std::fs::write(&path, out)?;
    Ok(path)
}

/// The paragraphs of an `after_help` text that start with a heading line (`Examples:`) as
/// roff sections (`.SH EXAMPLES`), their lines unfilled; other paragraphs as they are.
fn after_help_sections(text: &str) -> String {
    let mut out = String::new();
    for paragraph in text.split("\n\n") {
        let (heading, body) = match paragraph.split_once('\n') {
            Some((first, rest)) if first.ends_with(':') && !first.starts_with(' ') => {
                (first.trim_end_matches(':').to_uppercase(), rest)
            }
            _ => ("NOTES".to_string(), paragraph),
        };
        out.push_str(&format!(".SH {heading}\n.nf\n"));
        for line in body.lines() {
            out.push_str(&roff_line(line));
            out.push('\n');
        }
        out.push_str(".fi\n");
    }
    out
}

/// One line of text as roff shows it as written: backslashes and minus signs escaped,
/// and a line that would start with a control character (`.` or `'`) guarded.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_help_paragraphs_become_sections_of_unfilled_lines() {
        let text = "Examples:\n  # a comment\n  hatchery status --json\n\nExit codes:\n  0  ok\n\nA note,\non two lines.";
        assert_eq!(
            after_help_sections(text),
            ".SH EXAMPLES\n.nf\n  # a comment\n  hatchery status \\-\\-json\n.fi\n\
             .SH EXIT CODES\n.nf\n  0  ok\n.fi\n.SH NOTES\n.nf\nA note,\non two lines.\n.fi\n"
        );
        assert_eq!(roff_line(".x 'a' \\n"), "\\&.x 'a' \\en");
    }
}

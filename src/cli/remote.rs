//! `hatchery --host ssh://[USER@]HOST[:PORT] COMMAND ...`: a client command run against
//! another host's agent, through SSH.
//!
//! What it does, in order:
//! 1. takes the command line as it was typed, less `--host` and its value
//!    ([`args_without_host`]);
//! 2. quotes every argument for the remote user's shell ([`quote`]), since `ssh` joins its
//!    command arguments with spaces and hands the result to that shell;
//! 3. runs `ssh [-p PORT] [-n | -t] -- [USER@]HOST 'hatchery ARGS...'`, with `ssh` taken from
//!    `$HATCHERY_SSH`, else from the `PATH`, and stdin, stdout and stderr passed through;
//! 4. returns the remote command's exit code, except ssh's own failure (exit 255: the host
//!    was not reached, refused the login, or the connection was lost), which is the CLI's
//!    "agent unreachable" (3), as is a remote shell without `hatchery` (127).
//!
//! Why run the remote CLI rather than relay the control socket's bytes over ssh: the
//! remote `hatchery` is the same build as the agent it talks to, so a local CLI of another
//! version never meets a protocol it does not know; `exec` passes its terminal to the
//! agent with `SCM_RIGHTS`, which no byte relay can carry, while `ssh -t` gives the remote
//! `exec` and `top` a terminal of their own; and the agent authorizes the connection by
//! its peer's credentials, which are the SSH user's, with nothing new to trust on either
//! side: no listener, no crypto, no relay process with rights of its own.
//!
//! What it does not do: copy files. Paths in the arguments (`--release`, `--binary`,
//! `--config`, `--socket`) name files on the remote host, and a relative one is taken from
//! the remote user's login directory. Options for ssh itself (keys, jump hosts, a known
//! hosts file) belong in `~/.ssh/config`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::{Command, Stdio};
use std::str::FromStr;

/// The program run on the remote host.
const REMOTE_PROGRAM: &str = "hatchery";
/// `ssh`'s exit code when ssh itself failed (see ssh(1), EXIT STATUS).
const SSH_FAILED: i32 = 255;
/// A POSIX shell's exit code for a command it cannot find.
const SHELL_NOT_FOUND: i32 = 127;

/// Where a command runs: `ssh://[USER@]HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The login name (default: ssh's, from `~/.ssh/config` or the local user).
    pub user: Option<String>,
    /// The host name or address, as ssh takes it (an IPv6 address without brackets).
    pub name: String,
    /// The SSH port (default: ssh's).
    pub port: Option<u16>,
}

/// How a `--host` value is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// Not `ssh://...`.
    #[error("expected ssh://[USER@]HOST[:PORT], as in ssh://deploy@web1 or ssh://web1:2222")]
    NotSsh,
    /// No host after `ssh://` (or after `USER@`).
    #[error("no host name after ssh://")]
    NoHost,
    /// A path, query or fragment after the host.
    #[error("nothing may follow HOST[:PORT] (no path): {0:?}")]
    Trailing(String),
    /// A user or host that ssh would read as an option, or with characters no name has.
    #[error(
        "{what} {value:?} is not valid: it may not be empty, start with `-`, or hold spaces, `@`, `/` or control characters"
    )]
    BadName {
        /// `user` or `host`.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// A port that is not 1 to 65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
}

/// Whether `s` is a login or host name ssh takes as such (not an option, no spaces).
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '\\'))
}

impl FromStr for Host {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Host, HostError> {
        let rest = s.strip_prefix("ssh://").ok_or(HostError::NotSsh)?;
        // A single trailing slash is what a URL without a path may end with.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(at) = rest.find(['/', '?', '#']) {
            return Err(HostError::Trailing(rest[at..].to_string()));
        }
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if let Some(u) = user.filter(|u| !plain_name(u) || u.contains(':')) {
            return Err(HostError::BadName {
                what: "user",
                value: u.to_string(),
            });
        }
        // `[v6]:port`, or `name:port`; a bare IPv6 address has more than one colon.
        let (name, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or(HostError::BadName {
                what: "host",
                value: hostport.to_string(),
            })?;
            match after {
                "" => (addr, None),
                p => (addr, Some(p.strip_prefix(':').unwrap_or(p))),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h, Some(p)),
                _ => (hostport, None),
            }
        };
        if name.is_empty() {
            return Err(HostError::NoHost);
        }
        if !plain_name(name) {
            return Err(HostError::BadName {
                what: "host",
                value: name.to_string(),
            });
        }
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(HostError::BadPort(p.to_string())),
            })
            .transpose()?;
        Ok(Host {
            user: user.map(str::to_string),
            name: name.to_string(),
            port,
        })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ssh://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.name.contains(':') {
            write!(f, "[{}]", self.name)?;
        } else {
            write!(f, "{}", self.name)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl Host {
    /// The destination as ssh takes it: `[USER@]HOST`.
    fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What a command needs of the session ssh opens for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// No input: ssh reads none (`-n`), so a command in a `while read` loop leaves the
    /// loop's input alone.
    NoInput,
    /// `exec`: stdin passed through, and a remote terminal (`-t`) when stdin is one, as
    /// `exec` opens one on the host itself.
    Exec,
    /// `top`: stdin passed through (its keys), and a remote terminal when stdin and stdout
    /// are both terminals, as `top` draws its full screen on the host itself.
    Top,
}

impl Session {
    /// Whether ssh should open a terminal on the remote host (`-t`).
    fn terminal(self) -> bool {
        use std::io::IsTerminal as _;
        match self {
            Session::NoInput => false,
            Session::Exec => std::io::stdin().is_terminal(),
            Session::Top => std::io::stdin().is_terminal() && std::io::stdout().is_terminal(),
        }
    }
}

/// The command line `args` (without the program name) less `--host VALUE` and
/// `--host=VALUE` before the command; everything from the command on is kept as it is.
///
/// Only the top level's own options come before the command: `--host` and `--socket` with
/// a value, and flags (`--json`).
pub fn args_without_host(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if bytes == b"--host" {
            it.next();
        } else if bytes.starts_with(b"--host=") {
        } else if bytes == b"--socket" {
            out.push(arg.clone());
            out.extend(it.next().cloned());
        } else if bytes.starts_with(b"-") {
            out.push(arg.clone());
        } else {
            // The command: it and what follows go as they are.
            out.push(arg.clone());
            out.extend(it.cloned());
            break;
        }
    }
    out
}

/// `arg` as one word for a POSIX shell (and for csh and fish, which read `'...'` and `\'`
/// alike): as it is when made of characters no shell treats specially, else in single
/// quotes, each `'` written `'\''`.
pub fn quote(arg: &OsStr) -> OsString {
    let bytes = arg.as_bytes();
    let plain = |b: &u8| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(b);
    if !bytes.is_empty() && bytes.iter().all(plain) {
        return arg.to_os_string();
    }
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'\'');
    for &b in bytes {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

/// The command line the remote shell runs: `hatchery` and `args`, each quoted.
pub fn remote_command_line(args: &[OsString]) -> OsString {
    let mut line = OsString::from(REMOTE_PROGRAM);
    for a in args {
        line.push(" ");
        line.push(quote(a));
    }
    line
}

/// The ssh program: `$HATCHERY_SSH`, else `ssh` from the `PATH`.
fn ssh_program() -> OsString {
    std::env::var_os("HATCHERY_SSH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| OsString::from("ssh"))
}

/// ssh's arguments: its options, `--`, the destination, and the remote command line.
fn ssh_args(host: &Host, terminal: bool, session: Session, line: OsString) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(p) = host.port {
        args.push("-p".into());
        args.push(p.to_string().into());
    }
    if session == Session::NoInput {
        args.push("-n".into());
    }
    if terminal {
        args.push("-t".into());
    }
    // The destination after `--`: never read as an option, whatever it holds.
    args.push("--".into());
    args.push(host.destination().into());
    args.push(line);
    args
}

/// How a command run through ssh ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The remote command's exit code (128 + N when ssh was ended by signal N).
    Code(u8),
    /// The remote agent could not be reached: why, as a sentence.
    Unreachable(String),
}

/// Runs `hatchery args...` on `host` through ssh, with stdin, stdout and stderr passed
/// through.
pub fn run(host: &Host, args: &[OsString], session: Session) -> Ended {
    use std::os::unix::process::ExitStatusExt as _;
    let program = ssh_program();
    let argv = ssh_args(host, session.terminal(), session, remote_command_line(args));
    let status = Command::new(&program)
        .args(&argv)
        // Where this CLI's commands go is this host's setting, not the remote one's (and
        // an ssh that forwards the environment must not send the command back out).
        .env_remove("HATCHERY_HOST")
        .stdin(if session == Session::NoInput {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Ended::Unreachable(format!(
                "cannot run {} to reach {host}: {e}",
                program.to_string_lossy()
            ));
        }
    };
    match (status.code(), status.signal()) {
        (Some(SSH_FAILED), _) => Ended::Unreachable(format!(
            "cannot reach {host} through ssh, or lost the connection (ssh exited with 255; its own message is above)"
        )),
        // `exec`'s exit code is its command's, which may be any number.
        (Some(SHELL_NOT_FOUND), _) if session != Session::Exec => Ended::Unreachable(format!(
            "{host} has no `{REMOTE_PROGRAM}` on the PATH of its ssh sessions (the remote shell exited with 127)"
        )),
        (Some(code), _) => Ended::Code(u8::try_from(code).unwrap_or(u8::MAX)),
        (None, Some(signal)) => Ended::Code(u8::try_from(128 + signal).unwrap_or(u8::MAX)),
        (None, None) => Ended::Code(u8::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn hosts_parse_as_ssh_urls() {
        let h: Host = "ssh://deploy@web1:2222".parse().expect("valid");
        assert_eq!(
            h,
            Host {
                user: Some("deploy".into()),
                name: "web1".into(),
                port: Some(2222)
            }
        );
        assert_eq!(h.to_string(), "ssh://deploy@web1:2222");
        assert_eq!(h.destination(), "deploy@web1");
        let h: Host = "ssh://web1.example.org/".parse().expect("valid");
        assert_eq!(
            (h.user, h.name.as_str(), h.port),
            (None, "web1.example.org", None)
        );
        let h: Host = "ssh://root@[::1]:22".parse().expect("valid");
        assert_eq!((h.name.as_str(), h.port), ("::1", Some(22)));
        assert_eq!(h.to_string(), "ssh://root@[::1]:22");
        let h: Host = "ssh://fe80::1".parse().expect("valid");
        assert_eq!((h.name.as_str(), h.port), ("fe80::1", None));

        assert_eq!("web1".parse::<Host>(), Err(HostError::NotSsh));
        assert_eq!("https://web1".parse::<Host>(), Err(HostError::NotSsh));
        assert_eq!("ssh://".parse::<Host>(), Err(HostError::NoHost));
        assert_eq!("ssh://u@".parse::<Host>(), Err(HostError::NoHost));
        assert_eq!(
            "ssh://web1/srv".parse::<Host>(),
            Err(HostError::Trailing("/srv".into()))
        );
        assert_eq!(
            "ssh://web1:0".parse::<Host>(),
            Err(HostError::BadPort("0".into()))
        );
        assert_eq!(
            "ssh://web1:ssh".parse::<Host>(),
            Err(HostError::BadPort("ssh".into()))
        );
        // What ssh would take for an option is never a user or a host.
        for bad in [
            "ssh://-oProxyCommand=x",
            "ssh://-x@web1",
            "ssh://a b",
            "ssh://u:p@web1",
        ] {
            assert!(
                matches!(bad.parse::<Host>(), Err(HostError::BadName { .. })),
                "{bad}"
            );
        }
        let e = "web1".parse::<Host>().expect_err("refused").to_string();
        assert!(e.contains("ssh://[USER@]HOST[:PORT]"), "{e}");
    }

    #[test]
    fn host_is_taken_out_before_the_command_only() {
        assert_eq!(
            args_without_host(&os(&["--host", "ssh://w", "status", "blog"])),
            os(&["status", "blog"])
        );
        assert_eq!(
            args_without_host(&os(&[
                "--socket",
                "/s",
                "--host=ssh://w",
                "--json",
                "deploy",
                "blog"
            ])),
            os(&["--socket", "/s", "--json", "deploy", "blog"])
        );
        // After the command, `--host` is the command's (an argument of `exec`'s command).
        assert_eq!(
            args_without_host(&os(&[
                "--host", "ssh://w", "exec", "blog", "--", "x", "--host", "y"
            ])),
            os(&["exec", "blog", "--", "x", "--host", "y"])
        );
        // A socket path that looks like a command is the socket's value.
        assert_eq!(
            args_without_host(&os(&[
                "--socket", "status", "--host", "ssh://w", "logs", "b"
            ])),
            os(&["--socket", "status", "logs", "b"])
        );
    }

    #[test]
    fn quoted_arguments_are_read_back_exactly_by_a_shell() {
        let args = os(&[
            "status",
            "my site",
            "it's",
            "",
            "$HOME `id` $(id) \\ \" ; & | > * ? ~ # !",
            "line\nbreak",
            "plain-word_1.2/x:y@z",
        ]);
        assert_eq!(
            quote(OsStr::new("plain-word_1.2/x:y@z")),
            "plain-word_1.2/x:y@z"
        );
        assert_eq!(quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
        let line = remote_command_line(&args);
        // `hatchery` stands for a program that prints its arguments, one per NUL.
        let script = format!(
            "hatchery() {{ printf '%s\\0' \"$@\"; }}; {}",
            line.to_str().expect("utf-8")
        );
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("sh");
        assert!(out.status.success());
        let printed = out.stdout.strip_suffix(b"\0").expect("NUL-terminated");
        let back: Vec<OsString> = printed
            .split(|b| *b == 0)
            .map(|b| OsString::from_vec(b.to_vec()))
            .collect();
        assert_eq!(back, args);
        // Bytes that are not UTF-8 travel too.
        let raw = OsString::from_vec(vec![b'a', 0xff, b'\'', b'b']);
        assert_eq!(quote(&raw).as_bytes(), b"'a\xff'\\''b'");
    }

    #[test]
    fn ssh_is_given_its_options_then_the_destination_after_a_double_dash() {
        let h: Host = "ssh://deploy@web1:2222".parse().expect("valid");
        let argv = ssh_args(&h, false, Session::NoInput, "hatchery status".into());
        assert_eq!(
            argv,
            os(&["-p", "2222", "-n", "--", "deploy@web1", "hatchery status"])
        );
        let h: Host = "ssh://web1".parse().expect("valid");
        let argv = ssh_args(&h, true, Session::Exec, "hatchery exec blog".into());
        assert_eq!(argv, os(&["-t", "--", "web1", "hatchery exec blog"]));
    }
}

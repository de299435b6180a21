//! `[sandbox]` of a site file: chroot, groups, capabilities, rlimits, private `/tmp` and
//! Landlock. Parsed and validated here; turned into a plan by `crate::sandbox`, which the
//! child path of `sys::spawn` applies (the Landlock ruleset included: built by the agent
//! once for a generation's workers, otherwise by the child).
//!
//! Every path in `[sandbox.landlock]` is inside the site's `root` (the paths the worker
//! sees). Features the kernel may lack (Landlock filesystem and network rules) are
//! `"required"`, `"best-effort"` or `"off"`; the rest (credentials, capabilities,
//! `no_new_privs`, rlimits, chroot) exist on every supported kernel and are always
//! enforced when configured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, err};

/// `[sandbox]`, as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    /// The directory the workers are `chroot`ed into.
    pub root: Option<PathBuf>,
    /// Refuse a root holding setuid or setgid files.
    pub strict: Option<bool>,
    /// Extra supplementary groups (the user's groups from /etc/group are always added).
    pub groups: Option<Vec<String>>,
    /// Capabilities kept, e.g. `["CAP_NET_BIND_SERVICE"]`; every other one is dropped.
    pub capabilities: Option<Vec<String>>,
    /// A fresh tmpfs on `/tmp` for each worker.
    pub private_tmp: Option<bool>,
    /// Resource limits (soft = hard).
    pub rlimits: Option<BTreeMap<String, RawLimit>>,
    /// Landlock rules.
    pub landlock: Option<RawLandlock>,
}

/// An rlimit value: a number, a size string (`"1G"`) or `"unlimited"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(
    untagged,
    expecting = "expected a number, a size like \"1G\" or \"unlimited\""
)]
pub enum RawLimit {
    /// A plain number.
    Number(u64),
    /// A size or `"unlimited"`.
    Text(String),
}

/// `[sandbox.landlock]`, as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawLandlock {
    /// `required`, `best-effort` (default) or `off`: filesystem rules.
    pub filesystem: Option<String>,
    /// `required`, `best-effort` (default) or `off`: TCP bind/connect rules (ABI 4).
    pub network: Option<String>,
    /// `required`, `best-effort` (default) or `off`: no signals or abstract unix socket
    /// connections out of the worker's Landlock domain (ABI 6).
    pub scope: Option<String>,
    /// Readable paths (default: `/`, the whole root).
    pub read_only: Option<Vec<PathBuf>>,
    /// Readable and writable paths (default: `/tmp` and `/dev/null`).
    pub read_write: Option<Vec<PathBuf>>,
    /// Executable paths (default: `/`).
    pub execute: Option<Vec<PathBuf>>,
    /// TCP ports the workers may connect to (default: none).
    pub connect: Option<Vec<u16>>,
}

/// How much a hardening feature is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse to start the site without it.
    Required,
    /// Use it where the kernel has it; report when it does not.
    BestEffort,
    /// Do not use it.
    Off,
}

impl Mode {
    /// The mode at `slot` (`key`), `best-effort` when none is written (and then written).
    fn parse(file: &Path, key: &str, slot: &mut Option<String>) -> Result<Mode, ConfigError> {
        match slot
            .get_or_insert_with(|| Mode::BestEffort.name().into())
            .as_str()
        {
            "best-effort" => Ok(Mode::BestEffort),
            "required" => Ok(Mode::Required),
            "off" => Ok(Mode::Off),
            other => Err(err(
                file,
                key,
                format!("invalid value \"{other}\": use \"required\", \"best-effort\" or \"off\""),
            )),
        }
    }

    /// As written in the file.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Required => "required",
            Mode::BestEffort => "best-effort",
            Mode::Off => "off",
        }
    }
}

/// A validated `[sandbox]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The chroot directory.
    pub root: Option<PathBuf>,
    /// Refuse setuid/setgid files in the root.
    pub strict: bool,
    /// Supplementary gids (the user's, then the configured ones).
    pub groups: Vec<u32>,
    /// The extra groups as written.
    pub group_names: Vec<String>,
    /// Capabilities kept, as numbers.
    pub capabilities: Vec<u32>,
    /// A private `/tmp`.
    pub private_tmp: bool,
    /// `(name, RLIMIT_* number, value)`.
    pub rlimits: Vec<(String, i32, u64)>,
    /// Landlock filesystem rules.
    pub landlock_fs: Mode,
    /// Landlock network rules.
    pub landlock_net: Mode,
    /// Landlock scopes (signals, abstract unix sockets).
    pub landlock_scope: Mode,
    /// Read-only paths (inside the root).
    pub read_only: Vec<PathBuf>,
    /// Read-write paths (inside the root).
    pub read_write: Vec<PathBuf>,
    /// Executable paths (inside the root).
    pub execute: Vec<PathBuf>,
    /// TCP ports the workers may connect to.
    pub connect: Vec<u16>,
}

/// Capability names, indexed by number (`linux/capability.h`).
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Accepted rlimit names and their `RLIMIT_*` numbers (asm-generic/resource.h, as on
/// x86-64 and arm64).
pub const RLIMITS: &[(&str, i32)] = &[
    ("as", 9),
    ("core", 4),
    ("cpu", 0),
    ("data", 2),
    ("fsize", 1),
    ("memlock", 8),
    ("nofile", 7),
    ("nproc", 6),
    ("stack", 3),
];

/// The paths at `slot` (`key`), or `default`, which is then written there.
fn absolute_list(
    file: &Path,
    key: &str,
    slot: &mut Option<Vec<PathBuf>>,
    default: &[&str],
) -> Result<Vec<PathBuf>, ConfigError> {
    let list = slot
        .get_or_insert_with(|| default.iter().map(PathBuf::from).collect())
        .clone();
    for p in &list {
        if !p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
            return Err(err(
                file,
                key,
                format!(
                    "{} must be an absolute path (inside the site's root) without '..'",
                    p.display()
                ),
            ));
        }
    }
    Ok(list)
}

/// Validates `[sandbox]` at `slot`; `user` is the site's user name, for its supplementary
/// groups. Like [`super::validate_site`], writes every default it takes into `slot`.
pub fn validate(
    file: &Path,
    slot: &mut Option<RawSandbox>,
    user: Option<&str>,
) -> Result<SandboxConfig, ConfigError> {
    let raw = slot.get_or_insert_with(RawSandbox::default);
    if let Some(root) = &raw.root {
        if !root.is_absolute() || root.components().any(|c| c.as_os_str() == "..") {
            return Err(err(
                file,
                "sandbox.root",
                "must be an absolute path without '..'",
            ));
        }
    }
    // By the user's name (the site may give its user as a number).
    let mut groups = user
        .and_then(super::lookup_user)
        .map(|u| {
            // Its primary group is the gid itself, not a supplementary one.
            let mut g = super::users::user_groups(&u.name, u.gid);
            g.retain(|&x| x != u.gid);
            g
        })
        .unwrap_or_default();
    let group_names = raw.groups.get_or_insert_with(Vec::new).clone();
    for g in &group_names {
        let gid = super::lookup_group(g)
            .ok_or_else(|| err(file, "sandbox.groups", format!("no such group `{g}`")))?;
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    let mut capabilities = Vec::new();
    for c in raw.capabilities.get_or_insert_with(Vec::new).iter() {
        let upper = c.to_ascii_uppercase();
        let name = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        let n = CAPABILITIES.iter().position(|k| *k == name).ok_or_else(|| {
            err(
                file,
                "sandbox.capabilities",
                format!("unknown capability \"{c}\": use names such as \"CAP_NET_BIND_SERVICE\" (capabilities(7))"),
            )
        })?;
        let n = u32::try_from(n).expect("small");
        if !capabilities.contains(&n) {
            capabilities.push(n);
        }
    }
    capabilities.sort_unstable();
    let mut rlimits = Vec::new();
    for (name, value) in raw.rlimits.get_or_insert_with(BTreeMap::new).iter() {
        let key = format!("sandbox.rlimits.{name}");
        let resource = RLIMITS
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                let names: Vec<&str> = RLIMITS.iter().map(|(n, _)| *n).collect();
                err(
                    file,
                    &key,
                    format!("unknown limit: use one of {}", names.join(", ")),
                )
            })?;
        let v = match value {
            RawLimit::Number(n) => *n,
            RawLimit::Text(t) if t == "unlimited" => libc::RLIM_INFINITY,
            RawLimit::Text(t) => super::parse_size(t)
                .map_err(|m| err(file, &key, format!("{m}, or a number, or \"unlimited\"")))?,
        };
        rlimits.push((name.clone(), resource, v));
    }
    let strict = *raw.strict.get_or_insert(true);
    let private_tmp = *raw.private_tmp.get_or_insert(false);
    let ll = raw.landlock.get_or_insert_with(RawLandlock::default);
    Ok(SandboxConfig {
        root: raw.root.clone(),
        strict,
        groups,
        group_names,
        capabilities,
        private_tmp,
        rlimits,
        landlock_fs: Mode::parse(file, "sandbox.landlock.filesystem", &mut ll.filesystem)?,
        landlock_net: Mode::parse(file, "sandbox.landlock.network", &mut ll.network)?,
        landlock_scope: Mode::parse(file, "sandbox.landlock.scope", &mut ll.scope)?,
        read_only: absolute_list(
            file,
            "sandbox.landlock.read_only",
            &mut ll.read_only,
            &["/"],
        )?,
        read_write: absolute_list(
            file,
            "sandbox.landlock.read_write",
            &mut ll.read_write,
            &["/tmp", "/dev/null"],
        )?,
        execute: absolute_list(file, "sandbox.landlock.execute", &mut ll.execute, &["/"])?,
        connect: ll.connect.get_or_insert_with(Vec::new).clone(),
    })
}

impl SandboxConfig {
    /// The names of the capabilities kept, e.g. `CAP_NET_BIND_SERVICE`.
    pub fn capability_names(&self) -> Vec<&'static str> {
        self.capabilities
            .iter()
            .filter_map(|&c| CAPABILITIES.get(usize::try_from(c).ok()?).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SandboxConfig, ConfigError> {
        let raw: RawSandbox = toml::from_str(text).expect("toml");
        validate(Path::new("/s/blog.toml"), &mut Some(raw), None)
    }

    #[test]
    fn defaults_and_values() {
        let s = parse("").expect("empty is valid");
        assert_eq!(s.landlock_fs, Mode::BestEffort);
        assert_eq!(s.read_only, vec![PathBuf::from("/")]);
        assert!(s.strict);
        let s = parse(
            "root = \"/srv/r\"\ncapabilities = [\"net_bind_service\"]\n[rlimits]\nnofile = 64\nas = \"1G\"\ncore = \"unlimited\"\n[landlock]\nnetwork = \"required\"\nconnect = [5432]\n",
        )
        .expect("valid");
        assert_eq!(s.capabilities, vec![10]);
        assert_eq!(s.landlock_net, Mode::Required);
        assert!(s.rlimits.iter().any(|(n, _, v)| n == "as" && *v == 1 << 30));
        assert!(
            s.rlimits
                .iter()
                .any(|(n, _, v)| n == "core" && *v == libc::RLIM_INFINITY)
        );
    }

    #[test]
    fn notify_readiness_cannot_cross_a_root() {
        let file = Path::new("/s/blog.toml");
        let text = "name = \"blog\"\ncommand = [\"/x\"]\n[ready]\ncheck = \"notify\"\n[sandbox]\nroot = \"/srv/r\"\n";
        let raw: super::super::RawSite = super::super::load::parse_toml(file, text).expect("toml");
        let e = super::super::validate_site(file, &raw, super::super::LogPolicy::default())
            .expect_err("notify inside a root");
        assert_eq!(e.key, "ready.check");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("capabilities = [\"CAP_FLY\"]").expect_err("unknown cap");
        assert_eq!(e.key, "sandbox.capabilities");
        let e = parse("[rlimits]\nfiles = 3").expect_err("unknown limit");
        assert_eq!(e.key, "sandbox.rlimits.files");
        assert!(e.message.contains("nofile"));
        let e = parse("[landlock]\nnetwork = \"maybe\"").expect_err("bad mode");
        assert_eq!(e.key, "sandbox.landlock.network");
        let e = parse("root = \"srv\"").expect_err("relative");
        assert_eq!(e.key, "sandbox.root");
        let e = parse("[landlock]\nread_write = [\"/a/../b\"]").expect_err("dotdot");
        assert_eq!(e.key, "sandbox.landlock.read_write");
    }
}

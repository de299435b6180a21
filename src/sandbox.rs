//! The sandbox of a site's workers, prepared in the agent before `clone3`.
//!
//! This module checks the site's root and turns the configuration into a `SandboxPlan`
//! (`sys::spawn`) of plain numbers and C strings, the Landlock part included: the handled
//! rights, and each path (as the worker sees it, inside the root) with its rights. It
//! opens no path and creates no ruleset: the agent builds it once for a generation's
//! workers (`event::workers`, with `sys::spawn`), resolving each path inside the root, or,
//! with a private `/tmp`, the child does after `chroot` and the tmpfs (rules are tied to
//! inodes: see `sys::landlock`). The child applies the plan with raw syscalls between `clone3` and
//! `execve`, in this order (each step's why is next to its syscall there):
//!
//! 0.-4. fd table unshared, signals reset, a process group of its own (`setpgid`, or
//!    `setsid`), fds moved into place, the rest closed (see `sys::spawn`);
//! 5. `TIOCSCTTY` (only for `hatchery exec` on a PTY);
//! 6. rlimits: before dropping privileges, since raising a hard limit needs
//!    `CAP_SYS_RESOURCE`;
//! 7. private `/tmp` (`unshare(CLONE_NEWNS)`, `/` made private, tmpfs on `<root>/tmp`):
//!    needs `CAP_SYS_ADMIN`, and must come before Landlock, which forbids mounting;
//! 8. `chroot(root)` and `chdir("/")`: needs `CAP_SYS_CHROOT`; the `chdir` leaves no
//!    working directory outside the new root;
//! 9. drop the bounding set except the allow-list: needs `CAP_SETPCAP`, gone after 11;
//! 10. `setgroups`, `setresgid`: need `CAP_SETGID`, gone after 11;
//! 11. `PR_SET_KEEPCAPS` (only with an allow-list), `setresuid`: the last identity change;
//! 12. `capset` (effective = permitted = inheritable = allow-list) and the ambient set:
//!     after 11, which cleared the effective set, so the allowed ones survive `execve`;
//! 13. `PR_SET_NO_NEW_PRIVS`: always; before 14, since Landlock requires it;
//! 14. Landlock: `landlock_restrict_self` on the agent's ruleset (with a private `/tmp`:
//!     create it, open each path with `O_PATH` inside the root and the tmpfs, and add its
//!     rule first): last, so nothing the child still does is refused;
//! 15. `chdir(workdir)` as the site's user (so a workdir it may not enter fails), then
//! 16. `execve`.
//!
//! Each ordering is held by a test in `tests/sandbox.rs` that fails when it is swapped:
//! the probe's `memlock` above the default hard limit (6 after 11: EPERM), its `chroot`,
//! groups and capability sets (8, 9, 10 after 11: EPERM; 12 before 11: empty effective
//! set), Landlock for a non-root user (14 before 13: EPERM), and `exec`'s write to its
//! private `/tmp` (7 after 14: the mount is refused; rules built before 7: the tmpfs is
//! not covered and the write fails).
//!
//! Identity and capability steps (9 to 12) run only when the agent is root; an
//! unprivileged agent cannot change them and its workers run as itself.
//!
//! Kernel requirements: everything but Landlock exists on every supported kernel (5.10).
//! Landlock filesystem rules need ABI 1 (5.13), TCP bind/connect rules ABI 4 (6.7), scopes
//! ABI 6 (6.12); each is `required`, `best-effort` or `off` (see `config::sandbox`). What
//! is enforced is reported by [`Prepared::report`].
//!
//! What it does not do: namespaces other than the mount namespace of a private `/tmp`,
//! seccomp, and bind mounts into the root (the root is prepared by the operator).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::SiteConfig;
use crate::config::sandbox::Mode;
use crate::sys::landlock;
use crate::sys::spawn::SandboxPlan;

pub use crate::sys::landlock::abi_version as landlock_abi;

/// Why a site's sandbox cannot be had on this host. Every case is permanent: retrying
/// does not help until the operator changes the site, the root or the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// A root or a private `/tmp` without a root agent.
    #[error("sandbox.root and sandbox.private_tmp need the agent to run as root")]
    NeedsRoot,
    /// The root, or a directory on the way to it, is not safe to `chroot` into.
    #[error("sandbox.root: {0}")]
    Root(RootRefusal),
    /// `<root>/tmp` is not a directory.
    #[error("sandbox.private_tmp: {} is not a directory", .0.display())]
    PrivateTmp(PathBuf),
    /// A feature set to `required` that this kernel lacks.
    #[error(
        "sandbox: {feature} is required but this kernel does not provide it ({needs}; this kernel has Landlock ABI {abi})"
    )]
    Required {
        /// The feature.
        feature: &'static str,
        /// What it needs.
        needs: &'static str,
        /// The Landlock ABI this kernel has.
        abi: u32,
    },
    /// A path that cannot be passed to the kernel.
    #[error("{} contains a NUL byte", .0.display())]
    Nul(PathBuf),
}

impl SandboxError {
    /// Whether trying again cannot help (always: see the type).
    pub fn permanent(&self) -> bool {
        true
    }
}

/// What is wrong with a site's root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootRefusal {
    /// A relative path.
    #[error("{} is not an absolute path", .0.display())]
    NotAbsolute(PathBuf),
    /// A directory on the way could not be looked at.
    #[error("cannot inspect {}: {error}", .path.display())]
    Inspect {
        /// It.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// A symlink on the way.
    #[error("{} is a symlink: give the real path", .0.display())]
    Symlink(PathBuf),
    /// Not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A directory on the way someone other than root owns.
    #[error(
        "{} is owned by uid {uid}: every directory from / to the root must be owned by root (else its owner could swap the root for a symlink)",
        .path.display()
    )]
    Owned {
        /// It.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A directory on the way others may write.
    #[error(
        "{} is writable by {by}: every directory from / to the root must be writable by root only (chmod go-w)",
        .path.display()
    )]
    Writable {
        /// It.
        path: PathBuf,
        /// `its group` or `others`.
        by: &'static str,
    },
    /// A setuid or setgid file below (`strict`).
    #[error("{} is setuid or setgid (strict = true refuses it)", .0.display())]
    Setuid(PathBuf),
    /// Too many entries to look through (`strict`).
    #[error(
        "more than {MAX_ROOT_ENTRIES} entries under {}: too many to check for setuid files (set strict = false)",
        .0.display()
    )]
    TooMany(PathBuf),
}

/// Most entries looked at when searching a root for setuid files.
const MAX_ROOT_ENTRIES: usize = 200_000;

/// A site's sandbox, ready for every spawn.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The plan the child applies.
    pub plan: Arc<SandboxPlan>,
    /// What is enforced and what is not, one line each.
    pub report: Vec<(bool, String)>,
    /// With Landlock network rules in force: the only TCP ports workers may bind (the
    /// site's `[[listen]]` ports, `mode = "own"` ones included).
    pub bind_ports: Option<Vec<u16>>,
}

impl Prepared {
    /// The marked line for the site's log that says which ports the sandbox lets the app
    /// bind and how to allow another, when Landlock network rules are in force.
    pub fn bind_rule_line(&self) -> Option<String> {
        let ports = self.bind_ports.as_ref()?;
        let allowed = if ports.is_empty() {
            "no TCP port".to_string()
        } else {
            format!("only TCP {}", port_list(ports))
        };
        Some(format!(
            "sandbox: workers may bind {allowed} (Landlock network rules); a bind to another port fails with EACCES (Permission denied): declare it in [[listen]] (the agent binds it and passes it as fd 3, LISTEN_FDS), or add mode = \"own\" to let the app bind it"
        ))
    }

    /// The marked line for the site's log after worker `worker` printed `line`, when that
    /// may be the sandbox refusing a bind: Landlock network rules are in force and the
    /// line says `Permission denied` (`EACCES`, Python's `Errno 13`). The kernel does not
    /// say which rule refused what (Landlock's audit records need 6.15 and audit on), so
    /// the line names the rule and the fix, not a certainty.
    pub fn bind_refusal_hint(&self, worker: u32, line: &[u8]) -> Option<String> {
        let ports = self.bind_ports.as_ref()?;
        let text = String::from_utf8_lossy(line).to_ascii_lowercase();
        let denied = ["permission denied", "eacces", "errno 13"]
            .iter()
            .any(|m| text.contains(m));
        if !denied {
            return None;
        }
        let allowed = if ports.is_empty() {
            "no TCP port".to_string()
        } else {
            format!("only TCP {}", port_list(ports))
        };
        Some(format!(
            "w-{worker} was refused something (Permission denied): if it was a bind, it may not bind ports the site does not declare (it may bind {allowed}): declare it in [[listen]] (the agent binds it and passes fd 3), or say mode = \"own\" to let the app bind it"
        ))
    }
}

fn port_list(ports: &[u16]) -> String {
    let words: Vec<String> = ports.iter().map(ToString::to_string).collect();
    match words.len() {
        1 => format!("port {}", words[0]),
        _ => format!("ports {}", words.join(", ")),
    }
}

impl Prepared {
    /// The lines of the report that say what is not enforced.
    /// What `status` and `check` show of it.
    pub fn status(&self) -> crate::status::SandboxStatus {
        crate::status::SandboxStatus {
            enforced: self
                .report
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, s)| s.clone())
                .collect(),
            not_enforced: self.not_enforced(),
        }
    }

    pub fn not_enforced(&self) -> Vec<String> {
        self.report
            .iter()
            .filter(|(on, _)| !on)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

/// Prepares the sandbox of `site`. `privileged`: the agent is root and may change
/// identities, capabilities and roots.
pub fn prepare(site: &SiteConfig, privileged: bool) -> Result<Prepared, SandboxError> {
    let sb = &site.sandbox;
    let mut plan = SandboxPlan::default();
    let mut report = Vec::new();
    let mut bind_ports = None;
    for (name, resource, value) in &sb.rlimits {
        plan.rlimits.push((*resource, *value));
        report.push((true, format!("rlimit {name} = {value}")));
    }
    if !privileged && (sb.root.is_some() || sb.private_tmp) {
        return Err(SandboxError::NeedsRoot);
    }
    if let Some(root) = &sb.root {
        check_root(root, sb.strict).map_err(SandboxError::Root)?;
        plan.root = Some(cstring(root)?);
        report.push((true, format!("chroot {}", root.display())));
    }
    if sb.private_tmp {
        let tmp = host_path(sb.root.as_deref(), Path::new("/tmp"));
        if !tmp.is_dir() {
            return Err(SandboxError::PrivateTmp(tmp));
        }
        plan.private_tmp = Some(cstring(&tmp)?);
        report.push((true, "private /tmp".into()));
    }
    if privileged {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(40);
        let mut keep = 0u64;
        for &c in &sb.capabilities {
            keep |= 1 << c;
        }
        plan.drop_bounding = (0..=last).filter(|c| keep & (1u64 << c) == 0).collect();
        plan.keep_caps = keep;
        plan.identity = Some((site.uid, site.gid, sb.groups.clone()));
        report.push((
            true,
            format!(
                "uid {} gid {} groups {:?}, capabilities {}",
                site.uid,
                site.gid,
                sb.groups,
                if sb.capabilities.is_empty() {
                    "none".to_string()
                } else {
                    sb.capability_names().join(" ")
                }
            ),
        ));
    } else {
        report.push((
            false,
            "identity and capabilities: the agent is not root, workers run as the agent's user"
                .into(),
        ));
    }
    report.push((true, "no_new_privs".into()));

    let abi = landlock::abi_version();
    let fs_on = match (sb.landlock_fs, abi) {
        (Mode::Off, _) => {
            report.push((false, "Landlock filesystem rules: off".into()));
            false
        }
        (Mode::Required, 0) => {
            return Err(SandboxError::Required {
                feature: "Landlock (filesystem)",
                needs: "Landlock ABI 1, Linux 5.13",
                abi,
            });
        }
        (Mode::BestEffort, 0) => {
            report.push((
                false,
                "Landlock filesystem rules: not available on this kernel (needs 5.13)".into(),
            ));
            false
        }
        _ => true,
    };
    let net_on = match (sb.landlock_net, abi) {
        (Mode::Off, _) => {
            report.push((false, "Landlock network rules: off".into()));
            false
        }
        (Mode::Required, a) if a < 4 => {
            return Err(SandboxError::Required {
                feature: "Landlock network (TCP bind/connect rules)",
                needs: "Landlock ABI 4, Linux 6.7",
                abi,
            });
        }
        (Mode::BestEffort, a) if a < 4 => {
            report.push((
                false,
                format!(
                    "Landlock network rules: not available (Landlock ABI {abi}, needs 4, Linux 6.7): binds and connects are not restricted"
                ),
            ));
            false
        }
        _ => true,
    };
    let scope_on = match (sb.landlock_scope, abi) {
        (Mode::Off, _) => {
            report.push((false, "Landlock scopes: off".into()));
            false
        }
        (Mode::Required, a) if a < 6 => {
            return Err(SandboxError::Required {
                feature: "Landlock scopes (signals, abstract unix sockets)",
                needs: "Landlock ABI 6, Linux 6.12",
                abi,
            });
        }
        (Mode::BestEffort, a) if a < 6 => {
            report.push((
                false,
                format!(
                    "Landlock scopes: not available (Landlock ABI {abi}, needs 6, Linux 6.12): workers of sites sharing a user may signal each other"
                ),
            ));
            false
        }
        _ => true,
    };
    if fs_on || net_on || scope_on {
        let fs = if fs_on {
            landlock::fs_rights_for_abi(abi)
        } else {
            0
        };
        let net = if net_on {
            landlock::net::BIND_TCP | landlock::net::CONNECT_TCP
        } else {
            0
        };
        let scoped = if scope_on {
            landlock::scope::SIGNAL | landlock::scope::ABSTRACT_UNIX_SOCKET
        } else {
            0
        };
        let mut ll = landlock::LandlockPlan {
            fs,
            net,
            scoped,
            ..landlock::LandlockPlan::default()
        };
        if scope_on {
            report.push((
                true,
                "Landlock scopes: no signals or abstract unix socket connections out of the worker's domain".into(),
            ));
        }
        if fs_on {
            use landlock::fs as f;
            let read = f::READ_FILE | f::READ_DIR;
            let write = fs & !(f::EXECUTE | f::MAKE_CHAR | f::MAKE_BLOCK) & !read;
            let lists: [(&[PathBuf], u64); 3] = [
                (&sb.read_only, read),
                (&sb.read_write, read | write),
                (&sb.execute, read | f::EXECUTE),
            ];
            for (paths, access) in lists {
                for p in paths {
                    // The path as the worker sees it, inside the root (`sys::landlock`).
                    ll.paths.push((cstring(p)?, access & fs));
                }
            }
            report.push((
                true,
                format!(
                    "Landlock ABI {abi} filesystem rules: read {:?}, write {:?}, execute {:?}",
                    sb.read_only, sb.read_write, sb.execute
                ),
            ));
        }
        if net_on {
            let mut binds: Vec<u16> = site
                .listen
                .iter()
                .filter_map(|l| match &l.addr {
                    crate::config::ListenAddr::Tcp(a) => Some(a.port()),
                    crate::config::ListenAddr::Unix(_) => None,
                })
                .collect();
            binds.sort_unstable();
            binds.dedup();
            ll.ports
                .extend(binds.iter().map(|p| (*p, landlock::net::BIND_TCP)));
            bind_ports = Some(binds.clone());
            ll.ports
                .extend(sb.connect.iter().map(|p| (*p, landlock::net::CONNECT_TCP)));
            report.push((
                true,
                format!(
                    "Landlock network rules: bind {binds:?}, connect {:?}",
                    sb.connect
                ),
            ));
        }
        plan.landlock = Some(ll);
    }
    Ok(Prepared {
        plan: Arc::new(plan),
        report,
        bind_ports,
    })
}

fn cstring(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Nul(p.to_path_buf()))
}

/// Where `p` (a path inside the site's root) is on the host.
pub fn host_path(root: Option<&Path>, p: &Path) -> PathBuf {
    match root {
        Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
        None => p.to_path_buf(),
    }
}

/// Refuses a root that anyone but root could change or swap, like OpenSSH's
/// `ChrootDirectory`: every component from `/` to the root itself must be a real
/// directory (no symlink), owned by root and not writable by group or others. A site user
/// who owns (or may write) any directory on the way could rename the root and put a
/// symlink to `/` in its place, and the next worker would run with the host's `/` as its
/// root. Cheap (one `lstat` per component): the agent checks it again before every spawn
/// of a site with a root, since `chroot` follows the path again each time. Returns which
/// directory the root is.
pub fn check_root_path(root: &Path) -> Result<RootId, RootRefusal> {
    if !root.is_absolute() {
        return Err(RootRefusal::NotAbsolute(root.to_path_buf()));
    }
    let mut cur = PathBuf::from("/");
    let mut components = vec![cur.clone()];
    for c in root.components().skip(1) {
        cur.push(c);
        components.push(cur.clone());
    }
    let mut id = RootId { dev: 0, ino: 0 };
    for dir in &components {
        let m = std::fs::symlink_metadata(dir).map_err(|e| RootRefusal::Inspect {
            path: dir.clone(),
            error: e.to_string(),
        })?;
        judge_root_component(
            dir,
            m.file_type().is_symlink(),
            m.is_dir(),
            m.uid(),
            m.mode(),
        )?;
        id = RootId {
            dev: m.dev(),
            ino: m.ino(),
        };
    }
    Ok(id)
}

/// Which directory a site's root is ([`check_root_path`]): another one there since (the
/// root replaced) has other paths below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootId {
    pub dev: u64,
    pub ino: u64,
}

/// One directory on the way to a root, as [`check_root_path`] requires it.
fn judge_root_component(
    dir: &Path,
    symlink: bool,
    is_dir: bool,
    uid: u32,
    mode: u32,
) -> Result<(), RootRefusal> {
    let path = || dir.to_path_buf();
    if symlink {
        return Err(RootRefusal::Symlink(path()));
    }
    if !is_dir {
        return Err(RootRefusal::NotADirectory(path()));
    }
    if uid != 0 {
        return Err(RootRefusal::Owned { path: path(), uid });
    }
    if mode & 0o022 != 0 {
        return Err(RootRefusal::Writable {
            path: path(),
            by: if mode & 0o002 != 0 {
                "others"
            } else {
                "its group"
            },
        });
    }
    Ok(())
}

/// Refuses a root the site's user could change or escape through ([`check_root_path`]),
/// and when `strict`, one holding a setuid or setgid file.
pub fn check_root(root: &Path, strict: bool) -> Result<(), RootRefusal> {
    check_root_path(root)?;
    let top = std::fs::metadata(root).map_err(|e| RootRefusal::Inspect {
        path: root.to_path_buf(),
        error: e.to_string(),
    })?;
    if strict {
        let mut seen = 0;
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                seen += 1;
                if seen > MAX_ROOT_ENTRIES {
                    return Err(RootRefusal::TooMany(root.to_path_buf()));
                }
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() && m.dev() == top.dev() {
                    stack.push(e.path());
                } else if m.is_file() && m.mode() & 0o6000 != 0 {
                    return Err(RootRefusal::Setuid(e.path()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn every_directory_up_to_a_root_must_be_roots_alone() {
        let d = Path::new("/srv/jail");
        judge_root_component(d, false, true, 0, 0o40755).expect("root's, 0755");
        judge_root_component(d, false, true, 0, 0o40711).expect("root's, 0711");
        let e = judge_root_component(d, false, true, 33, 0o40755)
            .expect_err("owned by a user")
            .to_string();
        assert!(e.contains("/srv/jail is owned by uid 33"), "{e}");
        let e = judge_root_component(d, false, true, 0, 0o40775)
            .expect_err("group-writable")
            .to_string();
        assert!(e.contains("writable by its group"), "{e}");
        let e = judge_root_component(d, false, true, 0, 0o41777)
            .expect_err("like /tmp")
            .to_string();
        assert!(e.contains("writable by others"), "{e}");
        let e = judge_root_component(d, true, false, 0, 0o120777)
            .expect_err("symlink")
            .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        let e = judge_root_component(d, false, false, 0, 0o100644)
            .expect_err("a file")
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = check_root_path(Path::new("relative/root"))
            .expect_err("relative")
            .to_string();
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn a_strict_root_holding_a_setuid_file_is_refused() {
        // Only as root can a directory chain be root's; elsewhere the chain check refuses
        // first, which the test above covers.
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var("HATCHERY_TEST_REQUIRE").is_err(),
                "HATCHERY_TEST_REQUIRE is set but this needs root"
            );
            eprintln!("skipped: needs root for a root-owned directory chain");
            return;
        }
        let base = Path::new("/var/lib/hatchery-unit");
        std::fs::create_dir_all(base).expect("mkdir");
        chmod(base, 0o755);
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        chmod(&root, 0o755);
        chmod(&root.join("bin"), 0o755);
        chmod(dir.path(), 0o755);
        check_root(&root, true).expect("a clean root is accepted");
        let suid = root.join("bin/su");
        std::fs::write(&suid, b"x").expect("write");
        chmod(&suid, 0o4755);
        let e = check_root(&root, true)
            .expect_err("setuid file")
            .to_string();
        assert!(e.contains("bin/su is setuid or setgid"), "{e}");
        check_root(&root, false).expect("not strict: accepted");
    }

    fn site(text: &str) -> SiteConfig {
        let file = Path::new("/etc/hatchery/sites.d/blog.toml");
        let raw: crate::config::RawSite = toml::from_str(text).expect("toml");
        crate::config::validate_site(file, &raw, crate::config::LogPolicy::default())
            .expect("valid site")
    }

    #[test]
    fn an_unprivileged_agent_refuses_a_root_and_reports_what_it_cannot_do() {
        let s = site("name = \"blog\"\ncommand = [\"/x\"]\n[sandbox]\nroot = \"/srv\"\n");
        let e = prepare(&s, false)
            .expect_err("a root needs root")
            .to_string();
        assert!(e.contains("need the agent to run as root"), "{e}");
        let s = site(
            "name = \"blog\"\ncommand = [\"/x\"]\n[sandbox.landlock]\nfilesystem = \"off\"\nnetwork = \"off\"\nscope = \"off\"\n",
        );
        let p = prepare(&s, false).expect("prepared");
        assert!(p.plan.identity.is_none() && p.plan.landlock.is_none());
        let off = p.not_enforced().join("\n");
        assert!(off.contains("identity and capabilities"), "{off}");
        assert!(off.contains("Landlock filesystem rules: off"), "{off}");
    }

    #[test]
    fn paths_inside_the_root_map_to_the_host() {
        let r = Some(Path::new("/srv/r"));
        assert_eq!(host_path(r, Path::new("/tmp")), Path::new("/srv/r/tmp"));
        assert_eq!(host_path(r, Path::new("/")), Path::new("/srv/r/"));
        assert_eq!(host_path(None, Path::new("/tmp")), Path::new("/tmp"));
    }
}

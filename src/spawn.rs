//! From a site's configuration to an [`ExecImage`] ready for `clone3`.
//!
//! Built in the parent, before the clone: the resolved executable path, argv, and the
//! worker's environment, which is exactly the site's `env`, a default `PATH` if the site
//! sets none, and the protocol variables: `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`
//! (socket activation, when the site has listeners), `NOTIFY_SOCKET`, and
//! `HATCHERY_SITE`, `HATCHERY_WORKER_ID`, `HATCHERY_GENERATION`. Nothing of the agent's
//! own environment leaks into workers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::SiteConfig;
use crate::net::{self, Listener};
use crate::sys::spawn::ExecImage;

/// `PATH` for workers whose site does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `program` the way `execvp` would, in `path_var`. Names with a `/` are used as
/// they are.
pub fn resolve_program(program: &str, path_var: &str, workdir: Option<&Path>) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return Some(match (p.is_relative(), workdir) {
            (true, Some(w)) => w.join(p),
            _ => p,
        });
    }
    resolve_program_in(program, path_var, None)
}

/// As [`resolve_program`] for a name without `/`, searching `PATH` inside `root` (the
/// site's chroot); returns the path as the worker sees it.
pub fn resolve_program_in(program: &str, path_var: &str, root: Option<&Path>) -> Option<PathBuf> {
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .find_map(|dir| {
            let candidate = Path::new(dir).join(program);
            let host = crate::sandbox::host_path(root, &candidate);
            let meta = std::fs::metadata(&host).ok()?;
            (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
        })
}

/// The environment of worker `id` of generation `generation`.
pub fn worker_env(
    site: &SiteConfig,
    listeners: &[Listener],
    notify: &Path,
    id: u32,
    generation: u32,
) -> Vec<String> {
    let mut env: Vec<String> = site.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !site.env.contains_key("PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    env.extend(net::activation_env(listeners));
    env.push(format!("NOTIFY_SOCKET={}", notify.display()));
    env.push(format!("HATCHERY_SITE={}", site.name));
    env.push(format!("HATCHERY_WORKER_ID={id}"));
    env.push(format!("HATCHERY_GENERATION={generation}"));
    env
}

/// The working directory of the site's processes: `workdir`, else `/` (inside the root,
/// as systemd does), never the agent's own.
pub fn workdir(site: &SiteConfig) -> &str {
    site.workdir
        .as_deref()
        .and_then(Path::to_str)
        .unwrap_or("/")
}

/// The executable of the site's `command` (looked up in its `PATH` when it is a bare
/// name), as the worker will see it (inside its root).
pub fn resolve_command(site: &SiteConfig) -> Result<PathBuf, String> {
    let path_var = site
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let program = &site.command[0];
    let root = site.sandbox.root.as_deref();
    match root {
        Some(_) if !program.contains('/') => resolve_program_in(program, path_var, root),
        _ => resolve_program(program, path_var, Some(Path::new(workdir(site)))),
    }
    .ok_or_else(|| format!("{program} not found in PATH ({path_var})"))
}

/// Whether the site's command exists and is executable (for `check`; a spawn finds out
/// by itself).
pub fn check_command(site: &SiteConfig) -> Result<PathBuf, String> {
    let exe = resolve_command(site)?;
    let host = crate::sandbox::host_path(site.sandbox.root.as_deref(), &exe);
    match std::fs::metadata(&host) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(exe),
        Ok(_) => Err(format!("{} is not an executable file", host.display())),
        Err(e) => Err(format!("{}: {e}", host.display())),
    }
}

/// Builds the image for worker `id`. Fails with a message when the program cannot be
/// found or a string holds a NUL byte.
pub fn worker_image(
    site: &SiteConfig,
    listeners: &[Listener],
    notify: &Path,
    id: u32,
    generation: u32,
) -> Result<ExecImage, String> {
    let exe = resolve_command(site)?;
    let env = worker_env(site, listeners, notify, id, generation);
    ExecImage::new(
        &exe.to_string_lossy(),
        &site.command,
        &env,
        Some(workdir(site)),
        !listeners.is_empty(),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_like_execvp() {
        let sh = resolve_program("sh", "/nonexistent:/bin:/usr/bin", None).expect("sh exists");
        assert!(sh.ends_with("sh"));
        assert_eq!(resolve_program("no-such-program-x", "/bin", None), None);
        assert_eq!(
            resolve_program("/x/y", "", None),
            Some(PathBuf::from("/x/y"))
        );
        assert_eq!(
            resolve_program("./run", "", Some(Path::new("/srv"))),
            Some(PathBuf::from("/srv/./run"))
        );
    }
}

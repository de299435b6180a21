//! From a site's configuration to an `ExecImage` (`sys::spawn`) ready for `clone3`.
//!
//! Built in the parent, before the clone: the resolved executable path, argv, and the
//! worker's environment, which is exactly the site's `env`, a default `PATH` if the site
//! sets none, and the protocol variables: `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`
//! (socket activation, when the site has listeners), `NOTIFY_SOCKET`, and
//! `HATCHERY_SITE`, `HATCHERY_WORKER_ID`, `HATCHERY_GENERATION`. Nothing of the agent's
//! own environment leaks into workers.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::cgroup::{CgroupError, CgroupTree, Graveyard};
use crate::config::{Limits, SiteConfig};
use crate::net::{self, Listener};
use crate::sandbox::SandboxError;
use crate::sys::spawn::{ChildStep, ExecImage, FdBlock, SpawnError, Spawned, StartHelpers};

/// Why a process could not be started, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum SpawnFailure {
    /// The site's sandbox cannot be had here.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The command is not in `PATH`.
    #[error("{program} not found in PATH ({path})")]
    NotFound {
        /// The command.
        program: String,
        /// The `PATH` searched.
        path: String,
    },
    /// An argument or variable holds a NUL byte.
    #[error("invalid command")]
    Image(#[source] io::Error),
    /// The process's output pipe could not be made.
    #[error("failed to create the output pipe")]
    Pipe(#[source] io::Error),
    /// Its cgroup leaf could not be made.
    #[error("failed to set up its cgroup leaf")]
    Cgroup(#[source] CgroupError),
    /// `clone3` or a step of the child failed.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The process started but its pidfd could not be watched (it was killed).
    #[error("failed to watch the pidfd")]
    Watch(#[source] io::Error),
}

impl SpawnFailure {
    /// The failure and every cause under it, for the log and `status`.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cur = c.source();
        }
        text
    }

    /// As [`SpawnFailure::describe`], naming the working directory (`workdir`, inside
    /// the site's root if it has one) when changing to it failed.
    pub fn describe_in(&self, workdir: &str) -> String {
        match self {
            SpawnFailure::Spawn(SpawnError::Child {
                step: ChildStep::Chdir,
                source,
            }) => {
                format!("the child failed to change to the working directory {workdir}: {source}")
            }
            _ => self.describe(),
        }
    }

    /// Whether trying again cannot help (until the operator changes something): a
    /// sandbox this host refuses, a command that is not there or cannot be run, a working
    /// directory that does not exist. The rest (a pipe, a cgroup, `clone3` short of
    /// something) may work the next time.
    pub fn permanent(&self) -> bool {
        match self {
            SpawnFailure::Sandbox(e) => e.permanent(),
            SpawnFailure::NotFound { .. } | SpawnFailure::Image(_) => true,
            SpawnFailure::Pipe(_) | SpawnFailure::Cgroup(_) | SpawnFailure::Watch(_) => false,
            SpawnFailure::Spawn(SpawnError::Child { step, source }) => {
                matches!(step, ChildStep::Exec | ChildStep::Chdir)
                    && matches!(
                        source.raw_os_error(),
                        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR)
                    )
            }
            SpawnFailure::Spawn(_) => false,
        }
    }
}

/// Where a new process is born: a fresh cgroup leaf `name` of generation `generation` of
/// `site`, with per-worker `limits` when given.
pub struct Leaf<'a> {
    /// The tree.
    pub tree: &'a CgroupTree,
    /// Where the leaf goes if the spawn fails with a process left in it.
    pub graveyard: &'a mut Graveyard,
    /// The site.
    pub site: &'a str,
    /// The generation.
    pub generation: u32,
    /// `w-<K>` or `exec-<N>`.
    pub name: String,
    /// Per-worker limits to write into the leaf.
    pub limits: Option<&'a Limits>,
}

/// A [`Leaf`] without the graveyard: what [`start_all`] needs.
pub struct LeafSpec<'a> {
    /// The tree.
    pub tree: &'a CgroupTree,
    /// The site.
    pub site: &'a str,
    /// The generation.
    pub generation: u32,
    /// `w-<K>`.
    pub name: String,
    /// Per-worker limits to write into the leaf.
    pub limits: Option<&'a Limits>,
    /// The leaf of the slot's last process, to be born in again instead of a fresh one:
    /// empty, and never killed (see `Agent::reusable_leaves`).
    pub reuse: Option<PathBuf>,
}

/// A process that was started.
#[derive(Debug)]
pub struct Launched {
    /// Its pid.
    pub pid: i32,
    /// Its pidfd.
    pub pidfd: OwnedFd,
    /// Its cgroup leaf.
    pub leaf: Option<PathBuf>,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22), when the
    /// clock around `clone3` tells it (see `process::start_time_between`).
    pub start_time: Option<u64>,
}

/// A process that could not be started, and the leaf made for it, if one was: the
/// caller retires it (`CgroupTree::retire`), since a child that failed may have left it
/// only just.
#[derive(Debug)]
pub struct NotLaunched {
    /// Why.
    pub failure: SpawnFailure,
    /// The leaf to retire.
    pub leaf: Option<PathBuf>,
}

/// Starts `image` with `fds` as its fds 0, 1, 2, ...: the one sequence every process of a
/// site goes through (workers and `exec` commands): a fresh cgroup leaf with its limits,
/// then `clone3` into it (`sys::spawn`); a leaf whose process could not start is retired.
pub fn launch(
    image: &mut ExecImage,
    fds: &[BorrowedFd<'_>],
    leaf: Option<Leaf<'_>>,
    block: &mut FdBlock,
) -> Result<Launched, SpawnFailure> {
    let (spec, retire) = match leaf {
        Some(l) => (
            Some(LeafSpec {
                tree: l.tree,
                site: l.site,
                generation: l.generation,
                name: l.name,
                limits: l.limits,
                reuse: None,
            }),
            Some((l.tree, l.graveyard)),
        ),
        None => (None, None),
    };
    start(image, fds, spec, block).map_err(|not| {
        if let (Some(dir), Some((tree, graveyard))) = (&not.leaf, retire) {
            tree.retire(dir, graveyard);
        }
        not.failure
    })
}

/// [`launch`] without retiring the leaf of a process that could not start.
fn start(
    image: &mut ExecImage,
    fds: &[BorrowedFd<'_>],
    leaf: Option<LeafSpec<'_>>,
    block: &mut FdBlock,
) -> Result<Launched, NotLaunched> {
    let (dir, leaf_fd) = match leaf {
        Some(l) => {
            let (dir, fd) = make_leaf(&l)?;
            (Some(dir), Some(fd))
        }
        None => (None, None),
    };
    let cgroup = leaf_fd.as_ref().map(|f| f.as_fd());
    let spawned = if crate::sys::spawn::bounding_fits(image) {
        crate::sys::spawn::spawn(image, fds, cgroup, block)
    } else {
        // This thread dropped a capability the sandbox keeps.
        let image = Mutex::new(image);
        let task = |_, block: &mut FdBlock| {
            let mut image = image.lock().unwrap_or_else(PoisonError::into_inner);
            spawn_with_whole_set(&mut image, fds, cgroup, block)
        };
        let mut spawned = crate::sys::spawn::on_whole_set(1, block, &task);
        spawned.pop().expect("one start")
    };
    launched(spawned, dir)
}

/// `sys::spawn::spawn` on a thread that keeps its whole bounding set (`on_whole_set`), or
/// the failure to drop from it that the child would meet.
fn spawn_with_whole_set(
    image: &mut ExecImage,
    fds: &[BorrowedFd<'_>],
    cgroup: Option<BorrowedFd<'_>>,
    block: &mut FdBlock,
) -> Result<crate::sys::spawn::Spawned, SpawnError> {
    if crate::sys::spawn::keeps_whole_set() {
        crate::sys::spawn::spawn(image, fds, cgroup, block)
    } else {
        Err(bounding_refused())
    }
}

/// A start from a thread that dropped from its bounding set a capability the child keeps:
/// what the child's own `PR_CAPBSET_DROP`s would meet (it cannot have it back).
fn bounding_refused() -> SpawnError {
    SpawnError::Child {
        step: crate::sys::spawn::ChildStep::DropBounding,
        source: io::Error::from_raw_os_error(libc::EPERM),
    }
}

/// What a spawn into `leaf` (if any) gave: the process, or why there is none (the child,
/// reaped by `spawn`, was the leaf's only process; the caller retires the leaf).
fn launched(
    spawned: Result<Spawned, SpawnError>,
    leaf: Option<PathBuf>,
) -> Result<Launched, NotLaunched> {
    match spawned {
        Ok(s) => Ok(Launched {
            pid: s.pid,
            pidfd: s.pidfd,
            leaf,
            start_time: crate::process::start_time_between(s.born_between.0, s.born_between.1),
        }),
        Err(e) => Err(NotLaunched {
            failure: e.into(),
            leaf,
        }),
    }
}

/// A start's leaf, if it has one: its path and its fd to clone into.
type MadeLeaf = Result<(PathBuf, OwnedFd), NotLaunched>;
/// A start of [`start_all`], with its leaf when it was made ahead.
type StartItem<'a> = (Start<'a>, Option<MadeLeaf>);

/// A fresh leaf with its limits, or the one to reuse, and its fd to clone into.
fn make_leaf(l: &LeafSpec<'_>) -> Result<(PathBuf, OwnedFd), NotLaunched> {
    let not_launched = |e| NotLaunched {
        failure: SpawnFailure::Cgroup(e),
        leaf: None,
    };
    if let Some(dir) = &l.reuse {
        let failed = |e| NotLaunched {
            failure: SpawnFailure::Cgroup(e),
            leaf: Some(dir.clone()),
        };
        match CgroupTree::open_leaf(dir) {
            Ok(fd) => {
                // Its limits again, as a fresh leaf gets them (the site's may have changed
                // since they were written).
                if let Some(limits) = l.limits.filter(|_| l.tree.has_memory()) {
                    CgroupTree::apply_worker_limits(dir, limits).map_err(failed)?;
                }
                return Ok((dir.clone(), fd));
            }
            // Gone meanwhile (removed by hand): a fresh one, as for any start.
            Err(CgroupError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            // Still there: the caller retires it.
            Err(e) => return Err(failed(e)),
        }
    }
    let (dir, fd) = l
        .tree
        .new_leaf(l.site, l.generation, &l.name)
        .map_err(not_launched)?;
    if let Some(limits) = l.limits {
        if let Err(e) = l.tree.apply_new_leaf_limits(&dir, limits) {
            let _ = std::fs::remove_dir(&dir);
            return Err(not_launched(e));
        }
    }
    Ok((dir, fd))
}

/// One process of several to start together ([`start_all`]).
pub struct Start<'a> {
    /// What it runs.
    pub image: ExecImage,
    /// Its fds 0, 1, 2, ...
    pub fds: Vec<BorrowedFd<'a>>,
    /// Where it is born.
    pub leaf: Option<LeafSpec<'a>>,
}

/// Starts every process of `starts`, as [`launch`] does, and says how each went, in
/// order: from this thread with `block` and, when there are several, from the helper
/// threads at the same time (`sys::spawn::run_all`), each making its process's leaf
/// before starting it (a leaf's `mkdir` is a large part of a start: made one after the
/// other on this thread, it left the helpers waiting). The first leaf of each generation
/// is made here first, alone: it may make the generation's directory and turn its
/// controllers on, which a leaf made beside it could miss (and when it could not be made,
/// the others of its generation are made here too). Leaves of processes that could not
/// start are the caller's to retire.
pub fn start_all(
    starts: Vec<Start<'_>>,
    block: &mut FdBlock,
    helpers: Option<&StartHelpers>,
) -> Vec<Result<Launched, NotLaunched>> {
    // Each generation met, and whether its first leaf was made: if not, the others are
    // made here too, in turn (its directory may be half made).
    let mut generations: Vec<((&str, u32), bool)> = Vec::new();
    let starts: Vec<Mutex<Option<StartItem<'_>>>> = starts
        .into_iter()
        .map(|s| {
            let ahead = s.leaf.as_ref().and_then(|l| {
                let g = (l.site, l.generation);
                match generations.iter().find(|(seen, _)| *seen == g) {
                    Some((_, true)) => None,
                    Some((_, false)) => Some(make_leaf(l)),
                    None => {
                        let made = make_leaf(l);
                        generations.push((g, made.is_ok()));
                        Some(made)
                    }
                }
            });
            Mutex::new(Some((s, ahead)))
        })
        .collect();
    // `None`: not on this thread (`sys::spawn::bounding_fits`), given back when
    // `give_back`, for a thread that keeps its whole bounding set.
    let start = |i: usize, block: &mut FdBlock, give_back: bool| {
        let mut slot = starts[i].lock().unwrap_or_else(PoisonError::into_inner);
        let (mut start, ahead) = slot.take().expect("each start is taken once");
        if !crate::sys::spawn::bounding_fits(&start.image) {
            if give_back {
                *slot = Some((start, ahead));
                return None;
            }
            // Its leaf, made ahead or to be reused, is the caller's to retire.
            let leaf = match ahead {
                Some(Ok((dir, _))) => Some(dir),
                Some(Err(not)) => not.leaf,
                None => start.leaf.as_ref().and_then(|l| l.reuse.clone()),
            };
            return Some(launched(Err(bounding_refused()), leaf));
        }
        drop(slot);
        let leaf = match (ahead, &start.leaf) {
            (Some(made), _) => Some(made),
            (None, Some(l)) => Some(make_leaf(l)),
            (None, None) => None,
        };
        let leaf = match leaf.transpose() {
            Ok(l) => l,
            Err(not) => return Some(Err(not)),
        };
        let cgroup = leaf.as_ref().map(|(_, fd)| fd.as_fd());
        let spawned = crate::sys::spawn::spawn(&mut start.image, &start.fds, cgroup, block);
        Some(launched(spawned, leaf.map(|(dir, _)| dir)))
    };
    let done = crate::sys::spawn::run_all(starts.len(), block, helpers, &|i, block| {
        start(i, block, true)
    });
    // What a helper or this thread could not start, a thread that keeps its whole bounding
    // set does: this one, when it has dropped nothing.
    let left: Vec<usize> = (0..done.len()).filter(|&i| done[i].is_none()).collect();
    let mut again = crate::sys::spawn::on_whole_set(left.len(), block, &|k, block| {
        start(left[k], block, false).expect("started there")
    })
    .into_iter();
    let started = done
        .into_iter()
        .map(|r| r.unwrap_or_else(|| again.next().expect("one for each left")))
        .collect();
    // A lone start (a crashed worker's restart): its child is still in `execve` when this
    // thread wakes (`CLONE_VFORK` wakes it as the child lets go of its memory, before the
    // new program is loaded), and this thread, back from a sleep, takes the CPU from it for
    // the rest of the turn when the two share a CPU. Yielding lets the exec finish first:
    // 0.15 ms sooner where they shared one; nothing seen under the harness, where (by its
    // fork-to-exec spans) this thread seldom took its child's CPU (BENCHMARKS.md). Several
    // starts are not held up so.
    if starts.len() == 1 {
        std::thread::yield_now();
    }
    started
}

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

/// The `PATH` of the site's processes.
pub fn path_var(site: &SiteConfig) -> &str {
    site.env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH)
}

/// The executable of `program` for the site's processes (looked up in the site's `PATH`
/// when it is a bare name), as they see it (inside the site's root).
pub fn resolve_for(site: &SiteConfig, program: &str) -> Result<PathBuf, SpawnFailure> {
    let path_var = path_var(site);
    let root = site.sandbox.root.as_deref();
    match root {
        Some(_) if !program.contains('/') => resolve_program_in(program, path_var, root),
        _ => resolve_program(program, path_var, Some(Path::new(workdir(site)))),
    }
    .ok_or_else(|| SpawnFailure::NotFound {
        program: program.to_string(),
        path: path_var.to_string(),
    })
}

/// The executable of the site's `command`.
pub fn resolve_command(site: &SiteConfig) -> Result<PathBuf, SpawnFailure> {
    resolve_for(site, &site.command[0])
}

/// The image of `argv` with `env`, run the way the site's processes are: the program
/// resolved like [`resolve_for`], in the site's working directory.
pub fn site_image(
    site: &SiteConfig,
    argv: &[String],
    env: &[String],
    with_listen_pid: bool,
) -> Result<ExecImage, SpawnFailure> {
    let exe = resolve_for(site, &argv[0])?;
    ExecImage::new(
        &exe.to_string_lossy(),
        argv,
        env,
        Some(workdir(site)),
        with_listen_pid,
    )
    .map_err(SpawnFailure::Image)
}

/// Whether the site's command exists and is executable (for `check`; a spawn finds out
/// by itself).
pub fn check_command(site: &SiteConfig) -> Result<PathBuf, String> {
    let exe = resolve_command(site).map_err(|e| e.to_string())?;
    let host = crate::sandbox::host_path(site.sandbox.root.as_deref(), &exe);
    match std::fs::metadata(&host) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(exe),
        Ok(_) => Err(format!("{} is not an executable file", host.display())),
        Err(e) => Err(format!("{}: {e}", host.display())),
    }
}

/// Builds the image for worker `id` of generation `generation`.
pub fn worker_image(
    site: &SiteConfig,
    listeners: &[Listener],
    notify: &Path,
    id: u32,
    generation: u32,
) -> Result<ExecImage, SpawnFailure> {
    let env = worker_env(site, listeners, notify, id, generation);
    site_image(site, &site.command, &env, !listeners.is_empty())
}

/// Builds the image of generation `generation`'s zygote (`mode = "zygote"`): the
/// environment a worker gets, less `HATCHERY_WORKER_ID` and `LISTEN_PID` (each forked
/// worker sets its own), plus [`crate::zygote::ZYGOTE_FD_ENV`] naming `link_fd`, the fd
/// number its end of the zygote link is placed at, and [`crate::zygote::PROTOCOL_ENV`]
/// the protocol version the agent speaks.
pub fn zygote_image(
    site: &SiteConfig,
    listeners: &[Listener],
    notify: &Path,
    generation: u32,
    link_fd: usize,
) -> Result<ExecImage, SpawnFailure> {
    let mut env: Vec<String> = worker_env(site, listeners, notify, 0, generation)
        .into_iter()
        .filter(|v| !v.starts_with("HATCHERY_WORKER_ID="))
        .collect();
    env.push(format!("{}={link_fd}", crate::zygote::ZYGOTE_FD_ENV));
    env.push(format!(
        "{}={}",
        crate::zygote::PROTOCOL_ENV,
        crate::zygote::PROTOCOL_VERSION
    ));
    site_image(site, &site.command, &env, false)
}

/// Builds the image of a `hatchery exec` command (`argv`; empty for the site user's
/// shell): the site's environment and `PATH`, `TERM`, `HATCHERY_SITE`.
pub fn exec_image(
    site: &SiteConfig,
    argv: Vec<String>,
    term: Option<&str>,
) -> Result<ExecImage, SpawnFailure> {
    let argv = if argv.is_empty() {
        // The site user's login shell, if it exists inside the root; else /bin/sh.
        let shell = site
            .user
            .as_deref()
            .and_then(crate::config::lookup_user)
            .map(|u| u.shell)
            .filter(|s| {
                let host = crate::sandbox::host_path(site.sandbox.root.as_deref(), Path::new(s));
                s.starts_with('/') && host.is_file()
            })
            .unwrap_or_else(|| "/bin/sh".to_string());
        vec![shell]
    } else {
        argv
    };
    let mut env: Vec<String> = site.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !site.env.contains_key("PATH") {
        env.push(format!("PATH={}", path_var(site)));
    }
    if let Some(t) = term {
        env.push(format!("TERM={t}"));
    }
    env.push(format!("HATCHERY_SITE={}", site.name));
    site_image(site, &argv, &env, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_chdir_names_the_working_directory() {
        let chdir = SpawnFailure::Spawn(SpawnError::Child {
            step: ChildStep::Chdir,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
        let said = chdir.describe_in("/srv/files");
        assert!(
            said.starts_with("the child failed to change to the working directory /srv/files: "),
            "{said}"
        );
        assert!(chdir.permanent());
        let exec = SpawnFailure::Spawn(SpawnError::Child {
            step: ChildStep::Exec,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(exec.describe_in("/srv/files"), exec.describe());
    }

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

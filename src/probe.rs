//! `hatchery __probe`: a small worker for tests and diagnostics.
//!
//! - `info`: prints what the process sees of itself as JSON (uid, gid, groups, cgroup,
//!   open fds, environment, `NoNewPrivs`, capability sets, the kernel's Landlock ABI, the
//!   listing of `/`, rlimits), then sleeps: the oracle the tests compare with a site's
//!   configuration. Whether a Landlock domain is in force is not visible to a process
//!   (no `/proc` field before audit), so the `attacks` below show it by its effects.
//!   `info-once` prints it and exits (for `hatchery exec`).
//! - `alloc SIZE`: allocates and touches SIZE bytes (e.g. `200M`), says so, then sleeps.
//! - `spawn-forever`: starts sleeping copies of itself as fast as it can, counting
//!   successes and failures (a fork bomb that a `pids.max` must stop).
//! - `sleep`: sleeps forever.
//! - `busy-if ID`: reports `READY=1` and `BUSY=1` (worker ID) or `BUSY=0` (any other) on
//!   `NOTIFY_SOCKET`, then sleeps.
//! - `ids`: prints `uid euid gid egid` and exits (run setuid to show it gains nothing).
//! - `attacks SPEC...`: what a hostile worker would try, one JSON line per attempt
//!   (`{"attack":..., "blocked":bool, "detail":...}`), then `attacks done`, then sleeps.
//!   SPECs: `read:PATH`, `write:PATH`, `escape:PATH` (reach a host PATH through `..`, a
//!   second chroot and `/proc/1/root`), `signal:PID`, `ptrace:PID`, `environ:PID`,
//!   `bind:PORT`, `connect:PORT`, `exec:PATH` (run `PATH __probe ids`: blocked when the
//!   effective uid did not change), `nofile:N` and `nproc:N` (blocked when fewer than N
//!   fds or processes could be had).
//! - `without-io-uring CMD ARGS...`: runs CMD with `io_uring_setup` refused (`EPERM`) by a
//!   seccomp filter, as in a container whose runtime blocks io_uring.
//! - `hold-connections SOCKET N`: what a hostile local user does to a control socket:
//!   opens N connections, sends half a request on each, prints `{"connected":N}`, then
//!   reads each until the agent closes it and prints `{"replies":[...]}` (the last line
//!   the agent sent on each) and exits.
//! - `holder-dump SOCKET`: asks the fd holder at SOCKET for its fds, prints
//!   `{"dumped":N}` (exit 0) or `{"error":...}` (exit 1): what another user gets from it.

use std::io::Write;
use std::time::Duration;

/// Runs a probe mode; returns the process exit code.
pub fn main(args: &[String]) -> u8 {
    match args.first().map(String::as_str) {
        Some("info") => {
            println!("{}", info());
            let _ = std::io::stdout().flush();
            sleep_forever()
        }
        Some("info-once") => {
            println!("{}", info());
            0
        }
        Some("alloc") => {
            let Some(size) = args.get(1).and_then(|s| crate::config::parse_size(s).ok()) else {
                eprintln!("usage: __probe alloc SIZE");
                return 2;
            };
            let len = usize::try_from(size).unwrap_or(usize::MAX);
            let mut v: Vec<u8> = Vec::with_capacity(len);
            // Touch every page so the memory is really charged to our cgroup.
            v.resize(len, 1);
            println!("allocated {} bytes", v.len());
            let _ = std::io::stdout().flush();
            std::hint::black_box(&v);
            sleep_forever()
        }
        Some("spawn-forever") => {
            let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut children = Vec::new();
            loop {
                match std::process::Command::new(&exe)
                    .args(["__probe", "sleep"])
                    .spawn()
                {
                    Ok(c) => {
                        ok += 1;
                        children.push(c);
                    }
                    Err(_) => {
                        failed += 1;
                        if failed % 100 == 1 {
                            println!("spawned {ok}, refused {failed}");
                            let _ = std::io::stdout().flush();
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        Some("sleep") => sleep_forever(),
        Some("busy-if") => {
            // READY=1, then BUSY=1 in the worker whose id is the argument, BUSY=0 elsewhere.
            let me = std::env::var("HATCHERY_WORKER_ID").unwrap_or_default();
            let busy = args.get(1).is_some_and(|id| *id == me);
            let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
                eprintln!("busy-if: no NOTIFY_SOCKET");
                return 2;
            };
            let msg = format!("READY=1\nBUSY={}", u8::from(busy));
            let sent = std::os::unix::net::UnixDatagram::unbound()
                .and_then(|sock| sock.send_to(msg.as_bytes(), std::path::PathBuf::from(path)));
            if let Err(e) = sent {
                eprintln!("busy-if: {e}");
                return 1;
            }
            sleep_forever()
        }
        Some("ids") => {
            let ids = (
                rustix::process::getuid().as_raw(),
                rustix::process::geteuid().as_raw(),
                rustix::process::getgid().as_raw(),
                rustix::process::getegid().as_raw(),
            );
            println!("{} {} {} {}", ids.0, ids.1, ids.2, ids.3);
            0
        }
        Some("without-io-uring") => {
            use std::os::unix::process::CommandExt;
            let Some(cmd) = args.get(1) else {
                eprintln!("usage: __probe without-io-uring CMD ARGS...");
                return 2;
            };
            if let Err(e) = crate::sys::seccomp::deny_io_uring_setup() {
                eprintln!("without-io-uring: {e}");
                return 1;
            }
            let e = std::process::Command::new(cmd).args(&args[2..]).exec();
            eprintln!("without-io-uring: {cmd}: {e}");
            127
        }
        Some("hold-connections") => {
            let (Some(socket), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok()))
            else {
                eprintln!("usage: __probe hold-connections SOCKET N");
                return 2;
            };
            hold_connections(std::path::Path::new(socket), n)
        }
        Some("holder-dump") => {
            let Some(socket) = args.get(1) else {
                eprintln!("usage: __probe holder-dump SOCKET");
                return 2;
            };
            let dumped = crate::fdholder::HolderClient::connect(std::path::Path::new(socket))
                .and_then(|c| match c {
                    Some(mut c) => c.dump(),
                    None => Ok(Vec::new()),
                });
            match dumped {
                Ok(fds) => {
                    println!("{}", serde_json::json!({ "dumped": fds.len() }));
                    0
                }
                Err(e) => {
                    println!("{}", serde_json::json!({ "error": e.to_string() }));
                    1
                }
            }
        }
        Some("attacks") => {
            for spec in &args[1..] {
                let (blocked, detail) = attack(spec);
                println!(
                    "{}",
                    serde_json::json!({ "attack": spec, "blocked": blocked, "detail": detail })
                );
                let _ = std::io::stdout().flush();
            }
            println!("attacks done");
            let _ = std::io::stdout().flush();
            sleep_forever()
        }
        _ => {
            eprintln!(
                "usage: __probe info | alloc SIZE | spawn-forever | sleep | ids | attacks SPEC..."
            );
            2
        }
    }
}

fn hold_connections(socket: &std::path::Path, n: usize) -> u8 {
    use std::io::BufRead;
    let mut conns = Vec::new();
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut c) => {
                let _ = c.write_all(br#"{"cmd":"sta"#);
                conns.push(c);
            }
            Err(e) => eprintln!("connect: {e}"),
        }
    }
    println!("{}", serde_json::json!({ "connected": conns.len() }));
    let _ = std::io::stdout().flush();
    let replies: Vec<String> = conns
        .into_iter()
        .map(|c| {
            let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
            let mut last = String::new();
            for line in std::io::BufReader::new(c).lines() {
                match line {
                    Ok(l) => last = l,
                    Err(e) => {
                        last = format!("read: {e}");
                        break;
                    }
                }
            }
            last
        })
        .collect();
    println!("{}", serde_json::json!({ "replies": replies }));
    0
}

/// One attempt; `(blocked, what happened)`.
fn attack(spec: &str) -> (bool, String) {
    use std::io::Read;
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    let pid = || arg.parse::<i32>().unwrap_or(0);
    let res = |r: std::io::Result<String>| match r {
        Ok(s) => (false, s),
        Err(e) => (true, e.to_string()),
    };
    match kind {
        "read" => res(std::fs::read(arg).map(|b| format!("read {} bytes", b.len()))),
        "write" => res(std::fs::write(arg, b"owned\n").map(|()| "wrote".into())),
        "escape" => {
            // Through `..` from the root: in a chroot, `/..` is `/` again.
            let dots = format!("{}{arg}", "../".repeat(32));
            if std::fs::metadata(&dots).is_ok() {
                return (false, format!("reached {arg} as {dots}"));
            }
            // A second chroot below the cwd, then `..` out of it: needs CAP_SYS_CHROOT.
            let _ = std::fs::create_dir_all("/tmp/.escape");
            if let Ok(()) = std::os::unix::fs::chroot("/tmp/.escape") {
                if std::fs::metadata(&dots).is_ok() {
                    return (false, format!("reached {arg} after a second chroot"));
                }
                return (
                    false,
                    "chroot succeeded (CAP_SYS_CHROOT was not dropped)".into(),
                );
            }
            // The host's root through init's /proc entry.
            let via_proc = format!("/proc/1/root{arg}");
            if std::fs::metadata(&via_proc).is_ok() {
                return (false, format!("reached {arg} as {via_proc}"));
            }
            // An inherited directory fd from outside the root.
            for fd in 0..64 {
                let p = format!("/proc/self/fd/{fd}/{}", "../".repeat(32));
                if std::fs::metadata(format!("{p}{arg}")).is_ok() {
                    return (false, format!("reached {arg} through fd {fd}"));
                }
            }
            (true, format!("{arg} is unreachable"))
        }
        "signal" => res(rustix::process::Pid::from_raw(pid())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))
            .and_then(|p| {
                rustix::process::test_kill_process(p).map_err(std::io::Error::from)?;
                rustix::process::kill_process(p, rustix::process::Signal::CONT)
                    .map_err(std::io::Error::from)
            })
            .map(|()| "signalled".into())),
        "ptrace" => res(crate::sys::ptrace::attach_and_detach(pid()).map(|()| "attached".into())),
        "environ" => res(
            std::fs::File::open(format!("/proc/{}/environ", pid())).and_then(|mut f| {
                let mut s = String::new();
                f.read_to_string(&mut s)?;
                Ok(format!("read {} bytes", s.len()))
            }),
        ),
        "bind" => res(
            std::net::TcpListener::bind(("127.0.0.1", arg.parse::<u16>().unwrap_or(0)))
                .map(|_| "bound".into()),
        ),
        "connect" => res(std::net::TcpStream::connect((
            "127.0.0.1",
            arg.parse::<u16>().unwrap_or(0),
        ))
        .map(|_| "connected".into())),
        // stdin inherited: a root without /dev has no /dev/null for `output()` to open.
        "exec" => match std::process::Command::new(arg)
            .args(["__probe", "ids"])
            .stdin(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .output()
        {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let euid = text.split_whitespace().nth(1).unwrap_or("");
                (euid != "0", format!("ids: {text}"))
            }
            Err(e) => (true, e.to_string()),
        },
        "nofile" => {
            let want: usize = arg.parse().unwrap_or(0);
            let mut held = Vec::new();
            while held.len() < want {
                match std::fs::File::open("/dev/null").or_else(|_| std::fs::File::open("/")) {
                    Ok(f) => held.push(f),
                    Err(e) => return (true, format!("stopped after {} fds: {e}", held.len())),
                }
            }
            (false, format!("opened {want} fds"))
        }
        "nproc" => {
            let want: usize = arg.parse().unwrap_or(0);
            let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
            let mut children = Vec::new();
            let mut outcome = (false, format!("started {want} processes"));
            while children.len() < want {
                match std::process::Command::new(&exe)
                    .args(["__probe", "sleep"])
                    .spawn()
                {
                    Ok(c) => children.push(c),
                    Err(e) => {
                        outcome = (
                            true,
                            format!("stopped after {} processes: {e}", children.len()),
                        );
                        break;
                    }
                }
            }
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            outcome
        }
        _ => (false, format!("unknown attack {kind}")),
    }
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// What this process sees of itself.
pub fn info() -> serde_json::Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let fds: Vec<serde_json::Value> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            let mut v: Vec<(i32, String)> = d
                .flatten()
                .filter_map(|e| {
                    let n: i32 = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?.display().to_string();
                    Some((n, target))
                })
                .collect();
            v.sort();
            v.into_iter()
                .map(|(n, t)| serde_json::json!({ "fd": n, "target": t }))
                .collect()
        })
        .unwrap_or_default();
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    serde_json::json!({
        "pid": std::process::id(),
        "uid": status_field(&status, "Uid:"),
        "gid": status_field(&status, "Gid:"),
        "groups": status_field(&status, "Groups:"),
        "no_new_privs": status_field(&status, "NoNewPrivs:"),
        "cap_eff": status_field(&status, "CapEff:"),
        "cap_bnd": status_field(&status, "CapBnd:"),
        "cap_amb": status_field(&status, "CapAmb:"),
        "cap_prm": status_field(&status, "CapPrm:"),
        "cap_inh": status_field(&status, "CapInh:"),
        "landlock_abi": crate::sys::landlock::abi_version(),
        "root": root_listing(),
        "rlimits": rlimits(),
        "cgroup": std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default().trim(),
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
        "fds": fds,
        "env": env,
    })
}

fn root_listing() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn rlimits() -> serde_json::Value {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (name, label) in [
        ("nofile", "Max open files"),
        ("nproc", "Max processes"),
        ("core", "Max core file size"),
        ("as", "Max address space"),
        ("memlock", "Max locked memory"),
    ] {
        if let Some(line) = text.lines().find(|l| l.starts_with(label)) {
            let soft = line[label.len()..].split_whitespace().next().unwrap_or("");
            out.insert(name.into(), serde_json::Value::String(soft.to_string()));
        }
    }
    serde_json::Value::Object(out)
}

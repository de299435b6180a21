//! `hatchery __probe`: a small worker for tests and diagnostics.
//!
//! - `info`: prints what the process sees of itself as JSON (uid, gid, groups, cgroup,
//!   open fds, environment, `NoNewPrivs`, capability sets), then sleeps: the oracle the
//!   tests compare with a site's configuration.
//! - `alloc SIZE`: allocates and touches SIZE bytes (e.g. `200M`), says so, then sleeps.
//! - `spawn-forever`: starts sleeping copies of itself as fast as it can, counting
//!   successes and failures (a fork bomb that a `pids.max` must stop).
//! - `sleep`: sleeps forever.

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
        _ => {
            eprintln!("usage: __probe info | alloc SIZE | spawn-forever | sleep");
            2
        }
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
        "cgroup": std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default().trim(),
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
        "fds": fds,
        "env": env,
    })
}

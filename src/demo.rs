//! The built-in demo: a site served by a tiny HTTP worker shipped inside the binary.
//!
//! `hatchery demo` writes an agent file and one site into a fresh temporary directory
//! and runs the agent in the foreground: four workers of `hatchery __demo-worker`
//! answering `hello from worker <id>, generation <n>` on 127.0.0.1:8080, readiness by
//! `READY=1` on `NOTIFY_SOCKET`. It works as root or not, with or without cgroup v2
//! controllers (what is missing is reported, not fatal).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent file of the demo, with `{dir}` for its directory.
pub const DEMO_AGENT: &str = r#"# Hatchery demo agent (written by `hatchery demo`)
control_socket = "{dir}/control.sock"
state_dir = "{dir}/state"
sites_dir = "{dir}/sites.d"
cgroup_base = "auto"
"#;

/// The demo site, with `{exe}`, `{listen}` and `{workers}` to fill in.
pub const DEMO_SITE: &str = r#"# The demo site (written by `hatchery demo`)
name = "demo"
command = ["{exe}", "__demo-worker"]
workers = {workers}

[[listen]]
name = "http"
tcp = "{listen}"

[stop]
signal = "SIGTERM"
timeout = "5s"

[ready]
check = "notify"
timeout = "10s"
"#;

/// Writes the demo configuration into `dir`; returns the agent file's path.
pub fn write_config(
    dir: &Path,
    exe: &Path,
    listen: SocketAddr,
    workers: u32,
) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("sites.d"))?;
    let agent = dir.join("hatchery.toml");
    std::fs::write(
        &agent,
        DEMO_AGENT.replace("{dir}", &dir.display().to_string()),
    )?;
    let site = DEMO_SITE
        .replace("{exe}", &exe.display().to_string())
        .replace("{listen}", &listen.to_string())
        .replace("{workers}", &workers.to_string());
    std::fs::write(dir.join("sites.d/demo.toml"), site)?;
    Ok(agent)
}

/// The demo worker: serve the inherited listener, one connection at a time.
pub fn worker_main() -> io::Result<()> {
    let id = std::env::var("HATCHERY_WORKER_ID").unwrap_or_else(|_| "?".into());
    let generation = std::env::var("HATCHERY_GENERATION").unwrap_or_else(|_| "?".into());
    let fds = crate::sys::activation::listen_fds()?;
    let (_, fd) = fds.into_iter().next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no listener passed in LISTEN_FDS")
    })?;
    let listener = TcpListener::from(fd);
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.send_to(b"READY=1", PathBuf::from(path))?;
    }
    println!("demo worker {id} of generation {generation} serving");
    let body = format!("hello from worker {id}, generation {generation}\n");
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = Vec::new();
        let mut buf = [0u8; 2048];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        if req.is_empty() {
            continue;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}

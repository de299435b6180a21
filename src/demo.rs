//! The built-in demo: a site served by a tiny HTTP worker shipped inside the binary.
//!
//! `hatchery demo` writes an agent file and one site into a fresh temporary directory
//! and runs the agent in the foreground: four workers of `hatchery __demo-worker`
//! answering `hello from worker <id>, generation <n>` on 127.0.0.1:8080, readiness by
//! `READY=1` on `NOTIFY_SOCKET`. It works as root or not, with or without cgroup v2
//! controllers (what is missing is reported, not fatal).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::PollFlags;

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

/// How a demo worker behaves (hidden options, for deploy tests and benchmarks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Time each request takes.
    pub delay: Duration,
    /// A directory whose `behaviour` file (if present) says how this release misbehaves,
    /// in space-separated words:
    /// `exit` (exits at start), `never-ready` (serves but never reports ready),
    /// `crash-after-ready` (reports ready, then exits 300 ms later), `slow-start` (waits
    /// 1.5 s before it reports ready and accepts), `never-accepts` (neither reports ready
    /// nor accepts, until stopped), `quiet` (prints nothing when it starts serving),
    /// `one-at-a-time` (serves one connection before it accepts the next, so connections
    /// queue up behind a slow one), `http-500` (answers every request with
    /// `500 Internal Server Error`, as an app that failed to load behind a server that
    /// started), `hang-when-told` (once the file `hang-<worker id>` appears in the
    /// directory, the worker removes it and from then on accepts connections but never
    /// answers them, as a worker whose app is stuck), `log-requests` (prints each request
    /// line and its user agent), `slow-stop` (once told to stop, stops accepting but exits
    /// only once the file `finish-stop` appears in the directory, at most a minute later, as
    /// a worker finishing long requests: its generation drains that long), `wait-for-go`
    /// (with `one-at-a-time`: answers nothing until the file `go` appears in the directory,
    /// at most two minutes; connections queue up meanwhile, so its generation drains until
    /// told), `shut-listener` (shuts its last listener down, its only one unless the site
    /// has several, with `shutdown(2)`, which closes the socket for every process holding
    /// it: it leaves its `SO_REUSEPORT` group and accepts nothing more; then reports ready,
    /// accepts nothing and stays up until stopped, as an app that shuts down a socket it
    /// inherited; with `slow-stop`, until told after that), `shut-when-told` (serves until
    /// the file `shut` appears in the directory; the worker that removes it shuts the
    /// listener it serves down, as `shut-listener` does). A worker whose listener was shut
    /// down (by any process) says so and accepts nothing more, until stopped.
    pub behaviour_from: Option<PathBuf>,
    /// Bind this address itself (without `SO_REUSEPORT`, so a second process bound to it
    /// fails with `EADDRINUSE`) instead of taking its listener from `LISTEN_FDS`: a server
    /// that binds its own port (`[[listen]] mode = "own"`).
    pub bind: Option<SocketAddr>,
    /// Send `BUSY=1` to `NOTIFY_SOCKET` when a request begins and `BUSY=0` when it ends
    /// (with `one-at-a-time`; a threaded worker is never full).
    pub busy_reports: bool,
}

impl WorkerOptions {
    /// Parses `--delay-ms N`, `--behaviour-from DIR`, `--bind HOST:PORT` and
    /// `--busy-reports`.
    pub fn parse(args: &[String]) -> Result<WorkerOptions, String> {
        let mut o = WorkerOptions {
            delay: Duration::ZERO,
            behaviour_from: None,
            bind: None,
            busy_reports: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--delay-ms" => {
                    let v = it.next().ok_or("--delay-ms needs a value")?;
                    let ms: u64 = v.parse().map_err(|_| format!("bad --delay-ms {v:?}"))?;
                    o.delay = Duration::from_millis(ms);
                }
                "--behaviour-from" => {
                    let v = it.next().ok_or("--behaviour-from needs a directory")?;
                    o.behaviour_from = Some(PathBuf::from(v));
                }
                "--bind" => {
                    let v = it.next().ok_or("--bind needs host:port")?;
                    o.bind = Some(v.parse().map_err(|_| format!("bad --bind {v:?}"))?);
                }
                "--busy-reports" => o.busy_reports = true,
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(o)
    }
}

/// The demo worker: serves the inherited listener, a thread per connection, and on
/// `SIGTERM`/`SIGINT` stops accepting, finishes the requests it has, and exits 0.
pub fn worker_main(args: &[String]) -> io::Result<()> {
    let opts =
        WorkerOptions::parse(args).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let id = std::env::var("HATCHERY_WORKER_ID").unwrap_or_else(|_| "?".into());
    let generation = std::env::var("HATCHERY_GENERATION").unwrap_or_else(|_| "?".into());
    let behaviour = opts
        .behaviour_from
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("behaviour")).ok())
        .map(|b| b.trim().to_string())
        .unwrap_or_default();
    // Space-separated words, e.g. "slow-start never-ready".
    let does = |word: &str| behaviour.split_whitespace().any(|w| w == word);
    if does("exit") {
        return Err(io::Error::other(
            "this release exits at start (behaviour = exit)",
        ));
    }
    let release = opts
        .behaviour_from
        .as_ref()
        .and_then(|d| d.file_name())
        .map(|n| format!(", release {}", n.to_string_lossy()))
        .unwrap_or_default();
    // The listener served (the first passed), and the last one passed if there are more.
    let (listener, last) = match opts.bind {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("failed to bind {addr}: {e}")))?;
            println!("demo worker {id} of generation {generation}: bound {addr}");
            (l, None)
        }
        None => {
            let mut fds = crate::sys::activation::listen_fds()?.into_iter();
            let (_, fd) = fds.next().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no listener passed in LISTEN_FDS")
            })?;
            (TcpListener::from(fd), fds.last().map(|(_, fd)| fd))
        }
    };
    // Several processes (and generations) may accept from this socket: never block in
    // accept after another one took the connection.
    listener.set_nonblocking(true)?;
    let stop = crate::sys::signals::SigSet::of(&[libc::SIGTERM, libc::SIGINT]);
    crate::sys::signals::block(&stop)?;
    let sigfd = crate::sys::signals::signalfd(&stop)?;
    let wait_for_stop = |limit: Option<Duration>| -> io::Result<bool> {
        let mut fds = [rustix::event::PollFd::new(
            &sigfd,
            rustix::event::PollFlags::IN,
        )];
        let timeout = limit
            .map(|d| rustix::event::Timespec::try_from(d).map_err(io::Error::other))
            .transpose()?;
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    if does("never-accepts") {
        println!("demo worker {id} of generation {generation}: never accepting");
        while !wait_for_stop(None)? {}
        return Ok(());
    }
    if does("slow-start") && wait_for_stop(Some(Duration::from_millis(1500)))? {
        return Ok(());
    }
    // Before it reports ready: a deploy that sees it ready sees the listener shut down.
    if does("shut-listener") {
        let shut = last.as_ref().map_or(listener.as_fd(), |fd| fd.as_fd());
        match rustix::net::shutdown(shut, rustix::net::Shutdown::Both) {
            Ok(()) => {
                println!("demo worker {id} of generation {generation}: shut its listener down")
            }
            // Another worker of the generation shut it first.
            Err(e) => {
                println!("demo worker {id} of generation {generation}: listener not shut down: {e}")
            }
        }
    }
    if !does("never-ready") {
        if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
            // As `sd_notify` callers do, serve on when it cannot be reached (in a sandbox
            // root it is not: such sites use a `tcp` or `http` check).
            let sent = std::os::unix::net::UnixDatagram::unbound()
                .and_then(|sock| sock.send_to(b"READY=1", PathBuf::from(&path)));
            if let Err(e) = sent {
                println!(
                    "demo worker {id}: READY=1 not sent to {}: {e}",
                    Path::new(&path).display()
                );
            }
        }
    }
    let slow_stop = || {
        // Until told (the file `finish-stop` in the release), at most a minute.
        let told = opts.behaviour_from.as_ref().map(|d| d.join("finish-stop"));
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while told.as_ref().is_some_and(|f| !f.exists()) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("demo worker {id} of generation {generation}: stopped after a slow stop");
    };
    if does("shut-listener") {
        while !wait_for_stop(None)? {}
        if does("slow-stop") {
            slow_stop();
        }
        return Ok(());
    }
    let crash_at =
        does("crash-after-ready").then(|| std::time::Instant::now() + Duration::from_millis(300));
    if !does("quiet") {
        println!("demo worker {id} of generation {generation} serving");
    }
    let body = format!("hello from worker {id}, generation {generation}{release}\n");
    let status = if does("http-500") {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let mut handlers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let hang_file = opts
        .behaviour_from
        .as_ref()
        .filter(|_| does("hang-when-told"))
        .map(|d| d.join(format!("hang-{id}")));
    let go_file = opts
        .behaviour_from
        .as_ref()
        .filter(|_| does("wait-for-go"))
        .map(|d| d.join("go"));
    let shut_file = opts
        .behaviour_from
        .as_ref()
        .filter(|_| does("shut-when-told"))
        .map(|d| d.join("shut"));
    let log = does("log-requests").then(|| format!("demo worker {id} of generation {generation}"));
    // Once stuck, connections are held here, never answered.
    let mut stuck: Option<Vec<std::net::TcpStream>> = None;
    loop {
        if crash_at.is_some_and(|t| std::time::Instant::now() >= t) {
            return Err(io::Error::other(
                "this release crashes after becoming ready",
            ));
        }
        if shut_file
            .as_ref()
            .is_some_and(|f| std::fs::remove_file(f).is_ok())
        {
            rustix::net::shutdown(&listener, rustix::net::Shutdown::Both)?;
            println!("demo worker {id} of generation {generation}: shut its listener down");
        }
        let mut fds = [
            rustix::event::PollFd::new(&listener, PollFlags::IN | PollFlags::RDHUP),
            rustix::event::PollFd::new(&sigfd, PollFlags::IN),
        ];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if !fds[1].revents().is_empty() {
            println!("demo worker {id} of generation {generation}: stopping");
            break;
        }
        if fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP)
        {
            println!(
                "demo worker {id} of generation {generation}: its listener was shut down, accepting nothing more"
            );
            while !wait_for_stop(None)? {}
            break;
        }
        handlers.retain(|h| !h.is_finished());
        // Without the peer's address: std's `accept` refuses a unix socket's.
        let stream = match rustix::net::accept(&listener) {
            Ok(fd) => std::net::TcpStream::from(fd),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if stuck.is_none()
            && hang_file
                .as_ref()
                .is_some_and(|f| std::fs::remove_file(f).is_ok())
        {
            println!("demo worker {id} of generation {generation}: stuck, answering nothing");
            stuck = Some(Vec::new());
        }
        if let Some(held) = stuck.as_mut() {
            held.push(stream);
            continue;
        }
        if does("one-at-a-time") {
            if let Some(go) = &go_file {
                let until = std::time::Instant::now() + Duration::from_secs(120);
                while !go.exists() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // The next connection waits in the accept queue meanwhile.
            if opts.busy_reports {
                notify(b"BUSY=1");
            }
            serve(stream, status, &body, opts.delay, log.as_deref());
            if opts.busy_reports {
                notify(b"BUSY=0");
            }
            continue;
        }
        let body = body.clone();
        let delay = opts.delay;
        let log = log.clone();
        handlers.push(std::thread::spawn(move || {
            serve(stream, status, &body, delay, log.as_deref())
        }));
    }
    for h in handlers {
        let _ = h.join();
    }
    if does("slow-stop") {
        slow_stop();
    }
    Ok(())
}

/// Sends `state` to `NOTIFY_SOCKET`, if there is one (a failure changes nothing).
fn notify(state: &[u8]) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let _ = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|sock| sock.send_to(state, PathBuf::from(&path)));
    }
}

/// The demo zygote (`hatchery __demo-zygote [--load-ms N] [--load-mib M] [--ready-when
/// PATH] [--worker-alloc-mib K] [--worker-info] [--worker-try-write PATH]… [WORKER
/// ARGS…]`): simulates loading an application (waits N ms, allocates and touches M MiB
/// that its workers then share copy-on-write; with `--ready-when`, also waits, at most a
/// minute, for PATH to exist), then serves the zygote protocol on the link named by
/// `HATCHERY_ZYGOTE_FD` ([`crate::zygote::serve`]). Each worker it forks first prints the
/// cgroup it runs in (`/proc/self/cgroup`, read before anything else: where the agent put
/// it before its go); with `--worker-info`, what `__probe info` prints (its credentials,
/// capabilities, root, rlimits: the sandbox it inherited); for each `--worker-try-write`,
/// whether it can create that file (`ok`, or the error); then allocates and touches K MiB
/// of its own, then runs [`worker_main`] with the remaining arguments. Returns once the
/// agent closes the link.
pub fn zygote_main(args: &[String]) -> io::Result<()> {
    let mut load = Duration::ZERO;
    let mut mib: usize = 0;
    let mut worker_mib: usize = 0;
    let mut ready_when: Option<PathBuf> = None;
    let mut info = false;
    let mut try_write: Vec<PathBuf> = Vec::new();
    let mut rest = args;
    loop {
        match rest {
            [flag, tail @ ..] if flag == "--worker-info" => {
                info = true;
                rest = tail;
            }
            [flag, v, tail @ ..] if flag == "--worker-try-write" => {
                try_write.push(PathBuf::from(v));
                rest = tail;
            }
            [flag, v, tail @ ..] if flag == "--load-ms" => {
                let ms: u64 = v
                    .parse()
                    .map_err(|_| bad_input(format!("bad --load-ms {v:?}")))?;
                load = Duration::from_millis(ms);
                rest = tail;
            }
            [flag, v, tail @ ..] if flag == "--load-mib" => {
                mib = v
                    .parse()
                    .map_err(|_| bad_input(format!("bad --load-mib {v:?}")))?;
                rest = tail;
            }
            [flag, v, tail @ ..] if flag == "--worker-alloc-mib" => {
                worker_mib = v
                    .parse()
                    .map_err(|_| bad_input(format!("bad --worker-alloc-mib {v:?}")))?;
                rest = tail;
            }
            [flag, v, tail @ ..] if flag == "--ready-when" => {
                ready_when = Some(PathBuf::from(v));
                rest = tail;
            }
            _ => break,
        }
    }
    // Refuse bad worker options now rather than in every worker.
    WorkerOptions::parse(rest).map_err(bad_input)?;
    let link = crate::zygote::inherited_link()?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "not started as a zygote: HATCHERY_ZYGOTE_FD is not set",
        )
    })?;
    // The "application": loading takes time, and its memory is written once (every page
    // touched, so that it is really allocated), then only shared by the workers.
    std::thread::sleep(load);
    let mut heap = vec![0u8; mib * 1024 * 1024];
    for page in heap.chunks_mut(4096) {
        page[0] = 1;
    }
    let heap = std::hint::black_box(heap);
    if let Some(path) = &ready_when {
        println!("demo zygote: waiting for {} before READY", path.display());
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !path.exists() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!(
        "demo zygote: loaded {} MiB in {} ms",
        heap.len() / (1024 * 1024),
        load.as_millis()
    );
    crate::zygote::serve(link, |start| {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v2 = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("?");
        println!("demo worker {} forked into cgroup {v2}", start.slot);
        if info {
            println!("{}", crate::probe::info());
        }
        for path in &try_write {
            let result = std::fs::write(path, "written by a forked worker\n")
                .map_or_else(|e| e.to_string(), |()| "ok".to_string());
            println!(
                "demo worker {} writing {}: {result}",
                start.slot,
                path.display()
            );
        }
        let mut own = vec![0u8; worker_mib * 1024 * 1024];
        for page in own.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&own);
        match worker_main(rest) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("demo worker: {e}");
                1
            }
        }
    })
    .map_err(io::Error::other)
}

fn bad_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Answers every request on one connection (HTTP/1.1 keep-alive unless the client
/// says `connection: close`).
fn serve(
    mut stream: std::net::TcpStream,
    status: &str,
    body: &str,
    delay: Duration,
    log: Option<&str>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(p + 4);
            }
            if buf.len() > 16 * 1024 {
                break None;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(end) = end else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if let Some(who) = log {
            let line = head.lines().next().unwrap_or("");
            let agent = head
                .lines()
                .find_map(|l| l.strip_prefix("user-agent:"))
                .unwrap_or("")
                .trim();
            println!("{who}: {line} ({agent})");
        }
        buf.drain(..end);
        let close = head.contains("connection: close") || head.starts_with("get / http/1.0");
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if stream.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

//! `hatchery top` and the `watch` subscription behind it: the real agent, `top` on a
//! pseudo-terminal whose output feeds a terminal emulator (`vt100`), the screen asserted;
//! and `top` without a terminal. On both event loop backends.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hatchery::control::{Reply, Snapshot};

fn sleeper(name: &str, workers: u32) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000 # marker-top-{name}\"]\nworkers = {workers}\n"
    )
}

/// An agent with three sites of 1, 2 and 3 workers, all ready.
fn three_sites(reactor: &'static str) -> TestAgent {
    let (a, b, c) = (sleeper("alpha", 1), sleeper("beta", 2), sleeper("gamma", 3));
    let agent = TestAgent::start(
        &[("alpha", &a), ("beta", &b), ("gamma", &c)],
        Options {
            reactor,
            cgroups: true,
        },
    );
    for (site, n) in [("alpha", 1), ("beta", 2), ("gamma", 3)] {
        agent.wait_for(site, "ready workers", Duration::from_secs(20), |s| {
            s["ready"] == n
        });
    }
    agent
}

/// `hatchery top` on a pseudo-terminal of its own (its controlling terminal, so a size
/// change signals it), its output read into a terminal emulator by a thread.
struct Top {
    master: OwnedFd,
    slave_name: std::ffi::CString,
    child: Child,
    parser: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
    /// The thread reading the terminal: it ends once `top` has exited and everything it
    /// wrote was read.
    reader: Option<std::thread::JoinHandle<()>>,
}

fn winsize(rows: u16, cols: u16) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Top {
    fn start(agent: &TestAgent, rows: u16, cols: u16, args: &[&str]) -> Top {
        use rustix::pty::OpenptFlags;
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
                .expect("openpt");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        let slave_name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
        rustix::termios::tcsetwinsize(&master, winsize(rows, cols)).expect("winsize");
        let slave = rustix::fs::open(
            slave_name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("open slave");
        // A session of its own with the terminal as its controlling one (`setsid -c`),
        // as a shell would give it: TIOCSWINSZ then sends it SIGWINCH.
        let child = Command::new("setsid")
            .arg("--ctty")
            .arg(BIN)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("top")
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("spawn top");
        let parser = Arc::new(Mutex::new(vt100::Parser::new(rows, cols, 0)));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let reader = master.try_clone().expect("dup master");
        let (p, r) = (parser.clone(), raw.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            // Ends with EIO once every slave side is closed (top exited).
            while let Ok(n) = rustix::io::read(&reader, &mut buf) {
                if n == 0 {
                    break;
                }
                p.lock().expect("parser").process(&buf[..n]);
                r.lock().expect("raw").extend_from_slice(&buf[..n]);
            }
        });
        Top {
            master,
            slave_name,
            child,
            parser,
            raw,
            reader: Some(reader),
        }
    }

    /// The screen's rows, as text.
    fn rows(&self) -> Vec<String> {
        let p = self.parser.lock().expect("parser");
        let (_, cols) = p.screen().size();
        p.screen().rows(0, cols).collect()
    }

    /// Waits until `cond` holds on the screen's rows, or fails showing the screen.
    fn wait(&mut self, what: &str, cond: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.rows();
            if cond(&rows) {
                return rows;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("top exited ({st}) before {what}:\n{}", rows.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{}",
                rows.join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Types `keys`.
    fn keys(&self, keys: &str) {
        let mut data = keys.as_bytes();
        while !data.is_empty() {
            let n = rustix::io::write(&self.master, data).expect("write keys");
            data = &data[n..];
        }
    }

    /// Changes the terminal's size (the emulator's too).
    fn resize(&self, rows: u16, cols: u16) {
        self.parser.lock().expect("parser").set_size(rows, cols);
        rustix::termios::tcsetwinsize(&self.master, winsize(rows, cols)).expect("winsize");
    }
}

impl Top {
    /// Waits for `top` to exit, reads what it wrote to the end, and asserts that the
    /// terminal is as it was: the main screen (after the last switch to the alternate
    /// one), the cursor shown, cooked mode with echo. Returns its exit status.
    fn assert_restored(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait for top");
        // What it wrote last may still be in the terminal's buffer: read to the end.
        self.reader
            .take()
            .expect("the reader")
            .join()
            .expect("join the reader");
        let raw = self.raw.lock().expect("raw").clone();
        let text = String::from_utf8_lossy(&raw);
        let entered = text
            .rfind("\x1b[?1049h")
            .expect("the alternate screen was taken");
        assert!(
            text[entered..].contains("\x1b[?1049l"),
            "no return to the main screen"
        );
        assert!(
            text[entered..].contains("\x1b[?25h"),
            "the cursor is hidden"
        );
        let slave = rustix::fs::open(
            self.slave_name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
            rustix::fs::Mode::empty(),
        )
        .expect("open slave");
        let modes = rustix::termios::tcgetattr(&slave).expect("tcgetattr");
        use rustix::termios::LocalModes;
        assert!(
            modes
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO),
            "the terminal is left raw: {:?}",
            modes.local_modes
        );
        status
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `HATCHERY_TOP_CAPTURE=DIR`, writes the screen to `DIR/<name>.txt` (the README's
/// capture comes from there).
fn capture(name: &str, rows: &[String]) {
    if let Some(dir) = std::env::var_os("HATCHERY_TOP_CAPTURE") {
        let text: Vec<&str> = rows.iter().map(|r| r.trim_end()).collect();
        let path = std::path::Path::new(&dir).join(format!("{name}.txt"));
        std::fs::write(path, text.join("\n") + "\n").expect("write the capture");
    }
}

/// The README's capture of the overview has the columns and the keys `top` draws.
fn readme_capture_is_true(rows: &[String]) {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let block: Vec<&str> = readme
        .split("<!-- top: overview -->")
        .nth(1)
        .and_then(|rest| rest.split("```text\n").nth(1))
        .and_then(|b| b.split("\n```").next())
        .expect("a capture of top in README.md after <!-- top: overview -->")
        .lines()
        .collect();
    let heading = |lines: &[&str]| {
        lines
            .iter()
            .find(|l| l.trim_start().starts_with("SITE"))
            .map(|l| l.trim_end().to_string())
    };
    let screen: Vec<&str> = rows.iter().map(String::as_str).collect();
    assert_eq!(heading(&block), heading(&screen), "README's columns");
    assert_eq!(
        block.last().map(|l| l.trim_end()),
        rows.last().map(|l| l.trim_end()),
        "README's keys"
    );
}

/// The row of the screen that starts with `site` (after the selection marker, if any).
fn row_of(rows: &[String], site: &str) -> Option<usize> {
    rows.iter()
        .position(|r| r.trim_start().starts_with(&format!("{site} ")))
}

#[test]
fn top_shows_sorts_opens_a_site_restarts_it_and_follows_a_resize() {
    for reactor in REACTORS {
        let agent = three_sites(reactor);
        let mut top = Top::start(&agent, 24, 120, &["--delay", "0.2"]);

        // The overview: every site, by name.
        let rows = top.wait("the three sites", |r| {
            row_of(r, "alpha").is_some()
                && row_of(r, "beta").is_some()
                && row_of(r, "gamma").is_some()
        });
        let order = |rows: &[String]| {
            let mut v: Vec<(usize, &str)> = ["alpha", "beta", "gamma"]
                .iter()
                .map(|s| (row_of(rows, s).expect("a row"), *s))
                .collect();
            v.sort();
            v.into_iter().map(|(_, s)| s).collect::<Vec<_>>().join(",")
        };
        assert_eq!(order(&rows), "alpha,beta,gamma", "{}", rows.join("\n"));
        let gamma = &rows[row_of(&rows, "gamma").expect("gamma")];
        assert!(
            gamma.contains("3/3") && gamma.contains("running"),
            "{gamma}"
        );
        assert!(
            rows[0].contains(&format!("pid {}", agent.pid())),
            "{}",
            rows[0]
        );
        capture("overview", &rows);
        readme_capture_is_true(&rows);

        // `s`: sorted by READY, most first.
        top.keys("s");
        let rows = top.wait("sorted by ready workers", |r| {
            r.iter().any(|l| l.contains("READY*"))
        });
        assert_eq!(order(&rows), "gamma,beta,alpha", "{}", rows.join("\n"));
        // `S`: the other way round.
        top.keys("S");
        let rows = top.wait("the order reversed", |r| {
            r[0].contains("▲") && row_of(r, "alpha") < row_of(r, "gamma")
        });
        assert_eq!(order(&rows), "alpha,beta,gamma", "{}", rows.join("\n"));

        // `/` filters; Enter opens the site's view with its workers.
        top.keys("/bet\r");
        top.wait("only beta", |r| {
            row_of(r, "beta").is_some() && row_of(r, "alpha").is_none()
        });
        top.keys("\r");
        let before = agent.pids("beta");
        assert_eq!(before.len(), 2);
        let rows = top.wait("beta's workers", |r| {
            r[0].contains("site beta")
                && before
                    .iter()
                    .all(|p| r.iter().any(|l| l.contains(&p.to_string())))
        });
        assert!(
            rows.iter()
                .any(|l| l.contains("gen-1") && l.contains("serving")),
            "{}",
            rows.join("\n")
        );
        assert!(
            rows.iter().any(|l| l.trim_start().starts_with("w-1")),
            "{}",
            rows.join("\n")
        );
        capture("site", &rows);

        // `r` asks first; `y` restarts; the agent's answer is shown.
        top.keys("r");
        top.wait("the question", |r| {
            r.iter()
                .any(|l| l.contains("Restart every worker of beta? (y/n)"))
        });
        top.keys("y");
        top.wait("the agent's answer", |r| {
            r.iter().any(|l| l.contains("beta: restart done"))
        });
        let after = agent.pids("beta");
        assert_eq!(after.len(), 2);
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "every worker has a new process: {before:?} then {after:?}"
        );
        top.wait("the new pids on the screen", |r| {
            after
                .iter()
                .all(|p| r.iter().any(|l| l.contains(&p.to_string())))
        });

        // A larger terminal: the screen is drawn again to its new size.
        top.resize(40, 140);
        top.wait("the keys on the new last row", |r| {
            r.len() == 40 && r[39].contains("q quit")
        });
        // Esc goes back to every site.
        top.keys("\x1b");
        top.wait("the overview again", |r| {
            r[0].contains("sites") && row_of(r, "beta").is_some()
        });

        // `q` quits, and the terminal is as it was: the main screen, cooked mode.
        top.keys("q");
        let status = top.assert_restored();
        assert!(status.success(), "{status}");
    }
}

#[test]
fn top_without_a_terminal_prints_one_snapshot() {
    let agent = three_sites("io_uring");
    let out = agent.cli(&["top"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[1].starts_with("SITE") && lines[1].contains("LAST EVENT"),
        "{text}"
    );
    for (i, (site, ready)) in [("alpha", "1/1"), ("beta", "2/2"), ("gamma", "3/3")]
        .iter()
        .enumerate()
    {
        let line = lines[2 + i];
        assert!(line.starts_with(site) && line.contains(ready), "{text}");
    }
    // One site: its workers too, with their pids.
    let out = agent.cli(&["top", "gamma"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for pid in agent.pids("gamma") {
        assert!(text.contains(&pid.to_string()), "{text}");
    }
    // --json: the snapshot; the overview without workers, summed up per site.
    let out = agent.cli(&["top", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: Snapshot = serde_json::from_slice(&out.stdout).expect("a snapshot");
    assert_eq!(snap.status.sites.len(), 3);
    assert!(snap.status.sites.iter().all(|s| s.workers.is_empty()));
    let gamma = snap
        .summaries
        .iter()
        .find(|s| s.site == "gamma")
        .expect("gamma");
    assert_eq!((gamma.workers, gamma.live), (3, 3));
    // An agent that is not there: exit 3.
    let out = Command::new(BIN)
        .args(["--socket", "/nonexistent/control.sock", "top"])
        .output()
        .expect("run top");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn watch_pushes_snapshots_on_its_interval_until_the_client_hangs_up() {
    for reactor in REACTORS {
        let agent = three_sites(reactor);
        let conn = UnixStream::connect(&agent.socket).expect("connect");
        let mut reader = BufReader::new(conn.try_clone().expect("dup"));
        // An interval below the bound gets the bound.
        (&conn)
            .write_all(b"{\"cmd\":\"watch\",\"site\":\"beta\",\"interval_ms\":1}\n")
            .expect("send");
        let mut next = || {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            match serde_json::from_str::<Reply>(&line).expect("a reply") {
                Reply::Snapshot(s) => (Instant::now(), *s),
                other => panic!("not a snapshot: {other:?}"),
            }
        };
        let (_, first) = next();
        assert_eq!(first.interval_ms, 200);
        assert_eq!(first.status.sites.len(), 1);
        assert_eq!(
            first.status.sites[0].workers.len(),
            2,
            "beta with its workers"
        );
        let (t1, second) = next();
        let (t2, third) = next();
        assert!(
            second.monotonic_ms >= first.monotonic_ms + 190,
            "{first:?} {second:?}"
        );
        assert!(third.monotonic_ms >= second.monotonic_ms + 190);
        // Pushed on the interval (above, by the agent's clock), and not held back.
        assert!(t2 - t1 < Duration::from_secs(2), "{:?}", t2 - t1);
        // A site the agent does not have is refused as by `status`.
        let mut other = UnixStream::connect(&agent.socket).expect("connect");
        other
            .write_all(b"{\"cmd\":\"watch\",\"site\":\"nope\"}\n")
            .expect("send");
        let mut line = String::new();
        BufReader::new(&other).read_line(&mut line).expect("read");
        assert!(line.contains("no such site: nope"), "{line}");
        // Hanging up ends it; the agent goes on answering.
        drop(reader);
        drop(conn);
        let out = agent.cli(&["status", "--json"]);
        assert!(out.status.success());
        assert!(
            !agent.agent_log().contains("is not reading"),
            "{}",
            agent.agent_log()
        );
    }
}

#[test]
fn top_gives_the_terminal_back_on_sigterm_and_sighup() {
    let agent = three_sites(REACTORS[0]);
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let mut top = Top::start(&agent, 24, 120, &["--delay", "0.2"]);
        // Drawn: the terminal is raw and on the alternate screen now.
        top.wait("the three sites", |r| {
            row_of(r, "alpha").is_some() && row_of(r, "gamma").is_some()
        });
        let pid = rustix::process::Pid::from_raw(i32::try_from(top.child.id()).expect("a pid"))
            .expect("pid");
        let sig = rustix::process::Signal::from_named_raw(signal).expect("signal");
        rustix::process::kill_process(pid, sig).expect("signal top");
        let status = top.assert_restored();
        assert_eq!(
            status.code(),
            Some(128 + signal),
            "exits as a shell reports signal {signal}: {status}"
        );
    }
}

/// A site with a `release` symlink (so a rollback has a release to go back to): each
/// worker says its generation on stdout and on stderr.
fn release_site(link: &std::path::Path) -> String {
    format!(
        "name = \"rel\"\ncommand = [\"/bin/sh\", \"-c\", \"echo out-of-gen-$HATCHERY_GENERATION; echo err-of-gen-$HATCHERY_GENERATION >&2; exec sleep 1000 # marker-top-rel\"]\nworkers = 1\nrelease = \"{}\"\n[deploy]\nprobation = \"300ms\"\n",
        link.display()
    )
}

#[test]
fn top_scales_deploys_rolls_back_and_shows_the_logs_on_a_terminal() {
    for reactor in REACTORS {
        let root = root_owned_tempdir();
        let (r1, r2) = (root.path().join("r1"), root.path().join("r2"));
        for r in [&r1, &r2] {
            std::fs::create_dir_all(r).expect("mkdir release");
        }
        let link = root.path().join("current");
        std::os::unix::fs::symlink(&r1, &link).expect("symlink");
        let agent = TestAgent::start_ready(
            &[("rel", &release_site(&link))],
            Options {
                reactor,
                cgroups: true,
            },
            "rel",
            1,
        );
        let mut top = Top::start(&agent, 36, 140, &["--delay", "0.2", "rel"]);
        top.wait("the site's view", |r| r[0].contains("site rel"));
        let message_has = |r: &[String], text: &str| r.iter().any(|l| l.contains(text));

        // `n`: the number asked for, then the question; `n` declines, nothing changes.
        top.keys("n");
        top.wait("the number asked for", |r| {
            message_has(r, "workers for rel")
        });
        top.keys("3\r");
        top.wait("the question", |r| {
            message_has(r, "Scale rel to 3 workers? (y/n)")
        });
        top.keys("n");
        top.wait("declined", |r| message_has(r, "scale rel: not done"));
        assert_eq!(agent.status("rel")["desired"], 1, "declined: not scaled");
        // Asked again and confirmed: the agent scales, its answer is shown.
        top.keys("n3\r");
        top.wait("the question again", |r| {
            message_has(r, "Scale rel to 3 workers? (y/n)")
        });
        top.keys("y");
        top.wait("the agent's answer", |r| {
            message_has(r, "rel: all workers ready")
        });
        let s = agent.status("rel");
        assert_eq!(
            (s["desired"].clone(), s["ready"].clone()),
            (3.into(), 3.into()),
            "{s:#}"
        );
        let pids = agent.pids("rel");
        top.wait("the three workers", |r| {
            pids.iter()
                .all(|p| r.iter().any(|l| l.contains(&p.to_string())))
        });

        // `d`: a new generation of the release the link points to now; the deploy's
        // progress is shown while it runs, then the agent's answer.
        std::fs::remove_file(&link).expect("rm link");
        std::os::unix::fs::symlink(&r2, &link).expect("symlink");
        top.keys("d");
        top.wait("the question", |r| {
            message_has(r, "Deploy a new generation of rel? (y/n)")
        });
        top.keys("y");
        top.wait("the deploy's progress", |r| {
            message_has(r, "deploy rel: gen-2")
        });
        top.wait("the deploy's answer", |r| {
            message_has(r, "rel: gen-2 serves; gen-1 retired")
        });
        let s = agent.status("rel");
        assert_eq!(s["generation"], 2, "{s:#}");
        assert!(
            s["release"].as_str().is_some_and(|r| r.ends_with("r2")),
            "{s:#}"
        );

        // `b`: back to the release gen-2 replaced, as a new generation.
        top.keys("b");
        top.wait("the question", |r| message_has(r, "Roll rel back? (y/n)"));
        top.keys("y");
        top.wait("the rollback's answer", |r| {
            message_has(r, "rel: gen-3 serves; gen-2 retired")
        });
        let s = agent.status("rel");
        assert_eq!(s["generation"], 3, "{s:#}");
        assert!(
            s["release"].as_str().is_some_and(|r| r.ends_with("r1")),
            "{s:#}"
        );

        // `l`: the site's log in a pane, a worker's lines of each stream among them, its
        // stderr line marked and named by the worker's slot and its own pid. Which workers'
        // lines the pane's last rows hold depends on the order their lines came in.
        let gen3: Vec<String> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| w["generation"] == 3)
            .map(|w| format!(" w-{}[{}]! err-of-gen-3", w["id"], w["pid"]))
            .collect();
        assert_eq!(gen3.len(), 3, "{s:#}");
        top.keys("l");
        top.wait(
            "the logs pane with a gen-3 worker's lines of each stream",
            |r| {
                message_has(r, "log of rel")
                    && r.iter().any(|l| l.contains("] out-of-gen-3"))
                    && r.iter().any(|l| gen3.iter().any(|m| l.contains(m)))
            },
        );
        // Closed again with `l`.
        top.keys("l");
        top.wait("the pane closed", |r| !message_has(r, "log of rel"));
        top.keys("q");
        let status = top.assert_restored();
        assert!(status.success(), "{status}");
    }
}

//! `hatchery --host ssh://...`: client commands run on another host through ssh.
//!
//! Most tests run no sshd: `ssh` is a test double (a script named `ssh`, first on the `PATH`)
//! that records its arguments and runs the remote command line with `/bin/sh -c`, as the
//! remote user's shell would, with `hatchery` on its `PATH` and `HATCHERY_SOCKET` naming
//! the test agent's socket (the local CLI is given a socket that does not exist, so only
//! the way through the double reaches the agent). A destination containing `unreachable`
//! fails as ssh does when it cannot connect: a message and exit 255. One test runs a real
//! sshd on a loopback port and the real ssh client against it.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A directory holding the `ssh` double and the "remote" `hatchery`.
struct Double {
    dir: tempfile::TempDir,
}

impl Double {
    /// An `ssh` double whose remote commands talk to the agent at `socket`.
    fn new(socket: &Path) -> Double {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("remote-bin");
        std::fs::create_dir(&bin).expect("mkdir");
        std::os::unix::fs::symlink(BIN, bin.join("hatchery")).expect("symlink hatchery");
        let script = format!(
            r#"#!/bin/sh
# A test double of ssh: records its arguments, then runs the remote command here.
printf '%s\0' "$@" > '{dir}/args'
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -p) shift 2 ;;
    *) shift ;;
  esac
done
dest=$1
shift
case "$dest" in
  *unreachable*)
    echo "ssh: connect to host $dest port 22: Connection refused" >&2
    exit 255 ;;
esac
if [ -n "$HATCHERY_HOST" ]; then
  echo "the local HATCHERY_HOST reached the remote command" >&2
  exit 99
fi
HATCHERY_SOCKET='{socket}' PATH='{bin}':$PATH exec /bin/sh -c "$*"
"#,
            dir = dir.path().display(),
            socket = socket.display(),
            bin = bin.display(),
        );
        let ssh = dir.path().join("ssh");
        std::fs::write(&ssh, script).expect("write the ssh double");
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Double { dir }
    }

    /// The CLI, with the double first on the `PATH` and a local socket that does not exist.
    fn cli(&self) -> Command {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.dir.path().to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        let mut c = Command::new(BIN);
        c.env("PATH", std::env::join_paths(paths).expect("PATH"))
            .env("HATCHERY_SOCKET", "/nonexistent/control.sock")
            .env_remove("HATCHERY_HOST")
            .env_remove("HATCHERY_SSH")
            .stdin(Stdio::null());
        c
    }

    /// `hatchery --host HOST ARGS...` through the double.
    fn run(&self, host: &str, args: &[&str]) -> Output {
        self.cli()
            .arg("--host")
            .arg(host)
            .args(args)
            .output()
            .expect("run the cli")
    }

    /// The arguments ssh was last given.
    fn ssh_args(&self) -> Vec<String> {
        let raw = std::fs::read(self.dir.path().join("args")).expect("ssh was run");
        raw.strip_suffix(b"\0")
            .unwrap_or(&raw)
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

/// A site whose workers say hello and keep running.
fn site(name: &str, workers: u32) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hello $HATCHERY_WORKER_ID; while :; do sleep 0.2; done\"]\nworkers = {workers}\n"
    )
}

fn agent() -> TestAgent {
    TestAgent::start_ready(
        &[("blog", &site("blog", 2))],
        Options {
            reactor: REACTORS[0],
            cgroups: false,
        },
        "blog",
        2,
    )
}

#[test]
fn status_scale_and_logs_run_on_the_remote_agent_through_ssh() {
    let agent = agent();
    let ssh = Double::new(&agent.socket);

    // Without --host the local CLI finds no agent: what follows went through ssh.
    let out = ssh.cli().args(["status", "blog"]).output().expect("cli");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    let out = ssh.run("ssh://deploy@web1:2222", &["status", "blog", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: hatchery::status::Status =
        serde_json::from_slice(&out.stdout).expect("status --json through ssh");
    assert_eq!(status.sites.len(), 1);
    assert_eq!(
        ssh.ssh_args(),
        [
            "-p",
            "2222",
            "-n",
            "--",
            "deploy@web1",
            "hatchery status blog --json"
        ]
    );

    // Text for people, as on the host itself.
    let out = ssh.run("ssh://web1", &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("blog"), "{}", stdout(&out));
    assert_eq!(ssh.ssh_args()[..3], ["-n", "--", "web1"]);

    // `scale` waits for its workers, remotely too, and its progress comes back on stderr.
    let out = ssh.run("ssh://web1", &["scale", "blog", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = agent.status("blog");
    assert_eq!(s["ready"], 3, "{s:#}");

    let out = ssh.run("ssh://web1", &["logs", "blog", "-n", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("hello"), "{}", stdout(&out));

    // `top` without a terminal: one snapshot, and no terminal asked of ssh.
    let out = ssh.run("ssh://web1", &["top", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).expect("top --json");
    assert!(snapshot.is_object(), "{snapshot}");
    assert!(!ssh.ssh_args().contains(&"-t".to_string()));

    // HATCHERY_HOST instead of --host (and it is not passed on: the double refuses it).
    let out = ssh
        .cli()
        .env("HATCHERY_HOST", "ssh://web2")
        .args(["status", "blog", "--json"])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ssh.ssh_args()[..3], ["-n", "--", "web2"]);
    // ... and is left alone by the commands that run here.
    let out = ssh
        .cli()
        .env("HATCHERY_HOST", "ssh://web2")
        .args(["completions", "bash"])
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", stderr(&out));
    // A wrong HATCHERY_HOST is a usage error that names it.
    let out = ssh
        .cli()
        .env("HATCHERY_HOST", "web2")
        .args(["status"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HATCHERY_HOST=\"web2\": expected ssh://[USER@]HOST[:PORT]"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn arguments_reach_the_remote_command_exactly_and_exit_codes_come_back() {
    let agent = agent();
    let ssh = Double::new(&agent.socket);
    let tricky = [
        "it's a \"site\"",
        "$HOME `id` $(id) ; & | > * ? ~ # ! \\",
        "",
        "two\nlines",
        "--host",
    ];

    // `exec` prints its arguments back, one per NUL: each arrives as it was given.
    let out = ssh
        .cli()
        .args([
            "--host",
            "ssh://web1",
            "exec",
            "blog",
            "--",
            "printf",
            "%s\\0",
        ])
        .args(tricky)
        .output()
        .expect("exec through ssh");
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = out.stdout.strip_suffix(b"\0").expect("NUL-terminated");
    let back: Vec<OsString> = printed
        .split(|b| *b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    assert_eq!(back, tricky.map(OsString::from));
    // Without a terminal on stdin, none is asked for; stdin is passed (no `-n`).
    let args = ssh.ssh_args();
    assert!(!args.contains(&"-t".to_string()) && !args.contains(&"-n".to_string()));

    // A site name with spaces and quotes comes back in the agent's refusal, exactly.
    let name = "my \"odd\" site's name";
    let out = ssh.run("ssh://web1", &["status", name]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(name), "{}", stderr(&out));

    // Exit codes: the command's own through exec (127 too), the CLI's usage error (2).
    let out = ssh.run(
        "ssh://web1",
        &["exec", "blog", "--", "/bin/sh", "-c", "exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = ssh.run(
        "ssh://web1",
        &["exec", "blog", "--", "/bin/sh", "-c", "exit 127"],
    );
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    let out = ssh.run("ssh://web1", &["scale", "blog", "many"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // stdin reaches `exec`'s command.
    let mut child = ssh
        .cli()
        .args(["--host", "ssh://web1", "exec", "blog", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec cat");
    {
        use std::io::Write as _;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(b"through ssh\n").expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(stdout(&out), "through ssh\n");
    wait_until(
        "the site to keep its workers",
        Duration::from_secs(5),
        || agent.status("blog")["ready"] == 2,
    );
}

#[test]
fn an_unreachable_host_is_exit_3_with_a_message() {
    // No agent is needed: ssh fails before any command runs.
    let ssh = Double::new(Path::new("/nonexistent/control.sock"));
    let out = ssh.run("ssh://deploy@unreachable", &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ssh: connect to host deploy@unreachable port 22: Connection refused"),
        "ssh's own message is passed on: {err}"
    );
    assert!(
        err.contains("hatchery: cannot reach ssh://deploy@unreachable through ssh"),
        "{err}"
    );
    // With --json, the error is a JSON document on stdout too.
    let out = ssh.run("ssh://unreachable", &["deploy", "blog", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON error");
    assert_eq!(doc["error"]["kind"], "unreachable", "{doc}");
    // A host without `hatchery` (its shell exits 127), and an ssh that cannot be run.
    std::fs::remove_file(ssh.dir.path().join("remote-bin/hatchery")).expect("rm");
    let out = ssh.run("ssh://web1", &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ssh://web1 has no `hatchery` on the PATH of its ssh sessions"),
        "{}",
        stderr(&out)
    );
    let out = ssh
        .cli()
        .env("HATCHERY_SSH", "/nonexistent/ssh")
        .args(["--host", "ssh://web1", "status"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot run /nonexistent/ssh to reach ssh://web1"),
        "{}",
        stderr(&out)
    );
    // HATCHERY_SSH names the program to run instead of ssh from the PATH.
    let out = Command::new(BIN)
        .env("HATCHERY_SSH", ssh.dir.path().join("ssh"))
        .args(["--host", "ssh://unreachable", "status"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Connection refused"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn host_is_refused_for_the_commands_that_run_here() {
    let ssh = Double::new(Path::new("/nonexistent/control.sock"));
    for (args, name) in [
        (&["agent"][..], "agent"),
        (&["demo"], "demo"),
        (&["completions", "bash"], "completions"),
    ] {
        let out = ssh.run("ssh://web1", args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("--host is not an option of `hatchery {name}`")),
            "{}",
            stderr(&out)
        );
        assert!(
            !ssh.dir.path().join("args").exists(),
            "ssh was run for {name}"
        );
    }
    let out = ssh.run("web1", &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("expected ssh://[USER@]HOST[:PORT]"),
        "{}",
        stderr(&out)
    );
}

/// The README's examples of `--host` (its "Many hosts" section), run through the double.
#[test]
fn the_readmes_examples_run_through_ssh() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let block = readme
        .split("### `--host`")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the README's --host examples");
    let agent = agent();
    let ssh = Double::new(&agent.socket);
    let mut ran = 0;
    for line in block.lines() {
        let mut words = line.split_whitespace().peekable();
        let mut cmd = ssh.cli();
        // `NAME=VALUE` before the program: its environment.
        while let Some((k, v)) = words.peek().and_then(|w| w.split_once('=')) {
            cmd.env(k, v);
            words.next();
        }
        assert_eq!(words.next(), Some("hatchery"), "{line}");
        let out = cmd.args(words).output().expect("run the example");
        assert!(out.status.success(), "{line}: {}", stderr(&out));
        assert!(!out.stdout.is_empty(), "{line}: no output");
        ran += 1;
    }
    assert_eq!(ran, 4, "{block}");
    assert_eq!(agent.status("blog")["ready"], 3);
}

/// The real ssh client takes the arguments as given (port, `-n`, `--`, destination,
/// command): against a loopback port nobody listens on it fails as ssh does, and the CLI
/// says the host is unreachable.
#[test]
fn a_real_ssh_client_that_cannot_connect_is_exit_3() {
    let has_ssh = Command::new("ssh")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_ssh && skip("no ssh client on the PATH") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let out = Command::new(BIN)
        .env_remove("HATCHERY_SSH")
        .args([
            "--host",
            &format!("ssh://nobody@127.0.0.1:{port}"),
            "status",
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("port {port}: Connection refused")),
        "{}",
        stderr(&out)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON error");
    assert_eq!(doc["error"]["kind"], "unreachable", "{doc}");
}

/// A real sshd on a loopback port (started by the test, as root, with its own host key and
/// an authorized key made here) and the real ssh client: `status`, `scale` and `logs` reach
/// the agent through an actual SSH session, and a key the server does not know is exit 3.
#[test]
fn a_real_sshd_runs_the_commands_on_its_host() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = Path::new("/usr/sbin/sshd");
    let has_tools = sshd.exists()
        && Command::new("ssh-keygen").arg("-?").output().is_ok()
        && Command::new("ssh").arg("-V").output().is_ok();
    if !has_tools && skip("no sshd, ssh or ssh-keygen here (openssh-server, openssh-client)") {
        return;
    }
    if !is_root() && skip("sshd needs root to log a user in") {
        return;
    }
    let agent = agent();
    let dir = root_owned_tempdir();
    let d = dir.path();
    let keygen = |file: &str| {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(file))
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "{}", stderr(&out));
    };
    keygen("host_key");
    keygen("client_key");
    keygen("stranger_key");
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorize");
    // sshd needs its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
    let bin = d.join("remote-bin");
    std::fs::create_dir(&bin).expect("mkdir");
    std::os::unix::fs::symlink(BIN, bin.join("hatchery")).expect("symlink hatchery");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile none\n\
             SetEnv PATH={bin}:/usr/local/bin:/usr/bin:/bin HATCHERY_SOCKET={socket}\n",
            d = d.display(),
            bin = bin.display(),
            socket = agent.socket.display(),
        ),
    )
    .expect("sshd_config");
    let server = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("sshd.log")).expect("log"))
        .spawn()
        .expect("start sshd");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server_id = server.id();
    let mut server_guard = Kill(server);
    // Listening once a connection is accepted (sshd binds before it forks nothing else).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = server_guard.0.try_wait() {
            panic!(
                "sshd {server_id} exited ({st}): {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
        }
        assert!(std::time::Instant::now() < deadline, "sshd never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client: real ssh, with this test's key and no known_hosts of its own.
    let wrapper = |name: &str, key: &str| {
        let path = d.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec ssh -i {d}/{key} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \"$@\"\n",
                d = d.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    };
    let ssh = wrapper("ssh-client", "client_key");
    let host = format!("ssh://root@127.0.0.1:{port}");
    let run = |ssh: &Path, args: &[&str]| {
        Command::new(BIN)
            .env("HATCHERY_SSH", ssh)
            .env("HATCHERY_SOCKET", "/nonexistent/control.sock")
            .env_remove("HATCHERY_HOST")
            .arg("--host")
            .arg(&host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the cli")
    };
    let out = run(&ssh, &["status", "blog", "--json"]);
    assert!(
        out.status.success(),
        "{}\nsshd: {}",
        stderr(&out),
        std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["sites"][0]["ready"], 2, "{status}");
    let here: serde_json::Value =
        serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).expect("status JSON");
    assert_eq!(
        status["agent"]["pid"], here["agent"]["pid"],
        "the remote agent is the test's"
    );
    let out = run(&ssh, &["scale", "blog", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.status("blog")["ready"], 3);
    let out = run(&ssh, &["logs", "blog", "-n", "50"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("hello 2"), "{}", stdout(&out));
    // A key the server does not know: ssh's refusal is exit 3.
    let stranger = wrapper("ssh-stranger", "stranger_key");
    let out = run(&stranger, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}

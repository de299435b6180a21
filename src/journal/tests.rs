use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;

use super::*;

/// One entry's fields by name.
fn parse(data: &[u8]) -> BTreeMap<String, String> {
    super::parse(data)
        .expect("a well-formed entry")
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v).expect("utf-8 value")))
        .collect()
}

/// A journal socket in a temporary directory, and a layer that sends to it.
fn journal() -> (tempfile::TempDir, UnixDatagram, Journal) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("socket");
    let server = UnixDatagram::bind(&path).expect("bind");
    let journal = Journal::connect(path).expect("connect");
    // The empty entry that checked the socket.
    let mut buf = [0u8; 16];
    assert_eq!(server.recv(&mut buf).expect("recv"), 0);
    (dir, server, journal)
}

#[test]
fn a_line_becomes_an_entry_with_its_fields_named_for_the_journal() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let (_dir, server, journal) = journal();
    let subscriber = tracing_subscriber::registry().with(journal);
    tracing::subscriber::with_default(subscriber, || {
        tracing::warn!(site = %"blog", worker = 3, pid = 4242_i32, "worker exited: killed by SIGKILL");
        tracing::error!(site = %"blog", "two\nlines");
    });
    let mut buf = vec![0u8; 65536];
    let n = server.recv(&mut buf).expect("first entry");
    let first = parse(&buf[..n]);
    assert_eq!(first["MESSAGE"], "worker exited: killed by SIGKILL");
    assert_eq!(first["PRIORITY"], "4");
    assert_eq!(first["SYSLOG_IDENTIFIER"], "hatchery");
    assert_eq!(first["HATCHERY_SITE"], "blog");
    assert_eq!(first["HATCHERY_WORKER"], "3");
    assert_eq!(first["HATCHERY_PID"], "4242");
    let n = server.recv(&mut buf).expect("second entry");
    let second = parse(&buf[..n]);
    assert_eq!(
        second["MESSAGE"], "two\nlines",
        "a value with a newline, length-encoded"
    );
    assert_eq!(second["PRIORITY"], "3");
    assert!(!second.contains_key("HATCHERY_WORKER"), "{second:?}");
}

#[test]
fn a_journal_that_does_not_read_never_blocks_the_agent() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let (_dir, _server, journal) = journal();
    let subscriber = tracing_subscriber::registry().with(journal);
    let before = AGENT_LOG_DROPPED.load(Ordering::Relaxed);
    // Far more than a datagram queue holds (`net.unix.max_dgram_qlen`, 10 by default);
    // nobody reads them. A blocking send would hang here.
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..2000 {
            tracing::info!(site = %"blog", "line {i}");
        }
    });
    assert!(
        AGENT_LOG_DROPPED.load(Ordering::Relaxed) > before,
        "the entries the journal could not take are counted as dropped"
    );
}

#[test]
fn stderr_is_the_journal_only_when_journal_stream_names_it() {
    let st = rustix::fs::fstat(rustix::stdio::stderr()).expect("fstat stderr");
    assert!(stderr_is(&format!("{}:{}", st.st_dev, st.st_ino)));
    assert!(!stderr_is(&format!("{}:{}", st.st_dev, st.st_ino + 1)));
    assert!(!stderr_is("garbage"));
}

#[test]
fn field_names_are_what_journald_accepts() {
    assert_eq!(field_name("site"), "HATCHERY_SITE");
    assert_eq!(field_name("gen"), "HATCHERY_GEN");
    assert_eq!(field_name("cgroup.kill"), "HATCHERY_CGROUPKILL");
}

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

#[test]
fn cpu_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
    // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    // utime stime ...
    let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 123 0 0";
    assert_eq!(cpu_ticks(stat), Some(12));
    assert_eq!(cpu_ticks("garbage"), None);
}

#[test]
fn a_worker_tree_is_found_through_proc_and_its_memory_and_processes_added_up() {
    // A worker that started two children.
    let mut worker = Command::new("/bin/sh")
        .args(["-c", "sleep 100 & sleep 100 & wait"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = i32::try_from(worker.id()).expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut usage = Usage::default();
    // The children exist once the shell forked them: wait for that, not for a time.
    while Instant::now() < deadline {
        usage = Usage::default();
        complete(&mut usage, pid, None);
        if usage.pids == Some(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = Command::new("pkill")
        .args(["-P", &pid.to_string()])
        .status();
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(
        usage.pids,
        Some(3),
        "the shell and its two children: {usage:?}"
    );
    assert_eq!(usage.source, UsageSource::Proc);
    // Three processes resident: more than a page each.
    assert!(
        usage.memory_current.is_some_and(|m| m > 3 * 4096),
        "{usage:?}"
    );
    assert!(usage.cpu_usec.is_some());
}

#[test]
fn what_the_cgroup_has_is_kept_and_only_what_it_lacks_is_read() {
    let from_cgroup = Usage {
        memory_current: Some(5 << 20),
        pids: Some(2),
        cpu_usec: Some(7),
        ..Usage::default()
    };
    let mut u = from_cgroup;
    // A pid that cannot exist: nothing would be found, and nothing is looked for.
    complete(&mut u, i32::MAX, None);
    assert_eq!(u, from_cgroup);
    // CPU from `cpu.stat` (there without the cpu controller), memory from `/proc`.
    let mut partial = Usage {
        cpu_usec: Some(1_000),
        ..Usage::default()
    };
    fill(
        &mut partial,
        &Usage {
            memory_current: Some(3 << 20),
            pids: Some(4),
            cpu_usec: Some(9),
            source: UsageSource::Proc,
            ..Usage::default()
        },
    );
    assert_eq!(partial.cpu_usec, Some(1_000));
    assert_eq!(partial.memory_current, Some(3 << 20));
    assert_eq!(partial.pids, Some(4));
    assert_eq!(partial.source, UsageSource::Proc);
}

#[test]
fn a_sum_adds_what_each_part_has() {
    let a = Usage {
        memory_current: Some(10),
        pids: Some(1),
        ..Usage::default()
    };
    let b = Usage {
        memory_current: Some(5),
        pids: Some(2),
        cpu_usec: Some(3),
        ..Usage::default()
    };
    let s = sum([&a, &b]);
    assert_eq!(s.memory_current, Some(15));
    assert_eq!(s.pids, Some(3));
    assert_eq!(s.cpu_usec, Some(3));
    assert_eq!(s.source, UsageSource::Proc);
    assert_eq!(sum([]).memory_current, None);
}

#[test]
fn the_cache_answers_from_a_recent_reading_unless_asked_fresh() {
    use std::io::Write as _;
    // A worker that forks a child once told to.
    let mut worker = Command::new("/bin/sh")
        .args(["-c", "read x; sleep 100 & wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = i32::try_from(worker.id()).expect("pid");
    let cache = UsageCache::default();
    let read = |fresh: bool| {
        cache.worker(pid, fresh, || {
            let mut u = Usage::default();
            complete(&mut u, pid, None);
            u
        })
    };
    assert_eq!(read(true).pids, Some(1), "the shell alone");
    writeln!(worker.stdin.as_mut().expect("stdin")).expect("tell it");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fresh = read(true);
    while fresh.pids != Some(2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        fresh = read(true);
    }
    let _ = Command::new("pkill")
        .args(["-P", &pid.to_string()])
        .status();
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(fresh.pids, Some(2), "read anew: the shell and its child");
    // The fresh reading is what the cache now holds, so a cached answer is the same even
    // with the worker gone.
    assert_eq!(read(false).pids, Some(2));
    assert_eq!(read(false).source, UsageSource::Proc);
}

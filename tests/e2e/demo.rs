//! End to end: `udpshard demo`, the README's first command. It must show the
//! stats table and traffic that made the round trip, exit 0, and leave no
//! process or temp file behind.

use std::path::Path;
use std::process::Command;

use udpshard_tests::harness::process_exists;

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");

/// The number after `label` on the line that has it.
fn number_after(text: &str, label: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains(label))?;
    let rest = line.split(label).nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[test]
fn demo_shows_the_table_and_replies_then_leaves_nothing_behind() {
    let out = Command::new(BIN)
        .args(["demo", "--duration", "2s"])
        .output()
        .expect("run udpshard demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let both = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "demo failed: {}\n{both}", out.status);

    // The stats table, as `udpshard stats` prints it: a header line, then a
    // row per worker starting with its id and pid.
    assert!(stdout.contains("udpshard supervisor pid"), "{both}");
    let header = stdout
        .lines()
        .position(|l| l.trim_start().starts_with("id ") && l.contains(" pid "))
        .unwrap_or_else(|| panic!("no table header: {both}"));
    let worker_pids: Vec<u32> = stdout
        .lines()
        .skip(header + 1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() > 3 && cols[0].parse::<usize>().is_ok())
        .filter_map(|cols| cols[1].parse().ok())
        .collect();
    assert!(!worker_pids.is_empty(), "no worker rows: {both}");

    let sent = number_after(&stdout, "datagrams sent:").expect("a sent count");
    let replies = number_after(&stdout, "replies received:").expect("a reply count");
    assert!(sent > 0, "{both}");
    assert!(replies > 0, "no reply came back: {both}");
    assert!(replies <= sent, "{both}");
    assert!(
        number_after(&stdout, "flows migrated:").is_some_and(|n| n > 0),
        "{both}"
    );

    // A first run warns of nothing the host does not lack.
    match udpshard_tests::harness::host_lacks_for_a_first_run() {
        None => assert!(
            !stderr.lines().any(|l| l.contains(" WARN ")),
            "a warning on a first run: {both}"
        ),
        Some(why) => eprintln!("not checking for warnings: {why}"),
    }

    // The supervisor and its workers are gone...
    let supervisor = number_after(&stdout, "udpshard supervisor pid").expect("supervisor pid");
    for pid in worker_pids.into_iter().chain([supervisor as u32]) {
        assert!(!process_exists(pid), "pid {pid} still runs: {both}");
    }
    // ...and so is its temp directory, which no process names any more.
    let removed = stdout
        .lines()
        .find_map(|l| l.split("removing ").nth(1))
        .map(str::trim)
        .expect("the temp dir it removes");
    assert!(!Path::new(removed).exists(), "{removed} left behind");
    let procs = std::fs::read_dir("/proc").expect("/proc");
    for entry in procs.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(removed),
            "{:?} still runs: {cmdline}",
            entry.file_name()
        );
    }
}

#[test]
fn demo_rejects_a_bad_duration() {
    let out = Command::new(BIN)
        .args(["demo", "--duration", "soon"])
        .output()
        .expect("run udpshard demo");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a duration"), "{stderr}");
}

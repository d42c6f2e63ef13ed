//! The packaged files agree with the binary and with each other: the config
//! the packages install is valid, the systemd unit has what the service
//! needs and runs that config, its fd limit covers the config's sessions, and
//! the sysctl drop-in lets the config's receive buffers take effect.
//! (.ci/packaging.sh builds and installs the real packages.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
/// Where both packages install the config (supervisor/Cargo.toml).
const INSTALLED_CONFIG: &str = "/etc/udpshard/udpshard.toml";
/// recv_buffer when a listener does not set it (config crate).
const DEFAULT_RECV_BUFFER: u64 = 4 << 20;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    let path = repo_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `[Service]` (or any section) keys of a unit file; a key set twice keeps
/// every value in order.
fn unit_section(text: &str, section: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            current = line.to_string();
            continue;
        }
        if current == format!("[{section}]") {
            if let Some((k, v)) = line.split_once('=') {
                out.entry(k.trim().to_string())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
    }
    out
}

fn one<'a>(keys: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("udpshard.service: {key} should be set once, is {other:?}"),
    }
}

/// Uncommented `key = value` lines of a TOML config, values unquoted.
fn toml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .collect()
}

/// A size as the config writes it: bytes, or "<n>B|KiB|MiB|GiB|KB|MB|GB".
fn size(v: &str) -> u64 {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("size {v:?}"));
    n * match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => panic!("size {v:?}"),
    }
}

/// The largest receive buffer a config asks for (a listener without
/// recv_buffer gets the default).
fn largest_recv_buffer(config: &str) -> u64 {
    let listeners = config
        .lines()
        .filter(|l| l.split('#').next().unwrap_or("").trim() == "[[listener]]")
        .count();
    let set: Vec<u64> = toml_values(config, "recv_buffer")
        .into_iter()
        .map(size)
        .collect();
    assert!(listeners > 0, "no listener");
    let default = if set.len() < listeners {
        DEFAULT_RECV_BUFFER
    } else {
        0
    };
    set.into_iter().max().unwrap_or(0).max(default)
}

fn sysctl(key: &str) -> u64 {
    let text = read("packaging/sysctl.d/60-udpshard.conf");
    let values: Vec<u64> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().parse().expect("a number"))
        .collect();
    assert_eq!(values.len(), 1, "{key} set once in the sysctl drop-in");
    values[0]
}

/// The lines of one `[section]` of supervisor/Cargo.toml.
fn manifest_section(section: &str) -> Vec<String> {
    let manifest = read("supervisor/Cargo.toml");
    let header = format!("[{section}]");
    manifest
        .lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .map(str::to_string)
        .collect()
}

#[test]
fn packaged_config_passes_check_config() {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(repo_file("packaging/udpshard.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "packaging/udpshard.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn unit_has_what_the_service_needs() {
    let unit = read("packaging/udpshard.service");
    let service = unit_section(&unit, "Service");
    // systemd 252 (Debian 12, RHEL 9) has no Type=notify-reload.
    assert_eq!(one(&service, "Type"), "notify");
    assert_eq!(
        one(&service, "ExecStartPre"),
        format!("/usr/bin/udpshard check-config {INSTALLED_CONFIG}")
    );
    assert_eq!(
        one(&service, "ExecStart"),
        format!("/usr/bin/udpshard run --config {INSTALLED_CONFIG}")
    );
    assert_eq!(one(&service, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&service, "Restart"), "on-failure");
    assert_eq!(one(&service, "KillMode"), "mixed");
    // The stop waits for the supervisor it signals, also one that systemd
    // did not fork (after an in-place upgrade); .ci/systemd.sh runs it.
    let stop = one(&service, "ExecStop");
    assert!(
        stop.contains(r#"kill -TERM "$$MAINPID""#) && stop.contains(r#"while kill -0 "$$MAINPID""#),
        "{stop}"
    );
    assert_eq!(one(&service, "User"), "udpshard");
    assert_eq!(
        one(&service, "AmbientCapabilities"),
        "CAP_NET_BIND_SERVICE CAP_NET_RAW"
    );
    assert_eq!(
        one(&service, "CapabilityBoundingSet"),
        "CAP_NET_BIND_SERVICE CAP_NET_RAW"
    );
    assert_eq!(one(&service, "NoNewPrivileges"), "yes");
    assert_eq!(one(&service, "ProtectSystem"), "strict");
    assert_eq!(one(&service, "RuntimeDirectory"), "udpshard");
    assert!(service.contains_key("LimitNOFILE"));
    assert_eq!(
        one(&unit_section(&unit, "Install"), "WantedBy"),
        "multi-user.target"
    );
}

#[test]
fn unit_runs_the_config_the_packages_install() {
    let unit = read("packaging/udpshard.service");
    let service = unit_section(&unit, "Service");
    let exec = one(&service, "ExecStart");
    let config = exec
        .split_once("--config ")
        .map(|(_, c)| c.trim())
        .expect("ExecStart names its config");
    assert_eq!(config, INSTALLED_CONFIG);

    let deb = manifest_section("package.metadata.deb");
    let deb_config = deb
        .iter()
        .find(|l| l.contains("\"../packaging/udpshard.toml\""))
        .expect("the .deb ships packaging/udpshard.toml");
    assert!(
        deb_config.contains(&format!("\"{}\"", &INSTALLED_CONFIG[1..])),
        "{deb_config}"
    );
    assert!(
        deb.iter()
            .any(|l| l.contains("unit-scripts = \"../packaging\"")),
        "the .deb takes its unit from packaging/"
    );

    let rpm = manifest_section("package.metadata.generate-rpm");
    let rpm_config = rpm
        .iter()
        .find(|l| l.contains("source = \"../packaging/udpshard.toml\""))
        .expect("the .rpm ships packaging/udpshard.toml");
    assert!(
        rpm_config.contains(&format!("dest = \"{INSTALLED_CONFIG}\"")),
        "{rpm_config}"
    );
    assert!(
        rpm_config.contains("config = \"noreplace\""),
        "{rpm_config}"
    );
    assert!(rpm.iter().any(|l| l.contains(
        "source = \"../packaging/udpshard.service\", dest = \"/usr/lib/systemd/system/udpshard.service\""
    )));

    // The stats file lives in the unit's RuntimeDirectory.
    let packaged = read("packaging/udpshard.toml");
    let stats = toml_values(&packaged, "stats_file");
    let runtime = one(&service, "RuntimeDirectory");
    assert_eq!(stats, [format!("/run/{runtime}/stats")]);
}

#[test]
fn fd_limit_covers_the_packaged_sessions() {
    let service = unit_section(&read("packaging/udpshard.service"), "Service");
    let limit: u64 = one(&service, "LimitNOFILE").parse().expect("a number");
    let packaged = read("packaging/udpshard.toml");
    // One upstream socket per session, per listener, in each worker process.
    let sessions: u64 = toml_values(&packaged, "max_sessions")
        .into_iter()
        .map(|v| v.parse::<u64>().expect("a number"))
        .sum();
    assert!(sessions > 0);
    assert!(
        limit >= sessions + 1024,
        "LimitNOFILE={limit} leaves too little above max_sessions {sessions}"
    );
}

#[test]
fn sysctl_rmem_max_covers_the_largest_recv_buffer() {
    let rmem_max = sysctl("net.core.rmem_max");
    for config in ["packaging/udpshard.toml", "config/src/default.toml"] {
        let largest = largest_recv_buffer(&read(config));
        assert!(
            rmem_max >= largest,
            "net.core.rmem_max = {rmem_max} would clamp {config}'s recv_buffer {largest}"
        );
    }
    assert!(
        sysctl("net.core.rmem_default") > 212_992,
        "above the kernel default"
    );
    assert!(
        sysctl("net.core.netdev_max_backlog") > 1000,
        "above the kernel default"
    );
}

#[test]
fn size_parsing_matches_the_config_syntax() {
    assert_eq!(size("4MiB"), 4 << 20);
    assert_eq!(size("65536"), 65536);
    assert_eq!(size("1GB"), 1_000_000_000);
    assert_eq!(
        largest_recv_buffer(
            "[[listener]]\nname = \"a\"\n[[listener]]\nname = \"b\"\nrecv_buffer = \"1MiB\"\n"
        ),
        DEFAULT_RECV_BUFFER
    );
    assert_eq!(
        largest_recv_buffer("[[listener]]\nname = \"a\"\nrecv_buffer = \"16MiB\" # big\n"),
        16 << 20
    );
}

//! Records what `udpshard --version` and the startup log line report: the git
//! commit the binary is built from ("unknown" outside a git checkout, such as
//! a source tarball or a container build context without .git, unless
//! UDPSHARD_GIT_COMMIT names it) and the cargo features it was built with.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=UDPSHARD_GIT_COMMIT");
    let commit = std::env::var("UDPSHARD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown")
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=UDPSHARD_GIT_COMMIT={commit}");
    // A new commit or a checkout changes HEAD or the ref it points to.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
    }
    // Cargo sets CARGO_FEATURE_<NAME> for each enabled feature of this
    // package (upper case, '-' as '_').
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(str::to_string))
        .filter(|f| f != "DEFAULT")
        .map(|f| f.to_lowercase().replace('_', "-"))
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(", ")
    };
    println!("cargo:rustc-env=UDPSHARD_FEATURES={features}");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=UDPSHARD_TARGET={target}");
}

//! The options every benchmark binary takes alike, flattened into each one's own arguments
//! (`#[command(flatten)]`): where the binaries are, how long a proxy may take to be ready,
//! JSON output, and the host-wide lock that keeps two runs from measuring each other.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nix::fcntl::Flock;

use super::proxy::{host_lock, own_dir};
use super::units::parse_duration;

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Where the proxy binaries are; default: the directory of this executable.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// How long a proxy may take to say it is ready.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for another bench run on this host to finish (runs at the same time
    /// would measure each other).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub lock_timeout: Duration,
}

impl Common {
    /// `--bin-dir`, else the directory of this executable.
    pub fn bin_dir(&self) -> std::io::Result<PathBuf> {
        self.bin_dir.clone().map_or_else(own_dir, Ok)
    }

    /// The host's bench lock, waited for up to `--lock-timeout`.
    pub fn lock(&self) -> Result<Flock<File>, String> {
        host_lock(self.lock_timeout)
    }
}

impl Common {
    /// Prints the results, as JSON (`--json`) or as the table, and says
    /// how the bench exits: a failure when any measurement failed.
    pub fn report(
        &self,
        json: impl FnOnce() -> String,
        table: impl FnOnce() -> String,
        failed: bool,
    ) -> ExitCode {
        if self.json {
            println!("{}", json());
        } else {
            print!("{}", table());
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// How a bench's client reaches its server: directly (the baseline),
/// through nginx, or through udpshard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Straight to the server: the baseline.
    Direct,
    Nginx,
    Udpshard,
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Direct, Via::Nginx, Via::Udpshard];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Nginx => "nginx",
            Via::Udpshard => "udpshard",
        }
    }
}

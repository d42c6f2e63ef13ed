//! `udpshard`: the supervisor binary, and (as `udpshard worker`, started by
//! the supervisor) the worker.

mod cpus;
mod demo;
mod doctor;
mod metrics;
mod notify;
mod reuseport;
mod spawn;
mod stats_cmd;
mod stats_path;
mod supervisor;
mod system;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use udpshard_config as config;

#[derive(Parser)]
#[command(
    name = "udpshard",
    version,
    about = "UDP proxy for connection-oriented datagram protocols (QUIC first)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the embedded default config when --config is not given).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 when valid, else print file:line:col and exit 1.
    CheckConfig { file: PathBuf },
    /// Print the running proxy's counters from its stats file.
    Stats {
        /// Default: /run/udpshard/stats, else the per-user fallback a
        /// non-root `udpshard run` uses.
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// Machine-readable output (with --watch: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Sample every S seconds, print per-second rates and mark the first
        /// stage (in path order) whose drops grew.
        #[arg(long, value_name = "S", value_parser = parse_watch)]
        watch: Option<std::time::Duration>,
        /// With --watch: stop after N samples.
        #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Check the host and the config for what makes UDP drop (buffer sysctls,
    /// drops happening now, CPUs, CPU quota, fd limit, conntrack); print each
    /// finding with the line that fixes it. Exit 0 when clean, 1 with findings.
    Doctor {
        /// The config to check (default: the embedded default config).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// A showcase on loopback: the proxy with two echo backends and a client
    /// load with migrating flows, then the stats table. Leaves nothing behind.
    Demo {
        /// How long the client load runs: "10s", "1500ms", "2m" (1s..=1h).
        #[arg(long, default_value = "10s", value_parser = demo::parse_duration)]
        duration: std::time::Duration,
    },
    /// Internal: a worker process, started by the supervisor.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        id: usize,
        #[arg(long)]
        control_fd: i32,
        #[arg(long)]
        stats_fd: i32,
        #[arg(long, value_delimiter = ',')]
        listener_fds: Vec<i32>,
        #[arg(long)]
        handoff_fd: i32,
        #[arg(long, value_delimiter = ',')]
        peer_fds: Vec<i32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Worker { .. }));
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(cfg) => {
                println!("{}: ok ({} listeners)", file.display(), cfg.listeners.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Stats {
            stats_file,
            json,
            watch,
            count,
        } => {
            let path = stats_file.unwrap_or_else(stats_path::find_default);
            let result = match watch {
                None => stats_cmd::print(&path, json),
                Some(interval) => stats_cmd::watch(&path, json, interval, count),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("udpshard stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor { config } => doctor::run(config.as_deref()),
        Command::Demo { duration } => demo::run(duration),
        Command::Worker {
            id,
            control_fd,
            stats_fd,
            listener_fds,
            handoff_fd,
            peer_fds,
        } => {
            let args = udpshard_worker::WorkerArgs {
                id,
                control_fd,
                stats_fd,
                listener_fds,
                handoff_fd,
                peer_fds,
            };
            match udpshard_worker::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(worker = id, "{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let loaded = match &path {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| config::ConfigError::Io {
                origin: path.display().to_string(),
                source,
            })
            .and_then(|text| {
                let origin = path.display().to_string();
                config::parse(&text, &origin).map(|cfg| (cfg, origin, text))
            }),
        None => {
            tracing::info!(
                "no --config given: using the embedded default config (see `udpshard run --help`)"
            );
            Ok((
                config::default_config(),
                config::DEFAULT_CONFIG_ORIGIN.to_string(),
                config::DEFAULT_CONFIG_TOML.to_string(),
            ))
        }
    };
    let (cfg, origin, text) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "udpshard {} starting with {origin}",
        env!("CARGO_PKG_VERSION")
    );
    match supervisor::Supervisor::start(cfg, path, origin, text).and_then(|s| s.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `--watch S`: seconds, fractions allowed ("0.5"), in 0.1..=3600.
fn parse_watch(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(std::time::Duration::from_secs_f64(secs)),
        _ => Err(format!("{s:?} is not a number of seconds in 0.1..=3600")),
    }
}

fn init_logging(worker: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("UDPSHARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .compact()
        .init();
    if worker {
        tracing::debug!(pid = std::process::id(), "worker process");
    }
}

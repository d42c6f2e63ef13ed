//! `udpshard`: the supervisor binary, and (as `udpshard worker`, started by
//! the supervisor) the worker.

mod cpus;
mod demo;
mod notify;
mod reuseport;
mod spawn;
mod stats_cmd;
mod stats_path;
mod supervisor;

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
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
        Command::Stats { stats_file, json } => {
            match stats_cmd::print(&stats_file.unwrap_or_else(stats_path::find_default), json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("udpshard stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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

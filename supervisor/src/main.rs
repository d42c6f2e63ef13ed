//! `udpshard`: the supervisor binary, and (as `udpshard worker`, started by
//! the supervisor) the worker.

mod bindcheck;
mod capacity;
mod cpus;
mod demo;
mod doctor;
mod health;
mod logging;
mod metrics;
mod notify;
mod process;
mod reuseport;
mod route_cmd;
mod spawn;
mod stats_cmd;
mod stats_path;
mod supervisor;
mod system;
mod verdict;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use udpshard_config as config;

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the version and the commit it was built from.
pub(crate) const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("UDPSHARD_GIT_COMMIT"),
    ")"
);

/// This binary's version and commit in one stats word.
pub(crate) fn version_word() -> u64 {
    udpshard_shared::stats::pack_version(env!("CARGO_PKG_VERSION"), env!("UDPSHARD_GIT_COMMIT"))
}

/// `udpshard --version`: the version, the commit, the cargo features and the
/// target it was built for (`-V` prints the first line only).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("UDPSHARD_GIT_COMMIT"),
    "\nfeatures: ",
    env!("UDPSHARD_FEATURES"),
    "\ntarget: ",
    env!("UDPSHARD_TARGET"),
);

#[derive(Parser)]
#[command(
    name = "udpshard",
    version = VERSION,
    long_version = LONG_VERSION,
    about = "UDP proxy for connection-oriented datagram protocols (QUIC first)",
    long_about = "UDP proxy for connection-oriented datagram protocols (QUIC first): one \
                  SO_REUSEPORT group per listener with one pinned worker process per allowed \
                  CPU, connection-ID affinity across client migration, and every dropped \
                  datagram counted at the hop where it was lost."
)]
struct Cli {
    /// How log lines are written to stderr: text, or one JSON object per
    /// line for log shippers. Workers log in the same format.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the embedded default config when --config is not given).
    ///
    /// SIGHUP reloads the config, SIGTERM or SIGINT (Ctrl-C) drains live
    /// sessions for drain_timeout and exits 0; a second one stops at once.
    Run {
        /// The config file (TOML). Without it: the embedded default, which
        /// `udpshard run --print-config` shows.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the config text this would run with and exit.
        #[arg(long)]
        print_config: bool,
        /// Internal: take over from the running supervisor at the other end
        /// of this descriptor (a binary upgrade, SIGUSR2).
        #[arg(long, hide = true, value_name = "FD")]
        upgrade_fd: Option<i32>,
    },
    /// Validate a config file the way `run` would load it, binding its
    /// listener addresses to check they are free: exit 0 when valid, else
    /// print FILE:LINE:COL and exit 1.
    CheckConfig {
        /// The config file (TOML) to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the running proxy's counters from its stats file. Exits 3 when
    /// the proxy that wrote the file is no longer running (its last counters
    /// are still printed).
    Stats {
        /// The stats file. Default: /run/udpshard/stats, else the per-user
        /// fallback a non-root `udpshard run` uses:
        /// $XDG_RUNTIME_DIR/udpshard/stats, then $TMPDIR/udpshard-UID/stats
        /// (TMPDIR defaults to /tmp).
        #[arg(long, value_name = "FILE")]
        stats_file: Option<PathBuf>,
        /// Machine-readable output (with --watch: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Every counter of every worker (about 200 columns), with a legend.
        #[arg(long)]
        wide: bool,
        /// Sample every S seconds, print per-second rates and mark the first
        /// stage (in path order) whose drops grew.
        #[arg(long, value_name = "S", value_parser = parse_watch)]
        watch: Option<std::time::Duration>,
        /// With --watch: stop after N samples.
        #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Say whether the running proxy should be sent new flows: exit 0 and
    /// `ready: ...` while it serves; exit 1 and `not ready: <why>` while it
    /// starts, withdraws (SIGTERM with withdraw_delay), drains, or does not
    /// run. For BGP speakers and health checkers that run a command.
    Health {
        /// The stats file (default: as for `stats`).
        #[arg(long, value_name = "FILE")]
        stats_file: Option<PathBuf>,
    },
    /// Check the host and the config for what makes UDP drop (buffer sysctls,
    /// drops happening now, CPUs, CPU quota, fd limit, conntrack); print each
    /// finding with the line that fixes it. Exit 0 when clean, 1 with findings.
    Doctor {
        /// The config to check (default: the embedded default config).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// A showcase on loopback: the proxy with two echo backends and a client
    /// load with migrating flows, then the stats table. Leaves nothing behind.
    Demo {
        /// How long the client load runs: "10s", "1500ms", "2m" (1s..=1h).
        #[arg(long, default_value = "10s", value_parser = demo::parse_duration)]
        duration: std::time::Duration,
    },
    /// Print the backend a config sends a connection ID to, and why (its
    /// QUIC-LB server ID, or its Maglev slot): hosts of a fleet that print the
    /// same backend agree on the CID. Exit 2 for a CID that is not 1 to 20
    /// bytes of hex.
    Route {
        /// The config file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this listener (default: every listener).
        #[arg(long, value_name = "NAME")]
        listener: Option<String>,
        /// The connection ID, in hex (e.g. 0a1b2c3d4e5f6071).
        #[arg(value_name = "CID_HEX")]
        cid: String,
    },
    /// Print a shell completion script: `udpshard completions bash >
    /// /etc/bash_completion.d/udpshard`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `udpshard manpage | man -l -`.
    Manpage,
    /// Internal: a worker process, started by the supervisor.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        id: usize,
        #[arg(long)]
        control_fd: i32,
        #[arg(long)]
        stats_fd: i32,
        #[arg(long)]
        state_fd: i32,
        #[arg(long, value_delimiter = ',')]
        listener_fds: Vec<i32>,
        #[arg(long)]
        handoff_fd: i32,
        #[arg(long, value_delimiter = ',')]
        peer_fds: Vec<i32>,
        #[arg(long)]
        standby: Option<u64>,
        #[arg(long)]
        predecessor_fd: Option<i32>,
    },
}

fn main() -> ExitCode {
    ensure_std_fds();
    let cli = Cli::parse();
    match &cli.command {
        // Servers: a reader of their output that goes away must not stop
        // them (std ignores SIGPIPE; writes fail with EPIPE instead).
        Command::Run { .. } | Command::Worker { .. } | Command::Demo { .. } => {}
        // Commands that print and exit end quietly when their reader goes
        // away (`udpshard stats --watch 1 | head -1`), as `cat` does.
        _ => restore_default_sigpipe(),
    }
    if let Err(e) = logging::init(
        cli.log_format,
        matches!(cli.command, Command::Worker { .. }),
    ) {
        eprintln!("udpshard: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Run {
            config,
            print_config,
            upgrade_fd,
        } => run(config, print_config, upgrade_fd),
        Command::CheckConfig { file } => check_config(&file),
        Command::Stats {
            stats_file,
            json,
            wide,
            watch,
            count,
        } => {
            let path = stats_file.unwrap_or_else(stats_path::find_default);
            let view = stats_cmd::View { json, wide };
            let result = match watch {
                None => stats_cmd::print(&path, view),
                Some(interval) => stats_cmd::watch(&path, view, interval, count),
            };
            match result {
                Ok(stats_cmd::Liveness::Running) => ExitCode::SUCCESS,
                Ok(gone) => {
                    eprintln!("udpshard stats: {gone}");
                    ExitCode::from(stats_cmd::NOT_RUNNING)
                }
                Err(e) => {
                    eprintln!("udpshard stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health { stats_file } => {
            let path = stats_file.unwrap_or_else(stats_path::find_default);
            let (ready, line) = stats_cmd::health(&path);
            println!("{line}");
            if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Doctor { config } => doctor::run(config.as_deref()),
        Command::Demo { duration } => demo::run(duration),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "udpshard",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Route {
            config,
            listener,
            cid,
        } => route_cmd::run(&config, listener.as_deref(), &cid),
        Command::Manpage => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("udpshard manpage: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Worker {
            id,
            control_fd,
            stats_fd,
            state_fd,
            listener_fds,
            handoff_fd,
            peer_fds,
            standby,
            predecessor_fd,
        } => {
            let args = udpshard_worker::WorkerArgs {
                id,
                control_fd,
                stats_fd,
                state_fd,
                listener_fds,
                handoff_fd,
                peer_fds,
                standby,
                predecessor_fd,
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

fn check_config(file: &std::path::Path) -> ExitCode {
    let cfg = match config::load(file) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // As `nginx -t` does: an address the proxy could not bind is an error now,
    // not at start. One that the running udpshard of this config holds is fine.
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let origin = file.display().to_string();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let problem = match bindcheck::probe(l.bind, &cfg.stats_file) {
            Ok(_) => continue,
            Err(bindcheck::ProbeError::Denied(e)) => {
                eprintln!(
                    "{origin}: warning: listener {:?}: this user cannot bind {} ({e}); the service \
                     can with CAP_NET_BIND_SERVICE, which the packaged unit grants",
                    l.name, l.bind
                );
                continue;
            }
            Err(bindcheck::ProbeError::InUse(what)) => what,
            Err(bindcheck::ProbeError::Unavailable(e)) => e.to_string(),
        };
        let message = format!(
            "listener {:?}: bind = \"{}\" cannot be bound: {problem}",
            l.name, l.bind
        );
        eprintln!("{}", config::error_at_bind(&text, &origin, i, message));
        return ExitCode::FAILURE;
    }
    // The user must exist here; whether the service may become it depends
    // on who starts it (root, or that user).
    if let Some(name) = &cfg.user {
        if let Err(e) = udpshard_worker::lookup_user(name) {
            eprintln!("{}", config::error_at_user(&text, &origin, e.to_string()));
            return ExitCode::FAILURE;
        }
    }
    let n = cfg.listeners.len();
    println!(
        "{}: ok ({n} {})",
        file.display(),
        if n == 1 { "listener" } else { "listeners" }
    );
    ExitCode::SUCCESS
}

fn run(path: Option<PathBuf>, print_config: bool, upgrade_fd: Option<i32>) -> ExitCode {
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
            if !print_config {
                tracing::info!(
                    "no --config given: using the embedded default config (`udpshard run --print-config` shows it)"
                );
            }
            Ok((
                config::default_config(),
                config::DEFAULT_CONFIG_ORIGIN.to_string(),
                config::DEFAULT_CONFIG_TOML.to_string(),
            ))
        }
    };
    if let Some(fd) = upgrade_fd {
        tracing::info!("udpshard {VERSION} taking over (binary upgrade)");
        return match supervisor::Supervisor::take_over(fd, path, loaded).and_then(|s| s.run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let (cfg, origin, text) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if print_config {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    tracing::info!("udpshard {VERSION} starting with {origin}");
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

/// Started with stdin, stdout or stderr closed, the first files and sockets
/// we open would take descriptors 0 to 2, and log lines would be written
/// into them. Point any closed one at /dev/null first.
fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with
        // EBADF for a descriptor that is not open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // open() returns the lowest free descriptor: this one. Leaked on
            // purpose: it stays open for the process's life.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(fd == 0)
                .write(fd != 0)
                .open("/dev/null")
            {
                std::mem::forget(null);
            }
        }
    }
}

fn restore_default_sigpipe() {
    // SAFETY: SIG_DFL for SIGPIPE, before any thread starts; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

//! `loadgen`: send QUIC short-header datagrams over many flows at a paced rate, and (with
//! `--sink`) count what a proxy forwarded to the sink addresses.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use udpshard_tests::load::units::{parse_duration, Rate};
use udpshard_tests::load::{run_load, send_load, LoadSpec, Sink, DEFAULT_SIZE};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "UDP load generator: QUIC short-header datagrams, one CID per flow"
)]
struct Args {
    /// Where to send (the proxy's listen address).
    #[arg(long)]
    target: SocketAddr,
    /// Number of flows: one socket (source port) and one connection ID each.
    #[arg(long, default_value_t = 2000)]
    flows: usize,
    /// Datagrams per second over all flows (150000, 150k), or `max`.
    #[arg(long, default_value = "150000")]
    rate: Rate,
    /// How long to send (5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many datagrams even if the duration has not passed.
    #[arg(long)]
    max_datagrams: Option<u64>,
    /// Datagram size in bytes (at least 25).
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    size: usize,
    /// Receive at this address (repeatable; port 0 picks one) and report arrivals, loss and
    /// latency. Without it, only the sending side is reported.
    #[arg(long = "sink")]
    sinks: Vec<SocketAddr>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let spec = LoadSpec {
        target: args.target,
        flows: args.flows,
        rate: args.rate.0,
        duration: args.duration,
        max_datagrams: args.max_datagrams,
        size: args.size,
    };
    spec.validate()?;
    if args.sinks.is_empty() {
        let report = send_load(&spec)?;
        if args.json {
            let json = serde_json::json!({
                "offered_rate": spec.rate,
                "flows": spec.flows,
                "sent": report.sent,
                "send_errors": report.send_errors,
                "first_send_error": report.first_send_error,
                "slipped": report.slipped,
                "elapsed_s": report.elapsed.as_secs_f64(),
                "achieved_rate": report.achieved_rate(),
            });
            println!("{json}");
        } else {
            println!(
                "sent {} in {:.2}s ({:.0}/s) over {} flows to {}, {} send errors, {} slipped",
                report.sent,
                report.elapsed.as_secs_f64(),
                report.achieved_rate(),
                spec.flows,
                spec.target,
                report.send_errors,
                report.slipped
            );
            if let Some(err) = &report.first_send_error {
                println!("first send error: {err}");
            }
        }
        return Ok(());
    }
    let sink = Sink::bind(&args.sinks)?;
    if !args.json {
        let addrs: Vec<String> = sink.addrs().iter().map(ToString::to_string).collect();
        eprintln!("loadgen: sink listening on {}", addrs.join(", "));
    }
    let report = run_load(&spec, &sink)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    Ok(())
}

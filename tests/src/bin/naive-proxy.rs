//! `naive-proxy`: the seed's design, kept as a baseline. One thread, one socket: a blocking
//! `recv_from`, then `send_to` the backend chosen by a hash of the datagram's 8-byte CID.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use udpshard_tests::load::baseline::{
    backend_for, bind_listener, stop_on_signals, DEFAULT_RECV_BUFFER,
};
use udpshard_tests::load::units::parse_size;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Single-threaded recv_from -> send_to UDP proxy (benchmark baseline)"
)]
struct Args {
    /// Address to receive client datagrams on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backend address (repeatable); chosen per datagram by a hash of bytes 1..9 (the CID).
    #[arg(long = "backend", required = true)]
    backends: Vec<SocketAddr>,
    /// SO_RCVBUF to ask for (clamped by net.core.rmem_max).
    #[arg(long, default_value = DEFAULT_RECV_BUFFER, value_parser = parse_size)]
    recv_buffer: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("naive-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> std::io::Result<()> {
    let stop = stop_on_signals()?;
    let socket = bind_listener(args.listen, args.recv_buffer, false)?;
    eprintln!(
        "naive-proxy: ready: listening on {} with {} backend(s)",
        socket.local_addr()?,
        args.backends.len()
    );
    let (forwarded, errors) = forward(&socket, &args.backends, &stop);
    eprintln!("naive-proxy: stopped: forwarded {forwarded}, send errors {errors}");
    Ok(())
}

fn forward(
    socket: &UdpSocket,
    backends: &[SocketAddr],
    stop: &std::sync::atomic::AtomicBool,
) -> (u64, u64) {
    let mut buf = [0u8; 65_536];
    let (mut forwarded, mut errors) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // Timeouts (SO_RCVTIMEO) and signals come back as errors; both mean "look at the flag".
        let Ok((len, _client)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let datagram = &buf[..len];
        let backend = backends[backend_for(datagram, backends.len())];
        match socket.send_to(datagram, backend) {
            Ok(_) => forwarded += 1,
            Err(_) => errors += 1,
        }
    }
    (forwarded, errors)
}

#!/usr/bin/env bash
# Builds every binary in release mode and runs the benchmark (floor, naive, nginx, udpshard) with
# the given arguments, e.g. `bash tests/bench.sh --only floor --json`. See `bench --help`.
# nginx is Debian's `nginx` with `libnginx-mod-stream`: installed here when missing, where this
# runs as root with apt-get; elsewhere the bench says it skipped nginx.
# `bash tests/bench.sh scale [ARGS]` runs the scale mode instead: open N sessions, then a steady
# rate over them (floor, floor-ports, udpshard; see `scale-bench --help`).
# `bash tests/bench.sh soak [ARGS]` runs the soak: load with workers killed, reloads and resizes,
# and the ledger checked at the end (see `soak --help`); `--upgrades N` adds binary upgrades.
# `bash tests/bench.sh flood [ARGS]` runs udpshard under junk Initials and sprays of live CIDs
# from forged loopback sources (a raw socket: as root) beside established flows and new
# connections (see `flood-bench --help`).
# `bash tests/bench.sh burst [ARGS]` runs QUIC-shaped traffic: small requests answered by flights
# of large datagrams (sent with GSO or sendmmsg) back through nginx and udpshard, with and
# without udpshard's offloads (see `burst-bench --help`).
# `bash tests/bench.sh quic [ARGS]` runs real QUIC downloads (quinn, half the clients migrating
# midway) directly, through nginx and through udpshard (see `quic-bench --help`).
# `bash tests/bench.sh scaling [ARGS]` measures udpshard's delivered rate at 1, 2, 4 ... workers
# with the generator on CPUs of its own (see `scaling-bench --help`); on 2 CPUs, 1 worker.
# `bash tests/bench.sh dns [ARGS]` runs dnsperf against NSD directly, through nginx and through
# udpshard (see `dns-bench --help`); dnsperf and nsd are installed here when missing, as nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

bench=bench
if [[ "${1:-}" == scale ]]; then
    bench=scale-bench
    shift
elif [[ "${1:-}" == soak ]]; then
    bench=soak
    shift
elif [[ "${1:-}" == flood ]]; then
    bench=flood-bench
    shift
elif [[ "${1:-}" == burst ]]; then
    bench=burst-bench
    shift
elif [[ "${1:-}" == quic ]]; then
    bench=quic-bench
    shift
elif [[ "${1:-}" == scaling ]]; then
    bench=scaling-bench
    shift
elif [[ "${1:-}" == dns ]]; then
    bench=dns-bench
    shift
fi
# Debian packages a bench needs, installed where this runs as root with apt-get. The package
# scripts would start the system's nginx or NSD, which would then run beside every
# measurement: a policy-rc.d tells them not to start services.
install_packages() { # WHAT PACKAGE...
    local what=$1
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bench.sh: installing $* ($what)" >&2
        local policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            policy=/usr/sbin/policy-rc.d
        fi
        apt-get install -y -qq "$@" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$@" >/dev/null 2>&1; } ||
            echo "bench.sh: could not install $*" >&2
        [ -z "$policy" ] || rm -f "$policy"
    else
        echo "bench.sh: $what is missing (apt-get install $*)" >&2
    fi
}
if [[ $bench == dns-bench ]] && ! { [ -x /usr/bin/dnsperf ] && [ -x /usr/sbin/nsd ]; }; then
    install_packages "the DNS bench's client and server" dnsperf nsd
fi
extra=()
if [[ $bench == bench || $bench == burst-bench || $bench == quic-bench || $bench == dns-bench ]] && ! { [ -x /usr/sbin/nginx ] && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ]; }; then
    install_packages "the bench's nginx; without it the bench skips nginx" nginx libnginx-mod-stream
fi
if ! cargo build --release --workspace --bins; then
    # udpshard is under development: still measure the baselines, and never run a stale
    # udpshard binary left over from an earlier build.
    echo "bench.sh: the workspace does not build; building the baselines only and skipping udpshard" >&2
    cargo build --release -p udpshard-tests --bins
    if [[ $bench == soak || $bench == flood-bench || $bench == scaling-bench ]]; then
        echo "bench.sh: $bench needs udpshard" >&2
        exit 1
    elif [[ $bench == scale-bench ]]; then
        extra=(--only floor --only floor-ports)  # not udpshard, not udpshard-socket
    elif [[ $bench == burst-bench ]]; then
        extra=(--only nginx)
    elif [[ $bench == quic-bench || $bench == dns-bench ]]; then
        extra=(--skip udpshard)
    else
        extra=(--skip udpshard --skip udpshard-socket)
    fi
fi
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-target}/release/$bench" "${extra[@]}" "$@"

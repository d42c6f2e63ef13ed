#!/usr/bin/env bash
# Builds every binary in release mode and runs the benchmark (floor, naive, udpshard) with the
# given arguments, e.g. `bash tests/bench.sh --only floor --json`. See `bench --help`.
# `bash tests/bench.sh scale [ARGS]` runs the scale mode instead: open N sessions, then a steady
# rate over them (floor, floor-ports, udpshard; see `scale-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

bench=bench
if [[ "${1:-}" == scale ]]; then
    bench=scale-bench
    shift
fi
extra=()
if ! cargo build --release --workspace --bins; then
    # udpshard is under development: still measure the baselines, and never run a stale
    # udpshard binary left over from an earlier build.
    echo "bench.sh: the workspace does not build; building the baselines only and skipping udpshard" >&2
    cargo build --release -p udpshard-tests --bins
    if [[ $bench == scale-bench ]]; then
        extra=(--only floor --only floor-ports)
    else
        extra=(--skip udpshard)
    fi
fi
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-target}/release/$bench" "${extra[@]}" "$@"

#!/usr/bin/env bash
# Runs the commands of README.md's "Try it" section exactly as written, as a
# newcomer would in a fresh clone: the demo to completion; the proxy on its
# embedded default until it is ready; `stats` against it; then Ctrl-C (SIGINT
# to the process group), which must drain and exit 0. README's test command
# is .ci/run's last step.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "readme: FAILED: $*" >&2; exit 1; }

# The `sh` blocks of the "## Try it" section, one command per line.
mapfile -t commands < <(awk '
    /^## / { in_section = ($0 == "## Try it") }
    in_section && /^```sh$/ { in_block = 1; next }
    in_section && /^```$/ { in_block = 0; next }
    in_section && in_block && NF { print }
' README.md)
[ ${#commands[@]} -gt 0 ] || fail "no commands in README.md's Try it section"

find_cmd() {
    local c
    for c in "${commands[@]}"; do
        case "$c" in *"-- $1"*) printf '%s\n' "$c"; return 0 ;; esac
    done
    fail "README.md's Try it section has no '-- $1' command"
}
demo=$(find_cmd demo)
run=$(find_cmd run)
stats=$(find_cmd stats)

echo "== readme: $demo"
bash -c "$demo" || fail "the demo exited $?"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== readme: $run"
# Its own process group (job control on), as a terminal runs a job.
set -m
bash -c "exec $run" 2>"$log" &
pid=$!
set +m
for _ in $(seq 600); do
    grep -q "ready: " "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; fail "'$run' exited before it was ready"; }
    sleep 0.1
done
grep -q "ready: " "$log" || { cat "$log"; kill -KILL -- "-$pid"; fail "'$run' was not ready in 60 s"; }

echo "== readme: $stats"
out=$(bash -c "$stats") || { kill -KILL -- "-$pid"; fail "'$stats' exited $?"; }
printf '%s\n' "$out"
grep -q "udpshard supervisor pid $pid" <<<"$out" || { kill -KILL -- "-$pid"; fail "stats do not name the running proxy (pid $pid)"; }

echo "== readme: Ctrl-C"
kill -INT -- "-$pid"
status=0
wait "$pid" || status=$?
cat "$log"
[ "$status" = 0 ] || fail "'$run' exited $status after Ctrl-C"
grep -q "all workers exited" "$log" || fail "no drain in the log after Ctrl-C"
echo "readme: every Try it command ran as written"

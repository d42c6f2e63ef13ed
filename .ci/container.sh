#!/usr/bin/env bash
# Container CI: builds the image from the project's own packaging/Dockerfile
# on a Debian base made here with mmdebstrap (no registry is reachable, so
# the Dockerfile takes its bases as build arguments), with the binary cargo
# built on this machine (BINARY=context). Then, with podman:
# - pinned with --cpuset-cpus=0, then --cpuset-cpus=1: udpshard logs exactly
#   that one allowed CPU and one worker pinned to it, and datagrams from the
#   host reach a backend on the host and come back (--network host);
# - udpshard is PID 1, and `podman stop` (SIGTERM) ends it with exit 0
#   within drain_timeout;
# - under --cpus=0.5 with no CPU set, `udpshard doctor` flags the quota and
#   udpshard logs it at start.
#
# Needs root and apt-get (installs podman, runc and mmdebstrap when missing);
# without them it says so and exits 0 (under CI=true it fails). On 2 cores: about 1.5 minutes on a
# fresh machine once the release binary is built.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES_WHAT=container
. .ci/images.sh
images_can_run || exit 0

IMAGE=localhost/udpshard:ci
DRAIN_S=3
containers=()
cleanup() {
    for c in "${containers[@]}"; do
        podman rm -f "$c" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

images_install_tools

images_step "release build (stripped)"
CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked -p udpshard
mkdir -p dist
cp target/release/udpshard dist/udpshard

images_step "base image"
images_base udpshard-ci-base

images_step "podman build -f packaging/Dockerfile (BASE=localhost/udpshard-ci-base, BINARY=context)"
podman build --quiet --runtime runc -f packaging/Dockerfile \
    --build-arg BASE=localhost/udpshard-ci-base:latest --build-arg BINARY=context \
    -t "$IMAGE" . >/dev/null
podman_run --rm "$IMAGE" --version
caps=$(podman_run --rm --entrypoint /bin/sh "$IMAGE" -c \
    'id -un; stat -c "%a %U" /usr/bin/udpshard')
echo "image user and binary: $caps"
[ "$(echo "$caps" | head -1)" = udpshard ] || images_fail "the image does not run as user udpshard"


work=$(mktemp -d /tmp/udpshard-container.XXXXXX)
trap 'cleanup; rm -rf "$work"' EXIT
chmod 755 "$work"
read -r proxy_port backend_a backend_b < <(images_free_ports 3)
cat >"$work/udpshard.toml" <<EOF
workers = "auto"
drain_timeout = "${DRAIN_S}s"

[[listener]]
name = "quic"
bind = "127.0.0.1:$proxy_port"
dissector = "quic"
backends = ["127.0.0.1:$backend_a", "127.0.0.1:$backend_b"]
EOF
chmod 644 "$work/udpshard.toml"

# wait_ready CONTAINER: until its log has the ready line (bounded).
wait_ready() {
    for _ in $(seq 1 100); do
        if grep -q 'ready: ' <<<"$(podman logs "$1" 2>&1)"; then
            return 0
        fi
        if [ "$(podman inspect -f '{{.State.Running}}' "$1")" != true ]; then
            podman logs "$1" >&2 || true
            images_fail "$1 exited before it was ready"
        fi
        sleep 0.1
    done
    podman logs "$1" >&2 || true
    images_fail "$1 not ready within 10 s"
}

for cpu in 0 1; do
    if ! grep -qw "$cpu" <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'); then
        [ "${CI:-}" != true ] || images_fail "CPU $cpu is not in this machine's CPU set"
        echo "CPU $cpu is not ours to pin: skipping --cpuset-cpus=$cpu"
        continue
    fi
    c=udpshard-ci-cpu$cpu
    containers+=("$c")
    images_step "--cpuset-cpus=$cpu"
    podman rm -f "$c" >/dev/null 2>&1 || true
    podman_run -d --name "$c" --cpuset-cpus="$cpu" --network host \
        -v "$work/udpshard.toml:/etc/udpshard/udpshard.toml:ro" "$IMAGE" >/dev/null
    wait_ready "$c"
    log=$(podman logs "$c" 2>&1)
    echo "$log" | grep -E 'allowed CPUs|worker ready|ready: ' || true
    grep -q "allowed CPUs: $cpu (1 CPU); starting 1 worker\$" <<<"$log" ||
        images_fail "--cpuset-cpus=$cpu: udpshard did not log exactly CPU $cpu allowed and 1 worker"
    [ "$(grep -c 'worker ready' <<<"$log")" = 1 ] ||
        images_fail "--cpuset-cpus=$cpu: not exactly one worker started"
    grep -q "worker ready worker=0 cpu=$cpu " <<<"$log" ||
        images_fail "--cpuset-cpus=$cpu: the worker is not pinned to CPU $cpu"
    # The worker's own affinity, read from the host.
    pid1=$(podman inspect -f '{{.State.Pid}}' "$c")
    [ "$(cat "/proc/$pid1/comm")" = udpshard ] || images_fail "PID 1 of $c is $(cat "/proc/$pid1/comm"), not udpshard"
    worker=$(pgrep -P "$pid1" -x udpshard | sed -n 1p || true)
    [ -n "$worker" ] || images_fail "no worker process under PID 1 of $c"
    affinity=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "/proc/$worker/status")
    echo "PID 1 in $c is udpshard (host pid $pid1); its worker (host pid $worker) may run on CPU $affinity"
    [ "$affinity" = "$cpu" ] || images_fail "the worker may run on $affinity, not CPU $cpu"

    python3 .ci/roundtrip.py --proxy "127.0.0.1:$proxy_port" \
        --backend "a=127.0.0.1:$backend_a" --backend "b=127.0.0.1:$backend_b" --flows 32 ||
        images_fail "--cpuset-cpus=$cpu: round trips through the container"
    stats=$(podman exec "$c" udpshard stats)
    sed -n 1,12p <<<"$stats"

    # SIGTERM to PID 1; the sessions just opened keep the drain to its
    # timeout. udpshard's own time, from the signal to its exit, is read
    # from its log: drain_timeout and a margin for the workers' exit; the
    # whole `podman stop` adds podman's own teardown.
    t0=$(date +%s%N)
    podman stop -t $((DRAIN_S + 10)) "$c" >/dev/null
    took_ms=$((($(date +%s%N) - t0) / 1000000))
    code=$(podman inspect -f '{{.State.ExitCode}}' "$c")
    log=$(podman logs "$c" 2>&1)
    tail -3 <<<"$log"
    own_ms=$(LOG="$log" python3 - <<'PY' 2>/dev/null || echo none
import datetime, os, re
times = {}
for line in os.environ["LOG"].splitlines():
    m = re.match(r"(\S+Z)\s+\w+\s+(signal 15: draining|all workers exited; bye)", line)
    if m:
        times[m.group(2)[:6]] = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
print(int((times["all wo"] - times["signal"]).total_seconds() * 1000))
PY
)
    echo "podman stop: exit code $code; udpshard exited $own_ms ms after SIGTERM, podman stop took $took_ms ms (drain_timeout ${DRAIN_S}s)"
    [ "$code" = 0 ] || images_fail "--cpuset-cpus=$cpu: exit code $code after SIGTERM"
    [ "$own_ms" != none ] || images_fail "no SIGTERM and clean exit in the log"
    [ "$own_ms" -le $((DRAIN_S * 1000 + 500)) ] ||
        images_fail "--cpuset-cpus=$cpu: udpshard took $own_ms ms to exit, more than drain_timeout (${DRAIN_S}s) and 0.5 s"
    [ "$took_ms" -le $((DRAIN_S * 1000 + 5000)) ] ||
        images_fail "--cpuset-cpus=$cpu: podman stop took $took_ms ms"
done

images_step "--cpus=0.5 without a CPU set"
c=udpshard-ci-quota
containers+=("$c")
doctor=$(podman_run --rm --cpus=0.5 --network host \
    -v "$work/udpshard.toml:/etc/udpshard/udpshard.toml:ro" "$IMAGE" \
    doctor --config /etc/udpshard/udpshard.toml 2>&1) || true
grep -i 'cpu' <<<"$doctor" || true
grep -q 'allows 0.50 CPUs, but [0-9]* workers are pinned one per CPU' <<<"$doctor" ||
    images_fail "doctor did not flag the 0.5-CPU quota"
podman rm -f "$c" >/dev/null 2>&1 || true
podman_run -d --name "$c" --cpus=0.5 --network host \
    -v "$work/udpshard.toml:/etc/udpshard/udpshard.toml:ro" "$IMAGE" >/dev/null
wait_ready "$c"
grep 'allows 0.50 CPUs' <<<"$(podman logs "$c" 2>&1)" ||
    images_fail "udpshard did not log the 0.5-CPU quota at start"
podman stop -t $((DRAIN_S + 10)) "$c" >/dev/null
[ "$(podman inspect -f '{{.State.ExitCode}}' "$c")" = 0 ] || images_fail "exit code after SIGTERM under a quota"

images_step "done in $((SECONDS - IMAGES_START))s"

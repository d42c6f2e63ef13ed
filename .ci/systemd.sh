#!/usr/bin/env bash
# systemd CI: the project's .deb under a real systemd (Debian's, 252 on
# bookworm) as PID 1 of a podman container, and the .rpm installed with
# Debian's rpm in another. The systemd container shares the host's network,
# so the service binds a port below 1024 on the host's loopback and the
# backends and the client run here, on the host.
#
# Asserts, for the .deb:
# - `apt-get install ./udpshard_*.deb` installs it; `systemctl start`
#   becomes active (running) through READY=1, as user udpshard, holding only
#   the unit's capabilities, on a port below 1024;
# - `systemctl reload` applies a changed backend list (new sessions reach the
#   new backend) with NRestarts=0;
# - a reload of a broken file leaves the service active on its old config;
#   the journal names file:line:col and `systemctl status` shows the error
#   (STATUS=);
# - the package's upgrade-service, run against a broken file, reports each
#   failed upgrade within 20 s (STATUS=), twice, and the service serves on;
# - `systemctl kill -s USR2 --kill-whom=main` upgrades the binary under steady
#   traffic: a new MainPID, NRestarts=0, every datagram answered by its flow's
#   one backend; `apt-get install --reinstall` does the same through the
#   package's postinst;
# - after those upgrades, `systemctl stop` lets the upgraded supervisor (not
#   systemd's child) drain and exit: Result=success, not SIGKILL;
# - `systemctl kill -s KILL --kill-whom=main` is followed by a restart
#   (NRestarts=1) with no orphan worker left;
# - `systemctl stop` ends inactive with Result=success.
# For the .rpm: `rpm -i --nodeps` in a Debian container, its payload, file
# modes and scriptlets (the user it creates). What a RHEL userland would add
# is not checked here (packaging/README.md says what).
#
# Needs root and apt-get (installs podman, runc and mmdebstrap when missing);
# without them it says so and exits 0 (under CI=true it fails). Builds the packages with
# .ci/packaging.sh when target/packages has none.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES_WHAT=systemd
. .ci/images.sh
images_can_run || exit 0

C=udpshard-ci-systemd
R=udpshard-ci-rpm
cleanup() {
    if [ "${KEEP:-}" != 1 ]; then
        podman rm -f "$C" "$R" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

images_install_tools

if ! ls target/packages/udpshard_*.deb target/packages/udpshard-*.rpm >/dev/null 2>&1; then
    images_step "packages (.ci/packaging.sh, build and inspect only)"
    CI= bash .ci/packaging.sh >/dev/null
fi
deb=$(ls target/packages/udpshard_*.deb | head -1)
rpm=$(ls target/packages/udpshard-*.rpm | head -1)
echo "packages: $deb $rpm"

images_step "systemd image"
# procps: the .deb's one dependency beyond libc, so that apt-get needs no
# package lists to install it.
images_base udpshard-ci-systemd systemd,systemd-sysv,dbus,procps

in_c() { podman exec "$C" "$@"; }
# With this shell's stdin passed in.
in_c_stdin() { podman exec -i "$C" "$@"; }
show() { in_c systemctl show -p "$1" --value udpshard; }
journal() { in_c journalctl -u udpshard --no-pager -o cat; }
fail() {
    in_c systemctl status --no-pager udpshard >&2 || true
    journal | tail -30 >&2 || true
    images_fail "$*"
}

# test_eq WANT COMMAND...: whether COMMAND prints WANT.
test_eq() {
    local want=$1
    shift
    [ "$("$@" 2>/dev/null)" = "$want" ]
}
# grep_in PATTERN COMMAND...: whether COMMAND's output has PATTERN.
grep_in() {
    local pattern=$1
    shift
    local out
    out=$("$@" 2>/dev/null) || return 1
    grep -q -- "$pattern" <<<"$out"
}

# until_ok SECONDS_MAX 'WHAT' COMMAND...: polls COMMAND every 0.1 s.
until_ok() {
    local max=$1 what=$2
    shift 2
    local end=$((SECONDS + max))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || fail "not within ${max}s: $what"
        sleep 0.1
    done
}


images_step "boot systemd in a container"
podman rm -f "$C" >/dev/null 2>&1 || true
# CAP_NET_RAW, which podman leaves out of a container's set by default: as
# on a host, the unit's two capabilities are there to grant.
podman_run -d --name "$C" --systemd=always --network host --cap-add NET_RAW \
    localhost/udpshard-ci-systemd:latest /sbin/init >/dev/null
# Until systemd's bus is up, systemctl cannot ask it anything: poll (30 s).
state=
for _ in $(seq 1 300); do
    state=$(in_c systemctl is-system-running --wait 2>/dev/null) || true
    case "$state" in running | degraded | maintenance | stopping) break ;; esac
    sleep 0.1
done
version=$(in_c systemctl --version)
echo "systemd $(sed -n '1s/^systemd \([0-9]*\).*/\1/p' <<<"$version"): $state"
case "$state" in
running) ;;
degraded) in_c systemctl --failed --no-pager --plain || true ;;
*) images_fail "systemd in the container is $state" ;;
esac

images_step "apt-get install ./$(basename "$deb")"
podman cp "$deb" "$C:/tmp/"
in_c sh -c "cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./$(basename "$deb")" >/dev/null
grep -E '^(Status|Version)' <<<"$(in_c dpkg -s udpshard)"
in_c getent passwd udpshard

# The service's port below 1024, then three for backends.
read -r port a b c < <(images_free_ports 4 900 1024)
write_config() { # BACKEND...
    local list
    list=$(printf '"127.0.0.1:%s", ' "$@")
    in_c_stdin sh -c "cat > /etc/udpshard/udpshard.toml" <<EOF
workers = "auto"
drain_timeout = "2s"

[[listener]]
name = "quic"
bind = "127.0.0.1:$port"
dissector = "quic"
max_sessions = 10000
backends = [${list%, }]
EOF
}
write_config "$a" "$b"

# The unit asks for LimitNOFILE=1048576. Where root may not raise its hard
# limit (no CAP_SYS_RESOURCE: this machine kind), systemd cannot either, and
# the start fails with 205/LIMITS; cap it at what this container has.
hard=$(in_c sh -c 'ulimit -Hn')
if [ "$hard" != unlimited ] && [ "$hard" -lt 1048576 ]; then
    echo "this container's descriptor limit is $hard: a drop-in sets LimitNOFILE=$hard"
    in_c mkdir -p /etc/systemd/system/udpshard.service.d
    printf '[Service]\nLimitNOFILE=%s\n' "$hard" | in_c_stdin sh -c 'cat > /etc/systemd/system/udpshard.service.d/ci-limits.conf'
    in_c systemctl daemon-reload
fi

images_step "systemctl start udpshard"
in_c systemctl start udpshard || fail "systemctl start"
[ "$(show ActiveState)/$(show SubState)" = active/running ] || fail "not active (running) after start"
grep -q 'ready: ' <<<"$(journal)" || fail "no ready line in the journal"
status=$(show StatusText)
echo "active (running); status: $status"
case "$status" in "ready: "*) ;; *) fail "STATUS= is not the ready line: $status" ;; esac
main=$(show MainPID)
user=$(in_c ps -o user= -p "$main" | tr -d ' ')
[ "$user" = udpshard ] || fail "the main process runs as $user, not udpshard"
workers=$(in_c pgrep -P "$main" -x udpshard | tr '\n' ' ' || true)
[ -n "$workers" ] || fail "no worker under the main process"
# Capabilities: the supervisor keeps the unit's two; each worker, once its
# raw sockets are open, drops every capability (its upstream ports are the
# ephemeral range, above 1024) and sets no_new_privs.
caps_of() { in_c sh -c "sed -n 's/^$2:[[:space:]]*//p' /proc/$1/status"; }
NONE=0000000000000000 BIND_RAW=0000000000002400
sup_caps=$(caps_of "$main" CapEff)
echo "main pid $main (user $user) CapEff $sup_caps; workers $workers"
[ "$sup_caps" = $BIND_RAW ] ||
    fail "the supervisor holds CapEff $sup_caps, not CAP_NET_BIND_SERVICE and CAP_NET_RAW"
for w in $workers; do
    for set in CapEff CapPrm CapAmb; do
        w_caps=$(caps_of "$w" $set)
        [ "$w_caps" = $NONE ] || fail "worker $w holds $set $w_caps, not none"
    done
    [ "$(caps_of "$w" NoNewPrivs)" = 1 ] || fail "worker $w runs without no_new_privs"
    # systemd filters the unit too: the worker's own is one more.
    [ "$(caps_of "$w" Seccomp_filters)" = $(( $(caps_of "$main" Seccomp_filters) + 1 )) ] ||
        fail "worker $w runs without its system-call filter"
done
# The unit's own filters: what it may bind, the system calls it may make.
for prop in SocketBindAllow SocketBindDeny SystemCallFilter; do
    echo "$prop=$(show $prop | cut -c1-100)"
done
# (systemd 252 shows "tcp:9469" as "tcp9469", and "tcp" as "tcpany".)
grep -Eq '^tcp:?9469$' <<<"$(show SocketBindAllow)" || fail "SocketBindAllow= does not allow tcp:9469"
grep -Eq '^tcp:?(any)?$' <<<"$(show SocketBindDeny)" || fail "SocketBindDeny= does not deny tcp"
filter=$(show SystemCallFilter)
for call in seccomp sendmmsg recvmmsg epoll_wait; do
    grep -qw "$call" <<<"$filter" || fail "SystemCallFilter= lacks $call"
done
for call in ptrace bpf kexec_load; do
    ! grep -qw "$call" <<<"$filter" || fail "SystemCallFilter= allows $call"
done
grep -q "127.0.0.1:$port " <<<"$(ss -ulpn)" || fail "nothing listens on 127.0.0.1:$port"
echo "listening on 127.0.0.1:$port (below 1024) as udpshard; workers hold no capability, under their seccomp filter"

python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "a=127.0.0.1:$a" --backend "b=127.0.0.1:$b" \
    --flows 32 --cid-base 0x10000 || fail "round trips through the service"
# Forwards left as raw IP packets: the workers opened their raw sockets
# before dropping their capabilities. Workers publish counters in batches: poll
# until every forward (32, more if the client had to retry) is counted, and
# all of them raw.
sent_and_raw() {
    in_c udpshard stats --json | python3 -c 'import json, sys
ws = json.load(sys.stdin)["workers"]
tx, raw = sum(w["tx_packets"] for w in ws), sum(w["tx_raw"] for w in ws)
print("ok" if tx >= 32 and raw == tx else "no", tx, raw)'
}
until_ok 5 "every forward sent raw" grep_in '^ok' sent_and_raw
echo "tx_packets and tx_raw: $(sent_and_raw | cut -d' ' -f2-): every forward went out as a raw IP packet"

images_step "systemctl reload: a new backend list"
write_config "$c"
in_c systemctl reload udpshard
until_ok 10 "config generation 2" grep_in 'config generation 2' in_c udpshard stats
until_ok 5 "the reload in the journal" grep_in 'reloaded /etc/udpshard/udpshard.toml' journal
grep 'reloaded /etc/udpshard/udpshard.toml' <<<"$(journal)" | tail -1
python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "c=127.0.0.1:$c" \
    --flows 32 --cid-base 0x20000 --expect c || fail "new sessions after the reload"
[ "$(show NRestarts)" = 0 ] || fail "NRestarts=$(show NRestarts) after a reload"
[ "$(show MainPID)" = "$main" ] || fail "the main process changed on reload"
echo "reloaded: new sessions reach the new backend; NRestarts=0, same MainPID"

images_step "systemctl reload: a broken file"
in_c sh -c 'printf "workers = \"auto\"\n[[listener]]\nname = \"quic\"\nbindd = 1\n" > /etc/udpshard/udpshard.toml'
in_c systemctl reload udpshard
until_ok 10 "the reload failure in the journal" grep_in 'reload failed' journal
refused=$(grep 'reload failed' <<<"$(journal)" | tail -1)
echo "$refused"
grep -q '/etc/udpshard/udpshard.toml:4:1' <<<"$refused" ||
    fail "the journal does not name file:line:col"
until_ok 5 "STATUS= with the error" grep_in 'reload failed' show StatusText
status=$(in_c systemctl status --no-pager udpshard)
grep -E 'Active:|Status:' <<<"$status" || true
grep -q 'Status: "reload failed, still serving the previous config: /etc/udpshard/udpshard.toml:4:1' <<<"$status" ||
    fail "systemctl status does not show the error"
[ "$(show ActiveState)" = active ] || fail "not active after a broken reload"

images_step "upgrade-service with the broken file: the failure is reported at once, twice"
# The new binary refuses the file; the old generation serves on and says so
# in STATUS=. The package's script reports that as soon as it shows, also a
# second time with the same reason (the count keeps the text new), rather
# than after a fixed wait.
main=$(show MainPID)
for attempt in 1 2; do
    started=$SECONDS
    out=$(in_c /usr/lib/udpshard/upgrade-service 2>&1)
    echo "$out"
    grep -q "upgrade failed (failure $attempt)" <<<"$out" ||
        fail "upgrade-service did not report failure $attempt"
    [ $((SECONDS - started)) -le 20 ] || fail "upgrade-service took $((SECONDS - started)) s to report a refused file"
    [ "$(show MainPID)" = "$main" ] || fail "the main process changed on a failed upgrade"
    [ "$(show ActiveState)" = active ] || fail "not active after a failed upgrade"
done
python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "c=127.0.0.1:$c" \
    --flows 8 --cid-base 0x30000 --expect c || fail "the old config stopped serving"
echo "still active on the old config"
write_config "$c"

images_step "systemctl kill -s USR2 --kill-whom=main: a binary upgrade under traffic"
main=$(show MainPID)
workers=$(in_c pgrep -P "$main" -x udpshard | tr '\n' ' ')
ready=$(mktemp -u)
traffic_log=$(mktemp)
# 50 flows, a datagram each every 50 ms, for 6 s; the signal once replies flow.
python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "c=127.0.0.1:$c" \
    --flows 50 --cid-base 0x50000 --steady 6 --ready "$ready" >"$traffic_log" 2>&1 &
traffic=$!
until_ok 5 "steady traffic through the service" test -e "$ready"
in_c systemctl kill -s USR2 --kill-whom=main udpshard
main_changed() { [ "$(show MainPID)" != "$main" ] && [ "$(show MainPID)" != 0 ]; }
until_ok 30 "a new MainPID" main_changed
until_ok 10 "STATUS= upgraded" grep_in '^upgraded to ' show StatusText
wait "$traffic" || { cat "$traffic_log"; fail "traffic lost or moved during the upgrade"; }
cat "$traffic_log"
rm -f "$ready" "$traffic_log"
upgraded_main=$(show MainPID)
[ "$(show ActiveState)/$(show SubState)" = active/running ] || fail "not active (running) after the upgrade"
[ "$(show NRestarts)" = 0 ] || fail "NRestarts=$(show NRestarts) after the upgrade"
grep -q 'upgrade: the new generation serves; this supervisor exits' <<<"$(journal)" ||
    fail "the old supervisor did not hand over"
for w in $workers; do
    if in_c test -e "/proc/$w"; then
        fail "worker $w of the old generation is still alive"
    fi
done
in_c test -e "/proc/$main" && fail "the old supervisor $main still runs"
echo "upgraded: MainPID $main -> $upgraded_main, NRestarts=0, every datagram answered by its flow's one backend"

images_step "apt-get install --reinstall: the package upgrades the running service in place"
out=$(in_c sh -c "cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall ./$(basename "$deb")" 2>&1) ||
    { echo "$out"; fail "apt-get install --reinstall"; }
grep 'udpshard:' <<<"$out" || true
grep -q 'upgraded in place' <<<"$out" || { echo "$out"; fail "the postinst did not upgrade the running service"; }
[ "$(show MainPID)" != "$upgraded_main" ] || fail "the same MainPID after the package upgrade"
[ "$(show NRestarts)" = 0 ] || fail "NRestarts=$(show NRestarts) after the package upgrade"
in_c udpshard stats | head -2
until_ok 5 "two upgrades in the stats" grep_in 'binary upgrades (SIGUSR2): 2 done, 2 failed' in_c udpshard stats
python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "c=127.0.0.1:$c" \
    --flows 8 --cid-base 0x60000 --expect c || fail "round trips after the package upgrade"

images_step "systemctl stop and start after the in-place upgrades: the upgraded supervisor drains"
# Its main process is one systemd did not fork: without the unit's ExecStop,
# systemd 252 SIGKILLs the group right after its SIGTERM (Result=signal).
upgraded_main=$(show MainPID)
in_c systemctl stop udpshard
[ "$(show ActiveState)/$(show Result)" = inactive/success ] ||
    fail "$(show ActiveState), Result=$(show Result) after stopping the upgraded service"
log=$(in_c journalctl -u udpshard --no-pager -o short)
for said in "signal 15: draining" "all workers exited; bye"; do
    grep -q "udpshard\[$upgraded_main\]: .*$said" <<<"$log" ||
        { tail -20 <<<"$log"; fail "the upgraded supervisor $upgraded_main did not log '$said'"; }
done
grep "udpshard\[$upgraded_main\]: .*signal 15: draining" <<<"$log" | tail -1
in_c systemctl start udpshard
[ "$(show ActiveState)" = active ] || fail "not active after the start"
[ "$(show NRestarts)" = 0 ] || fail "NRestarts=$(show NRestarts) after a stop and a start"
echo "stopped: the upgraded supervisor $upgraded_main drained and exited 0 (Result=success); started again"
# Upgraded once more, so that the SIGKILL below hits a main process systemd
# did not fork, as after any package upgrade.
main=$(show MainPID)
in_c systemctl kill -s USR2 --kill-whom=main udpshard
until_ok 30 "a new MainPID" main_changed
until_ok 10 "STATUS= upgraded" grep_in '^upgraded to ' show StatusText
main=$(show MainPID)
workers=$(in_c pgrep -P "$main" -x udpshard | tr '\n' ' ')

images_step "systemctl kill -s KILL --kill-whom=main"
in_c systemctl kill -s KILL --kill-whom=main udpshard
# Where systemd in the container has only the legacy (v1) cgroup tree, as
# on this machine kind's hybrid hosts, it has no reliable cgroup-empty event:
# when a worker outlives the SIGKILL'd supervisor by a moment, systemd may
# wait out TimeoutStopSec (30 s) for a process that is gone ("Processes still
# around after SIGKILL. Ignoring.") before the restart. On the unified
# hierarchy the restart follows RestartSec (2 s).
killed_at=$SECONDS
until_ok 45 "NRestarts=1" test_eq 1 show NRestarts
until_ok 15 "active again" test_eq active show ActiveState
echo "restarted $((SECONDS - killed_at)) s after the SIGKILL"
if grep -q 'Processes still around after SIGKILL' <<<"$(journal)"; then
    echo "note: systemd waited for a process that had exited (legacy cgroup tree in a container: no cgroup-empty event)"
fi
new_main=$(show MainPID)
[ "$new_main" != "$main" ] || fail "the same MainPID after SIGKILL"
for w in $workers; do
    if in_c test -e "/proc/$w"; then
        fail "worker $w of the killed supervisor is still alive"
    fi
done
count=$(in_c pgrep -x udpshard | wc -l)
expect=$(($(in_c pgrep -P "$new_main" -x udpshard | wc -l) + 1))
[ "$count" = "$expect" ] || fail "$count udpshard processes, expected the new supervisor and its workers ($expect)"
echo "restarted: NRestarts=1, MainPID $main -> $new_main, the old workers ($workers) are gone"
python3 .ci/roundtrip.py --proxy "127.0.0.1:$port" --backend "c=127.0.0.1:$c" \
    --flows 8 --cid-base 0x40000 --expect c || fail "round trips after the restart"

images_step "systemctl stop"
in_c systemctl stop udpshard
[ "$(show ActiveState)" = inactive ] || fail "ActiveState=$(show ActiveState) after stop"
[ "$(show Result)" = success ] || fail "Result=$(show Result) after stop"
[ "$(in_c pgrep -x udpshard | wc -l)" = 0 ] || fail "udpshard processes left after stop"
tail -2 <<<"$(journal)"

images_step "SocketBindDeny=tcp: a metrics endpoint off the unit's one TCP port"
# Where systemd can attach its cgroup socket-bind programs (BPF), a start
# with metrics on another TCP port fails and says why; on 9469 it serves.
read -r other < <(images_free_ports 1 9470 9999)
config_with_metrics() { # PORT
    in_c sh -c "sed -i '/^metrics = /d' /etc/udpshard/udpshard.toml && sed -i '1i metrics = \"127.0.0.1:$1\"' /etc/udpshard/udpshard.toml"
}
config_with_metrics "$other"
if in_c systemctl start udpshard 2>/dev/null; then
    # systemd enforces it with BPF on the unified (v2) cgroup hierarchy;
    # a container on a v1 or hybrid tree has the rule but cannot apply it.
    echo "note: SocketBindDeny= is not enforced in this container ($(in_c stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup, not cgroup2): the start on tcp:$other went through"
    in_c systemctl stop udpshard
else
    until_ok 10 "the journal names the rule" grep_in 'a cgroup rule denies it' journal
    in_c systemctl stop udpshard || true
    in_c systemctl reset-failed udpshard || true
    echo "refused: metrics on tcp:$other ($(journal | grep -o 'metrics endpoint [^(]*' | tail -1))"
fi
config_with_metrics 9469
in_c systemctl start udpshard || fail "start with metrics on tcp:9469"
until_ok 10 "metrics on 127.0.0.1:9469" grep_in udpshard_worker_filter_kills_total \
    python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9469/metrics").read().decode())'
in_c systemctl stop udpshard
[ "$(show Result)" = success ] || fail "Result=$(show Result) after the last stop"
echo "metrics served on tcp:9469, the port the unit allows"
echo "inactive, Result=success"

images_step "the .rpm in a Debian container (rpm -i --nodeps)"
podman rm -f "$R" >/dev/null 2>&1 || true
podman_run -d --name "$R" --network host localhost/udpshard-ci-systemd:latest sleep 600 >/dev/null
podman cp "$rpm" "$R:/tmp/udpshard.rpm"
podman exec -e DEBIAN_FRONTEND=noninteractive "$R" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends rpm >/dev/null'
podman exec "$R" rpm -i --nodeps /tmp/udpshard.rpm
podman exec "$R" rpm -q udpshard
modes=$(podman exec "$R" stat -c '%a %U:%G %n' /usr/bin/udpshard /usr/lib/systemd/system/udpshard.service \
    /etc/udpshard/udpshard.toml /usr/lib/sysctl.d/60-udpshard.conf)
echo "$modes"
[ "$modes" = "755 root:root /usr/bin/udpshard
644 root:root /usr/lib/systemd/system/udpshard.service
644 root:root /etc/udpshard/udpshard.toml
644 root:root /usr/lib/sysctl.d/60-udpshard.conf" ] || images_fail "the rpm's file modes"
podman exec "$R" rpm -V --nodeps udpshard || images_fail "rpm -V: the installed files differ from the package"
podman exec "$R" getent passwd udpshard || images_fail "the rpm's %pre did not create the udpshard user"
podman exec "$R" /usr/bin/udpshard -V
podman exec "$R" /usr/bin/udpshard check-config /etc/udpshard/udpshard.toml
podman exec "$R" rpm -e --nodeps udpshard
podman exec "$R" test ! -e /usr/bin/udpshard || images_fail "rpm -e left /usr/bin/udpshard"
echo "rpm: installed, verified, erased"

images_step "done in $((SECONDS - IMAGES_START))s"

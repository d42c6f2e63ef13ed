#!/usr/bin/env bash
# Packaging CI: builds the .deb and the .rpm, lists what they hold, installs
# the .deb on this machine, checks the installed config, runs the installed
# binary the way the unit does (system user, CAP_NET_BIND_SERVICE and
# CAP_NET_RAW only, a port below 1024) against loopback backends, verifies the unit with
# systemd-analyze, and purges the package again. Any failure exits non-zero.
#
# Needs root and dpkg (CI has both); without them it says so and skips. The
# install and smoke test run only with CI=true (see below).
# On 2 cores: about 6 minutes on a fresh machine (installing cargo-deb and
# cargo-generate-rpm, then a release build), about 2 once they are installed
# (the release build), seconds when that is built too.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
OUT=target/packages
INSTALLED_CONFIG=/etc/udpshard/udpshard.toml

start=$SECONDS
step() { printf '\n== packaging [%3ds] %s\n' "$((SECONDS - start))" "$*"; }
fail() { echo "packaging: FAILED: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ] || ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
    echo "packaging: skipped: installing the .deb needs root, dpkg and apt-get (CI has them)"
    exit 0
fi

step "tools"
if cargo deb --version >/dev/null 2>&1; then
    echo "already installed: $(cargo deb --version)"
else
    cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
fi
if cargo generate-rpm --version >/dev/null 2>&1; then
    echo "already installed: $(cargo generate-rpm --version)"
else
    # Unoptimised, it builds in half the time (~420 crates, most of them for
    # RPM signing, unused here) and still packages udpshard in seconds.
    CARGO_PROFILE_RELEASE_OPT_LEVEL=0 cargo install --locked "cargo-generate-rpm@$CARGO_GENERATE_RPM_VERSION"
fi

apt_missing=()
command -v rpm >/dev/null || apt_missing+=(rpm)
# The systemd package only provides systemd-analyze here: it does not become
# init, and with PID 1 not systemd its install scripts start nothing.
if ! command -v systemd-analyze >/dev/null && [ ! -d /run/systemd/system ]; then
    apt_missing+=(systemd)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
    apt-get update -qq
    for pkg in "${apt_missing[@]}"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null ||
            [ "$pkg" = systemd ] || fail "apt-get install $pkg"
    done
fi

step "release build (stripped)"
CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked -p udpshard

step "glibc floor"
# RHEL 9 ships glibc 2.34: the binary must not ask for a newer symbol version.
if command -v objdump >/dev/null; then
    newest=$(objdump -T target/release/udpshard | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
    echo "newest glibc symbol version needed: $newest"
    [ "$(printf '%s\nGLIBC_2.34\n' "$newest" | sort -V | tail -1)" = GLIBC_2.34 ] ||
        fail "the binary needs $newest, newer than RHEL 9's GLIBC_2.34"
elif [ "${CI:-}" = true ]; then
    fail "no objdump (binutils) to check the glibc floor"
else
    echo "no objdump: glibc floor not checked"
fi

step "packages"
rm -rf "$OUT"
mkdir -p "$OUT"
cargo deb -p udpshard --no-build --output "$OUT/" >/dev/null
cargo generate-rpm -p supervisor --output "$OUT/" >/dev/null
deb=$(echo "$OUT"/udpshard_*.deb)
rpm=$(echo "$OUT"/udpshard-*.rpm)
[ -f "$deb" ] || fail "no .deb in $OUT"
[ -f "$rpm" ] || fail "no .rpm in $OUT"
ls -l "$deb" "$rpm"

step "contents: $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb" | tee "$OUT/deb.list"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
echo "conffiles: $conffiles"
[ "$conffiles" = "$INSTALLED_CONFIG" ] || fail "the .deb's conffiles should be $INSTALLED_CONFIG"

step "contents: $rpm"
rpm -qpi "$rpm"
rpm -qp --queryformat '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm" |
    tee "$OUT/rpm.list"
grep -qx -- "-rw-r--r-- root:root $INSTALLED_CONFIG cn" "$OUT/rpm.list" ||
    fail "the .rpm should mark $INSTALLED_CONFIG %config(noreplace)"
# cargo-generate-rpm takes a script path it cannot find as the script itself.
rpm -qp --scripts "$rpm" >"$OUT/rpm.scripts"
grep -q useradd "$OUT/rpm.scripts" || fail "the .rpm's %pre does not create the user"
grep -q 'daemon-reload' "$OUT/rpm.scripts" || fail "the .rpm's %postun is missing"
grep -q '/usr/lib/udpshard/upgrade-service' "$OUT/rpm.scripts" ||
    fail "the .rpm's %posttrans does not upgrade a running service in place"
if grep -q 'try-restart' "$OUT/rpm.scripts"; then
    fail "the .rpm restarts the service on upgrade (its sessions would be lost)"
fi
postinst=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./postinst)
grep -q '/usr/lib/udpshard/upgrade-service' <<<"$postinst" ||
    fail "the .deb's postinst does not upgrade a running service in place"
prerm=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./prerm 2>/dev/null) || prerm=
# Its prerm stops the service on remove only, and its postinst never
# restarts it.
if grep -q 'deb-systemd-invoke' <<<"$postinst" ||
    { grep -q 'deb-systemd-invoke' <<<"$prerm" && ! grep -q '"$1" = remove ]; then' <<<"$prerm"; }; then
    fail "the .deb stops or restarts the service on upgrade (its sessions would be lost)"
fi

for path in usr/bin/udpshard usr/lib/udpshard/upgrade-service \
    usr/lib/systemd/system/udpshard.service etc/udpshard/udpshard.toml \
    usr/lib/sysctl.d/60-udpshard.conf usr/share/doc/udpshard/README.md; do
    grep -q " \./$path\$" "$OUT/deb.list" || fail "the .deb lacks /$path"
    grep -q " /$path\( \|$\)" "$OUT/rpm.list" || fail "the .rpm lacks /$path"
done

# Installing the .deb changes the machine for good: the postinst raises the
# host's net.core sysctls (purging does not lower them) and creates the
# udpshard system user. CI's machines are thrown away; anywhere else, stop
# here unless asked (CI=true).
if [ "${CI:-}" != true ]; then
    echo "packaging: built and inspected both packages; not installing the .deb (set CI=true to" \
        "install, smoke-test and purge it: that raises this host's net.core sysctls for good and" \
        "leaves a udpshard system user)"
    exit 0
fi

step "install the .deb"
installed=0
cleanup() {
    if [ "$installed" = 1 ]; then
        echo "packaging: purging udpshard"
        dpkg --purge udpshard >/dev/null || true
    fi
}
trap cleanup EXIT
if dpkg -s udpshard >/dev/null 2>&1; then
    dpkg --purge udpshard
fi
installed=1
dpkg -i "$deb"
getent passwd udpshard || fail "postinst did not create the udpshard user"
# Again, as an upgrade: the user exists, the conffile is kept.
dpkg -i "$deb"
while read -r key want; do
    have=$(cat "/proc/sys/$(echo "$key" | tr . /)")
    if [ "$have" -lt "$want" ]; then
        if [ -w /proc/sys/net/core/rmem_max ]; then
            fail "postinst left $key=$have, below $want"
        fi
        echo "note: $key=$have (read-only /proc/sys: postinst could not raise it)"
    else
        echo "$key = $have (drop-in: $want)"
    fi
done < <(sed -n 's/^\([a-z0-9_.]*\) = \([0-9]*\)$/\1 \2/p' /usr/lib/sysctl.d/60-udpshard.conf)

reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)
case ",$reserved," in
*,20000-29999,*) echo "reserved ports: $reserved (the packaged upstream_ports)" ;;
*)
    if [ -w /proc/sys/net/ipv4/ip_local_reserved_ports ]; then
        fail "postinst did not reserve the packaged upstream_ports (ip_local_reserved_ports: $reserved)"
    fi
    echo "note: ip_local_reserved_ports=$reserved (read-only /proc/sys)"
    ;;
esac

step "check-config $INSTALLED_CONFIG"
/usr/bin/udpshard check-config "$INSTALLED_CONFIG"

step "run the installed binary as the unit would, against loopback backends"
python3 - "$INSTALLED_CONFIG" <<'PY'
"""The packaged config with loopback addresses, served by /usr/bin/udpshard as
user udpshard holding only CAP_NET_BIND_SERVICE and CAP_NET_RAW (the unit's
two), on a port below 1024: forwards leave as raw IP packets."""
import json, os, pwd, queue, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time

packaged = open(sys.argv[1]).read()
user = pwd.getpwnam("udpshard")

def backend(name):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    seen = []
    def serve():
        while True:
            data, peer = s.recvfrom(65536)
            seen.append(data)
            s.sendto(name + b":" + data, peer)
    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname(), seen

def privileged_port():
    for port in range(900, 1024):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    sys.exit("no free UDP port below 1024 on 127.0.0.1")

def sub(pattern, repl, text):
    text, n = re.subn(pattern, repl, text, count=1, flags=re.M | re.S)
    if n != 1:
        sys.exit(f"packaged config has no {pattern!r} to replace")
    return text

(a_host, a_port), seen_a = backend(b"a")
(b_host, b_port), seen_b = backend(b"b")
port = privileged_port()
tmp = tempfile.mkdtemp(prefix="udpshard-pkg-")
os.chmod(tmp, 0o755)
os.chown(tmp, user.pw_uid, user.pw_gid)
config = packaged
config = sub(r'^workers = .*?$', 'workers = 2', config)
config = sub(r'^stats_file = .*?$', f'stats_file = "{tmp}/stats"', config)
config = sub(r'^bind = .*?$', f'bind = "127.0.0.1:{port}"', config)
config = sub(r'^backends = \[.*?^\]', f'backends = ["{a_host}:{a_port}", "{b_host}:{b_port}"]', config)
path = os.path.join(tmp, "udpshard.toml")
with open(path, "w") as f:
    f.write(config)

# The unit's two capabilities; CAP_NET_RAW only where this machine may grant
# it (a container without it in its bounding set): then forwards go out on
# their own sockets, and tx_raw must stay 0.
bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)", open("/proc/self/status").read(), re.M).group(1), 16)
raw_allowed = bool(bounding & (1 << 13))  # CAP_NET_RAW
caps = "-all,+net_bind_service" + (",+net_raw" if raw_allowed else "")
if not raw_allowed:
    print("note: no CAP_NET_RAW in this machine's bounding set: running with CAP_NET_BIND_SERVICE only")
cmd = ["setpriv", "--reuid=udpshard", "--regid=udpshard", "--clear-groups",
       f"--inh-caps={caps}", f"--ambient-caps={caps}",
       f"--bounding-set={caps}", "--no-new-privs",
       "/usr/bin/udpshard", "run", "--config", path]
proxy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
log = []
lines = queue.Queue()
def pump():
    for line in proxy.stderr:
        log.append(line)
        lines.put(line)
    lines.put(None)
threading.Thread(target=pump, daemon=True).start()
try:
    deadline = time.monotonic() + 20
    addr = None
    while addr is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            sys.exit("udpshard did not become ready:\n" + "".join(log))
        m = re.search(r"ready: .* serving \S+@(\S+)", line)
        if m:
            host, _, p = m.group(1).rpartition(":")
            addr = (host, int(p))
    print(f"ready on {addr[0]}:{addr[1]} as user udpshard")

    flows = 16
    replies = 0
    for i in range(flows):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(3)
        c.sendto(b"\x40" + (0x5EED0000 + i).to_bytes(8, "big") + b"hello", addr)
        data, _ = c.recvfrom(65536)
        if data.endswith(b"hello") and data[:2] in (b"a:", b"b:"):
            replies += 1
        c.close()
    print(f"{flows} datagrams sent, {replies} replies; backends saw a={len(seen_a)} b={len(seen_b)}")
    if replies != flows or len(seen_a) + len(seen_b) != flows:
        sys.exit("not every datagram made the round trip:\n" + "".join(log))

    # Workers publish their counters in batches: poll briefly.
    for _ in range(40):
        stats = json.loads(subprocess.run(
            ["/usr/bin/udpshard", "stats", "--json", "--stats-file", f"{tmp}/stats"],
            check=True, capture_output=True, text=True).stdout)
        rx = sum(w["rx_packets"] for w in stats["workers"])
        if rx == flows:
            break
        time.sleep(0.05)
    raw = sum(w["tx_raw"] for w in stats["workers"])
    print(f"stats: {len(stats['workers'])} workers, rx_packets {rx}, tx_raw {raw}")
    if rx != flows:
        sys.exit(f"stats rx_packets {rx}, expected {flows}")
    want_raw = flows if raw_allowed else 0
    if raw != want_raw:
        sys.exit(f"stats tx_raw {raw}, expected {want_raw} (CAP_NET_RAW granted: {raw_allowed})")

    proxy.send_signal(signal.SIGTERM)
    code = proxy.wait(timeout=15)
    if code != 0:
        sys.exit(f"udpshard exited {code} after SIGTERM:\n" + "".join(log))
    print("SIGTERM: exit 0")
finally:
    if proxy.poll() is None:
        proxy.kill()
        proxy.wait()
    shutil.rmtree(tmp, ignore_errors=True)
PY

step "systemd-analyze verify"
if command -v systemd-analyze >/dev/null; then
    # verify exits 0 on warnings (an unknown key, a Type= this systemd lacks):
    # any output fails.
    verify=$(systemd-analyze verify /usr/lib/systemd/system/udpshard.service 2>&1) ||
        fail "systemd-analyze verify: $verify"
    [ -z "$verify" ] || fail "systemd-analyze verify: $verify"
    echo "$(systemd-analyze --version | head -1): udpshard.service verified"
else
    echo "systemd-analyze verify skipped: no systemd-analyze, and the systemd package was not installed" \
        "(it is only installed where systemd is not init, and its install must have succeeded)"
fi

step "purge"
dpkg --purge udpshard
installed=0
[ ! -e /usr/bin/udpshard ] || fail "/usr/bin/udpshard left after purge"
[ ! -e "$INSTALLED_CONFIG" ] || fail "$INSTALLED_CONFIG left after purge"

step "done in $((SECONDS - start))s"

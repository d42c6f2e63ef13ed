# Sourced by .ci/container.sh and .ci/systemd.sh: podman from Debian's
# packages, and Debian base images made with mmdebstrap from the mirror this
# machine's apt already uses. No image registry is needed.
#
# Two quirks of the machines CI runs on, handled in podman_run:
# - root lacks CAP_SYS_RESOURCE, so a container cannot be given a higher
#   descriptor or process limit than the caller's hard one: pass those;
# - the cgroup hierarchy may be hybrid (v1 controllers), where crun refuses
#   to start a container: use runc.

IMAGES_DIR=${IMAGES_DIR:-target/ci-images}
# The step clock starts when a script sources this file.
IMAGES_START=$SECONDS

images_step() { printf '\n== %s [%3ds] %s\n' "$IMAGES_WHAT" "$((SECONDS - IMAGES_START))" "$*"; }
images_fail() {
    echo "$IMAGES_WHAT: FAILED: $*" >&2
    exit 1
}

# Whether this machine can run these checks at all; prints why not. Under
# CI=true a machine that cannot is a failure, not a skip.
images_can_run() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        if [ "${CI:-}" = true ]; then
            images_fail "needs root and apt-get, which CI has"
        fi
        echo "$IMAGES_WHAT: skipped: needs root and apt-get (CI has both)"
        return 1
    fi
}

images_install_tools() {
    local want=(podman runc uidmap slirp4netns fuse-overlayfs containernetworking-plugins
        iptables conmon catatonit mmdebstrap python3 procps iproute2)
    local missing=()
    for pkg in "${want[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        images_step "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    podman --version
}

# The Debian mirror apt uses for this release: the first URI of a source
# whose suites include the host's codename (deb822 .sources or the one-line
# format), with a mirror+file: list resolved to its first mirror; else
# Debian's own.
debian_mirror() {
    python3 - <<'PY'
import glob, re
codename = "bookworm"
for line in open("/etc/os-release"):
    if line.startswith("VERSION_CODENAME="):
        codename = line.split("=", 1)[1].strip().strip('"') or codename
def resolve(uri):
    if uri.startswith("mirror+file:"):
        try:
            for line in open("/" + uri[len("mirror+file:"):].lstrip("/")):
                words = line.split()
                if words and words[0].startswith("http"):
                    return words[0]
        except OSError:
            return None
        return None
    return uri if uri.startswith("http") else None
found = None
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
        if codename in fields.get("Suites", "").split() and fields.get("Enabled", "yes") != "no":
            for uri in fields.get("URIs", "").split():
                found = found or resolve(uri)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m and m.group(2) == codename:
            found = found or resolve(m.group(1))
print(found or "http://deb.debian.org/debian")
PY
}

# images_base NAME [PACKAGES]: a minbase rootfs of this machine's Debian
# release (plus PACKAGES, comma-separated), imported as localhost/NAME:latest.
# The tarball is kept under $IMAGES_DIR; delete it to rebuild.
images_base() {
    local name=$1 include=${2:-}
    local suite
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    # Keyed by the package list too: a changed list makes a new rootfs.
    local key
    key=$(echo "$include" | sha256sum | cut -c1-8)
    local tar="$IMAGES_DIR/$name-$suite-$key.tar"
    mkdir -p "$IMAGES_DIR"
    if [ ! -s "$tar" ]; then
        images_step "mmdebstrap $suite${include:+ with $include} from $(debian_mirror)"
        mmdebstrap --quiet --variant=minbase ${include:+--include="$include"} \
            "$suite" "$IMAGES_DIR/partial-$name.tar" "$(debian_mirror)"
        mv "$IMAGES_DIR/partial-$name.tar" "$tar"
    fi
    podman import --quiet "$tar" "localhost/$name:latest" >/dev/null
    echo "localhost/$name:latest from $tar ($(du -h "$tar" | cut -f1))"
}

images_ulimits() {
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    echo "--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
}

# podman run with this machine's quirks handled (see the top).
podman_run() {
    # shellcheck disable=SC2046
    podman run --runtime runc $(images_ulimits) "$@"
}

# images_free_ports N [LOW HIGH]: N distinct free UDP ports on 127.0.0.1,
# all held until every one is chosen; with LOW HIGH the first comes from
# [LOW, HIGH) (a port below 1024, say), the rest from the kernel.
images_free_ports() {
    python3 - "$@" <<'PY'
import socket, sys
count = int(sys.argv[1])
held = []
if len(sys.argv) > 3:
    for port in range(int(sys.argv[2]), int(sys.argv[3])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        held.append(s)
        break
    else:
        sys.exit(f"no free UDP port in {sys.argv[2]}..{sys.argv[3]}")
while len(held) < count:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(*(s.getsockname()[1] for s in held))
PY
}

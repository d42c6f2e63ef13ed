# udpshard .rpm %post: the sysctl limits, and the unit known to systemd (as
# %systemd_post does: a preset on first install; RHEL's default preset leaves
# it disabled, which suits a config whose backends are placeholders).
# $1: 1 on install, 2 on upgrade.

# Raises each limit in the drop-in to its value where the running kernel's is
# lower, and never lowers one: an administrator's larger rmem_max stays. Boot
# applies the file through systemd-sysctl in the usual order. In a container
# /proc/sys is read-only: say so and go on (set them on the host).
SYSCTL_FILE=/usr/lib/sysctl.d/60-udpshard.conf
if [ -r "$SYSCTL_FILE" ]; then
    sed -n 's/^[[:space:]]*\([a-z0-9_.]*\)[[:space:]]*=[[:space:]]*\([0-9]*\)[[:space:]]*$/\1 \2/p' "$SYSCTL_FILE" |
        while read -r key want; do
            proc="/proc/sys/$(echo "$key" | tr . /)"
            have=$(cat "$proc" 2>/dev/null) || continue
            [ "$have" -ge "$want" ] 2>/dev/null && continue
            if ! (echo "$want" >"$proc") 2>/dev/null; then
                echo "udpshard: cannot set $key=$want here (read-only /proc/sys?); set it on the host" >&2
            fi
        done
fi

# The drop-in's reserved ports join what the running kernel reserves.
want=$(sed -n 's/^[[:space:]]*net\.ipv4\.ip_local_reserved_ports[[:space:]]*=[[:space:]]*\([0-9,-]*\)[[:space:]]*$/\1/p' "$SYSCTL_FILE" 2>/dev/null)
proc=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -n "$want" ] && [ -r "$proc" ]; then
    have=$(cat "$proc")
    case ",$have," in
    *",$want,"*) ;;
    *) (echo "${have:+$have,}$want" >"$proc") 2>/dev/null ||
        echo "udpshard: cannot reserve ports $want here (read-only /proc/sys?); set it on the host" >&2 ;;
    esac
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl --no-reload preset udpshard.service >/dev/null 2>&1 || :
    fi
fi
exit 0

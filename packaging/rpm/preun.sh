# udpshard .rpm %preun (as %systemd_preun): on erase, not on upgrade, stop
# and disable the service. $1: 0 on erase, 1 on upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now udpshard.service >/dev/null 2>&1 || :
fi
exit 0

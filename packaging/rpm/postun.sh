# udpshard .rpm %postun (as %systemd_postun_with_restart): forget the removed
# unit, or restart a running service on the new binary after an upgrade.
# $1: 0 on erase, 1 on upgrade.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart udpshard.service >/dev/null 2>&1 || :
    fi
fi
exit 0

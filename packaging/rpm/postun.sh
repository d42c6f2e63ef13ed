# udpshard .rpm %postun (as %systemd_postun, without the restart): forget
# the removed unit. An upgrade does not restart the service: %posttrans
# upgrades a running one in place (SIGUSR2), keeping its sessions.
# $1: 0 on erase, 1 on upgrade.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0

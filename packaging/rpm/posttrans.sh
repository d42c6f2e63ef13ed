# udpshard .rpm %posttrans: once the transaction is done (the old package's
# files are gone, the unit reloaded by %postun), a running service moves to
# the new binary in place, keeping its sessions (SIGUSR2); a service that is
# not running is left alone, as on a first install.
/usr/lib/udpshard/upgrade-service
exit 0

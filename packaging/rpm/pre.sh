# udpshard .rpm %pre: the service's system user, before its files land.
# $1: 1 on install, 2 on upgrade.
getent group udpshard >/dev/null || groupadd --system udpshard
getent passwd udpshard >/dev/null ||
    useradd --system --gid udpshard --no-create-home --home-dir / \
        --shell /usr/sbin/nologin --comment "udpshard UDP proxy" udpshard
exit 0

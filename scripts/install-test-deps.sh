#!/usr/bin/env bash
# Installs the external tools the test suite drives: qemu-io/qemu-img
# (qemu-utils), nbdcopy/nbdinfo/nbdfuse (libnbd-bin), libnbd's Python
# binding (python3-libnbd), fio, nbdkit, zfs-fuse (the failover tests),
# tmux (terminal output), curl and promtool (the metrics endpoint), and the
# FUSE/loop/network tools later tests use.
# Idempotent; needs root (apt).
set -euo pipefail

need=()
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v nbdcopy  >/dev/null || need+=(libnbd-bin)
command -v nbdfuse  >/dev/null || need+=(libnbd-bin)
command -v fio      >/dev/null || need+=(fio)
command -v nbdkit   >/dev/null || need+=(nbdkit)
# libnbd's Python binding (and nbdsh): FAST_ZERO, CACHE, DF, block status.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v losetup  >/dev/null || need+=(mount)
command -v nft      >/dev/null || need+=(nftables)
command -v ip       >/dev/null || need+=(iproute2)
command -v tmux     >/dev/null || need+=(tmux)
command -v curl     >/dev/null || need+=(curl)
# promtool (validates the metrics exposition) comes only with the server
# package; its service is kept from starting (policy-rc.d below).
command -v promtool >/dev/null || need+=(prometheus)
# zfs-fuse: the failover tests run their own daemon (it lives in /usr/sbin).
PATH="$PATH:/usr/sbin:/sbin" command -v zfs-fuse >/dev/null || need+=(zfs-fuse)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-test-deps: all tools present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: missing ${need[*]}; run as root (apt-get)" >&2
    exit 1
fi
echo "install-test-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# No package's service may start during the install (the prometheus
# server, in particular): the tests only need the tools.
policy=/usr/sbin/policy-rc.d
own_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
fi
apt-get install -y -qq --no-install-recommends "${need[@]}"
if [ -n "$own_policy" ]; then rm -f "$policy"; fi
# The package's service may have started a zfs-fuse daemon: the failover
# tests run (and kill) their own, one per host, so stop the service's.
if [[ " ${need[*]} " == *" zfs-fuse "* ]] && pgrep -x zfs-fuse >/dev/null 2>&1; then
    invoke-rc.d zfs-fuse stop || /etc/init.d/zfs-fuse stop || true
fi

#!/usr/bin/env bash
# HAST demo on this host: two nodes (nodeA on 127.0.0.1, nodeB on
# 127.0.0.2), three file-backed resources replicated with memsync.
#  1. builds hastd/hastctl, writes one hast.conf for both nodes;
#  2. initialises the providers, starts both daemons;
#  3. nodeB secondary, nodeA primary: data written through nodeA's NBD
#     exports with qemu-io / qemu-img; status shows complete, dirty 0;
#  4. role switch: nodeA secondary, nodeB primary; the same data is read
#     back through nodeB's exports.
# Everything lives in $HAST_DEMO_DIR (default /tmp/hast-demo); the daemons
# are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${HAST_DEMO_DIR:-/tmp/hast-demo}
command -v qemu-io >/dev/null || {
    echo "demo: installing qemu-utils (qemu-io, qemu-img)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-utils
}

echo "== building (release)"
cargo build --release --bins -q
BIN=$PWD/target/release
ctl() { local node=$1; shift; "$BIN/hastctl" -c "$DIR/hast.conf" --node "$node" "$@"; }

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -rf "$DIR"; mkdir -p "$DIR"
for n in A B; do for r in 1 2 3; do truncate -s 256M "$DIR/node$n-disk$r.img"; done; done
{
    echo "# Two nodes on one host; each has its own control socket, pidfile,"
    echo "# export directory and listen address."
    echo "on nodeA { control uds://$DIR/nodeA.ctl pidfile $DIR/nodeA.pid exportdir $DIR/nodeA-export listen 127.0.0.1:8457 }"
    echo "on nodeB { control uds://$DIR/nodeB.ctl pidfile $DIR/nodeB.pid exportdir $DIR/nodeB-export listen 127.0.0.2:8457 }"
    echo "replication memsync"
    echo "timeout 5"
    for r in 1 2 3; do
        echo "resource disk$r {"
        echo "    on nodeA { local $DIR/nodeA-disk$r.img remote 127.0.0.2 source 127.0.0.1 }"
        echo "    on nodeB { local $DIR/nodeB-disk$r.img remote 127.0.0.1 source 127.0.0.2 }"
        echo "}"
    done
} > "$DIR/hast.conf"
echo "== hast.conf"; cat "$DIR/hast.conf"
"$BIN/hastd" -c "$DIR/hast.conf" --node nodeA -t
"$BIN/hastd" -c "$DIR/hast.conf" --node nodeB -t

echo "== hastctl create (both nodes)"
echo "   (the demo's disks are sparse files: hastctl warns that this slows writes"
echo "    to new extents; use block devices or written files in production)"
ctl nodeA create disk1 disk2 disk3
ctl nodeB create disk1 disk2 disk3

for n in nodeA nodeB; do
    "$BIN/hastd" -F -c "$DIR/hast.conf" --node $n 2>>"$DIR/$n.log" &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$DIR/$n.ctl" ] && break; sleep 0.05; done
done

wait_in_sync() { # node
    for _ in $(seq 600); do
        if ctl "$1" list --json | python3 -c '
import json,sys
rs=json.load(sys.stdin)
sys.exit(0 if all(r["status"]=="complete" and r["dirty"]==0 and r["sync"] is None and r["queues"]["recv"]==0 for r in rs) else 1)'; then
            return 0
        fi
        sleep 0.1
    done
    echo "demo: $1 did not reach complete/dirty 0"; ctl "$1" list; exit 1
}

echo "== nodeB: role secondary all; nodeA: role primary all"
ctl nodeB role secondary all
ctl nodeA role primary all
wait_in_sync nodeA
ctl nodeA status

uri() { echo "nbd+unix:///$2?socket=$DIR/$1-export/$2.sock"; }
echo "== writing through nodeA's exports"
head -c 48M /dev/urandom > "$DIR/random.bin"
qemu-io -f raw -c 'write -P 0xab 0 16M' -c 'write -P 0xcd 200M 1M' -c flush "$(uri nodeA disk1)"
qemu-img convert -n -f raw -O raw "$DIR/random.bin" "$(uri nodeA disk2)"
qemu-io -f raw -c 'write -z 0 64M' -c 'write -P 0x42 100M 8M' -c flush "$(uri nodeA disk3)"
wait_in_sync nodeA
echo "== nodeA after the writes"
ctl nodeA status
ctl nodeA list disk2 | grep -E 'role|status|dirty|writes'
ctl nodeB status

echo "== role switch: nodeA secondary, nodeB primary"
ctl nodeA role secondary all
ctl nodeB role primary all
wait_in_sync nodeB
ctl nodeB status

echo "== reading the same data through nodeB's exports"
qemu-io -f raw -c 'read -P 0xab 0 16M' -c 'read -P 0xcd 200M 1M' "$(uri nodeB disk1)"
qemu-img compare -f raw -F raw "$DIR/random.bin" \
    "json:{\"driver\":\"raw\",\"size\":$((48<<20)),\"file\":{\"driver\":\"nbd\",\"path\":\"$DIR/nodeB-export/disk2.sock\",\"export\":\"disk2\"}}"
qemu-io -f raw -c 'read -P 0 0 64M' -c 'read -P 0x42 100M 8M' "$(uri nodeB disk3)"
echo "== demo complete: files in $DIR, logs in $DIR/nodeA.log and $DIR/nodeB.log"

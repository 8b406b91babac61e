#!/usr/bin/env bash
# A HAST demo on this host with file-backed disks: builds hastd/hastctl,
# configures a node with two resources, initialises them, makes them
# primary, writes data through the NBD exports with real clients, reads it
# back, shows status/list/dump, restarts hastd and checks the data is still
# there. Everything lives in $HAST_DEMO_DIR (default /tmp/hast-demo) and
# hastd is stopped on exit.
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
HASTCTL="$BIN/hastctl -c $DIR/hast.conf --node demo"

HASTD_PID=
cleanup() {
    if [ -n "$HASTD_PID" ] && kill -0 "$HASTD_PID" 2>/dev/null; then
        kill -TERM "$HASTD_PID"; wait "$HASTD_PID" || true
    fi
}
trap cleanup EXIT

rm -rf "$DIR"; mkdir -p "$DIR"
truncate -s 256M "$DIR/disk1.img" "$DIR/disk2.img"
cat > "$DIR/hast.conf" <<CONF
# Demo node: two resources on file-backed disks, no peer yet.
control uds://$DIR/ctl.sock
pidfile $DIR/hastd.pid
exportdir $DIR/export
resource disk1 { on demo { local $DIR/disk1.img remote none } }
resource disk2 { on demo { local $DIR/disk2.img remote none } }
CONF
echo "== hast.conf"; cat "$DIR/hast.conf"

echo "== hastd -t"
"$BIN/hastd" -c "$DIR/hast.conf" --node demo -t

echo "== hastctl create disk1 disk2"
$HASTCTL create disk1 disk2
$HASTCTL dump disk1

start_hastd() {
    "$BIN/hastd" -F -c "$DIR/hast.conf" --node demo 2>>"$DIR/hastd.log" &
    HASTD_PID=$!
    for _ in $(seq 100); do [ -S "$DIR/ctl.sock" ] && return; sleep 0.05; done
    echo "hastd did not start:"; cat "$DIR/hastd.log"; exit 1
}
start_hastd
echo "== hastctl role primary all"
$HASTCTL role primary all
$HASTCTL status

URI1="nbd+unix:///disk1?socket=$DIR/export/disk1.sock"
URI2="nbd+unix:///disk2?socket=$DIR/export/disk2.sock"
echo "== writing patterns through the NBD exports (qemu-io)"
qemu-io -f raw -c 'write -P 0xab 0 8M' -c 'write -P 0xcd 100M 1M' -c flush "$URI1"
echo "== copying 32 MiB of random data into disk2 (qemu-img convert)"
head -c 32M /dev/urandom > "$DIR/random.bin"
qemu-img convert -n -f raw -O raw "$DIR/random.bin" "$URI2"
echo "== reading back"
qemu-io -f raw -c 'read -P 0xab 0 8M' -c 'read -P 0xcd 100M 1M' "$URI1"
# The export is larger than the file; compare the first 32 MiB.
qemu-img compare -f raw -F raw "$DIR/random.bin" "json:{\"driver\":\"raw\",\"size\":$((32<<20)),\"file\":{\"driver\":\"nbd\",\"path\":\"$DIR/export/disk2.sock\",\"export\":\"disk2\"}}"
$HASTCTL list disk1

echo "== restarting hastd; the data survives"
kill -TERM "$HASTD_PID"; wait "$HASTD_PID" || true; HASTD_PID=
$HASTCTL dump disk1
start_hastd
$HASTCTL role primary all
qemu-io -f raw -c 'read -P 0xab 0 8M' "$URI1"
$HASTCTL status
echo "== demo complete: files in $DIR, hastd log in $DIR/hastd.log"

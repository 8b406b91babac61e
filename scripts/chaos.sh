#!/bin/sh
# A chaos run of two real hastd nodes: a verifying writer on the primary's
# export; random kill -9 of either node, partitions and heals through the
# test proxy, SIGSTOP/SIGCONT of either node, role switches; at the end
# every acknowledged record is read back and the legs compared byte for
# byte. Both providers fail on demand (write errors on the secondary's
# disk, read and write errors on the primary's) where root and nbdkit
# allow; HAST_CHAOS_DISKS=0 leaves disk faults out. The driver is
# tests/tests/chaos.rs (the suite runs it for 120 s).
#
#   scripts/chaos.sh [DURATION_SECONDS] [SEED]
#
# The seed is printed; passing it again draws the same faults.
set -eu
cd "$(dirname "$0")/.."
secs="${1:-120}"
case "$secs" in ''|*[!0-9]*) echo "usage: $0 [DURATION_SECONDS] [SEED]" >&2; exit 64;; esac
export HAST_CHAOS_SECS="$secs"
# A failed run leaves both nodes' whole logs here.
export HAST_KEEP_LOGS="${HAST_KEEP_LOGS:-$PWD/target/chaos-logs}"
if [ $# -ge 2 ]; then export HAST_CHAOS_SEED="$2"; fi
cargo build --workspace --bins
exec cargo test -p hast-tests --test chaos -- --nocapture --test-threads=1

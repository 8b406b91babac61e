#!/usr/bin/env bash
# The end-to-end benchmarks: builds the release binaries, then runs
# hast-bench (bench/src/bin/hast-bench.rs) on this host.
#
#   scripts/bench.sh                  # everything: raw disk, qemu-nbd, hastd in
#                                     # each mode, two resources, the 8 GiB
#                                     # working set, full sync; prints the table
#                                     # and the targets, writes
#                                     # $TARGET/hast-bench.json, the charts in
#                                     # docs/bench/ and the generated section of
#                                     # docs/benchmarks.md
#   scripts/bench.sh qemu-nbd         # one part: raw, qemu-nbd, hastd, two, big,
#                                     # sync, replication (the old baseline)
#   scripts/bench.sh hastd --modes memsync --workloads randwrite-4k-qd32
#   scripts/bench.sh --help           # every option
#
# Needs fio, qemu-nbd and qemu-io (scripts/install-test-deps.sh installs
# them); counting system calls needs root (or CAP_PERFMON) and tracefs, not
# the perf tool. About 20 GiB free under HAST_TEST_DIR (the 8 GiB job keeps
# two 8 GiB providers). Respects CARGO_TARGET_DIR. Benchmark files go to HAST_TEST_DIR
# (default /tmp; must support O_DIRECT, so not tmpfs). An interrupted run
# stops every process it started (each step runs in its own process group).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${CARGO_TARGET_DIR:-$root/target}

pid=
stop() {
	if [ -n "$pid" ]; then
		kill -TERM -- "-$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		# The harness keeps its files in one directory (see hast-bench.rs;
		# with --dir DIR it is under DIR instead).
		rm -rf "${HAST_TEST_DIR:-${TMPDIR:-/tmp}}/hast-bench-run-$pid"
	fi
	exit 130
}
trap stop INT TERM HUP

# Runs a command in its own process group (job control) and waits for it,
# so that stop() can end it together with everything it started.
group() {
	set -m
	"$@" &
	pid=$!
	set +m
	local rc=0
	wait "$pid" || rc=$?
	pid=
	return "$rc"
}

echo "== cargo build --release --workspace --bins" >&2
group cargo build --release --workspace --bins

if [ $# -eq 0 ]; then
	set -- all --json "$target/hast-bench.json" --docs "$root/docs/benchmarks.md"
fi
group "$target/release/hast-bench" "$@"

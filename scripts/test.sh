#!/usr/bin/env bash
# The whole test suite: installs the tools it needs, checks formatting and
# lints, builds the binaries the integration tests run, then runs every
# test of the workspace (unit, property, integration with real clients).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries for the integration tests)"
cargo build --workspace --bins
echo "== cargo test"
# Integration tests start real daemons; keep the parallelism modest on
# small machines.
cargo test --workspace -- --test-threads="${HAST_TEST_THREADS:-4}"

#!/usr/bin/env bash
# Runs every test: unit tests and the integration suite, which boots real QEMU guests,
# sandboxes them for real (uid, chroot, seccomp, cgroups) and drives the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "run as root: the integration tests sandbox real VMs" >&2; exit 1; }
scripts/host-packages.sh
images/build-guest.sh build/guest
cargo fmt --all -- --check
# The benchmarks are not tests, but they must keep building.
cargo test --locked -p palisade --bench boot --bench audit --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Doc tests are skipped (there are none); the integration suite runs two tests at a time.
set +e
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

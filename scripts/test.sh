#!/usr/bin/env bash
# Runs every test: unit tests and the integration suite, which boots real QEMU guests,
# sandboxes them for real (uid, chroot, seccomp, cgroups) and drives the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "run as root: the integration tests sandbox real VMs" >&2; exit 1; }
scripts/host-packages.sh
images/build-guest.sh build/guest
cargo fmt --all -- --check
cargo test --workspace --locked -- --test-threads=2

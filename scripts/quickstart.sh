#!/usr/bin/env bash
# From a fresh Debian 12 machine (as root) to a running tenant VM:
# host packages, build, guest image, then `palisade up` (controller + local agent) which
# creates a demo tenant and user, boots a VM and prints its boot line. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "run as root: QEMU sandboxing needs chroot, setuid and cgroups" >&2; exit 1; }
scripts/host-packages.sh
cargo build --release --locked -p palisade
images/build-guest.sh build/guest
exec target/release/palisade up \
  --data-dir "${PALISADE_DATA:-/var/lib/palisade}" \
  --guest-image build/guest "$@"

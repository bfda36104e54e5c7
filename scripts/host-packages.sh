#!/usr/bin/env bash
# Installs the Debian 12 packages Palisade's hosts and tests need, only those missing.
set -euo pipefail

packages=(
  qemu-system-x86   # the hypervisor (one sandboxed process per VM)
  qemu-utils        # qemu-img: disks, format always pinned
  nftables          # tenant network isolation (later issues)
  iproute2          # ip, tc, bridges, netns
  busybox-static    # guest image initramfs (the build script downloads its own copy too)
  cpio              # guest image initramfs
  kmod              # modinfo during the guest image build
  sqlite3           # inspecting the controller database in tests
  ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: Palisade needs a Rust toolchain >= 1.95 (rustup)" >&2
  exit 1
fi

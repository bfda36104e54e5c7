#!/usr/bin/env bash
# Installs the Debian 12 packages Palisade's hosts and tests need, only those missing.
set -euo pipefail

packages=(
  qemu-system-x86   # the hypervisor (one sandboxed process per VM)
  qemu-utils        # qemu-img: disks, format always pinned
  nftables          # tenant network isolation: security groups, ACLs, anti-spoofing
  iproute2          # ip, bridge, tc: namespaces, bridges, taps, bandwidth limits
  procps            # sysctl inside the agent's network namespace
  conntrack         # flushing the sessions a changed rule no longer allows
  busybox-static    # guest image initramfs (the build script downloads its own copy too)
  cpio              # guest image initramfs
  kmod              # modinfo during the guest image build
  sqlite3           # inspecting the controller database in tests
  rsyslog           # the syslog collector of the audit export test (not run as a service)
  rsyslog-gnutls    # its TLS driver (RFC 5425)
  ca-certificates
)

missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}

# Installing one package can remove another (a newer qemu-utils from backports conflicts
# with Debian 12's qemu-system-x86 and is removed for it), so look again after installing.
export DEBIAN_FRONTEND=noninteractive
updated=
for round in 1 2; do
  missing_packages
  [ "${#missing[@]}" -eq 0 ] && break
  echo "installing: ${missing[*]}"
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
done
missing_packages
if [ "${#missing[@]}" -gt 0 ]; then
  echo "could not install: ${missing[*]}" >&2
  exit 1
fi
# Node.js runs the OpenID Connect provider of the federation tests (testing/oidc); any
# packaging of Node >= 18.12 will do, so look for the command, not a package.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing: nodejs npm"
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  apt-get install -y -qq --no-install-recommends nodejs npm
fi
for tool in qemu-system-x86_64 qemu-img nft ip tc node npm; do
  command -v "$tool" >/dev/null || { echo "$tool is missing after installing packages" >&2; exit 1; }
done

if ! command -v cargo >/dev/null; then
  echo "cargo not found: Palisade needs a Rust toolchain >= 1.95 (rustup)" >&2
  exit 1
fi

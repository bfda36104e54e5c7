#!/usr/bin/env bash
# Build Palisade's guest image (kernel + initramfs + image.json) from Debian
# packages only.
#
# Usage: images/build-guest.sh OUT_DIR
#
# Everything comes from the host's configured Debian archive through apt, so
# every byte is covered by the archive's signed Release files and we need no
# second trust root, no checksums pinned by hand and no network access other
# than the Debian mirror. Nothing is installed on the host (except cpio if it
# is missing) and /boot is never read: the packages are downloaded and
# unpacked into a private temp dir.
#
# Runs as root on Debian 12 (bookworm). Re-running is cheap: when OUT_DIR
# already holds an image built from the current candidate kernel and busybox
# packages (recorded in OUT_DIR/packages.txt), the script exits at once.
# Delete OUT_DIR/image.json to force a rebuild.

set -euo pipefail
# apt-cache output is parsed below and must not be translated.
export LC_ALL=C

KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
IMAGE_NAME=debian-12-busybox
CMDLINE=quiet

# The drivers a Palisade instance needs: its disk (virtio-blk), its NIC
# (virtio-net) and the virtio console, all behind virtio-pci. Their
# dependencies are resolved from modules.dep below, not listed here.
WANTED_MODULES=(virtio_pci virtio_blk virtio_net virtio_console)

# Applets /init and an operator on the console rely on; checked at build time
# so a busybox without them fails the build rather than the boot.
REQUIRED_APPLETS=(sh mount insmod ip ifconfig udhcpc cat sleep ping nc echo uname seq ls
    setsid cttyhack wget arping)

prog=${0##*/}
die() { echo "$prog: error: $*" >&2; exit 1; }
log() { echo "$prog: $*" >&2; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $prog OUT_DIR"
out_dir=$1
[[ $EUID -eq 0 ]] || die "must run as root (needs apt-get update/install and mknod)"

# --- apt helpers -------------------------------------------------------------

# Prints "PACKAGE VERSION" for each given package whose candidate version can
# be downloaded from some archive. A candidate known only from
# /var/lib/dpkg/status (package installed, apt lists empty or stale) does not
# count: apt-get download would fail on it. One apt-cache call for all
# packages, as each call costs most of a second when apt keeps no binary cache
# (as in Debian's container images).
candidates() {
    apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ]/            { p = $1; sub(/:$/, "", p); cand = ""; cur = ""; next }
        /^  Candidate: /   { cand = $2; next }
        /^        [0-9-]/  { if (cur != "" && cur == cand && $2 != "/var/lib/dpkg/status") ok[p] = cand; next }
        /^ (\*\*\*|   ) [^ ]/ { cur = ($1 == "***") ? $2 : $1 }
        END                { for (p in ok) print p, ok[p] }'
}
candidate() { candidates "$1" | awk '{ print $2 }'; }

apt_updated=0
ensure_apt_lists() {
    # A fresh machine (or container) may never have run apt-get update, in
    # which case apt knows no downloadable candidate.
    if [[ -z $(candidate "$KERNEL_META") ]]; then
        log "no downloadable candidate for $KERNEL_META; running apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
        apt_updated=1
        [[ -n $(candidate "$KERNEL_META") ]] ||
            die "$KERNEL_META has no downloadable candidate even after apt-get update; is a bookworm amd64 source configured?"
    fi
}

ensure_tools() {
    local t missing=()
    for t in apt-get apt-cache dpkg-deb gzip sha256sum; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]} == 0)) || die "missing host tools: ${missing[*]} (is this Debian?)"
    if ! command -v cpio >/dev/null; then
        log "cpio not found; installing it"
        ((apt_updated)) || { apt-get update -q >&2 || die "apt-get update failed"; apt_updated=1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cpio >&2 ||
            die "could not install cpio"
    fi
}

ensure_tools
ensure_apt_lists

# The metapackage only tracks the current ABI; the concrete package names the
# kernel we actually ship (e.g. linux-image-6.1.0-57-cloud-amd64).
kernel_pkg=$(apt-cache depends "$KERNEL_META" |
    sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p;T;q')
[[ -n $kernel_pkg ]] || die "could not resolve $KERNEL_META to a concrete linux-image package"
declare -A ver=()
while read -r p v; do ver[$p]=$v; done < <(candidates "$kernel_pkg" "$BUSYBOX_PKG")
kernel_ver=${ver[$kernel_pkg]:-}
busybox_ver=${ver[$BUSYBOX_PKG]:-}
[[ -n $kernel_ver ]] || die "$kernel_pkg has no downloadable candidate version"
[[ -n $busybox_ver ]] || die "$BUSYBOX_PKG has no downloadable candidate version"
kver=${kernel_pkg#linux-image-}

# --- the probe: Palisade's own test tool for the guest -----------------------

# Built from this repository (images/probe), statically, so it runs on busybox
# alone. Its digest goes into packages.txt: a changed probe rebuilds the image.
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo >/dev/null || die "cargo is needed to build the guest's probe tool"
log "building the probe (static)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked \
    -p palisade-probe --target x86_64-unknown-linux-gnu --target-dir "$repo/target/probe" >&2) ||
    die "building the probe failed"
probe_bin=$repo/target/probe/x86_64-unknown-linux-gnu/release/palisade-probe
probe_sha=$(sha256sum <"$probe_bin" | cut -d' ' -f1)

# --- early exit when up to date ----------------------------------------------

json_field() { sed -n "s/.*\"$1\": *\"\\([^\"]*\\)\".*/\\1/p;T;q" "$2"; }

# The package versions live beside image.json, not in it: the controller
# parses image.json with deny_unknown_fields, so it carries only the fields
# the controller knows.
manifest=$out_dir/image.json
packages_file=$out_dir/packages.txt
packages="$kernel_pkg $kernel_ver
$BUSYBOX_PKG $busybox_ver
palisade-probe sha256:$probe_sha"
if [[ -f $manifest && -f $packages_file ]] &&
    [[ $(<"$packages_file") == "$packages" ]] &&
    [[ -f $out_dir/vmlinuz && -f $out_dir/initramfs.cpio.gz ]] &&
    # Guards against a half-written or hand-edited OUT_DIR; costs ~0.1 s.
    [[ $(sha256sum <"$out_dir/vmlinuz" | cut -d' ' -f1) == "$(json_field kernel_sha256 "$manifest")" ]] &&
    [[ $(sha256sum <"$out_dir/initramfs.cpio.gz" | cut -d' ' -f1) == "$(json_field initrd_sha256 "$manifest")" ]]; then
    log "$out_dir is up to date ($kernel_pkg $kernel_ver); nothing to do"
    exit 0
fi

# --- download and unpack -----------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/palisade-guest.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
# Turn signals into a normal exit so the EXIT trap above still cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM HUP
# apt-get download drops privileges to _apt; it must be able to write here,
# otherwise apt warns and falls back to downloading as root.
chmod 0755 "$work"
mkdir "$work/debs"
if id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi

log "downloading $kernel_pkg=$kernel_ver and $BUSYBOX_PKG=$busybox_ver"
# Pin the exact versions we resolved so the manifest cannot disagree with
# what was downloaded if the archive moves on mid-run.
(cd "$work/debs" && apt-get download -q "$kernel_pkg=$kernel_ver" "$BUSYBOX_PKG=$busybox_ver" >&2) ||
    die "apt-get download failed"

shopt -s nullglob
kdebs=("$work"/debs/"$kernel_pkg"_*.deb)
bdebs=("$work"/debs/"$BUSYBOX_PKG"_*.deb)
shopt -u nullglob
((${#kdebs[@]} == 1 && ${#bdebs[@]} == 1)) || die "unexpected download result in $work/debs"
dpkg-deb -x "${kdebs[0]}" "$work/kernel"
dpkg-deb -x "${bdebs[0]}" "$work/busybox"

vmlinuz_src=$work/kernel/boot/vmlinuz-$kver
moddir=$work/kernel/lib/modules/$kver
bb=$work/busybox/bin/busybox
[[ -f $vmlinuz_src ]] || die "$kernel_pkg does not contain boot/vmlinuz-$kver"
[[ -d $moddir ]] || die "$kernel_pkg does not contain lib/modules/$kver"
[[ -x $bb ]] || die "$BUSYBOX_PKG does not contain bin/busybox"

# --- resolve kernel modules --------------------------------------------------

# Debian generates modules.dep in the package's postinst, so the .deb does
# not ship it. Generate it with the busybox we just unpacked (static amd64,
# runs on the host) rather than requiring kmod on the build host.
if [[ ! -f $moddir/modules.dep ]]; then
    "$bb" depmod -b "$work/kernel" "$kver" || die "depmod failed for $kver"
fi

declare -A dep_line=() mod_path=() visited=()
while IFS= read -r line; do
    path=${line%%:*}
    name=${path##*/}
    name=${name%%.ko*}
    name=${name//-/_}
    mod_path[$name]=$path
    dep_line[$name]=${line#*:}
done <"$moddir/modules.dep"

# modules.dep lists the transitive dependencies of each module, but whether
# that list is sorted is a depmod implementation detail. Loading is order
# sensitive, so do a depth-first post-order walk: every module comes after all
# it depends on, whatever the list order. Walking each list backwards (as
# modprobe loads it) merely makes the result match kmod's order.
load_order=()
visit() {
    local m=$1 d dn i
    local -a deps
    [[ -z ${visited[$m]:-} ]] || return 0
    visited[$m]=1
    read -ra deps <<<"${dep_line[$m]}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        d=${deps[i]}
        dn=${d##*/}
        dn=${dn%%.ko*}
        visit "${dn//-/_}"
    done
    load_order+=("$m")
}
for m in "${WANTED_MODULES[@]}"; do
    if [[ -z ${mod_path[$m]:-} ]]; then
        # A future kernel may build the driver in; then there is nothing to load.
        if grep -qE "/${m//_/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            log "module $m is built into $kver; skipping"
            continue
        fi
        die "module $m not found in $kver"
    fi
    visit "$m"
done
log "modules in load order: ${load_order[*]}"

# --- assemble the initramfs tree ---------------------------------------------

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/share/udhcpc,etc,proc,sys,dev,tmp,run,lib/modules}
chmod 1777 "$root/tmp"
install -m 0755 "$bb" "$root/bin/busybox"
install -m 0755 "$probe_bin" "$root/bin/probe"

# One symlink per applet, at the path busybox itself says it belongs.
while IFS= read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done < <("$bb" --list-full)
for a in "${REQUIRED_APPLETS[@]}"; do
    [[ -L $root/bin/$a || -L $root/sbin/$a || -L $root/usr/bin/$a || -L $root/usr/sbin/$a ]] ||
        die "busybox $busybox_ver lacks required applet: $a"
done

# Busybox insmod reads the file itself and may not be built with xz
# support, so ship plain .ko files. Bookworm ships them uncompressed anyway.
: >"$root/etc/modules"
for m in "${load_order[@]}"; do
    src=$moddir/${mod_path[$m]}
    case $src in
    *.ko) install -m 0644 "$src" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) "$bb" unxz -c "$src" >"$root/lib/modules/$m.ko" ;;
    *) die "unsupported module compression: ${mod_path[$m]}" ;;
    esac
    echo "$m" >>"$root/etc/modules"
done

# The kernel opens /dev/console for PID 1 before /init can mount devtmpfs;
# without this node the early output would be lost. /init also re-opens the
# console after mounting devtmpfs, so a failing mknod is not fatal.
mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || log "warning: could not create dev/console"

cat >"$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# busybox udhcpc hook: apply the lease to the interface.
# shellcheck disable=SC2154 # interface, ip, router, dns... come from udhcpc.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"} up
    # Replace, not append: a renew must not stack default routes.
    while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
    for r in $router; do
        ip -4 route add default via "$r" dev "$interface" && break
    done
    : >/etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
    for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
    echo "udhcpc: $interface bound to $ip/${mask:-$subnet} via ${router:-none}"
    ;;
leasefail|nak)
    echo "udhcpc: $interface: $1"
    ;;
esac
exit 0
EOF
chmod 0755 "$root/usr/share/udhcpc/default.script"
# Debian builds busybox with /etc/udhcpc/default.script as udhcpc's default
# (upstream uses /usr/share/udhcpc). /init passes -s explicitly; the link makes
# a bare `udhcpc -i eth0` typed on the console work too.
mkdir -p "$root/etc/udhcpc"
ln -s /usr/share/udhcpc/default.script "$root/etc/udhcpc/default.script"

cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the Palisade guest. If PID 1 ever exits the kernel panics, so
# nothing here may abort: no `set -e`, the work runs in a subshell (even an
# unexpected exit there only ends the subshell), and PID 1 then idles forever.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Re-open the console from devtmpfs in case the kernel could not open one.
# Tested in a subshell first: a failed redirection on `exec` would end PID 1.
if (: >/dev/console) 2>/dev/null; then
    exec </dev/console >/dev/console 2>&1
fi

boot() {
    while read -r m; do
        if err=$(insmod "/lib/modules/$m.ko" 2>&1); then
            echo "module $m: loaded"
        else
            echo "module $m: FAILED: $err"
        fi
    done </etc/modules

    echo "PALISADE-BOOT-OK"
    uname -r

    ip link set lo up
    echo "== ip addr"
    ip addr
    echo "== ip route"
    ip route

    if [ -e /sys/class/net/eth0 ]; then
        ip link set eth0 up
        echo "== udhcpc eth0"
        udhcpc -i eth0 -n -q -t 3 -T 1 -s /usr/share/udhcpc/default.script ||
            echo "udhcpc: no lease on eth0"
        echo "== ip addr"
        ip addr
        echo "== ip route"
        ip route
    fi

    echo "== block devices"
    ls -1 /sys/block
}

( boot )
# A shell on the serial console, as a real cloud's serial console gives one:
# the tenant reaches it through the console API. It comes back if it exits.
( while :; do setsid cttyhack sh -l; sleep 1; done ) </dev/ttyS0 >/dev/ttyS0 2>&1 &
echo "PALISADE-CONSOLE-READY"
while :; do sleep 3600; done
EOF
chmod 0755 "$root/init"

# --- pack ----------------------------------------------------------------------

mkdir -p "$out_dir"
# Fixed mtimes, owners, inode numbers and entry order make the archive
# depend only on its contents.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -n -9 >"$out_dir/.initramfs.cpio.gz.tmp"
install -m 0644 "$vmlinuz_src" "$out_dir/.vmlinuz.tmp"
chmod 0644 "$out_dir/.initramfs.cpio.gz.tmp"

kernel_sha=$(sha256sum <"$out_dir/.vmlinuz.tmp" | cut -d' ' -f1)
initrd_sha=$(sha256sum <"$out_dir/.initramfs.cpio.gz.tmp" | cut -d' ' -f1)

# image.json goes last: it is what marks OUT_DIR as complete, so a build
# interrupted before this point is redone on the next run. Drop the old one
# first so OUT_DIR never pairs new files with stale digests.
rm -f "$manifest"
mv -f "$out_dir/.vmlinuz.tmp" "$out_dir/vmlinuz"
mv -f "$out_dir/.initramfs.cpio.gz.tmp" "$out_dir/initramfs.cpio.gz"
printf '%s\n' "$packages" >"$out_dir/.packages.txt.tmp"
chmod 0644 "$out_dir/.packages.txt.tmp"
mv -f "$out_dir/.packages.txt.tmp" "$packages_file"
cat >"$out_dir/.image.json.tmp" <<EOF
{"name":"$IMAGE_NAME","kernel":"vmlinuz","initrd":"initramfs.cpio.gz","kernel_sha256":"$kernel_sha","initrd_sha256":"$initrd_sha","cmdline":"$CMDLINE","kernel_version":"$kver"}
EOF
chmod 0644 "$out_dir/.image.json.tmp"
mv -f "$out_dir/.image.json.tmp" "$manifest"

log "built $IMAGE_NAME in $out_dir: kernel $kver ($kernel_pkg $kernel_ver), busybox $busybox_ver"
log "modules: ${load_order[*]}"

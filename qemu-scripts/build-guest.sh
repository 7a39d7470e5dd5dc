#!/bin/bash
# build-guest.sh [OUTDIR]: build the tiny Linux guest for the e2e tests.
#
# Output (OUTDIR defaults to target/guest under the repository root):
#   OUTDIR/vmlinuz              Debian cloud kernel
#   OUTDIR/initramfs.cpio.gz    busybox + fio + e2fsprogs + virtio modules + /init
#   OUTDIR/stamp                what it was built from; equal stamp => skip
#
# The kernel package is downloaded and unpacked, never installed: the host
# kernel is not touched. The guest runs host binaries (fio, mke2fs), so the
# guest userland is whatever Debian has on this machine, libraries included.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)

OUTDIR=${1:-$ROOT/target/guest}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# Drivers the guest needs, in load order. Dependencies found in the modules'
# own metadata are inserted before their users; names that are built into
# this kernel are skipped. The crc32c providers come before ext4 because
# ext4/jbd2 find crc32c through the crypto API, not a symbol dependency,
# and the guest has no modprobe/udev to load it on demand.
WANTED_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
    virtio_pci virtio_blk crc32c_generic libcrc32c crc16 mbcache jbd2 ext4)

# Host packages whose files go into the guest, plus tools used to build it.
ensure_packages busybox-static fio e2fsprogs cpio gzip

# Kernel: the image the linux-image-cloud-amd64 metapackage points at.
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
KPKG=${GUEST_KERNEL_PACKAGE:-$(kernel_package || true)}
if [ -z "$KPKG" ]; then
    # Empty package lists on a fresh machine: fetch them and ask again.
    apt_update_once
    KPKG=$(kernel_package || true)
fi
[ -n "$KPKG" ] || die "cannot find the kernel package of linux-image-cloud-amd64"

# Everything the result depends on. If it matches the stamp of the last
# build, the existing guest is reused (a rebuild takes ~20 s).
host_versions() {
    dpkg-query -W -f '${Package}=${Version}\n' busybox-static fio e2fsprogs libc6
    # fio's library closure may change with any library upgrade.
    ldd /usr/bin/fio /sbin/mke2fs /sbin/e2fsck | awk '/=>/ { print $3 }' | sort -u \
        | xargs -r readlink -f | xargs -r sha256sum | sha256sum
}
STAMP=$( {
    echo "kernel=$KPKG"
    echo "modules=${WANTED_MODULES[*]}"
    host_versions
    sha256sum "$HERE/build-guest.sh" "$HERE/guest-init.sh" "$HERE/lib.sh" | awk '{ print $1 }'
} )
if [ -f "$OUTDIR/stamp" ] && [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initramfs.cpio.gz" ] \
    && [ "$(cat "$OUTDIR/stamp")" = "$STAMP" ]; then
    log "guest in $OUTDIR is up to date"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building guest in $OUTDIR (kernel $KPKG)"

# --- kernel ----------------------------------------------------------------
(cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$KPKG" >&2) || {
    # A stale package list names a version the mirror no longer has.
    apt_update_once
    (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$KPKG" >&2)
}
dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kpkg"
KVMLINUZ=$(find "$WORK/kpkg/boot" -name 'vmlinuz-*' | head -n1)
[ -n "$KVMLINUZ" ] || die "no vmlinuz in $KPKG"
KVER=${KVMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kpkg/lib/modules/$KVER"
[ -d "$MODDIR" ] || MODDIR="$WORK/kpkg/usr/lib/modules/$KVER"
[ -d "$MODDIR" ] || die "no module directory for $KVER in $KPKG"

# --- guest root ------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,root,lib/modules}
# Module names use '_' where file names may use '-'; normalize to '_'.
norm() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }

declare -A MODFILE=() BUILTIN=() SEEN=()
while IFS= read -r f; do
    MODFILE[$(norm "$f")]=$f
done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r f; do BUILTIN[$(norm "$f")]=1; done <"$MODDIR/modules.builtin"
fi

# Copy one module into the guest uncompressed: busybox insmod may lack
# xz/zstd support, and the kernel's in-kernel decompression is optional.
LOAD_ORDER=()
add_module() {
    local name=$1 src dst dep deps
    [ -n "${SEEN[$name]:-}" ] && return 0
    SEEN[$name]=1
    if [ -n "${BUILTIN[$name]:-}" ]; then
        log "module $name: built in"
        return 0
    fi
    src=${MODFILE[$name]:-}
    if [ -z "$src" ]; then
        # Neither built in nor a module: the kernel lacks it. Drivers the
        # test cannot run without are checked when the guest boots.
        log "module $name: not in this kernel, skipped"
        return 0
    fi
    dst="$R/lib/modules/$name.ko"
    case "$src" in
        # Newer Debian kernels compress modules; fetch the tool on demand.
        *.ko.xz) ensure_packages xz-utils && xz -dc "$src" >"$dst" ;;
        *.ko.zst) ensure_packages zstd && zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
    # The .modinfo section holds NUL-separated key=value strings; depends=
    # lists the modules whose symbols this one uses (what depmod reads; the
    # unpacked package has no modules.dep, depmod runs at install time).
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        add_module "$(norm "$dep")"
    done
    LOAD_ORDER+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${LOAD_ORDER[@]}" >"$R/lib/modules/load-order"
log "modules to load: ${LOAD_ORDER[*]}"

# copy_bin SRC: copy a host executable and every shared library it needs
# to the same paths in the guest (same paths keep RUNPATHs and the ELF
# interpreter path valid without an ld.so.cache).
copy_with_path() {
    mkdir -p "$R$(dirname "$1")"
    cp -L "$1" "$R$1"
}
copy_bin() {
    local bin=$1 lib
    copy_with_path "$bin"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for
    # the dynamic loader; vdso has no file.
    for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [ -e "$R$lib" ] || copy_with_path "$lib"
    done
}

cp /bin/busybox "$R/bin/busybox"
file_is_static=$(ldd /bin/busybox 2>&1 || true)
case "$file_is_static" in
    *"not a dynamic"*|*"statically linked"*) ;;
    *) die "/bin/busybox is not static (install busybox-static)" ;;
esac
# Must exist before busybox --install runs at boot: /init's shebang.
ln -s busybox "$R/bin/sh"
copy_bin /usr/bin/fio
copy_bin /sbin/mke2fs
ln -sf mke2fs "$R/sbin/mkfs.ext4"
copy_bin /sbin/e2fsck
# mke2fs reads its defaults (ext4 features) from here; without it, it warns
# and falls back to compiled-in defaults that may differ from the host's.
cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"
echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"
install -m 0755 "$HERE/guest-init.sh" "$R/init"
# Early console before devtmpfs is mounted (needs root for mknod; the
# kernel's built-in initramfs usually provides it anyway).
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || true

# --- pack ------------------------------------------------------------------
# newc is the only cpio format the kernel unpacks; owner root so setuid-less
# root files look normal inside the guest.
(cd "$R" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet) \
    | gzip -1 >"$WORK/initramfs.cpio.gz"

cp "$KVMLINUZ" "$WORK/vmlinuz"
mv "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
echo "$KVER" >"$OUTDIR/kernel-version"
echo "$STAMP" >"$OUTDIR/stamp"
log "guest ready: $OUTDIR ($(du -h "$OUTDIR/initramfs.cpio.gz" | cut -f1) initramfs, kernel $KVER)"

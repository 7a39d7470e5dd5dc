#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks for the tests, and leaves ONE consistent QEMU:
# every QEMU package from bookworm-backports (10.0). Mixing bookworm's 7.2 with backports'
# 10.0 breaks: installing bookworm's qemu-system-x86 removes the image's qemu-utils 10.0 (so
# qemu-img disappears), and a QEMU 10 binary beside 7.2 modules aborts when it loads them.
# Idempotent: a second run installs nothing and does not touch apt's lists.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# The QEMU packages, all from backports. qemu-system-x86 pulls qemu-system-common,
# qemu-system-data, seabios and ipxe-qemu; the target release makes apt take those from
# backports too. qemu-utils carries qemu-img, qemu-nbd, qemu-io and qemu-storage-daemon.
qemu_packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils
    qemu-block-extra seabios)
# Everything else (Debian's own versions). libnbd-bin: nbdinfo/nbdcopy for the NBD tests.
# libvirt for qemu-scripts/libvirt.sh; its -sysv package keeps apt from pulling in
# systemd-container (there is no systemd here), bsdutils's `script` gives the progress test
# a terminal. Ceph (bookworm's 16.2: the librbd1 qemu-block-extra already uses): the daemons of
# the one-node test cluster (scripts/ceph-cluster.sh), and librbd's headers with libclang for
# the `rbd` cargo feature (rbd-sys runs bindgen over them).
other_packages=(fio busybox-static cpio thin-provisioning-tools zstd e2fsprogs libnbd-bin
    libvirt-daemon-system libvirt-clients libvirt-daemon-system-sysv bsdutils
    ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev libclang-dev)

is_backport() { # PACKAGE: installed, and its version is a bookworm backport
    local v
    v=$(dpkg-query -W -f '${db:Status-Status} ${Version}' "$1" 2>/dev/null) || return 1
    [[ $v == "installed "*"~bpo12"* ]]
}
is_installed() {
    [[ $(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# Only the files apt reads (*.list, *.sources), not disabled leftovers beside them.
if ! grep -qs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources; then
    echo "adding bookworm-backports to apt's sources"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi

# Any other QEMU package already installed (e.g. qemu-system-gui or the module packages
# pulled in by an earlier install's recommends) must move to 10.0 with the rest.
mapfile -t installed_qemu < <(dpkg-query -W -f '${db:Status-Status} ${Package}\n' 'qemu-*' 2>/dev/null |
    awk '$1 == "installed" { print $2 }')
qemu_missing=()
for p in "${qemu_packages[@]}" "${installed_qemu[@]}"; do
    is_backport "$p" || qemu_missing+=("$p")
done
other_missing=()
for p in "${other_packages[@]}"; do
    is_installed "$p" || other_missing+=("$p")
done

if [ ${#qemu_missing[@]} -gt 0 ] || [ ${#other_missing[@]} -gt 0 ]; then
    apt-get update -qq
fi
if [ ${#qemu_missing[@]} -gt 0 ]; then
    echo "installing from bookworm-backports: ${qemu_missing[*]}"
    # The dependencies that exist in backports come from there too (target release).
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        "${qemu_packages[@]}" "${installed_qemu[@]}" >/dev/null
fi
if [ ${#other_missing[@]} -gt 0 ]; then
    echo "installing: ${other_missing[*]}"
    apt-get install -y -qq --no-install-recommends "${other_missing[@]}" >/dev/null
fi

# The check that matters: every QEMU tool is there and they are one version.
status=0
for tool in qemu-img qemu-system-x86_64 qemu-storage-daemon; do
    if ! command -v "$tool" >/dev/null; then
        echo "install-deps: $tool is missing" >&2
        status=1
        continue
    fi
    version=$("$tool" --version | head -n1)
    case "$version" in
        *"version 10.0"*) ;;
        *)
            echo "install-deps: $tool is not QEMU 10.0: $version" >&2
            status=1
            ;;
    esac
done
for p in "${qemu_packages[@]}" "${installed_qemu[@]}"; do
    is_backport "$p" || {
        echo "install-deps: $p is not the backports version" >&2
        status=1
    }
done
exit $status

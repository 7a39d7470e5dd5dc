# Shared helpers for the qemu-scripts/*.sh harness. Sourced, not executed.
# shellcheck shell=bash

# Prefix every harness message so it stands out from QEMU/fio/server noise.
log() { printf 'e2e: %s\n' "$*" >&2; }
die() { printf 'e2e: error: %s\n' "$*" >&2; exit 1; }

# Run as root directly; elsewhere fall back to sudo so a developer can use the
# scripts from a normal account.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt-get update is slow and needs the network, so run it at most once per
# script run and only when we actually have to talk to the archive.
_APT_UPDATED=0
apt_update_once() {
    if [ "$_APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        _APT_UPDATED=1
    fi
}

# ensure_packages PKG...: install the Debian packages that are not installed.
# A fresh CI machine has none of qemu/fio/busybox-static, so every script
# installs what it uses instead of relying on a manual setup step.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing missing packages: ${missing[*]}"
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Repository root: the parent of qemu-scripts/, so scripts work from any cwd.
repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

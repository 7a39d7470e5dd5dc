#!/bin/bash
# libvirt.sh: thinblk under a stock libvirt (Debian 12's 9.0), QEMU running as libvirt's own
# user (libvirt-qemu), domain type qemu (TCG).
#
# thinblk creates its sockets with --socket-group libvirt-qemu --socket-mode 0660 (and the
# hot-plugged disk's over QMP with "socket-group"), so QEMU opens them with no manual chown.
# The guest (build-guest.sh, test "libvirt" of guest-init.sh) reads and writes vda; the host
# hot-plugs vdb with `virsh attach-device --live` and unplugs it with `detach-device --live`;
# then `thinblk ctl block-resize` grows vda and the guest sees the new size. Each host step
# waits for the guest's marker on the serial console.
#
# No systemd here: virtlogd and libvirtd are started by hand (and stopped again if this script
# started them). Without udev, /dev/kvm is root-only, and libvirt then probes QEMU again on
# every call (seconds each); the script gives /dev/kvm to group kvm, mode 0660, as udev would,
# for the run and puts it back afterwards. Environment: THINBLK (the binary),
# LIBVIRT_TIMEOUT (seconds per guest step, default 240).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)
THINBLK=${THINBLK:-$ROOT/target/release/thinblk}
STEP=${LIBVIRT_TIMEOUT:-240}
DOMAIN=thinblk-libvirt-test
export LIBVIRT_DEFAULT_URI=qemu:///system

[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release)"
ensure_packages libvirt-daemon-system libvirt-clients libvirt-daemon-system-sysv
bash "$HERE/build-guest.sh"
GUEST=$ROOT/target/guest
QEMU_USER=libvirt-qemu
id "$QEMU_USER" >/dev/null || die "no user $QEMU_USER (libvirt-daemon-system creates it)"

# Everything under one directory QEMU's user can traverse; the pool itself stays 0700.
WORK=$(mktemp -d /tmp/thinblk-libvirt.XXXXXX)
chmod 0755 "$WORK"
mkdir -m 0755 "$WORK/sockets" "$WORK/guest"
mkdir -m 0777 "$WORK/log"
cp "$GUEST/vmlinuz" "$GUEST/initramfs.cpio.gz" "$WORK/guest/"
chmod 0644 "$WORK/guest/"*
SERIAL=$WORK/log/serial.log
CTL=$WORK/control.sock

STARTED_PIDS=()
THINBLK_PID=
KVM_MODE=
cleanup() {
    local rc=$?
    virsh destroy "$DOMAIN" >/dev/null 2>&1 || true
    virsh undefine "$DOMAIN" >/dev/null 2>&1 || true
    if [ -n "$THINBLK_PID" ]; then
        kill -TERM "$THINBLK_PID" 2>/dev/null || true
        wait "$THINBLK_PID" 2>/dev/null || true
    fi
    local p
    for p in "${STARTED_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "$KVM_MODE" ]; then
        chown "${KVM_MODE%% *}" /dev/kvm && chmod "${KVM_MODE##* }" /dev/kvm || true
    fi
    if [ "$rc" -ne 0 ]; then
        log "libvirt: FAILED; serial console:"
        tail -n 40 "$SERIAL" >&2 2>/dev/null || true
        log "domain log:"
        tail -n 20 "/var/log/libvirt/qemu/$DOMAIN.log" >&2 2>/dev/null || true
        log "thinblk log:"
        tail -n 20 "$WORK/thinblk.log" >&2 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

if [ -e /dev/kvm ]; then
    KVM_MODE="$(stat -c '%u:%g %a' /dev/kvm)"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# The daemons, by hand, unless something already runs them. A pid file left by a daemon
# that is gone would make them refuse to start.
start_daemon() { # NAME
    if pgrep -x "$1" >/dev/null; then
        log "$1 already runs"
        return
    fi
    rm -f "/run/$1.pid" "/var/run/$1.pid"
    "$1" -d
    local i
    for i in $(seq 100); do
        pgrep -x "$1" >/dev/null && break
        sleep 0.1
    done
    STARTED_PIDS+=("$(pgrep -x "$1" | head -n1)")
    log "started $1"
}
start_daemon virtlogd
start_daemon libvirtd
for i in $(seq 100); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
virsh version >/dev/null || die "libvirtd does not answer"

# thinblk: the disks' sockets readable and writable by libvirt's QEMU through its group.
"$THINBLK" serve --dir "$WORK/pool" --metadata-size 64M --data-size 2G \
    --control "$CTL" --socket-group "$QEMU_USER" --socket-mode 0660 \
    --export "name=vm1,size=256M,socket=$WORK/sockets/vm1.sock" >"$WORK/thinblk.log" 2>&1 &
THINBLK_PID=$!
for i in $(seq 200); do [ -S "$CTL" ] && break; sleep 0.1; done
[ -S "$CTL" ] || die "thinblk did not start"
[ "$(stat -c '%G %a' "$WORK/sockets/vm1.sock")" = "$QEMU_USER 660" ] ||
    die "vm1.sock is $(stat -c '%U:%G %a' "$WORK/sockets/vm1.sock")"
"$THINBLK" ctl --socket "$CTL" thin-create name=vm2 size=134217728 >/dev/null
"$THINBLK" ctl --socket "$CTL" block-export-add type=vhost-user-blk id=vm2 node-name=vm2 \
    addr.type=unix "addr.path=$WORK/sockets/vm2.sock" writable=true \
    "socket-group=$QEMU_USER" socket-mode=0660 >/dev/null

cat >"$WORK/domain.xml" <<XML
<domain type='qemu'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$WORK/guest/vmlinuz</kernel>
    <initrd>$WORK/guest/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 thinblk.test=libvirt</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='1'/>
      <source type='unix' path='$WORK/sockets/vm1.sock'>
        <reconnect enabled='yes' timeout='10'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='$SERIAL'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
cat >"$WORK/vdb.xml" <<XML
<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='1'/>
  <source type='unix' path='$WORK/sockets/vm2.sock'>
    <reconnect enabled='yes' timeout='10'/>
  </source>
  <target dev='vdb' bus='virtio'/>
</disk>
XML

wait_marker() { # MARKER: wait for it on the serial console; fail on the guest's FAIL marker
    local i
    for i in $(seq $((STEP * 5))); do
        if grep -q "THINBLK-E2E FAIL" "$SERIAL" 2>/dev/null; then
            die "guest: $(grep "THINBLK-E2E FAIL" "$SERIAL")"
        fi
        grep -q "$1" "$SERIAL" 2>/dev/null && return 0
        state=$(virsh domstate "$DOMAIN" 2>/dev/null || true)
        if [ "$state" != running ]; then
            grep -q "$1" "$SERIAL" 2>/dev/null && return 0
            die "domain is '$state' before $1"
        fi
        sleep 0.2
    done
    die "no $1 within $STEP s"
}

t0=$(date +%s)
virsh define "$WORK/domain.xml" >/dev/null
virsh start "$DOMAIN" >/dev/null
log "libvirt: domain started in $(($(date +%s) - t0)) s (no chown: the socket's group let QEMU in)"
wait_marker LIBVIRT-VDA-OK
log "libvirt: the guest read and wrote vda ($(($(date +%s) - t0)) s)"
virsh attach-device "$DOMAIN" "$WORK/vdb.xml" --live >/dev/null
wait_marker LIBVIRT-VDB-OK
log "libvirt: vdb hot-plugged, read and written ($(($(date +%s) - t0)) s)"
virsh detach-device "$DOMAIN" "$WORK/vdb.xml" --live >/dev/null
wait_marker LIBVIRT-VDB-GONE
log "libvirt: vdb unplugged ($(($(date +%s) - t0)) s)"
# What libvirt refuses for a vhostuser disk; thinblk's own commands stand in (README).
if virsh domblkstat "$DOMAIN" vda >/dev/null 2>&1; then
    log "libvirt: note: domblkstat now works for vhostuser disks"
fi
wait_marker LIBVIRT-WAITING-RESIZE
"$THINBLK" ctl --socket "$CTL" block-resize node-name=vm1 size=536870912 >/dev/null
wait_marker "THINBLK-E2E PASS libvirt"
log "libvirt: $(grep LIBVIRT-RESIZED "$SERIAL" | tr -d '\r') ($(($(date +%s) - t0)) s)"
log "libvirt: PASS"

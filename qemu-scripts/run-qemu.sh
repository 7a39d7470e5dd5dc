#!/bin/bash
# run-qemu.sh [options] SOCKET TEST
#
# Boots the e2e guest (build-guest.sh) with one vhost-user-blk disk whose
# backend listens on the unix socket SOCKET, runs guest test TEST
# (fio | fs1 | fs2 | shell) and exits 0 iff the guest printed
# "THINBLK-E2E PASS TEST". The serial console (and QEMU's own messages)
# go to the log file.
#
# Options:
#   -g DIR      guest directory (default: target/guest)
#   -l FILE     serial log (default: ./qemu-TEST.log)
#   -t SECONDS  kill QEMU after this long (default: 300)
#   -q N        virtqueues of the disk (default: 2)
#   -d SOCKET   one more vhost-user-blk disk (vdb, vdc, ...), served at SOCKET; repeatable
#   -p FILE     QEMU writes its pid there (so a caller can SIGKILL a QEMU stuck on a backend)
#   -r MS       reconnect to a backend that went away every MS milliseconds (the chardevs'
#               reconnect-ms; `reconnect=1` in QEMU before 9.2), for restart.sh
#   -i          interactive: serial on this terminal, no timeout, no log
#               (use TEST=shell to get a guest shell; Ctrl-A x quits)
# Environment: QEMU (binary), QEMU_MEM (1G), QEMU_SMP (2), QEMU_ACCEL (tcg;
# e.g. kvm where it works), QEMU_APPEND (extra kernel arguments), QEMU_EXTRA
# (extra QEMU options, space-separated).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)

GUEST=$ROOT/target/guest
LOG=
TIMEOUT=300
QUEUES=2
INTERACTIVE=0
EXTRA_DISKS=()
PIDFILE=
RECONNECT=
while getopts "g:l:t:q:d:p:r:ih" opt; do
    case "$opt" in
        g) GUEST=$OPTARG ;;
        l) LOG=$OPTARG ;;
        t) TIMEOUT=$OPTARG ;;
        q) QUEUES=$OPTARG ;;
        d) EXTRA_DISKS+=("$OPTARG") ;;
        p) PIDFILE=$OPTARG ;;
        r) RECONNECT=",reconnect-ms=$OPTARG" ;;
        i) INTERACTIVE=1 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || die "usage: run-qemu.sh [-g DIR] [-l LOG] [-t SECONDS] [-q N] [-d SOCKET]... [-p FILE] [-i] SOCKET TEST"
SOCK=$1
TEST=$2
LOG=${LOG:-qemu-$TEST.log}

ensure_packages qemu-system-x86
QEMU=${QEMU:-qemu-system-x86_64}
MEM=${QEMU_MEM:-1G}
if [ ! -f "$GUEST/vmlinuz" ] || [ ! -f "$GUEST/initramfs.cpio.gz" ]; then
    die "no guest in $GUEST: run qemu-scripts/build-guest.sh first"
fi
[ -S "$SOCK" ] || die "$SOCK is not a socket: is the vhost-user server running?"

# vhost-user needs guest RAM in shared memory the backend can mmap: a
# memfd backend with share=on, made the guest RAM through the NUMA node.
# TCG because this machine (and CI) has no usable KVM. -nodefaults drops the
# default NIC/VGA/CD-ROM, which only slow the boot down.
# panic=-1 + -no-reboot: a guest panic ends QEMU at once instead of waiting
# for the timeout.
# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
args=(
    -accel "${QEMU_ACCEL:-tcg}" -m "$MEM" -smp "${QEMU_SMP:-2}"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
    -numa node,memdev=mem
    -nodefaults -no-user-config -display none -no-reboot
    -chardev "socket,id=c0,path=$SOCK$RECONNECT"
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$QUEUES"
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz"
    -append "console=ttyS0 panic=-1 loglevel=4 thinblk.test=$TEST ${QEMU_APPEND:-}"
)
n=0
for extra in "${EXTRA_DISKS[@]}"; do
    n=$((n + 1))
    [ -S "$extra" ] || die "$extra is not a socket: is its vhost-user server running?"
    args+=(-chardev "socket,id=c$n,path=$extra$RECONNECT" -device "vhost-user-blk-pci,chardev=c$n,num-queues=$QUEUES")
done
[ -z "$PIDFILE" ] || args+=(-pidfile "$PIDFILE")
# More QEMU options, split on spaces (migrate.sh: -qmp, -incoming).
# shellcheck disable=SC2206
[ -z "${QEMU_EXTRA:-}" ] || args+=($QEMU_EXTRA)

if [ "$INTERACTIVE" -eq 1 ]; then
    exec "$QEMU" "${args[@]}" -serial mon:stdio
fi

# Serial on stdio with stdin closed: QEMU's messages (e.g. a refused socket
# connection) and the guest console land in the same log, in order.
# timeout(1) moves itself into its own process group, so a Ctrl-C or a
# TERM sent to us would not reach QEMU: run it in the background and pass
# those signals on (timeout forwards TERM to QEMU).
start=$(date +%s)
rc=0
timeout --kill-after=10 "$TIMEOUT" "$QEMU" "${args[@]}" -serial stdio \
    </dev/null >"$LOG" 2>&1 &
qpid=$!
trap 'kill -TERM "$qpid" 2>/dev/null; wait "$qpid"; log "$TEST: interrupted (log: $LOG)"; exit 130' INT TERM
wait "$qpid" || rc=$?
trap - INT TERM
secs=$(($(date +%s) - start))

# The guest prints \r\n on the serial line; match the marker on its own line.
if tr -d '\r' <"$LOG" | grep -qx "THINBLK-E2E PASS $TEST"; then
    log "$TEST: PASS in ${secs}s"
    exit 0
fi
reason=$(tr -d '\r' <"$LOG" | grep -a -m1 "^THINBLK-E2E FAIL $TEST: " \
    | sed "s/^THINBLK-E2E FAIL $TEST: //" || true)
if [ -z "$reason" ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        reason="timed out after ${TIMEOUT}s"
    else
        reason="no result marker (QEMU exit status $rc)"
    fi
fi
log "$TEST: FAIL in ${secs}s: $reason (log: $LOG)"
exit 1

#!/bin/bash
# mirror-migrate.sh: a running VM and its thin disk move to another pool (issue 15).
#
# Two thinblk daemons on this host stand in for two hosts: pool A (the guest's disk d, a
# vhost-user export a.sock, a read-only NBD export of d on a unix socket for the comparison)
# and pool B (a disk d of the same size, a vhost-user export b.sock, a writable NBD export of
# d on TCP over loopback). The guest runs fio with verification round after round
# (guest-init.sh: migfio) on A. Then:
#   1. thin-mirror of A's d into nbd://127.0.0.1:PORT/d (B), until BLOCK_JOB_READY (the
#      mirror is write-blocking from then on: a guest write completes once on both pools);
#   2. a destination QEMU on b.sock (-incoming), and a live migration with the capability
#      pause-before-switchover (QEMU's dirty logging of the vhost-user disk, as migrate.sh);
#   3. at the switchover (mirror_switchover.py): the source QEMU has stopped the guest and its
#      disk; B's export must not have started; job-complete on A (A refuses writes from then
#      on, the last dirty blocks go over, B is flushed), BLOCK_JOB_COMPLETED without error;
#      B's d is snapshotted as d-switchover; then the migration finishes and the guest
#      resumes on B;
#   4. the guest finishes on B with every verify passing and no I/O error;
#   5. A's d (frozen since the switchover) equals B's d-switchover (qemu-img compare over
#      NBD, one side over TCP); both pools pass thin_check and thinblk check.
# Environment: THINBLK (binary), MIG_SECS (guest fio seconds, default 40), MIG_KEEP (1: keep
# the scratch directory), QEMU_MEM (guest RAM, default 512M).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)

THINBLK=${THINBLK:-$ROOT/target/release/thinblk}
[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release)"
SECS=${MIG_SECS:-40}
export QEMU_MEM=${QEMU_MEM:-512M}
QUEUES=2
GUEST=$ROOT/target/guest
ensure_packages qemu-system-x86 qemu-utils thin-provisioning-tools
python3 -c "import qemu.qmp" 2>/dev/null || die "python3 module qemu.qmp missing (pip install qemu.qmp)"
"$HERE/build-guest.sh" "$GUEST"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-mirror.XXXXXX")
PIDS=()
cleanup() {
    for f in "$SCRATCH"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${MIG_KEEP:-0}" = 1 ]; then log "kept $SCRATCH"; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT

wait_socket() {
    local i=0
    while [ ! -S "$1" ]; do
        i=$((i + 1))
        [ "$i" -le 200 ] || die "socket $1 never appeared"
        sleep 0.1
    done
}

qmp() { python3 "$HERE/qmp.py" "$@"; }

# wait_round LOG N: until the guest printed "MIGFIO round N ok" (or more) in LOG.
wait_round() {
    local log=$1 want=$2 i=0 got
    while :; do
        got=$(tr -d '\r' <"$log" 2>/dev/null | grep -c '^MIGFIO round [0-9]* ok' || true)
        [ "$got" -ge "$want" ] && return 0
        if tr -d '\r' <"$log" 2>/dev/null | grep -q '^THINBLK-E2E FAIL'; then
            die "guest failed: $(tr -d '\r' <"$log" | grep -m1 '^THINBLK-E2E FAIL')"
        fi
        i=$((i + 1))
        [ "$i" -le 3000 ] || die "no 'MIGFIO round $want ok' in $log after 300 s"
        sleep 0.1
    done
}

# start_qemu NAME SOCKET [INCOMING]: as migrate.sh's (QMP at NAME.qmp, serial log NAME.log,
# run-qemu.sh's exit status in NAME.rc).
start_qemu() {
    local name=$1 sock=$2 incoming=${3:-} extra
    extra="-qmp unix:$SCRATCH/$name.qmp,server=on,wait=off"
    [ -z "$incoming" ] || extra="$extra -incoming $incoming"
    (
        rc=0
        QEMU_EXTRA=$extra QEMU_APPEND="thinblk.secs=$SECS thinblk.disks=1" \
            "$HERE/run-qemu.sh" -g "$GUEST" -l "$SCRATCH/$name.log" -t 600 -q "$QUEUES" \
            -p "$SCRATCH/$name.pid" "$sock" migfio 2>"$SCRATCH/$name.harness" || rc=$?
        echo "$rc" >"$SCRATCH/$name.rc"
    ) &
    PIDS+=($!)
    wait_socket "$SCRATCH/$name.qmp"
}

# A free TCP port on the loopback for pool B's NBD server.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# start_pool NAME NBD-ADDR: a daemon with disk d (1 GiB) exported at NAME.sock.
start_pool() {
    local name=$1 nbd=$2
    RUST_LOG=${RUST_LOG:-info} "$THINBLK" serve --dir "$SCRATCH/pool-$name" --data-size 2G \
        --metadata-size 64M --control "$SCRATCH/ctl-$name.sock" --nbd "$nbd" \
        --export "name=d,size=1G,socket=$SCRATCH/$name.sock,id=d-$name,queues=$QUEUES" \
        >>"$SCRATCH/server-$name.log" 2>&1 &
    echo $! >"$SCRATCH/server-$name.pid"
    wait_socket "$SCRATCH/ctl-$name.sock"
    wait_socket "$SCRATCH/$name.sock"
}

stop_pool_and_check() {
    local name=$1 pid
    pid=$(cat "$SCRATCH/server-$name.pid")
    kill -TERM "$pid"
    local i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 300 ] || die "thinblk of pool $name did not exit on SIGTERM"
        sleep 0.1
    done
    rm -f "$SCRATCH/server-$name.pid"
    thin_check "$SCRATCH/pool-$name/metadata" >&2 || die "thin_check of pool $name failed"
    "$THINBLK" check "$SCRATCH/pool-$name/metadata" >&2 || die "thinblk check of pool $name failed"
}

log "pool A (guest), pool B (NBD on 127.0.0.1:$PORT)"
start_pool a "$SCRATCH/a.nbd"
start_pool b "127.0.0.1:$PORT"
qmp "$SCRATCH/ctl-b.sock" nbd-server-add '{"device": "d", "name": "d", "writable": true}' >/dev/null
qmp "$SCRATCH/ctl-a.sock" nbd-server-add '{"device": "d", "name": "d", "writable": false}' >/dev/null

start_qemu A "$SCRATCH/a.sock"
wait_round "$SCRATCH/A.log" 1

log "thin-mirror of A's d into pool B"
qmp "$SCRATCH/ctl-a.sock" thin-mirror \
    "{\"job-id\": \"m\", \"device\": \"d\", \"target\": \"nbd://127.0.0.1:$PORT/d\", \"sync\": \"full\"}" \
    >/dev/null
i=0
until qmp "$SCRATCH/ctl-a.sock" query-block-jobs | grep -q '"ready": true'; do
    i=$((i + 1))
    [ "$i" -le 600 ] || die "the mirror never became ready: $(qmp "$SCRATCH/ctl-a.sock" query-block-jobs)"
    sleep 0.5
done
log "mirror ready: $(qmp "$SCRATCH/ctl-a.sock" query-block-jobs)"
# A round of fio while the mirror is write-blocking.
seen=$(tr -d '\r' <"$SCRATCH/A.log" | grep -c '^MIGFIO round [0-9]* ok' || true)
wait_round "$SCRATCH/A.log" $((seen + 1))

start_qemu B "$SCRATCH/b.sock" "unix:$SCRATCH/B.mig"
out=$(python3 "$HERE/mirror_switchover.py" "$SCRATCH/A.qmp" "unix:$SCRATCH/B.mig" \
    "$SCRATCH/ctl-a.sock" "$SCRATCH/ctl-b.sock" m d d-b 300) \
    || die "migration with the mirror's switchover failed"
log "migrated A -> B: downtime ${out% *} ms (the mirror's completion included), total ${out#* } ms"

# The guest runs on pool B now; pool A's d refuses writes.
i=0
while [ ! -f "$SCRATCH/B.rc" ]; do
    i=$((i + 1))
    [ "$i" -le 6000 ] || die "guest on B did not finish in 600 s"
    sleep 0.1
done
cat "$SCRATCH/B.harness" >&2
[ "$(cat "$SCRATCH/B.rc")" = 0 ] || die "guest on B failed (log: $SCRATCH/B.log)"
tr -d '\r' <"$SCRATCH/B.log" | grep -m1 '^MIGFIO .* rounds' >&2 || true
rounds_b=$(tr -d '\r' <"$SCRATCH/B.log" | grep -c '^MIGFIO round [0-9]* ok' || true)
[ "$rounds_b" -ge 1 ] || die "the guest did no fio round on B"

log "comparing A's d with B's d at the switchover"
qmp "$SCRATCH/ctl-b.sock" nbd-server-add \
    '{"device": "d-switchover", "name": "d-switchover", "writable": false}' >/dev/null
qemu-img compare -f raw -F raw "nbd+unix:///d?socket=$SCRATCH/a.nbd" \
    "nbd://127.0.0.1:$PORT/d-switchover" >&2 \
    || die "pool B's disk at the switchover differs from pool A's"
if ! grep -q 'job m completed' "$SCRATCH/server-a.log"; then
    die "pool A's log does not show the mirror completed"
fi

stop_pool_and_check a
stop_pool_and_check b
log "PASS: the guest moved from pool A to pool B under fio verification"

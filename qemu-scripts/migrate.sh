#!/bin/bash
# migrate.sh: live migration of a guest on a thin disk between two QEMUs on this host.
#
# thinblk exports the thin device twice (the source QEMU's socket and the destination's); the
# guest runs fio with verification round after round (guest-init.sh: migfio) while QEMU A
# migrates it to QEMU B (started with -incoming unix:...). The guest must finish on B with
# every verify passing and no I/O error in its kernel log; the pool must then pass thin_check
# and thinblk check. Cases (MIG_CASES, default "ab aba snap two"):
#   ab    A -> B
#   aba   A -> B, then back to a new QEMU on A's socket
#   snap  A -> B while the host takes live snapshots of the disk (QMP) during the migration
#   two   A -> B with two thin disks (vda, vdb)
# The downtime query-migrate reports is printed per case, and the same guest is migrated with
# qemu-storage-daemon serving a raw file (two exports of one node) for comparison:
#   MIGRATE-DOWNTIME thinblk=<ms> qsd=<ms>
# Environment: THINBLK (binary), MIG_SECS (guest fio seconds per migration, default 40),
# MIG_CASES, MIG_QSD (1: also run qemu-storage-daemon, default 1), MIG_KEEP (1: keep scratch),
# QEMU_MEM (guest RAM, default 512M here).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)

THINBLK=${THINBLK:-$ROOT/target/release/thinblk}
[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release)"
SECS=${MIG_SECS:-40}
CASES=${MIG_CASES:-ab aba snap two}
export QEMU_MEM=${QEMU_MEM:-512M}
QUEUES=2
GUEST=$ROOT/target/guest
ensure_packages qemu-system-x86 thin-provisioning-tools
python3 -c "import qemu.qmp" 2>/dev/null || die "python3 module qemu.qmp missing (pip install qemu.qmp)"
"$HERE/build-guest.sh" "$GUEST"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-mig.XXXXXX")
SERVER_PID=
QEMU_PIDS=()
cleanup() {
    for f in "$SCRATCH"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    for p in "${QEMU_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true
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

# start_qemu NAME SOCKET-LIST [INCOMING]: a QEMU in the background with QMP at
# $SCRATCH/NAME.qmp, serial log $SCRATCH/NAME.log; its run-qemu.sh exit status goes to
# $SCRATCH/NAME.rc. SOCKET-LIST: the disks' sockets, space-separated.
start_qemu() {
    local name=$1 socks=$2 incoming=${3:-} extra disks=()
    # shellcheck disable=SC2206
    local all=($socks)
    for s in "${all[@]:1}"; do disks+=(-d "$s"); done
    extra="-qmp unix:$SCRATCH/$name.qmp,server=on,wait=off"
    [ -z "$incoming" ] || extra="$extra -incoming $incoming"
    (
        rc=0
        # (A source QEMU quits after the migration without a result marker: its verdict
        # goes to NAME.harness, and only the last QEMU's is printed.)
        QEMU_EXTRA=$extra QEMU_APPEND="thinblk.secs=$SECS thinblk.disks=${#all[@]}" \
            "$HERE/run-qemu.sh" -g "$GUEST" -l "$SCRATCH/$name.log" -t 600 -q "$QUEUES" \
            -p "$SCRATCH/$name.pid" \
            "${disks[@]}" "${all[0]}" migfio 2>"$SCRATCH/$name.harness" || rc=$?
        echo "$rc" >"$SCRATCH/$name.rc"
    ) &
    QEMU_PIDS+=($!)
    wait_socket "$SCRATCH/$name.qmp"
}

# migrate FROM TO: migrate the guest from QEMU FROM to QEMU TO (started with -incoming
# unix:$SCRATCH/TO.mig); prints the downtime in ms.
migrate() {
    local out
    out=$(python3 "$HERE/qmp.py" "$SCRATCH/$1.qmp" migrate "unix:$SCRATCH/$2.mig" 300) \
        || die "migration $1 -> $2 failed"
    log "migrated $1 -> $2: downtime ${out% *} ms, total ${out#* } ms"
    echo "${out% *}"
}

# finish NAME: wait for QEMU NAME's guest to finish; fail unless it passed.
finish() {
    local i=0
    while [ ! -f "$SCRATCH/$1.rc" ]; do
        i=$((i + 1))
        [ "$i" -le 6000 ] || die "guest on $1 did not finish in 600 s"
        sleep 0.1
    done
    cat "$SCRATCH/$1.harness" >&2
    [ "$(cat "$SCRATCH/$1.rc")" = 0 ] || die "guest on $1 failed (log: $SCRATCH/$1.log)"
    tr -d '\r' <"$SCRATCH/$1.log" | grep -m1 '^MIGFIO .* rounds' >&2 || true
}

# A thinblk daemon with disk d (and e) exported twice: a.sock/b.sock (a2.sock/b2.sock).
start_thinblk() {
    local disks=$1 args
    rm -rf "$SCRATCH/pool" "$SCRATCH"/*.sock "$SCRATCH"/*.qmp "$SCRATCH"/*.rc "$SCRATCH"/*.mig \
        "$SCRATCH"/*.pid "$SCRATCH"/*.log
    args=(serve --dir "$SCRATCH/pool" --data-size 2G --metadata-size 64M
        --control "$SCRATCH/ctl.sock"
        --export "name=d,size=1G,socket=$SCRATCH/a.sock,id=d-a,queues=$QUEUES"
        --export "name=d,socket=$SCRATCH/b.sock,id=d-b,queues=$QUEUES")
    if [ "$disks" = 2 ]; then
        args+=(--export "name=e,size=1G,socket=$SCRATCH/a2.sock,id=e-a,queues=$QUEUES"
            --export "name=e,socket=$SCRATCH/b2.sock,id=e-b,queues=$QUEUES")
    fi
    RUST_LOG=${RUST_LOG:-info} "$THINBLK" "${args[@]}" >>"$SCRATCH/server.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$SCRATCH/ctl.sock"
}

stop_server_and_check() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || die "thinblk exited $? on SIGTERM (log: $SCRATCH/server.log)"
    SERVER_PID=
    thin_check "$SCRATCH/pool/metadata" >&2 || die "thin_check failed"
    "$THINBLK" check "$SCRATCH/pool/metadata" >&2 || die "thinblk check failed"
}

THINBLK_DOWNTIME=
run_case() {
    local case=$1 disks=1 ms snapper=
    [ "$case" = two ] && disks=2
    log "case $case: start"
    start_thinblk "$disks"
    local a="$SCRATCH/a.sock" b="$SCRATCH/b.sock"
    if [ "$disks" = 2 ]; then
        a="$a $SCRATCH/a2.sock"
        b="$b $SCRATCH/b2.sock"
    fi
    start_qemu A "$a"
    start_qemu B "$b" "unix:$SCRATCH/B.mig"
    wait_round "$SCRATCH/A.log" 1
    if [ "$case" = snap ]; then
        # Live snapshots while the migration runs: the first before it starts, one during.
        python3 "$HERE/qmp.py" "$SCRATCH/ctl.sock" blockdev-snapshot-internal-sync \
            '{"device": "d", "name": "d-snap1"}' >/dev/null
        ( sleep 1; python3 "$HERE/qmp.py" "$SCRATCH/ctl.sock" blockdev-snapshot-internal-sync \
            '{"device": "d", "name": "d-snap2"}' >"$SCRATCH/snap2.out" 2>&1 ) &
        snapper=$!
    fi
    ms=$(migrate A B)
    [ -n "$THINBLK_DOWNTIME" ] || THINBLK_DOWNTIME=$ms
    # The destination's export runs the disk now, the source's does not.
    python3 "$HERE/qmp.py" "$SCRATCH/ctl.sock" query-block-exports >"$SCRATCH/exports.json"
    python3 -c 'import json, sys
active = sorted(e["id"] for e in json.load(open(sys.argv[1])) if e["active"])
sys.exit(0 if "d-a" not in active else 1)' "$SCRATCH/exports.json" \
        || die "the source export is still active after the switchover: $(cat "$SCRATCH/exports.json")"
    if [ "$case" = aba ]; then
        # Back to a new QEMU on A's socket once the guest did a round on B.
        local seen
        seen=$(tr -d '\r' <"$SCRATCH/B.log" | grep -c '^MIGFIO round [0-9]* ok' || true)
        wait_round "$SCRATCH/B.log" $((seen + 1))
        start_qemu A2 "$a" "unix:$SCRATCH/A2.mig"
        migrate B A2 >/dev/null
        finish A2
    else
        finish B
    fi
    if [ "$case" = snap ]; then
        wait "$snapper" || die "live snapshot during migration: $(cat "$SCRATCH/snap2.out")"
        python3 "$HERE/qmp.py" "$SCRATCH/ctl.sock" query-thin-devices | grep -q '"d-snap2"' \
            || die "the snapshot taken during the migration is missing"
    fi
    stop_server_and_check
    log "case $case: PASS"
}

qsd_downtime() {
    log "qemu-storage-daemon: the same guest, A -> B"
    rm -f "$SCRATCH"/*.sock "$SCRATCH"/*.qmp "$SCRATCH"/*.rc "$SCRATCH"/*.mig "$SCRATCH"/*.pid \
        "$SCRATCH"/[AB]*.log
    truncate -s 1G "$SCRATCH/qsd.raw"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk,filename=$SCRATCH/qsd.raw,cache.direct=on" \
        --export "type=vhost-user-blk,id=ea,node-name=disk,addr.type=unix,addr.path=$SCRATCH/a.sock,writable=on,num-queues=$QUEUES" \
        --export "type=vhost-user-blk,id=eb,node-name=disk,addr.type=unix,addr.path=$SCRATCH/b.sock,writable=on,num-queues=$QUEUES" \
        >>"$SCRATCH/qsd.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$SCRATCH/a.sock"
    wait_socket "$SCRATCH/b.sock"
    start_qemu A "$SCRATCH/a.sock"
    start_qemu B "$SCRATCH/b.sock" "unix:$SCRATCH/B.mig"
    wait_round "$SCRATCH/A.log" 1
    QSD_DOWNTIME=$(migrate A B)
    finish B
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=
}

for c in $CASES; do
    run_case "$c"
done
QSD_DOWNTIME=-
if [ "${MIG_QSD:-1}" = 1 ]; then
    qsd_downtime
fi
echo "MIGRATE-DOWNTIME thinblk=${THINBLK_DOWNTIME:-?}ms qsd=${QSD_DOWNTIME}ms"
log "all cases passed: $CASES"

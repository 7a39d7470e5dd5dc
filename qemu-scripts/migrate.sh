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
# The downtime query-migrate reports is printed per migration. One run's downtime says little
# (it depends on what the guest has in flight when it stops: a FLUSH, a 1 MiB write), so the
# comparison is a series: the same guest migrated MIG_SAMPLES times back and forth between the
# two exports of its disk, once with thinblk (a thin disk) and once with qemu-storage-daemon
# (a raw file, two exports of one node), one after the other in this run:
#   MIGRATE-DOWNTIME thinblk=<median ms> qsd=<median ms> (...) samples thinblk=<ms,...> qsd=<ms,...>
# At QEMU's default downtime limit (300 ms) the figure is mostly the part of the first RAM pass
# QEMU leaves for after the stop, which is chance; MIG_DOWNTIME_LIMIT=20 makes QEMU iterate to
# the guest's working set, and the downtime is then the backend's floor (docs/benchmarks.md).
# thinblk's log (RUST_LOG=debug) says where its share goes: "requests in flight finished in"
# (GET_VRING_BASE at the switchover) and "now the running export ..., N ms after the last one
# stopped its rings" (the destination's first request).
# MIG_TRACE=1 says where QEMU's downtime goes: both QEMUs log their migration trace points
# (NAME.trace), each migration prints a BREAKDOWN line (mig_breakdown.py: the VM stop with each
# vhost-user reply's wait, the final RAM copy and its size, device states, the destination's
# resume) and the run ends with one MIGRATE-BREAKDOWN line of medians per server.
# Environment: THINBLK (binary), MIG_SECS (guest fio seconds per migration, default 40),
# MIG_CASES, MIG_QSD (1: also run qemu-storage-daemon, default 1), MIG_SAMPLES (migrations
# per series, default 5; 0: no series), MIG_ROUNDS (series per server, taking turns, default
# 1), MIG_SAMPLE_SECS (guest seconds allowed per migration of a series, default 30),
# MIG_TRACE, MIG_TRACE_EVENTS (more QEMU trace points for MIG_TRACE, space-separated; patterns
# like savevm_section_* work), MIG_KEEP (1: keep scratch), QEMU_MEM (guest RAM, default 512M here).
# MIG_SCHED=1 (with MIG_TRACE=1; needs perf and the rights to trace the whole host) says who had
# the CPUs in each downtime: every context switch on the host is recorded around each
# migration, each migration prints SCHED lines (mig_sched.py: the source's and destination's
# threads' run/wait/sleep, the server's and other processes' CPU time) and the run ends with
# one MIGRATE-SCHED line of medians per server.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)

THINBLK=${THINBLK:-$ROOT/target/release/thinblk}
[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release)"
SECS=${MIG_SECS:-40}
CASES=${MIG_CASES:-ab aba snap two}
SAMPLES=${MIG_SAMPLES:-5}
SAMPLE_SECS=${MIG_SAMPLE_SECS:-30}
ROUNDS=${MIG_ROUNDS:-1}
export QEMU_MEM=${QEMU_MEM:-512M}
QUEUES=2
GUEST=$ROOT/target/guest
ensure_packages qemu-system-x86 thin-provisioning-tools
python3 -c "import qemu.qmp" 2>/dev/null || die "python3 module qemu.qmp missing (pip install qemu.qmp)"
if [ "${MIG_SCHED:-0}" = 1 ]; then
    [ "${MIG_TRACE:-0}" = 1 ] || die "MIG_SCHED=1 needs MIG_TRACE=1 (it reads QEMU's trace)"
    perf record -q -e sched:sched_switch -a -o /dev/null -- true >/dev/null 2>&1 \
        || die "MIG_SCHED=1: perf cannot record scheduler events on this host"
fi
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

# guest_failure LOG: the guest's first failure line in its serial log; fails if there is none.
guest_failure() {
    tr -d '\r' <"$1" 2>/dev/null | grep -m1 '^THINBLK-E2E FAIL'
}

# wait_round LOG N: until the guest printed "MIGFIO round N ok" (or more) in LOG.
wait_round() {
    local log=$1 want=$2 i=0 got
    while :; do
        got=$(tr -d '\r' <"$log" 2>/dev/null | grep -c '^MIGFIO round [0-9]* ok' || true)
        [ "$got" -ge "$want" ] && return 0
        # qemu-storage-daemon 10.0 sometimes stops serving the destination after a migration
        # here ("vu_panic: Error writing eventfd: Bad file descriptor" in its log, or silently):
        # in its series (PANIC_LOG set) that ends the series, after 120 s without a round.
        if [ -n "${PANIC_LOG:-}" ] && { grep -q 'vu_panic' "$PANIC_LOG" 2>/dev/null \
            || [ "$i" -ge 1200 ]; }; then
            return 1
        fi
        if got=$(guest_failure "$log"); then
            # On qemu-storage-daemon, the peer we measure against, it ends its series (its
            # own verify failed once after a migration here, CI of 2026-12-07); on thinblk
            # it fails the run.
            [ -z "${PANIC_LOG:-}" ] || return 1
            die "guest failed: $got"
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
    if [ "${MIG_TRACE:-0}" = 1 ]; then
        # QEMU's own account of the switchover, with wall-clock timestamps (the same clock as
        # thinblk's log): mig_breakdown.py reads it.
        extra="$extra -msg timestamp=on -D $SCRATCH/$name.trace"
        for ev in vmstate_downtime_checkpoint vmstate_downtime_save vmstate_downtime_load \
            vhost_user_write vhost_user_read migration_bitmap_sync_start \
            migration_bitmap_sync_end vhost_dev_start vhost_dev_stop migrate_transferred \
            migration_thread_low_pending migrate_pending_exact ${MIG_TRACE_EVENTS:-}; do
            extra="$extra -trace $ev"
        done
    fi
    [ -z "$incoming" ] || extra="$extra -incoming $incoming"
    (
        rc=0
        # (A source QEMU quits after the migration without a result marker: its verdict
        # goes to NAME.harness, and only the last QEMU's is printed.)
        QEMU_EXTRA=$extra QEMU_APPEND="thinblk.secs=${GUEST_SECS:-$SECS} thinblk.disks=${#all[@]}" \
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
    local out perf=
    if [ "${MIG_SCHED:-0}" = 1 ]; then
        # Every context switch on the host while this migration runs (mig_sched.py reads it):
        # perf's clock is CLOCK_MONOTONIC, the traces' the wall clock; the offset goes beside.
        python3 -c 'import time; print(time.time() - time.clock_gettime(time.CLOCK_MONOTONIC))' \
            >"$SCRATCH/$2.sched.offset"
        perf record -q -k mono -e sched:sched_switch -e sched:sched_wakeup -a \
            -o "$SCRATCH/$2.sched" >"$SCRATCH/$2.sched.log" 2>&1 &
        perf=$!
        sleep 0.5
    fi
    out=$(python3 "$HERE/qmp.py" "$SCRATCH/$1.qmp" migrate "unix:$SCRATCH/$2.mig" 300 \
        "$SCRATCH/$2.info") \
        || { log "migration $1 -> $2 failed"; [ -z "$perf" ] || kill -INT "$perf"; return 1; }
    if [ -n "$perf" ]; then
        kill -INT "$perf"
        wait "$perf" || true
    fi
    log "migrated $1 -> $2: downtime ${out% *} ms, total ${out#* } ms"
    [ "${MIG_TRACE:-0}" = 1 ] && breakdown "$1" "$2"
    [ -z "$perf" ] || sched_report "$1" "$2"
    echo "${out% *}"
}

# breakdown FROM TO: QEMU's account of the switchover (mig_breakdown.py), once the source
# QEMU quit and its trace is complete.
breakdown() {
    local i=0
    while [ ! -f "$SCRATCH/$1.rc" ] && [ "$i" -lt 300 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    python3 "$HERE/mig_breakdown.py" "$SCRATCH/$1.trace" "$SCRATCH/$2.trace" "$SCRATCH/$2.info" \
        | tee -a "$SCRATCH/breakdown.txt" >&2 || true
}

# sched_report FROM TO: who had the CPUs in the downtime (mig_sched.py), from the perf
# record migrate made and the source's trace.
sched_report() {
    local i=0
    while [ ! -f "$SCRATCH/$1.rc" ] && [ "$i" -lt 300 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    python3 "$HERE/mig_sched.py" "$SCRATCH/$1.trace" "$SCRATCH/$2.trace" "$SCRATCH/$2.sched" \
        "$(cat "$SCRATCH/$2.sched.offset")" "${SERVER_PID:-0}" \
        | tee -a "$SCRATCH/sched.txt" >&2 || true
}

# median N...: the middle value (the mean of the two middle ones for an even count).
median() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 }
        END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m }'
}

# series SERVER-LABEL OUT: one guest migrated SAMPLES times between a.sock and b.sock (a new
# QEMU on the free socket each time, after the guest did a round where it is); a server
# exporting the disk on both must be running. Writes the downtimes to OUT, space-separated. A
# migration that fails ends the series with what it has (the caller checks the count).
series() {
    local label=$1 file=$2 from=A to i sock ms out=() broken=0
    # Long enough for every migration and a round after each; the guest then ends by itself.
    local secs=$((SAMPLES * SAMPLE_SECS + 30))
    [ "${MIG_TRACE:-0}" = 1 ] && echo "series $label" >>"$SCRATCH/breakdown.txt"
    [ "${MIG_SCHED:-0}" = 1 ] && echo "series $label" >>"$SCRATCH/sched.txt"
    GUEST_SECS=$secs start_qemu A "$SCRATCH/a.sock"
    wait_round "$SCRATCH/A.log" 1
    for i in $(seq "$SAMPLES"); do
        if [ $((i % 2)) = 1 ]; then sock=b.sock; else sock=a.sock; fi
        to=S$i
        GUEST_SECS=$secs start_qemu "$to" "$SCRATCH/$sock" "unix:$SCRATCH/$to.mig"
        if ! ms=$(migrate "$from" "$to"); then
            log "$label series: migration $i failed; $((i - 1)) samples"
            break
        fi
        out+=("$ms")
        from=$to
        if ! wait_round "$SCRATCH/$to.log" 1; then
            log "$label series: the server stopped serving the guest after migration $i:" \
                "$(guest_failure "$SCRATCH/$to.log" || grep -m1 vu_panic "$PANIC_LOG" \
                    || echo "no round in 120 s")"
            broken=1
            break
        fi
    done
    # A guest whose server stopped serving it goes with the other QEMUs left (end_qemus).
    [ "$broken" = 1 ] || finish "$from"
    end_qemus
    echo "${out[*]}" >"$file"
    # Keep this series' QEMU logs and traces apart from the next series' (same names).
    mkdir -p "$SCRATCH/$label"
    mv "$SCRATCH"/[AS]*.log "$SCRATCH"/*.trace "$SCRATCH"/*.info "$SCRATCH"/*.sched* \
        "$SCRATCH/$label/" 2>/dev/null || true
    log "$label series: downtimes ${out[*]} ms"
}

# end_qemus: every QEMU of the series gone (one left waiting for a migration that failed is
# killed) and its harness done, .rc written, before the next series clears the scratch files.
# A QEMU killed when its server stopped serving wrote its S<i>.rc after the next series had
# begun, and that series took it for its own guest's failure (CI of 2026-12-07, with the
# servers' series in turns).
end_qemus() {
    local f pid p
    for f in "$SCRATCH"/[AS]*.pid; do
        # (A QEMU removes its pid file as it exits: one may be gone by now.)
        pid=$(cat "$f" 2>/dev/null) || continue
        grep -q qemu "/proc/$pid/comm" 2>/dev/null && kill "$pid" 2>/dev/null || true
    done
    for p in "${QEMU_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    QEMU_PIDS=()
    rm -f "$SCRATCH"/[AS]*.pid
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
    if [ "$(cat "$SCRATCH/$1.rc")" != 0 ]; then
        # As in wait_round: qemu-storage-daemon's failures are its own, and reported.
        [ -n "${PANIC_LOG:-}" ] || die "guest on $1 failed (log: $SCRATCH/$1.log)"
        log "the guest on $1 failed on qemu-storage-daemon:" \
            "$(guest_failure "$SCRATCH/$1.log" || echo "rc $(cat "$SCRATCH/$1.rc")")"
    fi
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
    ms=$(migrate A B) || die "case $case: migration failed"
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
        migrate B A2 >/dev/null || die "case $case: migration back failed"
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

thinblk_series() {
    log "thinblk: $SAMPLES migrations of one guest on a thin disk (round $1)"
    start_thinblk 1
    series "thinblk-$1" "$SCRATCH/thinblk.samples"
    THINBLK_SAMPLES="$THINBLK_SAMPLES $(cat "$SCRATCH/thinblk.samples")"
    stop_server_and_check
}

qsd_series() {
    log "qemu-storage-daemon: $SAMPLES migrations of the same guest on a raw file (round $1)"
    rm -f "$SCRATCH"/*.sock "$SCRATCH"/*.qmp "$SCRATCH"/*.rc "$SCRATCH"/*.mig "$SCRATCH"/*.pid \
        "$SCRATCH"/[ABS]*.log
    rm -f "$SCRATCH/qsd.raw"
    truncate -s 1G "$SCRATCH/qsd.raw"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk,filename=$SCRATCH/qsd.raw,cache.direct=on" \
        --export "type=vhost-user-blk,id=ea,node-name=disk,addr.type=unix,addr.path=$SCRATCH/a.sock,writable=on,num-queues=$QUEUES" \
        --export "type=vhost-user-blk,id=eb,node-name=disk,addr.type=unix,addr.path=$SCRATCH/b.sock,writable=on,num-queues=$QUEUES" \
        >"$SCRATCH/qsd-$1.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$SCRATCH/a.sock"
    wait_socket "$SCRATCH/b.sock"
    PANIC_LOG=$SCRATCH/qsd-$1.log series "qsd-$1" "$SCRATCH/qsd.samples"
    QSD_SAMPLES="$QSD_SAMPLES $(cat "$SCRATCH/qsd.samples")"
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=
}

for c in $CASES; do
    run_case "$c"
done
THINBLK_SAMPLES=
QSD_SAMPLES=
if [ "$SAMPLES" -gt 0 ]; then
    # Rounds take turns, in the order thinblk, qsd, qsd, thinblk, thinblk, ..., so that a
    # change in the machine during the run (its load, the host's memory) falls on both
    # servers, and neither always goes first.
    for r in $(seq "$ROUNDS"); do
        order="thinblk qsd"
        [ $((r % 2)) = 1 ] || order="qsd thinblk"
        for s in $order; do
            [ "$s" = thinblk ] || [ "${MIG_QSD:-1}" = 1 ] || continue
            "${s}_series" "$r"
        done
    done
    # shellcheck disable=SC2086
    t=$( [ -z "$THINBLK_SAMPLES" ] || median $THINBLK_SAMPLES)
    # shellcheck disable=SC2086
    q=$( [ -z "$QSD_SAMPLES" ] || median $QSD_SAMPLES)
    echo "MIGRATE-DOWNTIME thinblk=${t:-?}ms qsd=${q:--}ms" \
        "(downtime-limit ${MIG_DOWNTIME_LIMIT:-300}ms, $ROUNDS x $SAMPLES migrations per server)" \
        "samples thinblk=$(echo $THINBLK_SAMPLES | tr ' ' ,) qsd=$(echo $QSD_SAMPLES | tr ' ' ,)"
    [ "${MIG_TRACE:-0}" = 1 ] && python3 "$HERE/mig_breakdown.py" --summary "$SCRATCH/breakdown.txt"
    [ "${MIG_SCHED:-0}" = 1 ] && python3 "$HERE/mig_sched.py" --summary "$SCRATCH/sched.txt"
    # shellcheck disable=SC2086
    [ "$(echo $THINBLK_SAMPLES | wc -w)" -eq $((SAMPLES * ROUNDS)) ] \
        || die "thinblk: $(echo $THINBLK_SAMPLES | wc -w) of $((SAMPLES * ROUNDS)) migrations completed"
fi
log "all cases passed: $CASES"

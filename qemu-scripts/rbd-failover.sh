#!/bin/bash
# rbd-failover.sh: a pool on RBD fails over to a second daemon under a running guest.
#
# A guest runs rounds of verified fio (guest test restartfio: the area written and flushed
# once, then 4 KiB and 1 MiB random writes mixed at QD32, everything read back and checked) on
# a thin disk of a pool whose metadata and data are RBD images. In each of the first N rounds,
# at a random moment, the owning thinblk is killed with SIGKILL and a new one takes the pool
# over (--take-over: the dead owner's locks broken, its client blocklisted) on the same
# socket; QEMU reconnects (reconnect-ms=1000) and the new owner resubmits what was in flight
# (INFLIGHT_SHMFD). The second take-over goes through QMP instead: a daemon started with
# --standby (its own QMP socket, the same export) waits while the owner runs, its query-pool
# names the owner, and after the SIGKILL `thinblk ctl pool-take-over` fences the owner and
# starts the export. After the first take-over the old command line (no --take-over) must be
# refused, naming the owner. Passes when the guest reports every verify passed within
# FAILOVER_TIMEOUT seconds and the metadata image, exported with `rbd export` after the last
# owner stopped on SIGTERM, passes thin_check and thinblk check.
#
# The cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/ceph-cluster.sh start DIR; pool
# `thinblk`). librbd's client cache is turned off for the daemons here: with it, a write the
# guest saw complete may still sit in the killed process, and the guest's verify of a write
# it never flushed would then fail although no promise was broken.
#
# Environment: THINBLK (binary, default target/release/thinblk), FAILOVERS (rounds with a
# take-over, default 3), FAILOVER_TIMEOUT (default 600), FAILOVER_SEED (random delays;
# default random, logged), E2E_KEEP=1 keeps the scratch directory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
THINBLK=${THINBLK:-$TARGET/release/thinblk}
[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release --features rbd, or THINBLK=)"
[ -n "${THINBLK_CEPH_CONF:-}" ] || die "THINBLK_CEPH_CONF is not set (bash scripts/ceph-cluster.sh start DIR)"
[ -f "$THINBLK_CEPH_CONF" ] || die "THINBLK_CEPH_CONF=$THINBLK_CEPH_CONF: no such file"
command -v rbd >/dev/null || die "rbd (ceph-common) is not installed"
FAILOVERS=${FAILOVERS:-3}
TIMEOUT=${FAILOVER_TIMEOUT:-600}
SEED=${FAILOVER_SEED:-$RANDOM}
RANDOM=$SEED
GUEST=$TARGET/guest
ensure_packages thin-provisioning-tools
"$HERE/build-guest.sh" "$GUEST"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-rbd-failover.XXXXXX")
SERVER_PID=
STANDBY_PID=
RUN_PID=
FAILED=0
TAG=failover-$$-$SEED
META=thinblk/$TAG-meta
DATA=thinblk/$TAG-data
POOL=$SCRATCH/pool SOCK=$SCRATCH/disk.sock SERVER_LOG=$SCRATCH/server.log GLOG=$SCRATCH/guest.log
mkdir -p "$POOL"
# The cluster's configuration with librbd's client cache off (see above).
CONF=$SCRATCH/ceph.conf
{ cat "$THINBLK_CEPH_CONF"; printf '\n[client]\nrbd cache = false\n'; } >"$CONF"

cleanup() {
    if [ -n "$RUN_PID" ]; then
        kill -TERM "$RUN_PID" 2>/dev/null || true
        wait "$RUN_PID" 2>/dev/null || true
    fi
    [ -z "$SERVER_PID" ] || kill -KILL "$SERVER_PID" 2>/dev/null || true
    [ -z "$STANDBY_PID" ] || kill -KILL "$STANDBY_PID" 2>/dev/null || true
    if [ "$FAILED" -eq 0 ] && [ "${E2E_KEEP:-0}" != 1 ]; then
        rm -rf "$SCRATCH"
    else
        log "scratch directory kept: $SCRATCH"
    fi
}
trap cleanup EXIT

# The daemon's command line, the same for every owner (a take-over adds --take-over).
SERVE=(serve --dir "$POOL" --metadata "rbd:$META" --data "rbd:$DATA"
    --metadata-size 64M --data-size 1G --ceph-conf "$CONF"
    --export "name=vm,size=256M,socket=$SOCK,queues=2")

# start_server [EXTRA...]: thinblk in the background; waits for its socket (a take-over
# blocklists the old client first: allow 60 s).
start_server() {
    rm -f "$SOCK"
    RUST_LOG=${RUST_LOG:-info} "$THINBLK" "${SERVE[@]}" "$@" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1200); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# start_standby: a second daemon standing by for the pool (--standby) with its own QMP
# socket, while the owner runs; waits for that socket and checks query-pool names an owner.
STANDBY_CTL=$SCRATCH/standby-control.sock
start_standby() {
    local out
    RUST_LOG=${RUST_LOG:-info} "$THINBLK" "${SERVE[@]}" --standby --control "$STANDBY_CTL" \
        >>"$SERVER_LOG" 2>&1 &
    STANDBY_PID=$!
    for _ in $(seq 1200); do
        [ -S "$STANDBY_CTL" ] && break
        kill -0 "$STANDBY_PID" 2>/dev/null || { log "the standby exited"; return 1; }
        sleep 0.05
    done
    out=$("$THINBLK" ctl --socket "$STANDBY_CTL" query-pool 2>&1 | tr -d '\n ') \
        || { log "query-pool: $out"; return 1; }
    if ! grep -q '"mode":"standby"' <<<"$out" || ! grep -q '"owners":\["' <<<"$out"; then
        log "query-pool of the standby names no owner: $out"
        return 1
    fi
    log "standby: $out"
    [ -e "$SOCK" ] && [ "$(stat -c %i "$SOCK")" = "$SOCK_INODE" ] \
        || { log "the standby touched the owner's export socket"; return 1; }
}

# take_over_qmp: tells the standby to take the pool over; it becomes the server.
take_over_qmp() {
    local out
    out=$(timeout 120 "$THINBLK" ctl --socket "$STANDBY_CTL" pool-take-over 2>&1) \
        || { log "pool-take-over: $out"; return 1; }
    grep -q '"fenced"' <<<"$out" || { log "pool-take-over: $out"; return 1; }
    [ -S "$SOCK" ] || { log "no export socket after pool-take-over: $out"; return 1; }
    SERVER_PID=$STANDBY_PID
    STANDBY_PID=
    log "pool-take-over: $(tr -d '\n ' <<<"$out")"
}

stop_server() {
    local rc=0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=
    return "$rc"
}

# refused: the old command line, without --take-over, must exit non-zero naming the owner.
refused() {
    local out rc=0
    out=$(timeout 60 "$THINBLK" "${SERVE[@]}" 2>&1 >/dev/null) || rc=$?
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || ! grep -q 'is owned by' <<<"$out"; then
        echo "not refused (exit $rc): $(tail -n1 <<<"$out")"
        return 1
    fi
    log "old command line refused: $(grep -m1 'is owned by' <<<"$out")"
}

check_pool() {
    local out
    out=$(rbd --conf "$CONF" export "$META" "$SCRATCH/metadata.export" 2>&1) \
        || { echo "rbd export: $(echo "$out" | tail -n1)"; return 1; }
    out=$(thin_check "$SCRATCH/metadata.export" 2>&1) || { echo "thin_check: $(echo "$out" | tail -n1)"; return 1; }
    out=$("$THINBLK" check "$SCRATCH/metadata.export" 2>&1) || { echo "thinblk check: $(echo "$out" | tail -n1)"; return 1; }
}

wait_round() {
    while ! tr -d '\r' 2>/dev/null <"$GLOG" | grep -qx "RESTART-LOOP $1"; do
        kill -0 "$RUN_PID" 2>/dev/null || return 1
        sleep 0.1
    done
}

fail() {
    FAILED=1
    log "rbd-failover: FAIL: $*"
    tr -d '\r' <"$GLOG" 2>/dev/null | tail -n 30 | sed 's/^/  guest: /' >&2 || true
    tail -n 20 "$SERVER_LOG" | sed 's/^/  thinblk: /' >&2 || true
    exit 1
}

log "rbd-failover: seed $SEED (FAILOVER_SEED=$SEED repeats the delays), images $META $DATA"
start=$(date +%s)
start_server || fail "thinblk did not start"
QEMU_APPEND="thinblk.loops=$((FAILOVERS + 1))" "$HERE/run-qemu.sh" -g "$GUEST" -l "$GLOG" \
    -q 2 -t "$TIMEOUT" -r 1000 "$SOCK" restartfio 2>"$SCRATCH/run.err" &
RUN_PID=$!
for r in $(seq "$FAILOVERS"); do
    wait_round "$r" || fail "the guest ended before round $r"
    if [ "$r" -eq 2 ]; then
        SOCK_INODE=$(stat -c %i "$SOCK")
        start_standby || fail "round 2: the standby did not stand by"
    fi
    delay=$((RANDOM % 30))
    sleep "$((delay / 10)).$((delay % 10))"
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    t0=$(date +%s%N)
    if [ "$r" -eq 2 ]; then
        take_over_qmp || fail "round 2: the take-over over QMP failed"
        how="QMP pool-take-over"
    else
        start_server --take-over || fail "round $r: the take-over did not start"
        how="--take-over"
    fi
    log "round $r: SIGKILL, taken over ($how) in $((($(date +%s%N) - t0) / 1000000)) ms"
    if [ "$r" -eq 1 ]; then
        err=$(refused) || fail "round 1: $err"
    fi
done
rc=0
wait "$RUN_PID" || rc=$?
RUN_PID=
[ "$rc" -eq 0 ] || fail "$(tail -n1 "$SCRATCH/run.err")"
stop_server || fail "thinblk did not exit 0 on SIGTERM"
err=$(check_pool) || fail "$err"
resubmitted=$(sed -n 's/.*resubmitting \([0-9]*\) requests.*/\1/p' "$SERVER_LOG" \
    | awk '{ n += $1 } END { print n + 0 }')
log "rbd-failover: PASS in $(($(date +%s) - start))s: $FAILOVERS take-overs, every verify" \
    "passed, $resubmitted requests resubmitted, metadata image passes thin_check"

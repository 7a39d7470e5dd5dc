#!/bin/bash
# restart.sh: thinblk restarted and upgraded under a running guest.
#
# A guest on a thin disk runs rounds of fio with verification (guest test restartfio: 4 KiB
# and 1 MiB random writes mixed at QD32, so requests complete out of order; everything read
# back and checked) while the host, once in each of the first N rounds, at a random moment:
#   kill     SIGKILLs thinblk and starts it again with the same command line
#            (RESTART_KILLS rounds, default 10)
#   upgrade  upgrades it in place, alternately with SIGUSR2 and QMP x-thinblk-upgrade
#            (RESTART_UPGRADES rounds, default 3); the pid must stay the same
#   writethrough  the guest switches its disk to write-through first (cache_type), then
#            kills as above (RESTART_WT_KILLS rounds, default 3): the guest's cache_type must
#            stay "write through" and every restarted thinblk must log that it serves the
#            disk write-through again (the mode QEMU does not resend, kept in the inflight
#            region; src/vhost/cache_mode.rs)
# QEMU's chardev reconnects (reconnect-ms=1000) and thinblk resubmits the requests that were
# in flight (INFLIGHT_SHMFD). A case passes when the guest reports every verify passed and no
# I/O error or hung task in its kernel log within RESTART_TIMEOUT seconds (default 600), and
# the pool passes thin_check and thinblk check after thinblk stopped on SIGTERM.
#
# Environment: THINBLK (binary, default target/release/thinblk), RESTART_CASES ("kill
# upgrade writethrough"), RESTART_KILLS, RESTART_WT_KILLS, RESTART_UPGRADES, RESTART_TIMEOUT, RESTART_SEED (random delays;
# default random, logged), E2E_KEEP=1 keeps the scratch directory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
THINBLK=${THINBLK:-$TARGET/release/thinblk}
[ -x "$THINBLK" ] || die "no thinblk binary at $THINBLK (cargo build --release, or THINBLK=)"
CASES=${RESTART_CASES:-kill upgrade writethrough}
KILLS=${RESTART_KILLS:-10}
WT_KILLS=${RESTART_WT_KILLS:-3}
# Extra guest kernel parameters of the case being run.
GUEST_EXTRA=
UPGRADES=${RESTART_UPGRADES:-3}
TIMEOUT=${RESTART_TIMEOUT:-600}
SEED=${RESTART_SEED:-$RANDOM}
RANDOM=$SEED
GUEST=$TARGET/guest
ensure_packages thin-provisioning-tools
"$HERE/build-guest.sh" "$GUEST"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-restart.XXXXXX")
SERVER_PID=
RUN_PID=
FAILED=0

cleanup() {
    if [ -n "$RUN_PID" ]; then
        kill -TERM "$RUN_PID" 2>/dev/null || true
        wait "$RUN_PID" 2>/dev/null || true
    fi
    [ -z "$SERVER_PID" ] || kill -KILL "$SERVER_PID" 2>/dev/null || true
    if [ "$FAILED" -eq 0 ] && [ "${E2E_KEEP:-0}" != 1 ]; then
        rm -rf "$SCRATCH"
    else
        log "scratch directory kept: $SCRATCH"
    fi
}
trap cleanup EXIT

# start_server: thinblk on the case's pool, in the background; waits for its socket.
start_server() {
    rm -f "$SOCK"
    RUST_LOG=${RUST_LOG:-info} "$THINBLK" serve --dir "$POOL" --metadata-size 64M --data-size 1G \
        --export "name=vm,size=256M,socket=$SOCK,queues=2" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 200); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# stop_server: SIGTERM; thinblk must exit 0.
stop_server() {
    local rc=0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=
    return "$rc"
}

check_pool() {
    local out
    out=$(thin_check "$POOL/metadata" 2>&1) || { echo "thin_check: $(echo "$out" | tail -n1)"; return 1; }
    out=$("$THINBLK" check "$POOL/metadata" 2>&1) || { echo "thinblk check: $(echo "$out" | tail -n1)"; return 1; }
}

# wait_round N: until the guest starts fio round N; fails if the guest ended first.
wait_round() {
    while ! tr -d '\r' 2>/dev/null <"$GLOG" | grep -qx "RESTART-LOOP $1"; do
        kill -0 "$RUN_PID" 2>/dev/null || return 1
        sleep 0.1
    done
}

fail_case() {
    FAILED=1
    log "$CASE: FAIL: $*"
    tr -d '\r' <"$GLOG" 2>/dev/null | tail -n 30 | sed 's/^/  guest: /' >&2 || true
    tail -n 20 "$SERVER_LOG" | sed 's/^/  thinblk: /' >&2 || true
}

# Fio rounds the guest runs after the round of the last action. A round takes about a
# second, the action comes up to 2.9 s into its round, and in the writethrough case QEMU
# then takes up to a second to reconnect: with one round after it the guest could finish
# before the last action, which then met no guest and no QEMU to reconnect (CI of 02c32be).
TRAIL=6

# run_case NAME ROUNDS ACTION: one guest, ROUNDS+TRAIL fio rounds, ACTION after a random
# delay in each of the first ROUNDS, always while the guest still runs.
run_case() {
    CASE=$1
    local rounds=$2 action=$3 r delay start rc=0 err=
    local loops=$((rounds + TRAIL))
    local dir=$SCRATCH/$CASE
    mkdir -p "$dir"
    POOL=$dir/pool SOCK=$dir/disk.sock SERVER_LOG=$dir/server.log GLOG=$dir/guest.log
    start=$(date +%s)
    start_server || { fail_case "thinblk did not start"; return; }
    QEMU_APPEND="thinblk.loops=$loops $GUEST_EXTRA" "$HERE/run-qemu.sh" -g "$GUEST" -l "$GLOG" \
        -q 2 -t "$TIMEOUT" -r 1000 "$SOCK" restartfio 2>"$dir/run.err" &
    RUN_PID=$!
    for r in $(seq "$rounds"); do
        wait_round "$r" || { err="the guest ended before round $r"; break; }
        # Anywhere in the round: its writes, its verify, or between rounds.
        delay=$((RANDOM % 30))
        sleep "$((delay / 10)).$((delay % 10))"
        # An action after the guest's last round would test nothing.
        if tr -d '\r' <"$GLOG" | grep -q "^RESTART-DONE $loops "; then
            err="round $r: the guest had finished its $loops rounds before the $CASE"
            break
        fi
        if ! "$action" "$r"; then
            err="round $r: $CASE failed"
            break
        fi
    done
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    if [ -n "$err" ] || [ "$rc" -ne 0 ]; then
        fail_case "${err:-$(tail -n1 "$dir/run.err")}"
        return
    fi
    if ! stop_server; then
        fail_case "thinblk did not exit 0 on SIGTERM"
        return
    fi
    if ! err=$(check_pool); then
        fail_case "$err"
        return
    fi
    if [ "$CASE" = writethrough ]; then
        local kept reconnects
        kept=$(grep -c 'write-through, as the guest set it before the reconnect' "$SERVER_LOG" || true)
        # wt_kill_action waits for QEMU's reconnection after each kill, so every restart has
        # one; every connection after the first (where the guest set write-through) must
        # take the mode back.
        reconnects=$(( $(grep -c ': frontend connected' "$SERVER_LOG" || true) - 1 ))
        if [ "$reconnects" -lt "$rounds" ] || [ "$kept" -lt "$reconnects" ]; then
            fail_case "$kept of $reconnects reconnections ($rounds restarts) took the guest's" \
                "write-through mode back"
            return
        fi
        log "$CASE: every reconnection served the disk write-through again ($kept of" \
            "$rounds restarts);" \
            "guest: $(tr -d '\r' <"$GLOG" | grep -c '^RESTART-CACHE .* write through') rounds" \
            "ended with cache_type 'write through'"
    fi
    local resubmitted
    resubmitted=$(sed -n 's/.*resubmitting \([0-9]*\) requests.*/\1/p' "$SERVER_LOG" \
        | awk '{ n += $1 } END { print n + 0 }')
    log "$CASE: PASS in $(($(date +%s) - start))s: $rounds ${CASE}s, every verify passed," \
        "$resubmitted requests resubmitted; fio rounds (time, completion latency):"
    tr -d '\r' <"$GLOG" | grep '^RESTART-DONE' | sed 's/^/  /' >&2
}

kill_action() {
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    log "kill: round $1: SIGKILL"
    # Down for up to a second: QEMU retries every second meanwhile.
    sleep "0.$((RANDOM % 10))"
    start_server
}

# wt_kill_action: kill_action, then wait until QEMU (retrying once a second) has connected
# to the new daemon, so that the next kill cannot come before a frontend saw this restart.
wt_kill_action() {
    local before
    before=$(grep -c ': frontend connected' "$SERVER_LOG" || true)
    kill_action "$1" || return 1
    for _ in $(seq 200); do
        [ "$(grep -c ': frontend connected' "$SERVER_LOG" || true)" -gt "$before" ] && return 0
        sleep 0.1
    done
    log "writethrough: round $1: QEMU did not reconnect within 20 s"
    return 1
}

upgrade_action() {
    local pid=$SERVER_PID before
    before=$(grep -c 'listening socket inherited' "$SERVER_LOG" || true)
    if [ $(($1 % 2)) -eq 1 ]; then
        kill -USR2 "$pid"
        log "upgrade: round $1: SIGUSR2"
    else
        "$THINBLK" ctl --socket "$POOL/control.sock" x-thinblk-upgrade >>"$SERVER_LOG" 2>&1 \
            || return 1
        log "upgrade: round $1: QMP x-thinblk-upgrade"
    fi
    # The new image says so when it takes the sockets over (the export's and the control's).
    for _ in $(seq 300); do
        [ "$(grep -c 'listening socket inherited' "$SERVER_LOG" || true)" -ge $((before + 2)) ] && break
        sleep 0.1
    done
    [ "$(grep -c 'listening socket inherited' "$SERVER_LOG" || true)" -ge $((before + 2)) ] || return 1
    kill -0 "$pid" 2>/dev/null
}

log "restart: seed $SEED (RESTART_SEED=$SEED repeats the delays)"
for c in $CASES; do
    case "$c" in
        kill) run_case kill "$KILLS" kill_action ;;
        upgrade) run_case upgrade "$UPGRADES" upgrade_action ;;
        writethrough)
            GUEST_EXTRA=thinblk.cache=wt
            run_case writethrough "$WT_KILLS" wt_kill_action
            GUEST_EXTRA=
            ;;
        *) die "unknown case '$c' (kill, upgrade, writethrough)" ;;
    esac
done
[ "$FAILED" -eq 0 ] || exit 1

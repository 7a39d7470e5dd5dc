#!/bin/bash
# e2e.sh: end-to-end test of a vhost-user-blk server with a real Linux guest.
#
# Builds the guest (build-guest.sh, cached), serves a fresh 256 MiB sparse
# raw file over vhost-user-blk, and boots the guest once per case:
#   fio  random writes with crc32c verification (4k and 4k-128k)
#   fs1  mkfs.ext4, write files, record sha256sums on the disk
#   fs2  a new QEMU process ("reboot") against the SAME still-running server:
#        e2fsck -fn, then verify fs1's checksums. This also proves the server
#        accepts a second frontend connection after the first one went away.
#   restart  stop the server (it must exit 0 on SIGTERM), start it again on
#        the same file, and run fs2's checks once more.
#   live-snapshot (thin)  a guest writes 12 fio regions one after another while
#        the host snapshots the disk every second (thinblk ctl thin-snapshot);
#        then two of the snapshots (the middle and the last) are exported
#        (block-export-add) and a second guest verifies, verify-only, every
#        region each snapshot claims complete. Reports the I/O pauses.
#   resize (thin)  block-resize grows the disk while a guest runs; the guest
#        must see the new capacity (virtio config change) and use its end.
#   crash (thin)  E2E_CRASH_ROUNDS (3) times: a guest writes files on ext4,
#        each followed by fsync of the file and its directory and only then a
#        "FSYNCED name sha256" line; after 5-40 such lines (and up to 0.9 s more)
#        the host SIGKILLs the server and stops QEMU, runs thin_check and
#        thinblk check on the metadata as the kill left it, restarts the server
#        with the same command line and boots a new guest: once mounting has
#        replayed the journal, e2fsck -fn must exit 0, and every file reported
#        fsynced in any round so far must be there with its checksum. Rounds
#        alternate write-back and write-through. With another server the case
#        runs too, without the pool checks.
#   cacheflip (thin, never by default; scripts/test.sh runs it on its own)  two new thin
#        devices of one pool in one guest: fio writes at QD32 into unprovisioned blocks of
#        the first while the guest flips its write cache to write-through and back, and
#        into the second meanwhile; the host takes thin-snapshots of the first every
#        second. All within E2E_CACHEFLIP_TIMEOUT (default 120 s), fio without errors, and
#        thinblk exits 0 on SIGTERM afterwards. On a timeout QEMU and thinblk are killed
#        with SIGKILL and the case fails (issue 13: a flip under load deadlocked the pool).
# Prints one line per case and "N passed, M failed"; exits 1 if any failed.
#
# Environment:
#   SERVER=thinblk (default: a raw file) | thin (a thin device in a pool,
#                    with the extra cases "snapshot", "live-snapshot",
#                    "resize", "crash" and "check") | cow (a
#                    read-only ext4 origin image built on the host, served
#                    through a cow= export and a thin origin= export; cases
#                    "cow" and "thinorigin" mount it and write files,
#                    "restart" and "thinorigin2" check them after a restart,
#                    "unchanged" checks the origin file's sha256) | qsd
#                    which server to test; qsd-null is a
#                    self-check of the harness: a disk that drops writes and
#                    reads zeros, so every case must FAIL
#   THINBLK=PATH     thinblk binary (default: target/release/thinblk if it
#                    exists, else target/debug/thinblk)
#   E2E_TESTS        cases to run, in order (default: "fio fs1 fs2 restart");
#                    "fiobench" (never by default) prints guest fio IOPS, for
#                    the record: E2E_TESTS=fiobench SERVER=qsd|thinblk|thin
#   E2E_QUEUES       virtqueues (default 2)
#   E2E_EXPORT_OPTS  more thinblk export keys, e.g. ",poll-us=0" (default none)
#   E2E_TIMEOUT      seconds per guest boot (default 180; a case takes ~15)
#   E2E_CRASH_ROUNDS kills in the crash case (default 3, ~20 s each)
#   E2E_CRASH_SEED   seed of the crash case's kill targets (fsync count and delay;
#                    default random, logged); the guest's pace still varies
#   E2E_KEEP=1       keep the scratch directory (disk, logs) even on success
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=qemu-scripts/lib.sh
. "$HERE/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

SERVER=${SERVER:-thinblk}
if [ "$SERVER" = thin ]; then
    TESTS=${E2E_TESTS:-fio fs1 fs2 restart snapshot live-snapshot resize crash check}
elif [ "$SERVER" = cow ]; then
    TESTS=${E2E_TESTS:-cow restart thinorigin thinorigin2 unchanged}
else
    TESTS=${E2E_TESTS:-fio fs1 fs2 restart}
fi
QUEUES=${E2E_QUEUES:-2}
EXPORT_OPTS=${E2E_EXPORT_OPTS:-}
TIMEOUT=${E2E_TIMEOUT:-180}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GUEST=$TARGET/guest

case "$SERVER" in
    thinblk | thin | cow)
        if [ -z "${THINBLK:-}" ]; then
            THINBLK=$TARGET/debug/thinblk
            [ -x "$TARGET/release/thinblk" ] && THINBLK=$TARGET/release/thinblk
        fi
        ;;
    # qemu-storage-daemon comes with qemu-system-x86 (qemu-system-common).
    qsd | qsd-null) ensure_packages qemu-system-x86 ;;
    *) die "SERVER must be thinblk, thin, cow, qsd or qsd-null, not '$SERVER'" ;;
esac

"$HERE/build-guest.sh" "$GUEST"

# Scratch in /tmp, not under the repository: a unix socket path must stay
# below 108 bytes, and a CI checkout path can be long.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/thinblk-e2e.XXXXXX")
DISK=$SCRATCH/disk.raw
SOCK=$SCRATCH/disk.sock
POOL=$SCRATCH/pool
SNAP_SOCK=$SCRATCH/snap.sock
# Extra thinblk arguments for the next server start (the snapshot case adds an export).
THIN_EXTRA=()
SERVER_LOG=$SCRATCH/server.log
SERVER_PID=
STOP_RC=0
FAILED_ANY=0

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local pid=$SERVER_PID _ rc=0
    SERVER_PID=
    kill -TERM "$pid" 2>/dev/null || true
    # Give it 10 s to shut down cleanly, then make sure it is gone.
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || rc=$?
    log "server stopped (exit status $rc)"
    STOP_RC=$rc
}
RUN_PID=
cleanup() {
    # run-qemu.sh stops its QEMU when it gets TERM.
    if [ -n "$RUN_PID" ]; then
        kill -TERM "$RUN_PID" 2>/dev/null || true
        wait "$RUN_PID" 2>/dev/null || true
    fi
    stop_server
    if [ "$FAILED_ANY" -eq 0 ] && [ "${E2E_KEEP:-0}" != 1 ]; then
        rm -rf "$SCRATCH"
    else
        log "scratch directory kept: $SCRATCH"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s 256M "$DISK"

# SERVER=cow: a read-only origin image with files and their checksums.
ORIGIN=$SCRATCH/origin.img
STORE=$SCRATCH/snap.cow
THIN_SOCK=$SCRATCH/thin.sock
ORIGIN_SUM=
if [ "$SERVER" = cow ]; then
    ensure_packages e2fsprogs
    mkdir -p "$SCRATCH/tree/origin"
    for n in 1 2 3 4; do
        head -c $((n * 300000)) /dev/urandom >"$SCRATCH/tree/origin/f$n"
    done
    (cd "$SCRATCH/tree" && find origin -type f | sort | xargs sha256sum >SHA256SUMS)
    mkfs.ext4 -q -F -d "$SCRATCH/tree" "$ORIGIN" 64M
    chmod a-w "$ORIGIN"
    ORIGIN_SUM=$(sha256sum <"$ORIGIN")
fi

start_server() {
    # A socket left by a previous server would end the wait below at once.
    rm -f "$SOCK"
    case "$SERVER" in
        thinblk)
            [ -x "$THINBLK" ] || {
                echo "thinblk binary not found at $THINBLK (cargo build, or set THINBLK=, or SERVER=qsd)" >>"$SERVER_LOG"
                return 1
            }
            log "server: $THINBLK serve --export raw=$DISK,socket=$SOCK,queues=$QUEUES$EXPORT_OPTS"
            "$THINBLK" serve --export "raw=$DISK,socket=$SOCK,queues=$QUEUES$EXPORT_OPTS" \
                >>"$SERVER_LOG" 2>&1 &
            ;;
        thin)
            [ -x "$THINBLK" ] || {
                echo "thinblk binary not found at $THINBLK" >>"$SERVER_LOG"
                return 1
            }
            log "server: $THINBLK serve --dir $POOL (thin device disk, 256 MiB) ${THIN_EXTRA[*]}"
            "$THINBLK" serve --dir "$POOL" --metadata-size 64M --data-size 1G \
                --export "name=disk,size=256M,socket=$SOCK,queues=$QUEUES$EXPORT_OPTS" \
                "${THIN_EXTRA[@]}" >>"$SERVER_LOG" 2>&1 &
            ;;
        cow)
            [ -x "$THINBLK" ] || {
                echo "thinblk binary not found at $THINBLK" >>"$SERVER_LOG"
                return 1
            }
            rm -f "$THIN_SOCK"
            log "server: $THINBLK serve: cow=$ORIGIN (store $STORE) at $SOCK, thin origin= at $THIN_SOCK"
            "$THINBLK" serve --dir "$POOL" --metadata-size 64M --data-size 1G \
                --export "cow=$ORIGIN,store=$STORE,chunk-size=16K,id=cow,socket=$SOCK,queues=$QUEUES" \
                --export "name=odisk,origin=$ORIGIN,socket=$THIN_SOCK,queues=$QUEUES" \
                >>"$SERVER_LOG" 2>&1 &
            ;;
        qsd)
            log "server: qemu-storage-daemon, vhost-user-blk export at $SOCK"
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=disk,filename=$DISK" \
                --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES" \
                >>"$SERVER_LOG" 2>&1 &
            ;;
        qsd-null)
            log "server: qemu-storage-daemon null-co (harness self-check: all cases must fail)"
            qemu-storage-daemon \
                --blockdev "driver=null-co,node-name=disk,size=268435456,read-zeroes=on" \
                --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES" \
                >>"$SERVER_LOG" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    # QEMU fails at once if the socket is not there yet: wait for it, but
    # stop waiting as soon as the server has died.
    local _
    local want=$SOCK
    [ "$SERVER" != cow ] || want=$THIN_SOCK
    for _ in $(seq 300); do
        [ -S "$want" ] && return 0
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local rc=0
            wait "$SERVER_PID" 2>/dev/null || rc=$?
            SERVER_PID=
            echo "server exited (status $rc) before creating $SOCK" >>"$SERVER_LOG"
            return 1
        fi
        sleep 0.1
    done
    echo "server did not create $SOCK within 30 s" >>"$SERVER_LOG"
    return 1
}

show_tail() { # FILE TITLE
    [ -s "$1" ] || return 0
    echo "----- last lines of $2 ($1) -----"
    tail -n 40 "$1" | tr -d '\r'
    echo "-----"
}

RESULTS=()
PASSED=0
FAILED=0
record() { # STATUS NAME SECONDS [REASON]
    local line
    line=$(printf '%-4s %-8s %4ss  %s' "$1" "$2" "$3" "${4:-}" | sed 's/ *$//')
    RESULTS+=("$line")
    if [ "$1" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); FAILED_ANY=1; fi
}

CONTROL=$POOL/control.sock
ctl() { "$THINBLK" ctl --socket "$CONTROL" "$@"; }

# live-snapshot: snapshots of the disk taken through the control socket while a guest
# writes, each later read back by a second guest. Records its own result.
live_snapshot_case() {
    local start=$1 glog=$SCRATCH/guest-livewrite.log n=0 pauses=() commits=() rc=0 out
    "$HERE/run-qemu.sh" -g "$GUEST" -l "$glog" -q "$QUEUES" -t "$TIMEOUT" "$SOCK" livewrite \
        2>"$SCRATCH/run-livewrite.err" &
    RUN_PID=$!
    # Wait for the guest's first phase so snapshots land during the writes, not the boot.
    while kill -0 "$RUN_PID" 2>/dev/null && ! grep -q "phase 1 written" "$glog" 2>/dev/null; do
        sleep 0.5
    done
    while kill -0 "$RUN_PID" 2>/dev/null; do
        n=$((n + 1))
        if ! out=$(ctl thin-snapshot device=disk "name=live$n" 2>&1); then
            kill -TERM "$RUN_PID" 2>/dev/null || true
            wait "$RUN_PID" 2>/dev/null || true
            RUN_PID=
            record FAIL live-snapshot $(($(date +%s) - start)) "thin-snapshot: $out"
            return
        fi
        pauses+=("$(echo "$out" | sed -n 's/.*"pause-us": \([0-9]*\).*/\1/p')")
        commits+=("$(echo "$out" | sed -n 's/.*"commit-us": \([0-9]*\).*/\1/p')")
        sleep 1
    done
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    cat "$SCRATCH/run-livewrite.err" >&2
    if [ "$rc" -ne 0 ]; then
        record FAIL live-snapshot $(($(date +%s) - start)) "the writing guest failed"
        show_tail "$glog" "guest serial log"
        return
    fi
    local sorted max
    sorted=$(printf '%s\n' "${pauses[@]}" | sort -n)
    max=$(echo "$sorted" | tail -n1)
    log "live-snapshot: $n snapshots while the guest wrote; I/O pause (us): $(echo $sorted)"
    log "live-snapshot: the commit after each (first writes wait for it, as in every commit; us):" \
        "$(printf '%s\n' "${commits[@]}" | sort -n | tr '\n' ' ')"
    if [ "$n" -lt 2 ]; then
        record FAIL live-snapshot $(($(date +%s) - start)) "only $n snapshots were taken"
        return
    fi
    local s phases=() vsock vlog
    for s in $(((n + 1) / 2)) "$n"; do
        vsock=$SCRATCH/live$s.sock
        vlog=$SCRATCH/guest-liveverify$s.log
        if ! out=$(ctl block-export-add type=vhost-user-blk "id=live$s" "node-name=live$s" \
            addr.type=unix "addr.path=$vsock" writable=true 2>&1); then
            record FAIL live-snapshot $(($(date +%s) - start)) "block-export-add live$s: $out"
            return
        fi
        if ! "$HERE/run-qemu.sh" -g "$GUEST" -l "$vlog" -q "$QUEUES" -t "$TIMEOUT" "$vsock" \
            liveverify 2>"$SCRATCH/run-liveverify$s.err"; then
            cat "$SCRATCH/run-liveverify$s.err" >&2
            show_tail "$vlog" "guest serial log"
            record FAIL live-snapshot $(($(date +%s) - start)) "snapshot live$s does not verify"
            return
        fi
        phases+=("live$s:$(tr -d '\r' <"$vlog" | sed -n 's/^LIVE-VERIFIED //p')")
        ctl block-export-del "id=live$s" >/dev/null || true
    done
    record PASS live-snapshot $(($(date +%s) - start)) \
        "$n snapshots, max pause ${max}us; verified phases ${phases[*]}"
}

# resize: grow the disk under a running guest, which must notice. Records its own result.
resize_case() {
    local start=$1 glog=$SCRATCH/guest-resize.log rc=0 out
    "$HERE/run-qemu.sh" -g "$GUEST" -l "$glog" -q "$QUEUES" -t "$TIMEOUT" "$SOCK" resize \
        2>"$SCRATCH/run-resize.err" &
    RUN_PID=$!
    while kill -0 "$RUN_PID" 2>/dev/null && ! grep -q "waiting for resize" "$glog" 2>/dev/null; do
        sleep 0.2
    done
    if ! out=$(ctl block-resize node-name=disk size=536870912 2>&1); then
        kill -TERM "$RUN_PID" 2>/dev/null || true
        wait "$RUN_PID" 2>/dev/null || true
        RUN_PID=
        record FAIL resize $(($(date +%s) - start)) "block-resize: $out"
        return
    fi
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    cat "$SCRATCH/run-resize.err" >&2
    if [ "$rc" -ne 0 ]; then
        show_tail "$glog" "guest serial log"
        show_tail "$SERVER_LOG" "server log"
        record FAIL resize $(($(date +%s) - start)) \
            "$(tr -d '\r' <"$glog" | sed -n 's/^THINBLK-E2E FAIL resize: //p')"
        return
    fi
    record PASS resize $(($(date +%s) - start)) \
        "$(tr -d '\r' <"$glog" | sed -n 's/^capacity now //p')"
}

# cacheflip: see the header. Restarts the server with two more thin devices (new, so every
# write is a first write), runs the guest test of the same name on both, snapshots the first
# while it runs, then stops the server, which must exit 0 on SIGTERM. Records its own result.
CACHEFLIP_TIMEOUT=${E2E_CACHEFLIP_TIMEOUT:-120}
cacheflip_case() {
    local start=$1 glog=$SCRATCH/guest-cacheflip.log pidfile=$SCRATCH/qemu-cacheflip.pid
    local flip=$SCRATCH/flip.sock other=$SCRATCH/flip2.sock n=0 rc=0 out err= qpid
    stop_server
    THIN_EXTRA=(--export "name=flip,size=256M,socket=$flip,queues=$QUEUES"
        --export "name=flip2,size=64M,socket=$other,queues=$QUEUES")
    if ! start_server || ! wait_socket "$flip" || ! wait_socket "$other"; then
        SERVER_UP=0
        show_tail "$SERVER_LOG" "server log"
        record FAIL cacheflip $(($(date +%s) - start)) "server did not start with the flip disks"
        return
    fi
    rm -f "$pidfile"
    "$HERE/run-qemu.sh" -g "$GUEST" -l "$glog" -q "$QUEUES" -t "$CACHEFLIP_TIMEOUT" \
        -d "$other" -p "$pidfile" "$flip" cacheflip 2>"$SCRATCH/run-cacheflip.err" &
    RUN_PID=$!
    while kill -0 "$RUN_PID" 2>/dev/null && ! grep -q "CACHEFLIP started" "$glog" 2>/dev/null; do
        sleep 0.2
    done
    # Snapshots while the guest writes and flips; one that does not answer is the deadlock.
    while kill -0 "$RUN_PID" 2>/dev/null; do
        n=$((n + 1))
        if ! out=$(timeout 30 "$THINBLK" ctl --socket "$CONTROL" thin-snapshot device=flip \
            "name=flip-snap$n" 2>&1); then
            err="thin-snapshot $n did not complete: ${out:-no answer within 30 s}"
            break
        fi
        sleep 1
    done
    if [ -n "$err" ] && kill -0 "$RUN_PID" 2>/dev/null; then
        # QEMU would wait for the stuck backend forever: kill it outright.
        qpid=$(cat "$pidfile" 2>/dev/null || true)
        [ -z "$qpid" ] || kill -KILL "$qpid" 2>/dev/null || true
    fi
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    cat "$SCRATCH/run-cacheflip.err" >&2
    if [ -z "$err" ] && [ "$rc" -ne 0 ]; then
        err=$(tail -n1 "$SCRATCH/run-cacheflip.err" \
            | sed -e 's/^e2e: cacheflip: FAIL in [0-9]*s: //' -e 's/ (log: [^)]*)$//')
    fi
    # thinblk must still exit on SIGTERM (stop_server gives it 10 s, then SIGKILL).
    stop_server
    SERVER_UP=0
    if [ "$STOP_RC" -ne 0 ]; then
        err="${err:+$err; }thinblk exited with status $STOP_RC on SIGTERM (137: it had to be killed)"
    fi
    if [ -n "$err" ]; then
        show_tail "$glog" "guest serial log"
        show_tail "$SERVER_LOG" "server log"
        record FAIL cacheflip $(($(date +%s) - start)) "$err"
        return
    fi
    record PASS cacheflip $(($(date +%s) - start)) \
        "$(tr -d '\r' <"$glog" | sed -n 's/^CACHEFLIP flipped \([0-9]*\) times$/\1/p') flips, $n snapshots, fio: $(tr -d '\r' <"$glog" | sed -n 's/^  write: IOPS=\([^,]*\),.*/\1/p' | paste -sd / -) IOPS"
}

# wait_socket PATH: up to 30 s for a server's socket to appear.
wait_socket() {
    local _
    for _ in $(seq 300); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    echo "no socket $1 within 30 s" >>"$SERVER_LOG"
    return 1
}

# check_pool: the pool's metadata, with no server running, must pass Debian's thin_check and
# thinblk's own check (which also counts data references). On failure prints why, returns 1.
check_pool() {
    local out
    ensure_packages thin-provisioning-tools
    if ! out=$(thin_check "$POOL/metadata" 2>&1); then
        echo "thin_check: $(echo "$out" | tail -n1)"
        return 1
    fi
    if ! out=$("$THINBLK" check "$POOL/metadata" 2>&1); then
        echo "thinblk check: $(echo "$out" | tail -n1)"
        return 1
    fi
}

# crash: rounds of SIGKILL while a guest writes and fsyncs files (guest test crashwrite), then
# the pool check, a restart with the same command line, and a fresh boot (crashverify): after
# ext4's journal replay e2fsck -fn must be clean, and every file the guest reported fsynced, in
# this round or an earlier one, must have its checksum. Records its own result.
CRASH_ROUNDS=${E2E_CRASH_ROUNDS:-3}
crash_case() {
    local start=$1 seed=${E2E_CRASH_SEED:-$RANDOM} r k got glog vlog rc name sum line
    local kills=() replays=0 lost=() checks=0 err
    # name -> sha256 of every file whose fsync returned, over all rounds so far.
    local -A want=() have=()
    RANDOM=$seed
    log "crash: $CRASH_ROUNDS rounds, seed $seed (E2E_CRASH_SEED=$seed repeats the kill targets)"
    for r in $(seq "$CRASH_ROUNDS"); do
        # Kill after 5-40 fsyncs, then 0-0.9 s more, so the kill lands anywhere in the
        # guest's write-fsync cycle, mid-commit included.
        k=$((5 + RANDOM % 36))
        glog=$SCRATCH/guest-crashwrite$r.log
        QEMU_APPEND="${QEMU_APPEND:-} thinblk.round=$r" \
            "$HERE/run-qemu.sh" -g "$GUEST" -l "$glog" -q "$QUEUES" -t "$TIMEOUT" "$SOCK" \
            crashwrite 2>"$SCRATCH/run-crashwrite$r.err" &
        RUN_PID=$!
        got=0
        while kill -0 "$RUN_PID" 2>/dev/null && [ "$got" -lt "$k" ]; do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
            got=$(grep -c '^FSYNCED ' "$glog" 2>/dev/null) || got=0
        done
        err=
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            err="round $r: the server died on its own after $got fsyncs"
        elif ! kill -0 "$RUN_PID" 2>/dev/null; then
            err="round $r: the writing guest ended after $got of $k fsyncs: $(tr -d '\r' <"$glog" \
                | sed -n 's/^THINBLK-E2E FAIL crashwrite: //p' | head -n1)"
        else
            sleep "0.$((RANDOM % 10))"
            kill -KILL "$SERVER_PID"
        fi
        rc=0
        if ! kill -0 "$SERVER_PID" 2>/dev/null || [ -z "$err" ]; then
            wait "$SERVER_PID" 2>/dev/null || rc=$?
            SERVER_PID=
        fi
        # The guest's I/O now waits for a backend that is gone; QEMU goes too, as at a host crash.
        kill -TERM "$RUN_PID" 2>/dev/null || true
        wait "$RUN_PID" 2>/dev/null || true
        RUN_PID=
        if [ -n "$err" ]; then
            show_tail "$glog" "guest serial log"
            show_tail "$SERVER_LOG" "server log"
            record FAIL crash $(($(date +%s) - start)) "$err"
            return
        fi
        # Only complete lines count: a line cut short by the kill names no checksum to hold.
        got=0
        while read -r line; do
            read -r _ name sum <<<"$line"
            want[$name]=$sum
            got=$((got + 1))
        done < <(tr -d '\r' <"$glog" | grep -E '^FSYNCED r[0-9]+-[0-9]+ [0-9a-f]{64}$' || true)
        kills+=("$got")
        log "crash: round $r: SIGKILL (status $rc) after $got fsynced files (aimed at $k)"
        if [ "$SERVER" = thin ]; then
            # The metadata exactly as the kill left it, before a restart could touch it.
            if ! err=$(check_pool); then
                record FAIL crash $(($(date +%s) - start)) "round $r, after the kill: $err"
                return
            fi
        fi
        if ! start_server; then
            show_tail "$SERVER_LOG" "server log"
            record FAIL crash $(($(date +%s) - start)) "round $r: the server did not start after the kill"
            return
        fi
        vlog=$SCRATCH/guest-crashverify$r.log
        if ! "$HERE/run-qemu.sh" -g "$GUEST" -l "$vlog" -q "$QUEUES" -t "$TIMEOUT" "$SOCK" \
            crashverify 2>"$SCRATCH/run-crashverify$r.err"; then
            cat "$SCRATCH/run-crashverify$r.err" >&2
            show_tail "$vlog" "guest serial log"
            show_tail "$SERVER_LOG" "server log"
            record FAIL crash $(($(date +%s) - start)) "round $r: $(tail -n1 "$SCRATCH/run-crashverify$r.err" \
                | sed -e 's/^e2e: crashverify: FAIL in [0-9]*s: //' -e 's/ (log: [^)]*)$//')"
            return
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            record FAIL crash $(($(date +%s) - start)) "round $r: the server died during crashverify"
            return
        fi
        # grep -c, not -q: -q stops reading early and pipefail would count tr's SIGPIPE.
        [ "$(tr -d '\r' <"$vlog" | grep -cx 'CRASH-JOURNAL-REPLAYED yes')" -eq 0 ] \
            || replays=$((replays + 1))
        have=()
        while read -r line; do
            read -r _ name sum <<<"$line"
            have[$name]=$sum
        done < <(tr -d '\r' <"$vlog" | grep -E '^CRASHFILE r[0-9]+-[0-9]+ [0-9a-f]{64}$' || true)
        lost=()
        for name in "${!want[@]}"; do
            if [ -z "${have[$name]:-}" ]; then
                lost+=("$name(missing)")
            elif [ "${have[$name]}" != "${want[$name]}" ]; then
                lost+=("$name(wrong data)")
            fi
            checks=$((checks + 1))
        done
        log "crash: round $r: ${#want[@]} fsynced files expected, ${#have[@]} files found," \
            "${#lost[@]} lost or wrong"
        if [ "${#lost[@]}" -gt 0 ]; then
            show_tail "$vlog" "guest serial log"
            record FAIL crash $(($(date +%s) - start)) \
                "round $r: ${#lost[@]} of ${#want[@]} fsynced files: $(printf '%s\n' "${lost[@]}" \
                | sort -V | head -n 8 | tr '\n' ' ')"
            return
        fi
    done
    local at summary
    at=$(IFS=/; echo "${kills[*]}")
    summary="$CRASH_ROUNDS kills (after $at fsyncs), ${#want[@]} fsynced files intact"
    summary+=" ($checks file checks in $CRASH_ROUNDS boots), fsck clean after journal replay"
    summary+=" ($replays of $CRASH_ROUNDS replayed), seed $seed"
    record PASS crash $(($(date +%s) - start)) "$summary"
}

SERVER_UP=0
t0=$(date +%s)
if start_server; then
    SERVER_UP=1
    log "server up after $(($(date +%s) - t0))s"
else
    show_tail "$SERVER_LOG" "server log"
fi

for t in $TESTS; do
    if [ "$SERVER_UP" -eq 0 ]; then
        record FAIL "$t" 0 "server not running ($SERVER)"
        continue
    fi
    start=$(date +%s)
    # Most cases are a guest test of the same name; "restart" restarts the
    # server on the same file first (it must exit 0 on SIGTERM), then runs
    # fs2's checks again: the data must be in the file, not only in the
    # old server process.
    gtest=$t
    gsock=$SOCK
    pre_fail=
    if [ "$t" = check ]; then
        # The pool's metadata, as thinblk left it, must pass Debian's thin_check.
        stop_server
        SERVER_UP=0
        if out=$(check_pool); then
            record PASS "$t" $(($(date +%s) - start))
        else
            record FAIL "$t" $(($(date +%s) - start)) "$out"
        fi
        continue
    fi
    if [ "$t" = crash ]; then
        crash_case "$start"
        # A failed round may leave the server killed and not restarted.
        [ -n "$SERVER_PID" ] || SERVER_UP=0
        continue
    fi
    if [ "$t" = resize ]; then
        resize_case "$start"
        continue
    fi
    if [ "$t" = cacheflip ]; then
        [ "$SERVER" = thin ] || die "cacheflip needs SERVER=thin"
        cacheflip_case "$start"
        continue
    fi
    if [ "$t" = live-snapshot ]; then
        live_snapshot_case "$start"
        continue
    fi
    if [ "$t" = unchanged ]; then
        # The origin image must be byte for byte what the host built.
        if [ "$(sha256sum <"$ORIGIN")" = "$ORIGIN_SUM" ]; then
            record PASS "$t" $(($(date +%s) - start))
        else
            record FAIL "$t" $(($(date +%s) - start)) "the origin image changed"
        fi
        continue
    fi
    case "$t" in
        cow) gtest=originrw ;;
        thinorigin) gtest=originrw gsock=$THIN_SOCK ;;
        thinorigin2) gtest=fs2 gsock=$THIN_SOCK ;;
    esac
    if [ "$t" = snapshot ]; then
        # A snapshot taken while no guest runs, of the disk the guest wrote: a guest
        # booted on the snapshot finds fs1's files intact.
        gtest=fs2
        gsock=$SNAP_SOCK
        stop_server
        THIN_EXTRA=(--export "name=snap,snapshot-of=disk,socket=$SNAP_SOCK,queues=$QUEUES")
        log "snapshot: restarting with a snapshot of disk exported at $SNAP_SOCK"
        if ! start_server; then
            SERVER_UP=0
            record FAIL "$t" $(($(date +%s) - start)) "server did not start with the snapshot"
            show_tail "$SERVER_LOG" "server log"
            continue
        fi
    fi
    if [ "$t" = restart ]; then
        gtest=fs2
        stop_server
        [ "$STOP_RC" -eq 0 ] || pre_fail="server exited with status $STOP_RC on SIGTERM"
        log "restart: starting the server again on the same file, then fs2's checks"
        if ! start_server; then
            SERVER_UP=0
            record FAIL "$t" $(($(date +%s) - start)) "server did not start again"
            show_tail "$SERVER_LOG" "server log"
            continue
        fi
    fi
    glog=$SCRATCH/guest-$t.log
    "$HERE/run-qemu.sh" -g "$GUEST" -l "$glog" -q "$QUEUES" -t "$TIMEOUT" "$gsock" "$gtest" \
        2>"$SCRATCH/run-$t.err" &
    RUN_PID=$!
    # Watch the server while the guest runs: when a vhost-user backend dies,
    # QEMU keeps the guest waiting for it and the case would only end at
    # the timeout. Stop the guest at once instead.
    while kill -0 "$RUN_PID" 2>/dev/null; do
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server died while $t was running; stopping the guest"
            kill -TERM "$RUN_PID" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rc=0
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    secs=$(($(date +%s) - start))
    cat "$SCRATCH/run-$t.err" >&2

    # A server that died fails this case (even if the guest got its PASS
    # out first, e.g. a crash on disconnect) and all later ones.
    died=
    if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        src=0
        wait "$SERVER_PID" || src=$?
        SERVER_PID=
        SERVER_UP=0
        died="server died during the case (exit status $src)"
    fi
    if [ -z "$died" ] && [ -z "$pre_fail" ] && [ "$rc" -eq 0 ]; then
        # fiobench's figures go on its line.
        record PASS "$t" "$secs" "$(tr -d '\r' <"$glog" | sed -n 's/^BENCH //p' | paste -sd ';' -)"
        continue
    fi
    if [ -n "$died" ]; then
        reason=$died
    elif [ -n "$pre_fail" ] && [ "$rc" -eq 0 ]; then
        reason=$pre_fail
    else
        # run-qemu.sh's last line: "e2e: T: FAIL in Ns: REASON (log: F)".
        reason=$(tail -n1 "$SCRATCH/run-$t.err" \
            | sed -e "s/^e2e: $gtest: FAIL in [0-9]*s: //" -e 's/ (log: [^)]*)$//')
        [ -z "$pre_fail" ] || reason="$pre_fail; $reason"
    fi
    record FAIL "$t" "$secs" "$reason"
    show_tail "$glog" "guest serial log"
    show_tail "$SERVER_LOG" "server log"
done
stop_server

echo "e2e results (server=$SERVER, $(($(date +%s) - t0))s total):"
printf '  %s\n' "${RESULTS[@]}"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

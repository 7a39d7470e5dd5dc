#!/bin/bash
# System calls and context switches of a thinblk export's queue worker per request, for one
# bench job: numbers that depend far less on a loaded machine than IOPS do (issue 13).
#
#   scripts/worker-syscalls.sh THINBLK BACKING [JOB]
#     THINBLK  a thinblk binary;  BACKING  an export's backing, e.g. raw=/path/disk.raw
#     JOB      a vhost_blk bench job (default randread-4k-qd1)
#   VHOST_BLK_BENCH=path of the bench executable (`cargo bench --bench vhost_blk --no-run`
#   prints it). Needs perf and taskset; the server runs on CPU 1, the client on CPU 0.
set -euo pipefail
BIN=$1; BACKING=$2; JOB=${3:-randread-4k-qd1}
BENCH=${VHOST_BLK_BENCH:?set VHOST_BLK_BENCH to the vhost_blk bench executable}
command -v perf >/dev/null || { echo "perf is missing" >&2; exit 1; }
D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
S=$D/sock
taskset -c 1 env RUST_LOG=warn "$BIN" serve --export "$BACKING,socket=$S,queues=1" \
    2>"$D/server.log" >/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 200); do [ -S "$S" ] && break; sleep 0.05; done
sleep 0.2
taskset -c 0 "$BENCH" --bench --socket "$S" --pid "$PID" --jobs "$JOB" --seconds 4 \
    --warmup 0.3 >"$D/client.out" 2>&1 &
CLIENT=$!
sleep 0.5
# 3 s inside the client's 4 measured seconds.
perf stat --per-thread -x, -o "$D/perf" -p "$PID" -e context-switches,raw_syscalls:sys_enter,\
syscalls:sys_enter_epoll_wait,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_read,\
syscalls:sys_enter_write -- sleep 3
wait $CLIENT
line=$(grep "^| $JOB" "$D/client.out")
iops=$(echo "$line" | sed 's/^| [^|]*| \([0-9.]*k\?\) IOPS.*/\1/')
n=$(echo "$iops" | sed 's/k$/*1000/' | bc)
echo "$line"
echo -n "per request:"
grep vring_worker "$D/perf" | awk -F, -v n="$n" \
    '{split($4,a,":"); e=a[2]==""?a[1]:a[2]; printf " %s=%.3f", e, $2/(n*3)}'
echo

#!/usr/bin/env bash
# A one-node Ceph cluster for the tests, everything under one directory:
#   bash scripts/ceph-cluster.sh start DIR   # mon, mgr, one OSD; pool `thinblk`; DIR/ceph.conf
#   bash scripts/ceph-cluster.sh stop DIR    # OSD, then mgr, then mon; safe to call twice
#
# Loopback only: the mon listens on two free ports of 127.0.0.1 (msgr2 and msgr1), the OSD
# keeps its BlueStore on a sparse file DIR/osd.0/block (16 GiB, of which only what is written
# takes space: the RBD bench writes about 3 GiB of images, which filled the 4 GiB it had
# before until its writes hung), every pool has one replica, cephx is
# on and the admin key is DIR/ceph.client.admin.keyring (named in the conf, so
# `ceph -c DIR/ceph.conf` and `rbd -c DIR/ceph.conf` need nothing else). No systemd: the
# daemons daemonize and write their pid files to DIR/run. `start` gives up after
# CEPH_START_TIMEOUT seconds (default 90) with the reason and the logs' tails, and stops
# whatever it started.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
dir=$2

# Daemons in the order they must stop: the OSD before the mon (an OSD that outlives its mon
# waits 5 s for it on the way down), the mgr in between.
daemons=(osd.0 mgr.x mon.a)

# The pid in DIR/run/NAME.pid if that process is still a Ceph daemon (a stale pid file whose
# number was reused by something else is ignored).
daemon_pid() {
    local pidfile=$dir/run/$1.pid pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "ceph-" || return 1
    echo "$pid"
}

stop_one() { # NAME: SIGTERM, up to 10 s, then SIGKILL
    local pid i
    pid=$(daemon_pid "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "ceph-cluster: $1 (pid $pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/run/$1.pid"
}

stop() {
    [ -d "$dir" ] || return 0
    for d in "${daemons[@]}"; do
        stop_one "$d"
    done
}

# Seconds left before the start deadline (at least 1, so `timeout` still gets a number).
left() {
    local l=$((deadline - SECONDS))
    ((l > 0)) || l=1
    echo "$l"
}

fail() {
    echo "ceph-cluster: start failed after $((SECONDS - started))s: $*" >&2
    for log in "$dir"/log/*.log; do
        [ -f "$log" ] || continue
        echo "--- last lines of $log" >&2
        tail -n 15 "$log" >&2
    done
    stop
    exit 1
}

# Runs a command within the time left; fails the start with its name if it fails.
step() {
    timeout "$(left)" "$@" || fail "'$*' failed or timed out (status $?)"
}

ceph_cli() {
    step ceph -c "$conf" --connect-timeout "$(left)" "$@"
}

# Waits (within the deadline) until `$@` succeeds.
wait_for() {
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.5
    done
}

start() {
    local timeout_s=${CEPH_START_TIMEOUT:-90}
    started=$SECONDS
    deadline=$((SECONDS + timeout_s))
    for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd python3; do
        command -v "$tool" >/dev/null || {
            echo "ceph-cluster: $tool is missing (bash scripts/install-deps.sh installs it)" >&2
            exit 1
        }
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    conf=$dir/ceph.conf
    if [ -e "$conf" ]; then
        echo "ceph-cluster: $conf exists; stop and remove the old cluster first" >&2
        exit 1
    fi
    mkdir -p "$dir/run" "$dir/log" "$dir/mon.a" "$dir/mgr.x" "$dir/osd.0"

    # Two free loopback ports for the mon (the kernel picks them; a race with another
    # process taking one in between shows as a mon that does not start).
    local ports v2 v1 fsid osd_uuid
    ports=$(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
    read -r v2 v1 <<<"$ports"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    local mon_addr="[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]"

    # $name is Ceph's own meta-variable (mon.a, osd.0, ...), expanded by the daemons.
    cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = $mon_addr
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/ceph.client.admin.keyring
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false

[mon]
mon data = $dir/\$name
keyring = $dir/\$name/keyring

[mgr]
mgr data = $dir/\$name
keyring = $dir/\$name/keyring

[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 17179869184
osd memory target = 939524096
CONF

    step ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    step ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key \
        -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' \
        --cap mds 'allow *' >/dev/null
    step ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" \
        >/dev/null
    step monmaptool --create --addv a "$mon_addr" --fsid "$fsid" "$dir/monmap" >/dev/null
    step ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    step ceph-mon -c "$conf" -i a
    wait_for "the mon" timeout 5 ceph -c "$conf" --connect-timeout 5 mon stat

    ceph_cli auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$dir/mgr.x/keyring"
    step ceph-mgr -c "$conf" -i x

    local id
    id=$(ceph_cli osd new "$osd_uuid")
    [ "$id" = 0 ] || fail "the OSD got id '$id', not 0"
    step ceph-authtool --create-keyring "$dir/osd.0/keyring" --gen-key -n osd.0 >/dev/null
    ceph_cli auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
        -i "$dir/osd.0/keyring" 2>/dev/null
    # mkfs reports the missing label and fsid of the new store as errors: keep them in a log.
    step sh -c 'exec "$@" >>"$0" 2>&1' "$dir/log/osd-mkfs.log" \
        ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid"
    step ceph-osd -c "$conf" -i 0
    wait_for "the OSD to come up" sh -c \
        "ceph -c '$conf' --connect-timeout 5 osd dump -f json | grep -q '\"up\":1'"

    ceph_cli osd pool create thinblk 8 8 >/dev/null
    step rbd -c "$conf" pool init thinblk
    echo "ceph-cluster: started in $((SECONDS - started))s; conf $conf, pool thinblk"
}

case "$action" in
start) start ;;
stop) stop ;;
*) usage ;;
esac

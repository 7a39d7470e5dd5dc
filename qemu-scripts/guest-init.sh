#!/bin/sh
# /init of the thinblk end-to-end test guest (busybox sh, runs as PID 1).
#
# It loads the virtio-blk driver, runs the one test named on the kernel
# command line (thinblk.test=NAME) against /dev/vda, which is the
# vhost-user-blk disk under test, prints exactly one result marker on the
# serial console and powers the VM off. The host side (run-qemu.sh) only
# greps for the markers:
#     THINBLK-E2E PASS <name>
#     THINBLK-E2E FAIL <name>: <reason>
# Deliberately no `set -e`: PID 1 must never exit on its own (that would
# panic the kernel and hide the reason); every failure goes through fail().

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
# The kernel opened the console before devtmpfs was mounted; reopen it so
# the output surely reaches ttyS0.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin

DISK=/dev/vda
TEST=unknown
# Which kill round of the crash case this boot belongs to (thinblk.round=N).
ROUND=1
# fio rounds of the restartfio test (thinblk.loops=N).
LOOPS=4
# restartfio's write cache: "wt" switches the disk to write-through first (thinblk.cache=wt).
CACHE=

# Markers are printed on a line of their own; the leading newline protects
# against a partial line left on the console by the kernel or fio.
pass() {
    echo
    echo "THINBLK-E2E PASS $TEST"
    finish
}
fail() {
    echo
    echo "THINBLK-E2E FAIL $TEST: $*"
    finish
}
finish() {
    sync
    # -f: there is no init system to ask; the ACPI power-off ends QEMU.
    poweroff -f
    sleep 10
}

# Run a command, echoing it first so the serial log shows what failed.
run() {
    echo "+ $*"
    "$@"
}

read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        thinblk.test=*) TEST="${arg#thinblk.test=}" ;;
        thinblk.round=*) ROUND="${arg#thinblk.round=}" ;;
        thinblk.loops=*) LOOPS="${arg#thinblk.loops=}" ;;
        thinblk.cache=*) CACHE="${arg#thinblk.cache=}" ;;
    esac
done
echo "thinblk-e2e guest: kernel $(uname -r), $(nproc) cpus, test=$TEST"

# Modules in dependency order, computed on the host by build-guest.sh.
# Drivers built into the kernel are simply not in the list.
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod failed"
done </lib/modules/load-order

# virtio_blk probes asynchronously; under TCG that can take a few seconds.
i=0
while [ ! -b "$DISK" ]; do
    i=$((i + 1))
    [ "$i" -le 200 ] || fail "$DISK did not appear (is the vhost-user backend connected?)"
    sleep 0.1
done
# Facts that help when reading a failed log: size, queue count, limits.
set -- /sys/block/vda/mq/*
echo "disk: $DISK $(cat /sys/block/vda/size) sectors," \
    "$# hw queues," \
    "max_segments=$(cat /sys/block/vda/queue/max_segments)," \
    "max_sectors_kb=$(cat /sys/block/vda/queue/max_sectors_kb)," \
    "write_cache=$(cat /sys/block/vda/queue/write_cache 2>/dev/null)"

# set_cache "write back"|"write through": switch the device's volatile write
# cache through virtio_blk's cache_type attribute (a config space write of
# `wce`, which QEMU passes to the backend as VHOST_USER_SET_CONFIG). Needs
# VIRTIO_BLK_F_CONFIG_WCE; without it the mode stays what the device
# offered, which is reported but not a failure.
set_cache() {
    if [ -w /sys/block/vda/cache_type ]; then
        echo "$1" >/sys/block/vda/cache_type \
            || fail "cannot set cache_type to '$1'"
        now=$(cat /sys/block/vda/cache_type)
        [ "$now" = "$1" ] || fail "cache_type is '$now' after setting '$1'"
    fi
    echo "cache mode: $(cat /sys/block/vda/cache_type 2>/dev/null)," \
        "queue write_cache: $(cat /sys/block/vda/queue/write_cache)"
}

# pick_engine ENGINE...: first fio ioengine that can read one block of the
# disk. io_uring/libaio may be missing from a guest kernel; psync never is.
pick_engine() {
    for e in "$@"; do
        if fio --name=probe --filename="$DISK" --rw=read --bs=4k --size=4k \
            --ioengine="$e" --direct=1 --output=/dev/null >/dev/null 2>&1; then
            echo "$e"
            return
        fi
    done
    echo psync
}

# run_fio WHAT ARGS...: run fio; on failure fail with fio's first error
# (e.g. "verify: bad magic header ...") so the host's one-line reason
# already says what went wrong.
run_fio() {
    what=$1
    shift
    echo "+ fio $*"
    fio "$@" >/tmp/fio.out 2>&1
    rc=$?
    cat /tmp/fio.out
    if [ "$rc" -ne 0 ]; then
        first=$(grep -m1 -E '^verify:|err=|error' /tmp/fio.out)
        fail "$what: fio exited $rc: ${first:-no error message}"
    fi
}

test_fio() {
    # Run 1 in write-through mode. 4 KiB random writes, two jobs pinned to the two vCPUs so that
    # blk-mq submits on both virtqueues, each job on its own 16 MiB region
    # (offset_increment), so fio's "multiple writers may overwrite" warning
    # does not apply.
    # fio writes, then reads everything back and checks crc32c headers.
    set_cache "write through"
    e1=$(pick_engine libaio io_uring)
    echo "fio run 1: 4k randwrite, ioengine=$e1"
    run_fio "run 1 (4k randwrite, $e1)" --name=rand4k --filename="$DISK" --rw=randwrite --bs=4k \
        --size=16M --numjobs=2 --offset_increment=16M \
        --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --ioengine="$e1" --iodepth=16 --direct=1 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --group_reporting

    # Runs 2 and 3 with the write cache on: completions may precede
    # durability and fdatasync becomes VIRTIO_BLK_T_FLUSH.
    set_cache "write back"

    # Run 2: random sizes 4k..128k: large requests span several descriptors
    # (multi-segment) and are not multiples of each other. Each run has its
    # own region so one run's data is never what another run verifies.
    e2=$(pick_engine io_uring libaio)
    echo "fio run 2: 4k-128k randwrite, ioengine=$e2"
    run_fio "run 2 (4k-128k randwrite, $e2)" --name=randvar --filename="$DISK" --rw=randwrite \
        --bsrange=4k-128k --offset=32M --size=32M \
        --ioengine="$e2" --iodepth=8 --direct=1 \
        --fdatasync=16 \
        --verify=crc32c --do_verify=1 --verify_fatal=1

    # Run 3: sequential 1 MiB writes: requests at the kernel's size limit,
    # up to max_segments descriptors each.
    echo "fio run 3: 1M sequential write, ioengine=$e2"
    run_fio "run 3 (1M write, $e2)" --name=seq1m --filename="$DISK" --rw=write \
        --bs=1M --offset=64M --size=64M \
        --ioengine="$e2" --iodepth=4 --direct=1 --fdatasync=8 \
        --verify=crc32c --do_verify=1 --verify_fatal=1
    pass
}

# fiobench: guest-side fio figures, for the record only (the guest runs under TCG here, so
# they measure the emulator more than the server). 4 KiB random writes then reads at queue
# depth 32 and 1, 5 s each, on the first 64 MiB (written first, so reads hit data blocks);
# prints "BENCH <job> IOPS=<n>" per job.
test_fiobench() {
    set_cache "write back"
    e=$(pick_engine libaio io_uring)
    for job in randwrite:32 randwrite:1 randread:1 randread:32; do
        rw=${job%:*}
        qd=${job#*:}
        fio --name=bench --filename="$DISK" --rw="$rw" --bs=4k --iodepth="$qd" --size=64M \
            --runtime=5 --time_based --ioengine="$e" --direct=1 >/tmp/bench.out 2>&1 \
            || fail "fiobench: fio $rw at depth $qd failed: $(grep -m1 -E 'err=|error' /tmp/bench.out)"
        iops=$(grep -o -m1 'IOPS=[^,]*' /tmp/bench.out)
        echo "BENCH $rw-4k-qd$qd $iops ($e)"
    done
    pass
}

# migfio: fio with verification, round after round, for thinblk.secs seconds (default 60),
# while the host live-migrates this guest (qemu-scripts/migrate.sh). Each round writes 4 KiB
# random blocks from two jobs (both virtqueues) and 64 KiB-1 MiB blocks, then reads all of it
# back and checks crc32c; every round prints "MIGFIO round N ok", which the host waits for
# before it migrates. A read that lands in guest memory during the migration but is missing
# from the dirty log shows up as a bad verify on the destination. Also fails on any I/O error
# in the kernel log. thinblk.disks=2 runs the same on /dev/vdb at the same time.
test_migfio() {
    set_cache "write back"
    secs=60
    disks=1
    for arg in $cmdline; do
        case "$arg" in
            thinblk.secs=*) secs="${arg#thinblk.secs=}" ;;
            thinblk.disks=*) disks="${arg#thinblk.disks=}" ;;
        esac
    done
    e=$(pick_engine libaio io_uring)
    files=$DISK
    if [ "$disks" -ge 2 ]; then
        i=0
        while [ ! -b /dev/vdb ]; do
            i=$((i + 1))
            [ "$i" -le 200 ] || fail "/dev/vdb did not appear"
            sleep 0.1
        done
        files="$DISK:/dev/vdb"
    fi
    end=$(($(date +%s) + secs))
    round=0
    while [ "$(date +%s)" -lt "$end" ] || [ "$round" -eq 0 ]; do
        round=$((round + 1))
        run_fio "round $round (4k randwrite)" --name=mig4k --filename="$files" \
            --rw=randwrite --bs=4k --size=8M --numjobs=2 --offset_increment=8M \
            --cpus_allowed=0-1 --cpus_allowed_policy=split \
            --ioengine="$e" --iodepth=16 --direct=1 --randseed="$round" \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
        run_fio "round $round (64k-1m write)" --name=migbig --filename="$files" \
            --rw=randwrite --bsrange=64k-1m --offset=16M --size=16M \
            --ioengine="$e" --iodepth=4 --direct=1 --fdatasync=4 --randseed="$round" \
            --verify=crc32c --do_verify=1 --verify_fatal=1
        echo "MIGFIO round $round ok"
    done
    errors=$(dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O' | head -3)
    [ -z "$errors" ] || fail "I/O errors in the kernel log: $errors"
    echo "MIGFIO $round rounds, no I/O error"
    pass
}

# fs1: make a filesystem, fill it with known data, record checksums on it.
# fs2 (the next boot, a new QEMU process) checks them.
test_fs1() {
    # Write-back, as a VM normally runs: ext4's journal commits then rely
    # on flushes (and FUA, which the kernel emulates with flushes here).
    set_cache "write back"
    run mkfs.ext4 -F -q "$DISK" || fail "mkfs.ext4 exited $?"
    run mount -t ext4 "$DISK" /mnt || fail "mount after mkfs failed"
    mkdir -p /mnt/big /mnt/small/a/b || fail "mkdir failed"
    # Large files from /dev/urandom: incompressible, many multi-block writes.
    for n in 1 2 3; do
        dd if=/dev/urandom of=/mnt/big/f$n bs=1M count=$((n * 3)) 2>/dev/null \
            || fail "writing big/f$n failed"
    done
    # One file written in odd-sized pieces so blocks are partially updated.
    for n in 1 2 3 4 5 6 7; do
        dd if=/dev/urandom bs=1000 count=$((n * 37)) 2>/dev/null >>/mnt/big/odd \
            || fail "appending to big/odd failed"
    done
    # Many small files: metadata-heavy (inodes, directories, journal).
    n=0
    while [ "$n" -lt 200 ]; do
        echo "small file $n $(head -c 64 /dev/urandom | sha256sum)" \
            >"/mnt/small/a/b/s$n" || fail "writing small/a/b/s$n failed"
        n=$((n + 1))
    done
    (cd /mnt && find big small -type f | sort | xargs sha256sum >SHA256SUMS) \
        || fail "sha256sum failed"
    echo "recorded $(wc -l </mnt/SHA256SUMS) checksums, $(du -sk /mnt | cut -f1) KiB"
    # Read back through the device, not the page cache, before unmounting.
    sync
    echo 3 >/proc/sys/vm/drop_caches
    (cd /mnt && sha256sum -c -s SHA256SUMS) || fail "checksums wrong right after writing"
    run umount /mnt || fail "umount failed"
    sync
    pass
}

test_fs2() {
    # Write-through (the guest turns the cache off): every write must be
    # durable when it completes.
    set_cache "write through"
    # The filesystem was cleanly unmounted by fs1, so a forced read-only
    # check must find nothing to fix.
    if command -v e2fsck >/dev/null; then
        run e2fsck -fn "$DISK" || fail "e2fsck -fn exited $?"
    fi
    run mount -t ext4 "$DISK" /mnt || fail "mount failed"
    [ -s /mnt/SHA256SUMS ] || fail "SHA256SUMS missing: fs1's data did not survive"
    (cd /mnt && sha256sum -c -s SHA256SUMS) || fail "checksums differ after reboot"
    echo "verified $(wc -l </mnt/SHA256SUMS) checksums"
    run umount /mnt || fail "umount failed"
    pass
}

# live-snapshot: the writer fills LIVE_PHASES regions of 4 MiB one after another, each with
# its own fio seed, and after each one records "LIVE k" in sector 0. The host snapshots the
# disk meanwhile. In a snapshot, "LIVE k" proves regions 1..k were complete before it was
# taken: the verifier (a second boot on the snapshot) checks exactly those, verify-only.
LIVE_PHASES=12
live_fio() { # PHASE ENGINE EXTRA...
    k=$1
    e=$2
    shift 2
    run_fio "live phase $k" --name="live$k" --filename="$DISK" --rw=randwrite --bs=16k \
        --offset=$((1 + 4 * (k - 1)))M --size=4M --randseed="$k" \
        --ioengine="$e" --iodepth=8 --direct=1 --verify=crc32c "$@"
}

test_livewrite() {
    set_cache "write back"
    e=$(pick_engine libaio io_uring)
    k=1
    while [ "$k" -le "$LIVE_PHASES" ]; do
        live_fio "$k" "$e" --do_verify=0 --fdatasync=32
        printf 'LIVE %d\n' "$k" | dd of="$DISK" bs=512 count=1 conv=sync,fsync 2>/dev/null \
            || fail "writing the phase marker failed"
        echo "phase $k written"
        k=$((k + 1))
    done
    pass
}

test_liveverify() {
    marker=$(dd if="$DISK" bs=512 count=1 2>/dev/null | head -n1 | tr -d '\0')
    case "$marker" in
        "LIVE "*) done=${marker#LIVE } ;;
        *) done=0 ;;
    esac
    echo "snapshot holds $done complete phases (marker '$marker')"
    e=$(pick_engine libaio io_uring)
    k=1
    while [ "$k" -le "$done" ]; do
        live_fio "$k" "$e" --verify_only=1 --do_verify=1 --verify_fatal=1
        k=$((k + 1))
    done
    echo "LIVE-VERIFIED $done"
    pass
}

# resize: the host grows the disk while this guest runs; the virtio config-change interrupt
# must bring the new capacity, and its last sector must be readable and writable.
test_resize() {
    before=$(cat /sys/block/vda/size)
    echo "waiting for resize from $before sectors"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$before" ]; do
        i=$((i + 1))
        [ "$i" -le 600 ] || fail "capacity still $before sectors after 60 s"
        sleep 0.1
    done
    after=$(cat /sys/block/vda/size)
    echo "capacity now $after sectors (was $before)"
    [ "$after" -gt "$before" ] || fail "capacity shrank from $before to $after sectors"
    echo resized | dd of="$DISK" bs=512 seek=$((after - 1)) count=1 conv=sync,fsync 2>/dev/null \
        || fail "cannot write the new last sector"
    got=$(dd if="$DISK" bs=512 skip=$((after - 1)) count=1 iflag=direct 2>/dev/null | head -n1)
    [ "$got" = resized ] || fail "the new last sector reads back '$got'"
    pass
}

# cacheflip: fio writes at QD32 into unprovisioned blocks of vda while the guest switches
# vda's write cache to write-through and back, again and again; a second fio job writes to
# vdb (another thin device of the same pool) meanwhile, all first writes. The host takes thin-snapshots
# meanwhile. Every write must complete without an error (a flip used to deadlock the pool).
test_cacheflip() {
    ct=/sys/block/vda/cache_type
    [ -w "$ct" ] || fail "no writable $ct (VIRTIO_BLK_F_CONFIG_WCE not offered?)"
    [ -b /dev/vdb ] || fail "no second disk /dev/vdb"
    # vdb's job is paced (about 8 s) so that its first writes go on through the flips.
    echo "+ fio: vda 4k randwrite QD32 over 64M, vdb 4k randwrite QD4 over 32M at 1000 IOPS"
    fio --output=/tmp/fio.out --eta=never --ioengine=libaio --direct=1 --runtime=90 \
        --name=flip --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=32 --size=64M \
        --name=other --filename=/dev/vdb --rw=randwrite --bs=4k --iodepth=4 --size=32M \
        --rate_iops=1000 &
    fpid=$!
    echo "CACHEFLIP started"
    n=0
    while kill -0 "$fpid" 2>/dev/null && [ "$n" -lt 8 ]; do
        echo "write through" >"$ct" || fail "cannot set write through"
        sleep 0.4
        echo "write back" >"$ct" || fail "cannot set write back"
        sleep 0.4
        n=$((n + 1))
    done
    echo
    echo "CACHEFLIP flipped $n times"
    wait "$fpid"
    rc=$?
    cat /tmp/fio.out
    [ "$rc" -eq 0 ] || fail "fio exited $rc: $(grep -m1 -E 'err=|error' /tmp/fio.out)"
    if grep -qE 'err= *[1-9]' /tmp/fio.out; then
        fail "fio reported errors: $(grep -m1 -E 'err= *[1-9]' /tmp/fio.out)"
    fi
    [ "$n" -ge 2 ] || fail "fio ended after $n flips: nothing was tested"
    pass
}

# originrw: the disk is a writable view of a read-only origin image the host
# built with mkfs.ext4 -d (a COW or thin external-origin export). Check the
# origin's files, add files of our own, record checksums of everything; the
# next boot (fs2) verifies them.
test_originrw() {
    set_cache "write back"
    if command -v e2fsck >/dev/null; then
        run e2fsck -fn "$DISK" || fail "e2fsck -fn of the origin image exited $?"
    fi
    run mount -t ext4 "$DISK" /mnt || fail "mount of the origin image failed"
    [ -s /mnt/SHA256SUMS ] || fail "SHA256SUMS missing: not the origin image"
    (cd /mnt && sha256sum -c -s SHA256SUMS) || fail "origin files read wrong"
    mkdir -p /mnt/guest || fail "mkdir failed"
    for n in 1 2 3; do
        dd if=/dev/urandom of=/mnt/guest/f$n bs=1000 count=$((n * 700)) 2>/dev/null \
            || fail "writing guest/f$n failed"
    done
    # Overwrite one origin file in place: its blocks are copied, then changed.
    dd if=/dev/urandom of=/mnt/origin/f1 bs=4096 count=3 conv=notrunc 2>/dev/null \
        || fail "overwriting origin/f1 failed"
    (cd /mnt && find origin guest -type f | sort | xargs sha256sum >SHA256SUMS) \
        || fail "sha256sum failed"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    (cd /mnt && sha256sum -c -s SHA256SUMS) || fail "checksums wrong right after writing"
    echo "recorded $(wc -l </mnt/SHA256SUMS) checksums"
    run umount /mnt || fail "umount failed"
    sync
    pass
}

# crashwrite / crashverify: the host SIGKILLs thinblk while crashwrite writes files, then boots
# crashverify on the restarted server. "FSYNCED NAME SHA256" goes out only after fsync of the
# file and of its directory returned, so the host may hold every such file to its checksum;
# crashverify only reports what it finds (CRASHFILE lines) and the host compares.
CRASH_DIR=/mnt/crash
test_crashwrite() {
    # Odd rounds in write-back mode (fsync becomes a FLUSH the server must honour), even ones
    # in write-through (each write must be durable when it completes, with no FLUSH at all).
    if [ $((ROUND % 2)) -eq 1 ]; then set_cache "write back"; else set_cache "write through"; fi
    # Later rounds keep the file system, so the files of earlier rounds face every later kill.
    if [ "$ROUND" -le 1 ]; then
        run mkfs.ext4 -F -q "$DISK" || fail "mkfs.ext4 exited $?"
    fi
    run mount -t ext4 "$DISK" /mnt || fail "mount failed (round $ROUND)"
    mkdir -p "$CRASH_DIR" || fail "mkdir failed"
    sync "$CRASH_DIR" /mnt || fail "fsync of $CRASH_DIR failed"
    echo "crash writer ready (round $ROUND)"
    n=1
    while [ "$n" -le 5000 ]; do
        name=r$ROUND-$n
        # Sizes from a few bytes to ~190 KiB, rarely block-aligned: partial and multi-block
        # writes, inline extents and extent trees alike.
        size=$(((n * 37 + ROUND * 11) % 190 * 1024 + n * 7 % 1000 + 1))
        # The checksum is taken from the source in tmpfs, never read back from the disk.
        head -c "$size" /dev/urandom >/tmp/crashbuf || fail "reading urandom failed"
        sum=$(sha256sum </tmp/crashbuf | cut -d' ' -f1)
        cat /tmp/crashbuf >"$CRASH_DIR/$name" || fail "writing $name failed"
        # fsync(2) on the file, then on the directory: a new name is durable only with both.
        sync "$CRASH_DIR/$name" "$CRASH_DIR" || fail "fsync of $name failed"
        echo "FSYNCED $name $sum"
        n=$((n + 1))
    done
    fail "wrote $((n - 1)) files and the host never stopped the server"
}

test_crashverify() {
    set_cache "write back"
    command -v e2fsck >/dev/null || fail "no e2fsck in the guest"
    # Mounting replays ext4's journal: the normal recovery after a crash, not a repair. Only
    # after it is "clean" a meaningful claim; e2fsck -n would skip the replay and see the
    # journal's pending blocks as damage.
    run mount -t ext4 "$DISK" /mnt || fail "mount after the crash failed"
    run umount /mnt || fail "umount failed"
    if dmesg | grep -q 'vda.*recovery complete'; then replayed=yes; else replayed=no; fi
    echo "CRASH-JOURNAL-REPLAYED $replayed"
    echo "+ e2fsck -fn $DISK"
    e2fsck -fn "$DISK" >/tmp/fsck.out 2>&1
    rc=$?
    cat /tmp/fsck.out
    # -n answers no to every fix, so exit status 0 means there was nothing to fix.
    [ "$rc" -eq 0 ] || fail "e2fsck -fn exited $rc after the journal replay"
    echo "CRASH-FSCK-CLEAN"
    run mount -t ext4 "$DISK" /mnt || fail "mount failed"
    [ -d "$CRASH_DIR" ] || fail "$CRASH_DIR is gone"
    # Every file, written to the end or not: the host knows which ones were fsynced.
    files=0
    for f in "$CRASH_DIR"/*; do
        [ -f "$f" ] || continue
        echo "CRASHFILE ${f##*/} $(sha256sum <"$f" | cut -d' ' -f1)"
        files=$((files + 1))
    done
    echo "CRASH-FILES $files"
    run umount /mnt || fail "umount failed"
    pass
}

# libvirt (qemu-scripts/libvirt.sh): the domain's disk vda reads and writes; then the host
# hot-plugs vdb (it must appear and read and write) and unplugs it (it must go); then the host
# grows vda with `thinblk ctl block-resize` (the new size must show). Each step prints a marker
# the host waits for before it acts.
wait_for() { # SECONDS CONDITION...: poll until the condition holds
    limit=$(($1 * 10))
    shift
    i=0
    until "$@"; do
        i=$((i + 1))
        [ "$i" -le "$limit" ] || return 1
        sleep 0.1
    done
}
rw_check() { # DEVICE: write a marker at its last sector and read it back past the cache
    dev=$1
    sectors=$(cat "/sys/block/${dev#/dev/}/size")
    echo "thinblk $dev" | dd of="$dev" bs=512 seek=$((sectors - 1)) count=1 conv=sync,fsync \
        2>/dev/null || return 1
    got=$(dd if="$dev" bs=512 skip=$((sectors - 1)) count=1 iflag=direct 2>/dev/null | head -n1)
    [ "$got" = "thinblk $dev" ]
}
vda_size_is_not() { [ "$(cat /sys/block/vda/size)" != "$1" ]; }
test_libvirt() {
    run fio --output=/tmp/fio.out --eta=never --name=rw --filename="$DISK" --rw=randwrite \
        --bs=4k --size=8M --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c \
        --verify_fatal=1 || { cat /tmp/fio.out; fail "fio with verification on vda failed"; }
    rw_check "$DISK" || fail "vda: the last sector does not read back"
    echo "LIBVIRT-VDA-OK"
    wait_for 180 test -b /dev/vdb || fail "the hot-plugged vdb did not appear"
    rw_check /dev/vdb || fail "vdb: the last sector does not read back"
    echo "LIBVIRT-VDB-OK"
    wait_for 180 test ! -e /dev/vdb || fail "vdb is still there after detach-device"
    echo "LIBVIRT-VDB-GONE"
    before=$(cat /sys/block/vda/size)
    echo "LIBVIRT-WAITING-RESIZE $before"
    wait_for 120 vda_size_is_not "$before" || fail "vda is still $before sectors after block-resize"
    echo "LIBVIRT-RESIZED $before $(cat /sys/block/vda/size)"
    rw_check "$DISK" || fail "vda: the new last sector does not read back"
    pass
}

# restartfio (restart.sh): rounds of verified fio while the host kills thinblk with SIGKILL
# and starts it again, or upgrades it in place; QEMU reconnects (reconnect-ms) and thinblk
# resubmits what was in flight (INFLIGHT_SHMFD). Each round mixes 4 KiB and 1 MiB random
# writes at QD32, so requests complete out of order, then reads everything back and checks
# it. The area is written and flushed once first: every block is mapped and committed, so
# a write the guest saw complete is in the data file, which a SIGKILL does not lose (a
# mapping made after the last FLUSH would be, as after a power cut). Fails on any fio error,
# any failed verify, and any I/O error or hung task in the kernel log; a request that never
# completes runs the host's timeout out.
test_restartfio() {
    e=$(pick_engine libaio io_uring)
    # Write-through (restart.sh's writethrough case): the guest sends no flushes from now on,
    # so every write thinblk completes must already be durable, after every restart too.
    [ "$CACHE" != wt ] || set_cache "write through"
    run_fio "prefill" --name=prefill --filename="$DISK" --rw=write --bs=1M --size=64M \
        --ioengine="$e" --iodepth=8 --direct=1 --end_fsync=1
    i=1
    while [ "$i" -le "$LOOPS" ]; do
        echo "RESTART-LOOP $i"
        t0=$(date +%s)
        run_fio "round $i" --name="mix$i" --filename="$DISK" --rw=randwrite \
            --bssplit=4k/50:1m/50 --size=64M --ioengine="$e" --iodepth=32 --direct=1 \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --randseed="$i"
        echo "RESTART-DONE $i $(($(date +%s) - t0))s" \
            "$(grep -m1 -E '^ +clat \((u|m)sec\)' /tmp/fio.out | tr -s ' ')"
        if [ "$CACHE" = wt ]; then
            ct=$(cat /sys/block/vda/cache_type)
            [ "$ct" = "write through" ] || fail "round $i: cache_type is '$ct'"
            echo "RESTART-CACHE $i $ct"
        fi
        i=$((i + 1))
    done
    errors=$(dmesg | grep -E 'I/O error|blk_update_request|blocked for more than|hung_task|timed out')
    [ -z "$errors" ] || fail "kernel log: $(echo "$errors" | head -n1)"
    pass
}

case "$TEST" in
    libvirt) test_libvirt ;;
    fio) test_fio ;;
    restartfio) test_restartfio ;;
    fiobench) test_fiobench ;;
    migfio) test_migfio ;;
    resize) test_resize ;;
    cacheflip) test_cacheflip ;;
    livewrite) test_livewrite ;;
    liveverify) test_liveverify ;;
    originrw) test_originrw ;;
    crashwrite) test_crashwrite ;;
    crashverify) test_crashverify ;;
    fs1) test_fs1 ;;
    fs2) test_fs2 ;;
    # For debugging by hand (run-qemu.sh with INTERACTIVE=1).
    shell) echo "thinblk-e2e: shell; poweroff -f to quit"; setsid cttyhack sh; finish ;;
    *) fail "unknown test (use thinblk.test=fio|fiobench|migfio|fs1|fs2|livewrite|liveverify|resize|originrw|crashwrite|crashverify|shell)" ;;
esac
fail "test function returned without a verdict"

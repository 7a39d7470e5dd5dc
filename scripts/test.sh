#!/usr/bin/env bash
# The one command that passes the tests: installs what a fresh Debian machine lacks, then runs
# every test — unit, property, integration (blkio and vhost frontends) and the QEMU guest
# end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# One consistent QEMU (10.0, every package from bookworm-backports) and the other tools;
# it fails unless qemu-img, qemu-system-x86_64 and qemu-storage-daemon all report 10.0.
bash scripts/install-deps.sh

python3 -c "import qemu.qmp, pytest" 2>/dev/null ||
    python3 -m pip install -q --root-user-action=ignore qemu.qmp pytest

cargo build --release --locked
cargo test --release --locked --all-targets 2>&1 | tee target/cargo-test.log
THINBLK="$PWD/target/release/thinblk" python3 -m pytest -q tests/qmp
# Coverage-guided fuzzing, bounded: 30 s per target (longer by hand: bash fuzz/run.sh 600).
bash fuzz/run.sh 30

# A guest on a raw export, then on a thin device (restart, offline and live snapshots, a
# resize seen by the running guest, kill -9 while the guest fsyncs files then fsck and the
# files checked on the next boot, thin_check and thinblk check on the pool).
THINBLK="$PWD/target/release/thinblk" bash qemu-scripts/e2e.sh
THINBLK="$PWD/target/release/thinblk" SERVER=thin bash qemu-scripts/e2e.sh
# Snapshots of an external origin: a cow= export and a thin origin= export of one image.
THINBLK="$PWD/target/release/thinblk" SERVER=cow bash qemu-scripts/e2e.sh
# Issue 13: a guest flips its write cache under QD32 first writes while another disk of the pool
# takes first writes and the host snapshots; must finish, and thinblk exit on SIGTERM (on a
# deadlock the case kills QEMU and thinblk and fails).
THINBLK="$PWD/target/release/thinblk" SERVER=thin E2E_TESTS=cacheflip bash qemu-scripts/e2e.sh
# Issue 14: live migration of a guest on a thin disk under fio verification (A -> B, A -> B -> A,
# during live snapshots, two disks), the pool checked after; then the same guest on
# qemu-storage-daemon, for the downtime beside thinblk's: two series of 5 migrations per
# server, taking turns (thinblk, qsd, qsd, thinblk), since at QEMU's default limit a downtime is
# mostly how much of a RAM pass QEMU left for the stop, which is chance (about 9 min here).
# MIG_TRACE=1: each migration's BREAKDOWN (VM stop, final RAM copy, device states; docs/benchmarks.md).
THINBLK="$PWD/target/release/thinblk" MIG_SECS=30 MIG_ROUNDS=2 MIG_TRACE=1 timeout 1800 \
    bash qemu-scripts/migrate.sh
# The downtime series again with QEMU's downtime-limit at 20 ms, where the downtime is the
# backend's floor rather than the chance part of a RAM pass, also two series per server in
# turns (about 8 min here).
THINBLK="$PWD/target/release/thinblk" MIG_CASES=" " MIG_DOWNTIME_LIMIT=20 MIG_SAMPLE_SECS=15 \
    MIG_ROUNDS=2 MIG_TRACE=1 timeout 1500 bash qemu-scripts/migrate.sh
# Issue 15: a VM and its thin disk move to another pool: two daemons (pool B's NBD export on TCP
# over loopback), thin-mirror to B while the guest runs verified fio, live migration with the
# mirror's job-complete at the switchover, the guest finishes on B; B at the switchover equals A,
# both pools checked (about 3 min; bounded at 15).
THINBLK="$PWD/target/release/thinblk" MIG_SECS=60 timeout 900 bash qemu-scripts/mirror-migrate.sh
# Issue 22: a libvirt domain (QEMU as libvirt-qemu, TCG) on thinblk sockets made with
# --socket-group/--socket-mode: the guest reads and writes, a second disk is hot-plugged and
# unplugged, `thinblk ctl block-resize` shows in the guest (about 30 s; bounded at 10 min).
THINBLK="$PWD/target/release/thinblk" timeout 600 bash qemu-scripts/libvirt.sh
# Issue 14: thinblk killed with SIGKILL 10 times and upgraded in place 3 times under a guest running
# verified fio (mixed 4 KiB / 1 MiB writes, out-of-order completion); ~2.5 min, bounded at 20 min.
THINBLK="$PWD/target/release/thinblk" timeout 1200 bash qemu-scripts/restart.sh
# Issue 16: Ceph RBD (the cargo feature `rbd`). A one-node cluster (mon, mgr, one OSD on a sparse
# file, loopback only, bounded at 3 min to start) in a temporary directory, stopped on the way
# out whatever happens; on it the librbd bindings and the blkio tests of a raw rbd= export.
ceph_dir=$(mktemp -d /tmp/thinblk-ceph.XXXXXX)
trap 'bash scripts/ceph-cluster.sh stop "$ceph_dir"; rm -rf "$ceph_dir"' EXIT
timeout 180 bash scripts/ceph-cluster.sh start "$ceph_dir"
cargo build --release --locked --features rbd
THINBLK_CEPH_CONF="$ceph_dir/ceph.conf" timeout 1800 cargo test --release --locked \
    --features rbd --test rbd_bindings --test blkio_rbd_export 2>&1 | tee target/cargo-test-rbd.log
# Issue 16 part B: a thin pool on RBD images: a take-over after SIGKILL sees every flushed write,
# the old owner is refused, a stopped owner is fenced (blocklisted) and cannot write when it
# runs again, thin_check on the exported metadata image (about 30 s); then a guest running
# verified fio through 3 take-overs on the same socket (about 1.5 min; bounded at 20 min).
THINBLK_CEPH_CONF="$ceph_dir/ceph.conf" timeout 900 cargo test --release --locked \
    --features rbd --test rbd_pool_failover 2>&1 | tee -a target/cargo-test-rbd.log
# Issue 16: the blkio scenarios of a thin export (tests/thin_blkio/: I/O, snapshots, two queues,
# a random model check, reconnects, restarts) on a pool on RBD images; about 1.5 min. And that a
# thin device there keeps its data I/O in flight in librbd (the stacked queue; a second), and a
# closed pool gives its images (locks, watches) back at once (a few seconds).
THINBLK_CEPH_CONF="$ceph_dir/ceph.conf" timeout 600 cargo test --release --locked \
    --features rbd --test blkio_rbd_pool --test rbd_thin_async --test rbd_pool_release 2>&1 \
    | tee -a target/cargo-test-rbd.log
# Issue 16: a daemon started with --standby takes the pool over when told to over QMP
# (pool-take-over): the owner fenced, the thin export comes up with every flushed write; refused
# take-overs are QMP errors (one waits for an unreachable cluster's 30 s timeout; about 40 s).
THINBLK_CEPH_CONF="$ceph_dir/ceph.conf" timeout 300 cargo test --release --locked \
    --features rbd --test rbd_pool_standby 2>&1 | tee -a target/cargo-test-rbd.log
THINBLK="$PWD/target/release/thinblk" THINBLK_CEPH_CONF="$ceph_dir/ceph.conf" timeout 1200 \
    bash qemu-scripts/rbd-failover.sh

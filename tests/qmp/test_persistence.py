"""Exports and snapshot nodes made over QMP (driven by qemu.qmp) come back after the
daemon restarts; persistent: false ones do not.

Run by scripts/test.sh after `cargo build --release`; THINBLK names the binary.
"""
import asyncio
import os
import signal
import subprocess
import tempfile
import time

from qemu.qmp import QMPClient

THINBLK = os.environ.get("THINBLK", "target/release/thinblk")


def start(pool):
    proc = subprocess.Popen(
        [THINBLK, "serve", "--dir", pool, "--metadata-size", "16M", "--data-size", "64M",
         "--export", "name=vm,size=1M"],
        stdout=subprocess.DEVNULL,
    )
    ctl = os.path.join(pool, "control.sock")
    deadline = time.time() + 20
    while not os.path.exists(ctl):
        assert proc.poll() is None, "thinblk exited early"
        assert time.time() < deadline, "control socket never appeared"
        time.sleep(0.02)
    return proc, ctl


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


async def session(ctl, body):
    qmp = QMPClient("test")
    await qmp.connect(ctl)
    try:
        return await body(qmp)
    finally:
        await qmp.disconnect()


def test_qmp_exports_and_snapshot_nodes_survive_a_restart():
    with tempfile.TemporaryDirectory() as d:
        pool = os.path.join(d, "pool")
        origin = os.path.join(d, "origin.raw")
        with open(origin, "wb") as f:
            f.truncate(1 << 20)

        async def make(qmp):
            await qmp.execute("thin-create", {"name": "w", "size": 1 << 20})
            await qmp.execute("cow-create", {"name": "c", "origin": origin,
                                             "store": os.path.join(d, "c.cow")})
            for eid, node, persistent in (("w", "w", True), ("c", "c", True), ("tmp", "vm", False)):
                await qmp.execute("block-export-add", {
                    "type": "vhost-user-blk", "id": eid, "node-name": node, "writable": True,
                    "addr": {"type": "unix", "path": os.path.join(pool, f"q-{eid}.sock")},
                    "socket-mode": "0660", "persistent": persistent})

        proc, ctl = start(pool)
        try:
            asyncio.run(session(ctl, make))
        finally:
            stop(proc)

        async def look(qmp):
            exports = await qmp.execute("query-block-exports")
            cows = await qmp.execute("query-cow")
            return sorted(e["id"] for e in exports), [c["name"] for c in cows]

        proc, ctl = start(pool)
        try:
            exports, cows = asyncio.run(session(ctl, look))
        finally:
            stop(proc)
        assert exports == ["c", "vm", "w"]
        assert cows == ["c"]

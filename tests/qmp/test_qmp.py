"""The control socket driven by QEMU's own Python QMP client (PyPI: qemu.qmp).

Run by scripts/test.sh after `cargo build --release`; THINBLK names the binary.
"""
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import time

import pytest
from qemu.qmp import ExecuteError

from support import THINBLK, connected, run, serve


@pytest.fixture
def daemon():
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        ctl = os.path.join(d, "control.sock")
        sock = os.path.join(d, "disk.sock")
        args = ["--export", f"raw={image},socket={sock},id=vm1", "--control", ctl]
        with serve(args, [ctl, sock]):
            yield {"dir": d, "ctl": ctl, "sock": sock}


def test_the_greeting_carries_a_qemu_version_and_negotiation_succeeds(daemon):
    async def go():
        qmp = await connected(daemon["ctl"])
        assert qmp.greeting is not None
        version = await qmp.execute("query-version")
        assert version["package"].startswith("thinblk ")
        assert set(version["qemu"]) == {"major", "minor", "micro"}
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"block-export-add", "block-export-del", "query-block-exports"} <= names
        await qmp.disconnect()

    run(go())


def test_exports_are_listed_removed_and_added_back(daemon):
    async def go():
        qmp = await connected(daemon["ctl"])
        exports = await qmp.execute("query-block-exports")
        assert [(e["id"], e["node-name"], e["type"]) for e in exports] == [("vm1", "vm1", "vhost-user-blk")]

        await qmp.execute("block-export-del", {"id": "vm1"})
        event = await asyncio.wait_for(qmp.events.get(), 5)
        assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"]["id"] == "vm1"
        assert await qmp.execute("query-block-exports") == []
        assert not os.path.exists(daemon["sock"])

        new_sock = os.path.join(daemon["dir"], "again.sock")
        await qmp.execute(
            "block-export-add",
            {"type": "vhost-user-blk", "id": "again", "node-name": "vm1",
             "addr": {"type": "unix", "path": new_sock}, "writable": True, "num-queues": 1,
             "poll-us": 0, "submit-batch": 8},
        )
        assert os.stat(new_sock).st_mode & 0o777 == 0o600
        exports = await qmp.execute("query-block-exports")
        assert [e["id"] for e in exports] == ["again"]
        await qmp.disconnect()

    run(go())


def test_bad_arguments_are_named_and_the_connection_lives(daemon):
    async def go():
        qmp = await connected(daemon["ctl"])
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("block-export-add", {"type": "vhost-user-blk", "id": "x"})
        assert "node-name" in e.value.error.error.desc or "missing field" in e.value.error.error.desc
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("block-export-del", {"id": "vm1", "colour": "red"})
        assert "colour" in e.value.error.error.desc
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("block-export-del", {"id": "nope"})
        assert e.value.error.error.class_ == "DeviceNotFound"
        for bad in ({"submit-batch": 0}, {"submit-batch": 1025}, {"poll-us": 1001}):
            with pytest.raises(ExecuteError) as e:
                await qmp.execute(
                    "block-export-add",
                    {"type": "vhost-user-blk", "id": "x", "node-name": "vm1",
                     "addr": {"type": "unix", "path": os.path.join(daemon["dir"], "x.sock")},
                     **bad},
                )
            assert next(iter(bad)) in e.value.error.error.desc
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("no-such-command")
        assert e.value.error.error.class_ == "CommandNotFound"
        assert (await qmp.execute("query-version"))["package"].startswith("thinblk")
        await qmp.disconnect()

    run(go())


def raw_exchange(ctl, payloads):
    """Sends raw bytes (no newlines) and returns the parsed replies, one per payload."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(ctl)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    assert "QMP" in greeting
    replies = []
    for p in payloads:
        s.sendall(p)
        line = f.readline()
        assert line.endswith(b"\r\n")
        replies.append(json.loads(line))
    s.close()
    return replies


def test_malformed_json_gets_errors_without_closing_the_connection(daemon):
    replies = raw_exchange(daemon["ctl"], [
        b'{"execute": "query-version"}',  # before negotiation
        b'{"execute": "qmp_capabilities"}',
        b'{"execute": nonsense}',
        b'[1, 2]',
        b'{"execute": "query-version", "argumentz": {}}',
        b'{"execute": 5, "id": "abc"}',
        b'{"execute": "query-version", "id": {"any": ["json", 1]}}',
    ])
    assert replies[0]["error"]["class"] == "CommandNotFound"
    assert replies[1] == {"return": {}}
    assert "JSON parse error" in replies[2]["error"]["desc"]
    assert "object" in replies[3]["error"]["desc"]
    assert "argumentz" in replies[4]["error"]["desc"]
    assert replies[5]["id"] == "abc" and "string" in replies[5]["error"]["desc"]
    assert replies[6]["id"] == {"any": ["json", 1]} and "return" in replies[6]


def test_qmp_shell_runs_a_command(daemon):
    out = subprocess.run(
        ["qmp-shell", daemon["ctl"]], input="query-block-exports\n",
        capture_output=True, text=True, timeout=30,
    )
    assert "vm1" in out.stdout, out.stdout + out.stderr


# ---- a thin pool -------------------------------------------------------------------------

@pytest.fixture
def pool():
    with tempfile.TemporaryDirectory() as d:
        ctl = os.path.join(d, "control.sock")
        sock = os.path.join(d, "vm1.sock")
        args = ["--dir", os.path.join(d, "pool"), "--data-size", "256M", "--metadata-size", "16M",
                "--control", ctl, "--export", f"name=vm1,size=64M,socket={sock},queues=1"]
        with serve(args, [ctl, sock]):
            yield {"dir": d, "ctl": ctl, "sock": sock}


THIN_COMMANDS = {
    "query-pool", "pool-set-low-water", "pool-reserve-metadata-snap",
    "pool-release-metadata-snap", "query-thin-devices", "thin-create", "thin-delete",
    "block-resize", "thin-delta", "thin-snapshot", "blockdev-snapshot-internal-sync",
    "transaction", "block-set-write-threshold", "block-export-add", "block-export-del",
    "query-block-exports", "query-commands",
}


async def error_of(qmp, cmd, args=None):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute(cmd, args or {})
    return e.value.error.error


def by_name(devices):
    return {d["name"]: d for d in devices}


def test_query_commands_lists_every_command(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert THIN_COMMANDS <= names
        await qmp.disconnect()

    run(go())


def test_query_pool_reports_space_mode_and_metadata_snap(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        p = await qmp.execute("query-pool")
        assert p["mode"] == "write" and p["block-size"] == 65536
        assert p["data-blocks"] == 4096 and p["data-free-blocks"] == 4096
        assert p["metadata-free-blocks"] < p["metadata-blocks"]
        assert p["needs-check"] is False and p["metadata-snap"] is False
        tid = p["transaction-id"]
        assert isinstance(tid, int)

        snap = await qmp.execute("pool-reserve-metadata-snap")
        assert snap["metadata-snap-block"] > 0
        assert (await qmp.execute("query-pool"))["metadata-snap"] is True
        err = await error_of(qmp, "pool-reserve-metadata-snap")
        assert "held" in err.desc
        await qmp.execute("pool-release-metadata-snap")
        assert (await qmp.execute("query-pool"))["metadata-snap"] is False
        err = await error_of(qmp, "pool-release-metadata-snap")
        assert "no metadata snapshot" in err.desc

        await qmp.execute("pool-set-low-water", {"blocks": 100})
        assert (await qmp.execute("query-pool"))["data-low-water"] == 100
        err = await error_of(qmp, "pool-set-low-water", {"blocks": 10**9})
        assert "blocks" in err.desc
        err = await error_of(qmp, "pool-set-low-water", {"block": 1})
        assert "block" in err.desc
        await qmp.disconnect()

    run(go())


def test_low_water_above_the_free_count_fires_at_once(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        # Nothing is written yet: every block is free, so a mark above the total cannot be
        # set, and a mark at the total does not fire.
        await qmp.execute("pool-set-low-water", {"blocks": 4096})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(qmp.events.get(), 0.5)
        await qmp.disconnect()

    run(go())


def test_thin_devices_are_created_listed_and_deleted(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        r = await qmp.execute("thin-create", {"name": "data1", "size": 32 << 20})
        assert r["id"] > 0
        devs = by_name(await qmp.execute("query-thin-devices"))
        assert set(devs) == {"vm1", "data1"}
        d = devs["data1"]
        assert d["size"] == 32 << 20 and d["mapped-bytes"] == 0 and d["exclusive-bytes"] == 0
        assert d["origin"] is None and d["export"] is None
        assert devs["vm1"]["export"] == "vm1"

        err = await error_of(qmp, "thin-create", {"name": "data1", "size": 1 << 20})
        assert "already exists" in err.desc
        err = await error_of(qmp, "thin-create", {"name": "bad/name", "size": 1 << 20})
        assert "not a valid device name" in err.desc
        err = await error_of(qmp, "thin-create", {"name": "odd", "size": 1000})
        assert "multiple of 512" in err.desc
        err = await error_of(qmp, "thin-create", {"name": "x"})
        assert "size" in err.desc
        err = await error_of(qmp, "thin-create", {"name": "x", "size": 512, "colour": 1})
        assert "colour" in err.desc
        err = await error_of(qmp, "thin-create", {"name": "x", "size": "big"})
        assert "'size'" in err.desc and "string" in err.desc

        image = os.path.join(pool["dir"], "golden.img")
        with open(image, "wb") as f:
            f.truncate(3 << 20)
        await qmp.execute("thin-create", {"name": "over", "origin": image})
        assert by_name(await qmp.execute("query-thin-devices"))["over"]["size"] == 3 << 20
        await qmp.execute("thin-delete", {"name": "over"})

        await qmp.execute("thin-delete", {"name": "data1"})
        assert "data1" not in by_name(await qmp.execute("query-thin-devices"))
        err = await error_of(qmp, "thin-delete", {"name": "data1"})
        assert err.class_ == "DeviceNotFound"
        await qmp.disconnect()

    run(go())


def test_an_exported_disk_is_deleted_only_with_force(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        err = await error_of(qmp, "thin-delete", {"name": "vm1"})
        assert "exported" in err.desc and "force" in err.desc
        assert "vm1" in by_name(await qmp.execute("query-thin-devices"))
        await qmp.execute("thin-delete", {"name": "vm1", "force": True})
        event = await asyncio.wait_for(qmp.events.get(), 5)
        assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"]["id"] == "vm1"
        assert await qmp.execute("query-block-exports") == []
        assert await qmp.execute("query-thin-devices") == []
        assert not os.path.exists(pool["sock"])
        await qmp.disconnect()

    run(go())


def test_snapshots_report_their_pause_and_transactions_are_all_or_nothing(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        r = await qmp.execute("thin-snapshot", {"device": "vm1", "name": "s1"})
        assert r["pause-us"] >= 0 and r["commit-us"] >= 0 and r["id"] == r["ids"][0]
        assert await qmp.execute(
            "blockdev-snapshot-internal-sync", {"device": "vm1", "name": "s2"}) == {}
        devs = by_name(await qmp.execute("query-thin-devices"))
        assert devs["s1"]["origin"] == "vm1" and devs["s2"]["origin"] == "vm1"
        assert devs["s1"]["size"] == devs["vm1"]["size"]

        def snap(device, name):
            return {"type": "blockdev-snapshot-internal-sync",
                    "data": {"device": device, "name": name}}

        await qmp.execute("transaction", {"actions": [snap("vm1", "t1"), snap("s1", "t2")]})
        devs = by_name(await qmp.execute("query-thin-devices"))
        assert devs["t1"]["origin"] == "vm1" and devs["t2"]["origin"] == "s1"
        # The second action names an existing device: neither snapshot is taken.
        err = await error_of(qmp, "transaction", {"actions": [snap("vm1", "t3"), snap("vm1", "s1")]})
        assert "s1" in err.desc
        assert "t3" not in by_name(await qmp.execute("query-thin-devices"))
        err = await error_of(qmp, "transaction", {"actions": [snap("nope", "t4")]})
        assert err.class_ == "DeviceNotFound"
        err = await error_of(qmp, "transaction", {"actions": [{"type": "drive-backup", "data": {}}]})
        assert "drive-backup" in err.desc
        err = await error_of(qmp, "thin-snapshot", {"device": "vm1"})
        assert "name" in err.desc
        await qmp.disconnect()

    run(go())


def test_resize_grows_and_refuses_to_shrink(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        await qmp.execute("block-resize", {"node-name": "vm1", "size": 128 << 20})
        assert by_name(await qmp.execute("query-thin-devices"))["vm1"]["size"] == 128 << 20
        nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
        assert nodes["vm1"]["image"]["virtual-size"] == 128 << 20
        err = await error_of(qmp, "block-resize", {"node-name": "vm1", "size": 1 << 20})
        assert "shrink" in err.desc
        err = await error_of(qmp, "block-resize", {"node-name": "nope", "size": 1 << 20})
        assert err.class_ == "DeviceNotFound"
        err = await error_of(qmp, "block-resize", {"size": 1 << 20})
        assert "node-name" in err.desc
        await qmp.disconnect()

    run(go())


def test_thin_delta_and_write_threshold_arguments(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        await qmp.execute("thin-snapshot", {"device": "vm1", "name": "s1"})
        d = await qmp.execute("thin-delta", {"base": "vm1", "target": "s1"})
        assert d == {"block-size": 65536, "unit": "bytes", "ranges": []}
        err = await error_of(qmp, "thin-delta", {"base": "vm1", "target": "nope"})
        assert err.class_ == "DeviceNotFound" and "nope" in err.desc
        await qmp.execute("block-set-write-threshold",
                          {"node-name": "vm1", "write-threshold": 1 << 20})
        err = await error_of(qmp, "block-set-write-threshold",
                             {"node-name": "nope", "write-threshold": 1})
        assert err.class_ == "DeviceNotFound"
        err = await error_of(qmp, "block-set-write-threshold", {"node-name": "vm1"})
        assert "write-threshold" in err.desc
        await qmp.disconnect()

    run(go())


def test_thin_exports_are_removed_and_added_back(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        await qmp.execute("thin-create", {"name": "extra", "size": 1 << 20})
        sock = os.path.join(pool["dir"], "extra.sock")
        await qmp.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "ex", "node-name": "extra",
            "addr": {"type": "unix", "path": sock}, "writable": True})
        assert os.path.exists(sock)
        devs = by_name(await qmp.execute("query-thin-devices"))
        assert devs["extra"]["export"] == "ex"
        await qmp.execute("block-export-del", {"id": "ex"})
        assert (await asyncio.wait_for(qmp.events.get(), 5))["data"]["id"] == "ex"
        await qmp.execute("thin-delete", {"name": "extra"})
        await qmp.disconnect()

    run(go())


def test_qmp_shell_runs_a_pool_command(pool):
    out = subprocess.run(
        ["qmp-shell", pool["ctl"]], input="query-pool\nthin-create name=fromshell size=1048576\n",
        capture_output=True, text=True, timeout=30,
    )
    assert "out-of-data-space" not in out.stdout and '"mode": "write"' in out.stdout, out.stdout + out.stderr
    ctl = subprocess.run([THINBLK, "ctl", "--socket", pool["ctl"], "query-thin-devices"],
                         capture_output=True, text=True, timeout=30)
    assert "fromshell" in ctl.stdout


def ctl(pool, *args):
    return subprocess.run([THINBLK, "ctl", "--socket", pool["ctl"], *args],
                          capture_output=True, text=True, timeout=30)


def test_thinblk_ctl_round_trip(pool):
    r = ctl(pool, "thin-create", "name=c1", "size=1048576")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] > 0, r.stderr
    r = ctl(pool, "thin-snapshot", "--args", '{"device": "c1"}', "name=c1-snap")
    assert r.returncode == 0 and json.loads(r.stdout)["pause-us"] >= 0, r.stderr
    r = ctl(pool, "query-thin-devices")
    devs = by_name(json.loads(r.stdout))
    assert devs["c1-snap"]["origin"] == "c1"
    r = ctl(pool, "thin-create", "name=c1", "size=1048576")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = ctl(pool, "thin-create", "oops")
    assert r.returncode != 0 and "key=value" in r.stderr
    r = subprocess.run([THINBLK, "ctl", "--socket", os.path.join(pool["dir"], "none.sock"),
                        "query-pool"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "cannot connect" in r.stderr


def test_thinblk_ctl_prints_events(pool):
    watcher = subprocess.Popen([THINBLK, "ctl", "--socket", pool["ctl"], "--events"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        r = ctl(pool, "block-export-del", "id=vm1")
        assert r.returncode == 0, r.stderr
        line = watcher.stdout.readline()
        event = json.loads(line)
        assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"]["id"] == "vm1"
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)


def test_external_origin_snapshots_are_created_queried_merged_and_deleted(daemon):
    origin = os.path.join(daemon["dir"], "origin.img")
    with open(origin, "wb") as f:
        f.write(bytes(range(256)) * 4096)
    store = os.path.join(daemon["dir"], "snap.cow")

    async def go():
        qmp = await connected(daemon["ctl"])
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("cow-create", {"name": "s", "origin": origin, "store": store, "chunk-size": 1000})
        assert "chunk-size" in e.value.error.error.desc
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("cow-create", {"name": "s", "origin": origin})
        assert "store" in e.value.error.error.desc
        st = await qmp.execute(
            "cow-create", {"name": "snap", "origin": origin, "store": store, "chunk-size": 65536})
        assert st["valid"] and st["persistent"] and st["chunk-size"] == 65536
        assert 0 < st["fraction-full"] < 1
        listed = await qmp.execute("query-cow")
        assert [c["name"] for c in listed] == ["snap"]
        sock = os.path.join(daemon["dir"], "snap.sock")
        await qmp.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "snapx", "node-name": "snap",
            "addr": {"type": "unix", "path": sock}, "writable": True})
        with pytest.raises(ExecuteError):
            await qmp.execute("cow-delete", {"name": "snap"})
        await qmp.execute("block-export-del", {"id": "snapx"})
        await qmp.execute("cow-merge", {"name": "snap"})
        while True:
            ev = await asyncio.wait_for(qmp.events.get(), 30)
            if ev["event"] == "COW_MERGE_COMPLETED":
                assert ev["data"]["node-name"] == "snap"
                break
        assert (await qmp.execute("query-cow"))[0]["merge"] == "done"
        await qmp.execute("cow-delete", {"name": "snap"})
        assert await qmp.execute("query-cow") == []
        await qmp.disconnect()

    run(go())


def test_a_client_that_stops_reading_is_dropped_without_slowing_commands_or_other_clients(daemon):
    # A raw client negotiates and then never reads again.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(daemon["ctl"])
    stalled.sendall(b'{"execute": "qmp_capabilities"}')
    reader = stalled.makefile("rb")
    reader.readline()  # greeting
    assert b"return" in reader.readline()

    cycles = 2000  # more BLOCK_EXPORT_DELETED events than its socket and its queue hold
    new_sock = os.path.join(daemon["dir"], "cycle.sock")
    add = {"type": "vhost-user-blk", "id": "cycle", "node-name": "vm1",
           "addr": {"type": "unix", "path": new_sock}, "num-queues": 1}

    async def go():
        qmp = await connected(daemon["ctl"])
        slowest = 0.0
        for _ in range(cycles):
            await qmp.execute("block-export-add", add)
            start = time.monotonic()
            # Deleting an export sends BLOCK_EXPORT_DELETED to every client.
            await qmp.execute("block-export-del", {"id": "cycle"})
            slowest = max(slowest, time.monotonic() - start)
        seen = 0
        while seen < cycles:
            event = await asyncio.wait_for(qmp.events.get(), 10)
            seen += event["event"] == "BLOCK_EXPORT_DELETED"
        await qmp.disconnect()
        return slowest

    slowest = run(go())
    # Before, the first event the stalled client could not take held the command for 1 s.
    assert slowest < 0.5, f"a block-export-del took {slowest:.3f} s"
    # The stalled client was hung up on: it reads what was written, then the end.
    stalled.settimeout(10)
    got = 0
    while True:
        line = reader.readline()
        if not line:
            break
        got += 1
    assert got < cycles, f"the stalled client got all {got} events"
    stalled.close()

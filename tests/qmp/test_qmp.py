"""The control socket driven by QEMU's own Python QMP client (PyPI: qemu.qmp).

Run by scripts/test.sh after `cargo build --release`; THINBLK names the binary.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

THINBLK = os.environ.get("THINBLK", "target/release/thinblk")


def wait_for(path, proc, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "thinblk exited early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def daemon():
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        ctl = os.path.join(d, "control.sock")
        sock = os.path.join(d, "disk.sock")
        proc = subprocess.Popen(
            [THINBLK, "serve", "--export", f"raw={image},socket={sock},id=vm1", "--control", ctl],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for(ctl, proc)
            wait_for(sock, proc)
            yield {"dir": d, "ctl": ctl, "sock": sock}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def run(coro):
    return asyncio.run(coro)


async def connected(ctl):
    qmp = QMPClient("test")
    await qmp.connect(ctl)
    return qmp


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
             "addr": {"type": "unix", "path": new_sock}, "writable": True, "num-queues": 1},
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

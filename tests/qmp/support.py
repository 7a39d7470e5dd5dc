"""What the QMP tests share: the thinblk binary, a daemon in a child process, and a
connected qemu.qmp client.

Run by scripts/test.sh after `cargo build --release`; THINBLK names the binary.
"""
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time

from qemu.qmp import QMPClient

THINBLK = os.environ.get("THINBLK", "target/release/thinblk")


def wait_for(path, proc, timeout=20):
    """Waits until `path` exists, failing if `proc` exits first or time runs out."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "thinblk exited early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@contextlib.contextmanager
def serve(args, sockets):
    """`thinblk serve ARGS`, once every path in `sockets` exists; stopped with SIGTERM."""
    proc = subprocess.Popen([THINBLK, "serve", *args], stdout=subprocess.DEVNULL)
    try:
        for path in sockets:
            wait_for(path, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(coro)


async def connected(ctl):
    qmp = QMPClient("test")
    await qmp.connect(ctl)
    return qmp

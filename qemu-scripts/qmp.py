#!/usr/bin/env python3
"""Small QMP client for the qemu-scripts harness (qemu.qmp).

  qmp.py SOCKET COMMAND [JSON-ARGUMENTS]   run one command, print its return value as JSON
  qmp.py SOCKET migrate URI [TIMEOUT [INFO]]
                                           migrate the VM behind SOCKET to URI, wait until it
                                           completes, print "downtime-ms total-ms", quit the
                                           source; exit 1 if the migration fails or times out;
                                           INFO: a file for the final query-migrate (JSON);
                                           MIG_DOWNTIME_LIMIT (ms) in the environment sets
                                           QEMU's downtime-limit (default: QEMU's, 300 ms)
"""
import asyncio
import json
import os
import sys
import time

from qemu.qmp import QMPClient


async def connect(sock):
    qmp = QMPClient("harness")
    for _ in range(100):
        try:
            await qmp.connect(sock)
            return qmp
        except Exception:  # not listening yet
            await asyncio.sleep(0.1)
    await qmp.connect(sock)
    return qmp


async def one(sock, cmd, args):
    qmp = await connect(sock)
    try:
        print(json.dumps(await qmp.execute(cmd, args)))
    finally:
        await qmp.disconnect()


async def migrate(sock, uri, timeout, info_file=None):
    qmp = await connect(sock)
    try:
        # Fast enough that a TCG guest's dirty rate does not keep the migration from
        # converging; QEMU's default downtime limit (300 ms) stays unless the caller sets one.
        params = {"max-bandwidth": 4 << 30}
        if os.environ.get("MIG_DOWNTIME_LIMIT"):
            params["downtime-limit"] = int(os.environ["MIG_DOWNTIME_LIMIT"])
        await qmp.execute("migrate-set-parameters", params)
        await qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        while True:
            info = await qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                if info_file:
                    with open(info_file, "w") as f:
                        json.dump(info, f)
                print(info.get("downtime", -1), info.get("total-time", -1))
                await qmp.execute("quit")
                return 0
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                print(f"migration {status}: {json.dumps(info)}", file=sys.stderr)
                return 1
            await asyncio.sleep(0.1)
    finally:
        try:
            await qmp.disconnect()
        except Exception:  # the source quit
            pass


def main():
    sock, cmd = sys.argv[1], sys.argv[2]
    if cmd == "migrate":
        timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 120
        info_file = sys.argv[5] if len(sys.argv) > 5 else None
        sys.exit(asyncio.run(migrate(sock, sys.argv[3], timeout, info_file)))
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    asyncio.run(one(sock, cmd, args))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A live migration whose switchover completes a thin-mirror job (qemu-scripts/mirror-migrate.sh).

  mirror_switchover.py VM-QMP URI SOURCE-CTL TARGET-CTL JOB DEVICE DEST-EXPORT [TIMEOUT]

Migrates the VM behind VM-QMP to URI with the capability pause-before-switchover, so the
source QEMU stops the guest (its disk's rings stopped, every request it had in flight done)
and waits in status "pre-switchover". Only then, on the thinblk daemon at SOURCE-CTL: checks
that the destination's vhost export DEST-EXPORT (on TARGET-CTL) has not started (the disk on
the target pool must not serve before the mirror is complete), sends job-complete to JOB
(the source refuses writes from now on, the last dirty blocks go over, the target is
flushed) and waits for BLOCK_JOB_COMPLETED without an error; snapshots DEVICE on TARGET-CTL
as DEVICE-switchover (the target's content at the switchover, compared with the source
afterwards); then lets the migration finish. Prints "downtime-ms total-ms" and quits the
source; exits 1 on any failure.
"""
import asyncio
import json
import sys
import time

from qemu.qmp import EventListener, QMPClient

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from qmp import connect  # noqa: E402


def fail(msg):
    print(f"mirror_switchover: {msg}", file=sys.stderr)
    return 1


async def complete_job(source, target, job, device, dest_export, timeout):
    exports = await target.execute("query-block-exports")
    active = [e["id"] for e in exports if e.get("active")]
    if dest_export in active:
        return fail(f"the destination export {dest_export} serves before the switchover")
    listener = EventListener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
    with source.listen(listener):
        await source.execute("job-complete", {"id": job})
        while True:
            ev = await asyncio.wait_for(listener.get(), timeout)
            data = ev.get("data", {})
            if data.get("device") != job:
                continue
            if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in data:
                return fail(f"the mirror did not complete: {json.dumps(dict(ev))}")
            break
    await target.execute(
        "blockdev-snapshot-internal-sync", {"device": device, "name": f"{device}-switchover"}
    )
    return 0


async def migrate(vm_sock, uri, source_ctl, target_ctl, job, device, dest_export, timeout):
    vm = await connect(vm_sock)
    source = await connect(source_ctl)
    target = await connect(target_ctl)
    try:
        await vm.execute("migrate-set-parameters", {"max-bandwidth": 4 << 30})
        await vm.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )
        await vm.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        switched = False
        while True:
            info = await vm.execute("query-migrate")
            status = info.get("status")
            if status == "pre-switchover" and not switched:
                t0 = time.monotonic()
                rc = await complete_job(source, target, job, device, dest_export, timeout)
                if rc:
                    await vm.execute("migrate_cancel")
                    return rc
                print(f"mirror_switchover: job completed in {(time.monotonic() - t0) * 1000:.0f} ms",
                      file=sys.stderr)
                switched = True
                await vm.execute("migrate-continue", {"state": "pre-switchover"})
            elif status == "completed":
                if not switched:
                    return fail("the migration completed without its pre-switchover pause")
                print(info.get("downtime", -1), info.get("total-time", -1))
                await vm.execute("quit")
                return 0
            elif status in ("failed", "cancelled") or time.monotonic() > deadline:
                return fail(f"migration {status}: {json.dumps(info)}")
            await asyncio.sleep(0.05)
    finally:
        for c in (vm, source, target):
            try:
                await c.disconnect()
            except Exception:  # the source VM quit
                pass


def main():
    if len(sys.argv) < 8:
        sys.exit(__doc__)
    timeout = float(sys.argv[8]) if len(sys.argv) > 8 else 300
    sys.exit(asyncio.run(migrate(*sys.argv[1:8], timeout)))


if __name__ == "__main__":
    main()

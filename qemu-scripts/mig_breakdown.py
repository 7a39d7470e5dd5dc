#!/usr/bin/env python3
"""Where one live migration's downtime went, from QEMU's own trace (migrate.sh, MIG_TRACE=1).

  mig_breakdown.py SOURCE.trace DEST.trace INFO.json
  mig_breakdown.py --summary BREAKDOWNS      medians per server of the lines above, as
                                             migrate.sh collects them ("series LABEL-ROUND"
                                             lines, then that series' BREAKDOWN lines), and
                                             the floor: the least downtime and the least
                                             devices + flush (on a shared machine the medians
                                             of those are mostly other processes' load, see
                                             mig_sched.py; the floor is what QEMU needs)

SOURCE.trace / DEST.trace: the two QEMUs' logs of the trace points migrate.sh enables, written
with `-msg timestamp=on` (lines `TID@SECONDS.MICROS:EVENT ARGS`); INFO.json: the source's last
query-migrate. Prints one line:

  BREAKDOWN downtime=D stop=S [vhost=R1:W1,...] final-dirty=P ram=M devices=V end=E
            resumed=X sync-count=C downtime-bytes=B

all times in ms:
  downtime  what query-migrate reports (the source's clock: src-downtime-start to -end)
  stop      vm_stop: src-downtime-start to src-vm-stopped; the vhost-user device stops here,
            and vhost= lists each request sent in that window and how long its reply took
            (REQ:MS; 11 GET_VRING_BASE, 18 SET_VRING_ENABLE, 39 SET_STATUS; "-" = no reply)
  final-dirty  pages the last dirty-bitmap sync found (the final RAM copy)
  ram       the final RAM copy (src-vm-stopped to src-iterable-saved)
  devices   device states (src-iterable-saved to src-non-iterable-saved), with the slowest
  end       flushing the stream (src-non-iterable-saved to src-downtime-end)
  resumed   src-downtime-start to the destination's dst-precopy-bh-vm-started (the guest's
            real pause, which includes loading on the destination and its device start; QEMU
            does not count that part as downtime)
  pending-at-stop  what QEMU still had to send when it decided to stop the guest (RAM not
            yet copied in this pass plus pages dirtied since), and threshold: what it then
            expected to send within its downtime limit (its last bandwidth figure times the
            limit); it stops the guest as soon as the first is below the second
"""
import json
import re
import sys

LINE = re.compile(r"^\d+@(\d+\.\d+):(\S+)\s*(.*)$")
VHOST_NAMES = {
    5: "SET_MEM_TABLE",
    6: "SET_LOG_BASE",
    11: "GET_VRING_BASE",
    18: "SET_VRING_ENABLE",
    39: "SET_STATUS",
}


def events(path):
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LINE.match(line.strip())
                if m:
                    out.append((float(m.group(1)), m.group(2), m.group(3)))
    except FileNotFoundError:
        pass
    return out


def checkpoint(evs, name, after=0.0):
    for t, ev, args in evs:
        if ev == "vmstate_downtime_checkpoint" and args == name and t >= after:
            return t
    return None


def ms(a, b):
    if a is None or b is None:
        return "?"
    return f"{(b - a) * 1e3:.1f}"


def mb(n):
    return "?" if n is None else f"{n / 1e6:.1f}MB"


def vhost_replies(evs, start, end):
    """Each vhost-user request written in [start, end] with the wait for its reply."""
    out = []
    pending = None
    for t, ev, args in evs:
        if t < start or t > end:
            continue
        m = re.search(r"req:(\d+)", args)
        if not m:
            continue
        req = int(m.group(1))
        if ev == "vhost_user_write":
            if pending is not None:
                out.append(f"{pending[0]}:-")
            pending = (req, t)
        elif ev == "vhost_user_read" and pending is not None and pending[0] == req:
            out.append(f"{req}:{(t - pending[1]) * 1e3:.2f}")
            pending = None
    if pending is not None:
        out.append(f"{pending[0]}:-")
    return out


def median(values):
    v = sorted(values)
    if not v:
        return float("nan")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def series_fields(path, prefix):
    """(server, {key: value}) of each line starting with `prefix` in a file of series: a
    "series LABEL-ROUND" line names the server of the lines after it; lines before the first
    series (migrate.sh's cases) belong to no server and are skipped."""
    server = None
    with open(path) as f:
        for line in f:
            if line.startswith("series "):
                server = line.split()[1].rsplit("-", 1)[0]
            elif server is not None and line.startswith(prefix):
                yield server, dict(re.findall(r"(\S+?)=(\S+)", line))


def summary(path):
    groups = {}
    for server, fields in series_fields(path, "BREAKDOWN"):
        try:
            row = {k: float(fields[k]) for k in ("downtime", "stop", "ram", "devices", "end", "downtime-bytes")}
        except (KeyError, ValueError):
            continue
        row["resumed"] = float(fields["resumed"]) if fields.get("resumed", "?") != "?" else row["downtime"]
        groups.setdefault(server, []).append(row)
    for server, rows in groups.items():
        def m(key):
            return median(r[key] for r in rows)
        mbps = median(r["downtime-bytes"] / 1e6 / (r["ram"] / 1e3) for r in rows if r["ram"] > 0)
        other = median(r["stop"] + r["devices"] + r["end"] for r in rows)
        print(
            f"MIGRATE-BREAKDOWN {server}: n={len(rows)} downtime={m('downtime'):.0f}"
            f" final-ram-copy={m('ram'):.1f} ({m('downtime-bytes') / 1e6:.1f} MB at {mbps:.0f} MB/s)"
            f" vm-stop={m('stop'):.2f}"
            f" devices+flush={median(r['devices'] + r['end'] for r in rows):.1f}"
            f" all-but-ram={other:.1f} guest-resumed={m('resumed'):.0f} (medians, ms)"
            f" floor: downtime={min(r['downtime'] for r in rows):.0f}"
            f" devices+flush={min(r['devices'] + r['end'] for r in rows):.1f} (minimums, ms)"
        )


def main():
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    src, dst = events(sys.argv[1]), events(sys.argv[2])
    try:
        with open(sys.argv[3]) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    # The last switchover in the source's trace (a QEMU migrated only once, but be safe).
    starts = [t for t, ev, a in src if ev == "vmstate_downtime_checkpoint" and a == "src-downtime-start"]
    start = starts[-1] if starts else None
    after = start or 0.0
    stopped = checkpoint(src, "src-vm-stopped", after)
    iterable = checkpoint(src, "src-iterable-saved", after)
    non_iterable = checkpoint(src, "src-non-iterable-saved", after)
    end = checkpoint(src, "src-downtime-end", after)
    resumed = checkpoint(dst, "dst-precopy-bh-vm-started")
    final_dirty = "?"
    for t, ev, args in src:
        if ev == "migration_bitmap_sync_end" and t >= after:
            final_dirty = args.split()[-1]
            break
    slowest = ("?", 0)
    for t, ev, args in src:
        if ev == "vmstate_downtime_save" and t >= after and "non-iterable" in args:
            m = re.search(r"idstr=(\S+).*downtime=(\d+)", args)
            if m and int(m.group(2)) > slowest[1]:
                slowest = (m.group(1), int(m.group(2)))
    vhost = vhost_replies(src, start, stopped) if start and stopped else []
    # Why QEMU stopped the guest then: what it had left to send (migration_thread_low_pending)
    # was below what it expected to send within the downtime limit (migrate_transferred's
    # max_size, from the bandwidth it last measured).
    pending = threshold = None
    for t, ev, args in src:
        if start is not None and t > start:
            break
        if ev == "migration_thread_low_pending":
            pending = int(args.split()[-1])
        elif ev == "migrate_transferred":
            m = re.search(r"max_size (\d+)", args)
            threshold = int(m.group(1)) if m else threshold
    ram = info.get("ram", {})
    print(
        f"BREAKDOWN downtime={info.get('downtime', '?')} stop={ms(start, stopped)}"
        f" vhost={','.join(vhost) or '-'} final-dirty={final_dirty}"
        f" ram={ms(stopped, iterable)} devices={ms(iterable, non_iterable)}"
        f" (slowest {slowest[0]} {slowest[1] / 1e3:.1f}) end={ms(non_iterable, end)}"
        f" resumed={ms(start, resumed)} sync-count={ram.get('dirty-sync-count', '?')}"
        f" downtime-bytes={ram.get('downtime-bytes', '?')}"
        f" setup={info.get('setup-time', '?')} total={info.get('total-time', '?')}"
        f" pending-at-stop={mb(pending)} threshold={mb(threshold)}"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Who had the CPUs while one live migration's guest was stopped (migrate.sh MIG_SCHED=1).

  mig_sched.py SOURCE.trace DEST.trace PERF.data OFFSET SERVER-PID
  mig_sched.py --summary SCHED-LINES     medians per server of the lines below, as migrate.sh
                                         collects them ("series LABEL-ROUND" lines first)

SOURCE.trace / DEST.trace: the two QEMUs' traces (mig_breakdown.py); PERF.data: `perf record
-k mono -e sched:sched_switch -e sched:sched_wakeup -a` over the migration; OFFSET: wall clock
minus CLOCK_MONOTONIC (seconds) when it was taken; SERVER-PID: thinblk's or
qemu-storage-daemon's process. Prints one line for the part of the downtime QEMU spends
saving device states and flushing the stream (src-iterable-saved to src-downtime-end, the
"devices + flush" of mig_breakdown.py), and one for the whole downtime:

  SCHED devices ms=W src=R/Q/S dst=R/Q/S server=C [thread:ms,...] others=O [comm:ms,...]

  W        the window's length (ms)
  src      the source QEMU thread that saves the state (the one that logs the checkpoints):
           ms it ran / waited runnable for a CPU / slept (on the socket: the destination
           has not read the stream yet)
  dst      the same for the destination QEMU thread that loads it
  server   CPU ms the storage server's threads used in the window, the busiest named
  others   CPU ms of every other process but the two QEMUs, the busiest named
"""
import pathlib
import re
import subprocess
import sys

# The series file's format and the median are mig_breakdown.py's (this is its companion).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mig_breakdown import median, series_fields  # noqa: E402

LINE = re.compile(r"^(\d+)@(\d+\.\d+):(\S+)\s*(.*)$")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
    r"next_comm=(.*?) next_pid=(\d+)"
)
WAKEUP = re.compile(r"comm=(.*?) pid=(\d+) prio=\d+ target_cpu=(\d+)")


def checkpoints(path):
    """{name: (tid, wall time)} of the last occurrence of each checkpoint in a trace."""
    out = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LINE.match(line.strip())
                if m and m.group(3) == "vmstate_downtime_checkpoint":
                    out[m.group(4)] = (int(m.group(1)), float(m.group(2)))
    except FileNotFoundError:
        pass
    return out


def perf_events(path):
    """(mono time, cpu, event, pid, tid, args) of each scheduler event in a perf record."""
    text = subprocess.run(
        ["perf", "script", "-i", path, "--ns", "-F", "pid,tid,cpu,time,event,trace"],
        capture_output=True, text=True, check=True,
    ).stdout
    return parse_perf_script(text)


def parse_perf_script(text):
    """The events of `perf script -F pid,tid,cpu,time,event,trace` output, in its order."""
    head = re.compile(r"^\s*(\d+)/(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)$")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            yield (float(m.group(4)), int(m.group(3)), m.group(5).rstrip(":"),
                   int(m.group(1)), int(m.group(2)), m.group(6))


class Window:
    """CPU time by thread and the run/wait/sleep split of two threads over [start, end]."""

    def __init__(self, start, end, watched):
        self.start, self.end = start, end
        self.cpu = {}
        # tid -> {"run": s, "wait": s, "sleep": s}
        self.states = {tid: {"run": 0.0, "wait": 0.0, "sleep": 0.0} for tid in watched}

    def span(self, a, b):
        a, b = max(a, self.start), min(b, self.end)
        return max(0.0, b - a)

    def ran(self, tid, a, b):
        d = self.span(a, b)
        if d > 0:
            self.cpu[tid] = self.cpu.get(tid, 0.0) + d

    def state(self, tid, what, a, b):
        if tid in self.states and what in self.states[tid]:
            self.states[tid][what] += self.span(a, b)


def analyse(evs, windows, watched):
    running = {}  # cpu -> (tid, since)
    state = {tid: ("sleep", None) for tid in watched}  # tid -> (what, since)
    names = {0: ("idle", 0)}  # tid -> (comm, pid)

    def enter(tid, what, t):
        old, since = state[tid]
        if since is not None:
            for w in windows:
                w.state(tid, old, since, t)
        state[tid] = (what, t)

    for t, cpu, ev, pid, tid, args in evs:
        if ev == "sched:sched_switch":
            m = SWITCH.search(args)
            if not m:
                continue
            prev, nxt = int(m.group(2)), int(m.group(5))
            names.setdefault(prev, (m.group(1), pid))
            if tid == prev:
                names[prev] = (m.group(1), pid)
            cur = running.get(cpu)
            if cur is not None and cur[0] == prev:
                for w in windows:
                    w.ran(prev, cur[1], t)
            running[cpu] = (nxt, t)
            names.setdefault(nxt, (m.group(4), None))
            if prev in state:
                enter(prev, "wait" if m.group(3).startswith("R") else "sleep", t)
            if nxt in state:
                enter(nxt, "run", t)
        elif ev == "sched:sched_wakeup":
            m = WAKEUP.search(args)
            if m and int(m.group(2)) in state and state[int(m.group(2))][0] == "sleep":
                enter(int(m.group(2)), "wait", t)
    return names


def describe(w, names, src_tid, dst_tid, server_pid, qemu_pids):
    def pid_of(tid):
        return names.get(tid, ("?", None))[1]

    def fmt(tid):
        s = w.states.get(tid, {})
        return "/".join(f"{s.get(k, 0) * 1e3:.2f}" for k in ("run", "wait", "sleep"))

    server, qemu, others = {}, {}, {}
    for tid, secs in w.cpu.items():
        comm, pid = names.get(tid, ("?", None))
        if tid == 0 or tid in (src_tid, dst_tid):
            continue
        if pid in qemu_pids:
            side = "src" if pid == pid_of(src_tid) else "dst"
            qemu[f"{side}/{comm}"] = qemu.get(f"{side}/{comm}", 0.0) + secs
        elif pid == server_pid:
            server[comm] = server.get(comm, 0.0) + secs
        else:
            others[comm] = others.get(comm, 0.0) + secs

    def top(d):
        items = sorted(d.items(), key=lambda kv: -kv[1])[:4]
        return ",".join(f"{k}:{v * 1e3:.2f}" for k, v in items) or "-"

    return (f"ms={(w.end - w.start) * 1e3:.2f} src={fmt(src_tid)} dst={fmt(dst_tid)}"
            f" qemu={sum(qemu.values()) * 1e3:.2f} [{top(qemu)}]"
            f" server={sum(server.values()) * 1e3:.2f} [{top(server)}]"
            f" others={sum(others.values()) * 1e3:.2f} [{top(others)}]")


def summary(path):
    groups = {}
    for server, fields in series_fields(path, "SCHED devices"):
        try:
            src = [float(x) for x in fields["src"].split("/")]
            dst = [float(x) for x in fields["dst"].split("/")]
            row = {"ms": float(fields["ms"]), "src-run": src[0], "src-wait": src[1],
                   "src-sleep": src[2], "dst-run": dst[0], "dst-wait": dst[1],
                   "server": float(fields["server"]), "others": float(fields["others"])}
        except (KeyError, ValueError, IndexError):
            continue
        groups.setdefault(server, []).append(row)
    for server, rows in groups.items():
        cols = " ".join(f"{k}={median(r[k] for r in rows):.2f}" for k in rows[0])
        print(f"MIGRATE-SCHED {server}: n={len(rows)} devices+flush {cols} (medians, ms)")


def main():
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    src_trace, dst_trace, data, offset, server_pid = sys.argv[1:6]
    offset, server_pid = float(offset), int(server_pid)
    src, dst = checkpoints(src_trace), checkpoints(dst_trace)
    need = ("src-downtime-start", "src-iterable-saved", "src-downtime-end")
    if not all(k in src for k in need):
        print("SCHED no downtime checkpoints in the source trace")
        return
    src_tid = src["src-downtime-start"][0]
    dst_tid = next(iter(dst.values()))[0] if dst else -1

    def mono(name):
        return src[name][1] - offset

    devices = Window(mono("src-iterable-saved"), mono("src-downtime-end"), (src_tid, dst_tid))
    whole = Window(mono("src-downtime-start"), mono("src-downtime-end"), (src_tid, dst_tid))
    names = analyse(perf_events(data), [devices, whole], (src_tid, dst_tid))
    # The QEMUs' other threads (vCPUs, RCU, I/O) are theirs, not others'.
    qemu_pids = {names.get(src_tid, ("", None))[1], names.get(dst_tid, ("", None))[1]}
    qemu_pids.discard(None)
    print("SCHED devices " + describe(devices, names, src_tid, dst_tid, server_pid, qemu_pids))
    print("SCHED downtime " + describe(whole, names, src_tid, dst_tid, server_pid, qemu_pids))


if __name__ == "__main__":
    main()

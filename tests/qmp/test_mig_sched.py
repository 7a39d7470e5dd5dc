"""qemu-scripts/mig_sched.py: who had the CPUs in a migration's downtime, from scheduler
events (migrate.sh MIG_SCHED=1 relies on it)."""
import importlib.util
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "qemu-scripts" / "mig_sched.py"
spec = importlib.util.spec_from_file_location("mig_sched", SCRIPT)
mig_sched = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mig_sched)

SRC, DST, SERVER, OTHER = 100, 200, 400, 300


def switch(t, cpu, prev, prev_pid, state, nxt, nxt_comm="x"):
    """A sched_switch as `perf script` prints it (the sample's pid/tid are the prev task)."""
    comm = {SRC: "qemu-system-x86", DST: "qemu-system-x86", SERVER: "vring_worker",
            OTHER: "opt cgu.0", 0: "swapper/0"}
    return (f" {prev_pid}/{prev}  [{cpu:03d}] {t:.9f}: sched:sched_switch: prev_comm={comm[prev]}"
            f" prev_pid={prev} prev_prio=120 prev_state={state} ==> next_comm={comm.get(nxt, nxt_comm)}"
            f" next_pid={nxt} next_prio=120")


def wakeup(t, cpu, tid):
    return (f" 0/0  [{cpu:03d}] {t:.9f}: sched:sched_wakeup: comm=qemu-system-x86 pid={tid}"
            f" prio=120 target_cpu={cpu:03d}")


# Window [0.5, 3.5] s. The source thread runs, is preempted by the server's worker, runs,
# sleeps (on the socket), is woken, waits for a CPU, runs; another process has cpu1 all along.
SCRIPT_TEXT = "\n".join([
    switch(0.0, 0, 0, 0, "R", SRC),
    switch(0.0, 1, 0, 0, "R", OTHER),
    switch(1.0, 0, SRC, 10, "R", SERVER),
    switch(1.5, 0, SERVER, 40, "S", SRC),
    switch(2.0, 0, SRC, 10, "S", 0),
    wakeup(2.5, 0, SRC),
    switch(3.0, 0, 0, 0, "R", SRC),
    switch(4.0, 0, SRC, 10, "S", 0),
    switch(4.0, 1, OTHER, 300, "S", 0),
])


def test_the_window_splits_the_source_threads_time_and_names_who_else_ran():
    evs = list(mig_sched.parse_perf_script(SCRIPT_TEXT))
    assert len(evs) == 9
    w = mig_sched.Window(0.5, 3.5, (SRC, DST))
    names = mig_sched.analyse(evs, [w], (SRC, DST))
    s = w.states[SRC]
    assert abs(s["run"] - 1.5) < 1e-6, s
    assert abs(s["wait"] - 1.0) < 1e-6, s
    assert abs(s["sleep"] - 0.5) < 1e-6, s
    line = mig_sched.describe(w, names, SRC, DST, 40, {10})
    fields = line.split()
    for f in ["ms=3000.00", "src=1500.00/1000.00/500.00", "server=500.00",
              "[vring_worker:500.00]", "others=3000.00", "[opt"]:
        assert f in fields, (f, line)


def test_summary_gives_medians_per_server(tmp_path):
    row = ("SCHED devices ms={ms} src=1.30/{w}/0.00 dst=0.40/0.20/1.00 qemu=0.00 [-]"
           " server={s} [-] others=1.00 [-]\n")
    text = ("series thinblk-1\n" + row.format(ms=2, w=0.5, s=0.0) + row.format(ms=4, w=2.5, s=0.1)
            + row.format(ms=3, w=1.5, s=0.0) + "SCHED downtime ms=9 src=1/1/1\n"
            + "series qsd-1\n" + row.format(ms=1.5, w=0.1, s=0.0))
    (tmp_path / "s.txt").write_text(text)
    out = subprocess.run([sys.executable, str(SCRIPT), "--summary", str(tmp_path / "s.txt")],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("MIGRATE-SCHED thinblk: n=3 devices+flush ms=3.00 "), out
    assert "src-wait=1.50" in out[0].split() and "server=0.00" in out[0].split(), out
    assert out[1].startswith("MIGRATE-SCHED qsd: n=1 "), out

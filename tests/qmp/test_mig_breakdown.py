"""qemu-scripts/mig_breakdown.py: the split of one migration's downtime from QEMU's trace,
and the medians per server (migrate.sh MIG_TRACE=1 relies on both)."""
import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "qemu-scripts" / "mig_breakdown.py"

SOURCE = """\
9@100.000000:migrate_transferred transferred 1 time_spent 100 bandwidth 400 switchover_bw 0 max_size 120000000
9@100.010000:migration_thread_low_pending 50000000
9@100.020000:vmstate_downtime_checkpoint src-downtime-start
9@100.020100:vhost_user_write req:18 flags:0x9
9@100.020300:vhost_user_read req:18 flags:0x5
9@100.020400:vhost_user_write req:11 flags:0x1
9@100.024400:vhost_user_read req:11 flags:0x5
9@100.025000:vmstate_downtime_checkpoint src-vm-stopped
9@100.025100:migration_bitmap_sync_end dirty_pages 42
9@100.065000:vmstate_downtime_checkpoint src-iterable-saved
9@100.066000:vmstate_downtime_save type=non-iterable idstr=0000:00:02.0/vhost-user-blk instance_id=0 downtime=1000
9@100.067000:vmstate_downtime_checkpoint src-non-iterable-saved
9@100.067500:vmstate_downtime_checkpoint src-downtime-end
"""
DEST = "8@100.070000:vmstate_downtime_checkpoint dst-precopy-bh-vm-started\n"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=True,
                          capture_output=True, text=True).stdout


def test_one_migration_is_split_into_stop_ram_devices_and_resume(tmp_path):
    (tmp_path / "src.trace").write_text(SOURCE)
    (tmp_path / "dst.trace").write_text(DEST)
    info = {"downtime": 48, "setup-time": 1, "total-time": 900,
            "ram": {"dirty-sync-count": 3, "downtime-bytes": 20000000}}
    (tmp_path / "info.json").write_text(json.dumps(info))
    line = run(str(tmp_path / "src.trace"), str(tmp_path / "dst.trace"), str(tmp_path / "info.json"))
    for field in ["downtime=48", "stop=5.0", "vhost=18:0.20,11:4.00", "final-dirty=42",
                  "ram=40.0", "devices=2.0", "end=0.5", "resumed=50.0",
                  "pending-at-stop=50.0MB", "threshold=120.0MB"]:
        assert field in line.split(), (field, line)


def test_summary_gives_medians_per_server_and_skips_lines_before_a_series(tmp_path):
    row = ("BREAKDOWN downtime={d} stop=1.0 vhost=- final-dirty=0 ram={r} devices={v} (slowest x 1.0)"
           " end={e} resumed={d} sync-count=3 downtime-bytes=1000000\n")
    text = (row.format(d=999, r=990, v=0.5, e=0.0)
            + "series thinblk-1\n" + row.format(d=5, r=2, v=2.0, e=0.0)
            + row.format(d=9, r=6, v=1.5, e=4.0) + row.format(d=7, r=4, v=3.0, e=0.0)
            + "series qsd-1\n" + row.format(d=4, r=1, v=2.0, e=0.0))
    (tmp_path / "b.txt").write_text(text)
    out = run("--summary", str(tmp_path / "b.txt")).splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("MIGRATE-BREAKDOWN thinblk: n=3 downtime=7 "), out
    assert out[1].startswith("MIGRATE-BREAKDOWN qsd: n=1 downtime=4 "), out
    # The median of each migration's devices + flush (2.0, 3.0, 5.5), not the sum of the two
    # medians (2.0 + 0.0).
    assert "devices+flush=3.0" in out[0].split(), out
    # The floor: the least of each, not their medians.
    assert out[0].endswith("floor: downtime=5 devices+flush=2.0 (minimums, ms)"), out

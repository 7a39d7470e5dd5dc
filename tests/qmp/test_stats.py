"""Statistics, limits, metrics and pool growth driven by QEMU's own QMP client (qemu.qmp)
and scraped by Python's HTTP client.

Run by scripts/test.sh after `cargo build --release`; THINBLK names the binary.
"""
import os
import tempfile
import urllib.request

import pytest
from qemu.qmp import ExecuteError

from support import connected, free_port, run, serve


@pytest.fixture
def pool():
    with tempfile.TemporaryDirectory() as d:
        ctl = os.path.join(d, "control.sock")
        sock = os.path.join(d, "d.sock")
        port = free_port()
        args = ["--dir", os.path.join(d, "pool"), "--data-size", "16M", "--metadata-size", "4M",
                "--control", ctl, "--metrics", f"127.0.0.1:{port}",
                "--export", f"name=d,size=64M,socket={sock}"]
        with serve(args, [ctl, sock]):
            yield {"dir": d, "ctl": ctl, "sock": sock, "port": port}


def test_pool_resize_grows_both_devices_and_refuses_to_shrink(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        before = await qmp.execute("query-pool")
        assert (before["data-blocks"], before["metadata-blocks"]) == (256, 1024)
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("pool-resize", {"data-size": 8 << 20})
        assert "cannot shrink" in str(e.value)
        r = await qmp.execute("pool-resize", {"data-size": 64 << 20, "metadata-size": 8 << 20})
        assert r == {"data-blocks": 1024, "metadata-blocks": 2048}
        after = await qmp.execute("query-pool")
        assert (after["data-blocks"], after["metadata-blocks"]) == (1024, 2048)
        assert after["data-free-blocks"] == 1024
        data = os.path.join(pool["dir"], "pool", "data")
        assert os.path.getsize(data) == 64 << 20
        # Grown underneath (as lvextend grows a block device): no size re-reads it.
        os.truncate(data, 96 << 20)
        r = await qmp.execute("pool-resize")
        assert r["data-blocks"] == 1536
        assert (await qmp.execute("query-pool"))["data-free-blocks"] == 1536
        await qmp.disconnect()

    run(go())


def test_blockstats_histograms_and_throttle_answer_in_qemus_shapes(pool):
    async def go():
        qmp = await connected(pool["ctl"])
        [entry] = await qmp.execute("query-blockstats")
        assert entry["device"] == "d" and entry["node-name"] == "d"
        stats = entry["stats"]
        for key in ["rd_bytes", "wr_operations", "flush_total_time_ns", "invalid_rd_operations",
                    "failed_unmap_operations", "wr_highest_offset", "timed_stats"]:
            assert key in stats, key
        await qmp.execute("block-latency-histogram-set", {"id": "d", "boundaries": [10, 1000]})
        [entry] = await qmp.execute("query-blockstats")
        assert entry["stats"]["rd_latency_histogram"] == {"boundaries": [10, 1000], "bins": [0, 0, 0]}
        limits = {"id": "d", "bps": 0, "bps_rd": 0, "bps_wr": 1 << 20, "iops": 0, "iops_rd": 100,
                  "iops_wr": 0, "iops_rd_max": 200, "iops_rd_max_length": 2, "group": "tenants"}
        assert await qmp.execute("block-set-io-throttle", limits) == {}
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("block-set-io-throttle", dict(limits, iops=5))
        assert "same time" in str(e.value)
        await qmp.disconnect()

    run(go())


def test_metrics_are_scraped_over_http(pool):
    url = f"http://127.0.0.1:{pool['port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        body = r.read().decode()
    assert 'thinblk_export_operations_total{export="d",node="d",op="read"} 0' in body
    assert "thinblk_pool_data_blocks 256" in body
    assert 'thinblk_pool_mode{mode="write"} 1' in body

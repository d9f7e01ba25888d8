"""The benchmark runs end to end (scripts/bench.py --quick) and reports every figure.

It asserts that the benchmark works, not how fast zeromesh is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "scripts", "bench.py")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_bench_quick_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--silent", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)   # the benchmark ends its manager and executor on SIGTERM
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        raise
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    res = json.loads(out.read_text())

    for n in ("1", "2"):
        t = res["throughput"][n]
        for key in ("tasks_per_s", "limit_tasks_per_s", "ratio"):
            assert _positive(t[key]), (n, key, t)
        assert _positive(res["manager"][f"cpu_s_per_10k_tasks_{n}"]), res["manager"]
        assert res["runs"]["throughput"][n]["zeromesh"][0]["warmup"]["instances"] >= int(n)
    for label in ("0 B", "100 KiB", "10 MiB"):
        lat = res["latency"][label]
        for key in ("p50_us", "p99_us", "limit_p50_us", "limit_p99_us", "ratio_p50", "ratio_p99"):
            assert _positive(lat[key]), (label, key, lat)
        assert lat["p99_us"] >= lat["p50_us"]
    m = res["manager"]
    assert _positive(m["cpu_s_per_10k_tasks"])
    assert _positive(m["rss_bytes_per_queued_task"]), m
    assert m["queued_memory"]["cancelled"] == m["queued_memory"]["queued"]  # closing cancelled every queued task
    f = m["finished_memory"]
    assert f["counts"][1] > f["counts"][0] > 0 and _positive(f["rss_first"]) and _positive(f["rss_second"]), f
    assert isinstance(m["rss_bytes_per_finished_task"], (int, float)), m   # may be 0 or slightly negative
    p = res["payload_10mib"]
    for key in ("mb_per_s", "limit_mb_per_s", "ratio"):
        assert _positive(p[key]), (key, p)
    for label in ("same app", "second app", "control: other mesh"):
        fair = res["fairness"][label]
        for key in ("idle_p50_us", "idle_p99_us", "during_p50_us", "during_p99_us", "ratio_p50", "ratio_p99",
                    "burst_s"):
            assert _positive(fair[key]), (label, key, fair)
        assert fair["samples_during"] >= 1 and fair["burst"] > 0, fair
    assert _positive(res["total_seconds"])
    assert "throughput no-op" in text   # the table was printed

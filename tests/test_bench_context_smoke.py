"""The context benchmark runs end to end (scripts/bench_context.py --quick) and reports every figure.

It asserts that the benchmark works and that a one-op patch ships a patch,
not the document (>= 100x fewer bytes than replacing a 10 MiB context); it
asserts no speed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "scripts", "bench_context.py")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_bench_context_quick_reports_patch_vs_replace_and_lag(tmp_path):
    out = tmp_path / "bench_context.json"
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--silent", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        stdout, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)   # the benchmark ends its manager and executors on SIGTERM
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        raise
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    res = json.loads(out.read_text())

    c = res["client"]
    for kind in ("patch", "replace"):
        for key in ("count", "p50_us", "p99_us", "bytes_per_write", "wire_bytes_per_write", "encoded_bytes"):
            assert _positive(c[kind][key]), (kind, key, c[kind])
    # The behaviour users rely on: a one-op patch to a 10 MiB context does not ship the context.
    assert c["patch"]["bytes_per_write"] * 100 <= c["replace"]["bytes_per_write"], c
    assert c["replace"]["bytes_per_write"] >= 10 * 1024 * 1024, c["replace"]
    assert _positive(c["ratio"]["bytes"]) and _positive(c["ratio"]["time_p50"]), c["ratio"]

    i = res["instance"]
    for kind in ("patch", "update"):
        for key in ("count", "p50_us", "p99_us", "invoke_p50_us", "bytes_per_write"):
            assert _positive(i[kind][key]), (kind, key, i[kind])
        # update_context ships the difference (one op), not the 10 MiB document
        assert i[kind]["bytes_per_write"] < 1024, i[kind]

    lag = res["lag"]
    assert len(lag["per_executor"]) == 2, lag["per_executor"]
    for eid, r in lag["per_executor"].items():
        assert _positive(r["count"]) and _positive(r["p50_us"]) and _positive(r["p99_us"]), (eid, r)
        assert r["p99_us"] >= r["p50_us"]
    assert _positive(lag["overall"]["p50_us"]) and lag["overall"]["p99_us"] >= lag["overall"]["p50_us"]
    assert _positive(res["total_seconds"])
    assert "client write p50" in text   # the table was printed

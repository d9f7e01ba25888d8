"""The benchmarks run end to end (scripts/bench.py, bench_context.py, bench_hotpath.py, bench_flood.py,
bench_runner.py, bench_flows.py, bench_functions.py and bench_streaming.py, small or --quick) and report every figure.  They assert that the benchmarks
work, not how fast zeromesh is; the one behaviour checked is that a one-op patch to a 10 MiB context ships a patch
(>= 100x fewer bytes than replacing it)."""
from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _run(script: str, out: object, timeout: float, args: Sequence[str] = ("--quick", "--silent")) -> str:
    """Run a benchmark script with ``args`` (default: --quick mode), its figures to ``out`` (--json); end it by
    PID if it overruns; its output (stdout and stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, script), *args, "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)   # the benchmarks end their managers, executors and children on SIGTERM
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        raise
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def test_bench_quick_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    text = _run("bench.py", out, 120)
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


def test_bench_context_quick_reports_patch_vs_replace_and_lag(tmp_path):
    out = tmp_path / "bench_context.json"
    text = _run("bench_context.py", out, 180)
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


def test_bench_hotpath_quick_reports_ratios_against_the_limit(tmp_path):
    out = tmp_path / "hot.json"
    text = _run("bench_hotpath.py", out, 120)
    res = json.loads(out.read_text())
    [run] = res["runs"]
    for key in ("tasks_per_s", "limit_tasks_per_s", "throughput_ratio", "p50_us", "limit_p50_us", "p50_ratio"):
        assert _positive(run[key]), (key, run)
    assert run["throughput_ratio"] == pytest.approx(run["tasks_per_s"] / run["limit_tasks_per_s"], abs=0.002)
    assert "throughput_ratio" in text and "min / median / max" in text


def test_bench_flood_small_reports_evictions_and_the_other_clients_latency(tmp_path):
    out = tmp_path / "flood.json"
    text = _run("bench_flood.py", out, 60, ("--tasks", "2000", "--idle", "50", "--max-seconds", "20", "--silent"))
    res = json.loads(out.read_text())

    f = res["flood"]
    assert f["answered"] == f["sent"] == 2000 and f["errors"] == 0 and not f["timed_out"], f
    assert _positive(f["tasks_per_s"]) and _positive(f["seconds"]), f
    m = res["mesh"]
    for key in ("evictions", "executor_reconnects", "executor_processes_exited", "instance_restarts",
                "instance_deaths", "instance_pids_new", "store_pauses", "max_store_backlog", "poll_failures"):
        assert isinstance(m[key], int) and m[key] >= 0, (key, m)
    assert m["instance_pids_at_start"] == res["warmup"]["instances"] == 4, (m, res["warmup"])  # 2 x 2 slots
    assert m["polls"] >= 1, m
    for key in ("idle_p50_us", "idle_p99_us", "flood_p50_us", "flood_p99_us", "p99_ratio"):
        assert _positive(res[key]), (key, res)
    assert res["idle_p99_us"] >= res["idle_p50_us"] and res["flood_p99_us"] >= res["flood_p50_us"], res
    assert res["probe"]["idle"]["count"] == 50 and res["probe"]["flood"]["count"] >= 1, res["probe"]
    assert res["p99_ratio"] == round(res["flood_p99_us"] / res["idle_p99_us"], 2)
    assert set(res["goals"]) == {"no_eviction", "p99_within_5x"}, res["goals"]
    assert res["settings"]["heartbeat_interval"] == 1.0 and res["settings"]["liveness"] == 3  # default timers
    assert "goal 1, no executor evicted" in text and "flood p99 / idle p99" in text


def test_bench_runner_quick_reports_runner_registered_ratios_and_ray_missing(tmp_path):
    """Ray is not needed: the Ray child is pointed at a module that does not exist, which must
    come back as "not installed" with no figures (the path a machine without Ray takes)."""
    out = tmp_path / "runner.json"
    text = _run("bench_runner.py", out, 40, ("--quick", "--calls", "200", "--latency", "20", "--silent",
                                             "--ray-module", "zeromesh_no_such_ray"))
    res = json.loads(out.read_text())

    [run] = res["runs"]
    for key in ("runner_cold_s", "registered_cold_s", "cold_ratio", "counter_cold_s",
                "runner_p50_us", "runner_p99_us", "registered_p50_us", "registered_p99_us", "p50_ratio",
                "runner_tasks_per_s", "registered_tasks_per_s", "throughput_ratio",
                "counter_p50_us", "counter_p99_us", "counter_p50_ratio", "counter_tasks_per_s",
                "counter_throughput_ratio"):
        assert _positive(run[key]), (key, run)
    assert run["cold_ratio"] == pytest.approx(run["runner_cold_s"] / run["registered_cold_s"], abs=0.002)
    assert run["throughput_ratio"] == pytest.approx(run["runner_tasks_per_s"] / run["registered_tasks_per_s"], abs=0.002)
    assert run["runner_p99_us"] >= run["runner_p50_us"] and run["counter_p99_us"] >= run["counter_p50_us"]
    assert run["runner_cold_s"] >= run["runner_first_call_s"] > 0, run   # the parts fit in the whole
    assert run["counter_in_order"] is True   # the object service applied its calls in order
    assert run["latency_samples"] == {"runner": 20, "registered": 20, "counter": 20}, run["latency_samples"]
    assert res["summary"]["throughput_ratio"]["median"] == run["throughput_ratio"]
    assert res["ray"]["available"] is False and res["ray"]["reason"].startswith("not installed"), res["ray"]
    assert "runs" not in res["ray"] and res["vs_ray"] == {}   # no figure made up for a missing peer
    assert "ray: not installed" in text and "min" in text and "median" in text


def test_bench_flows_quick_reports_flow_plain_ratio_and_dask_missing(tmp_path):
    """Dask is not needed: its child is pointed at a module that does not exist, which must come
    back as "not installed" with no figures (the path a machine without Dask takes)."""
    out = tmp_path / "flows.json"
    text = _run("bench_flows.py", out, 60, ("--quick", "--silent", "--dask-module", "zeromesh_no_such_dask"))
    res = json.loads(out.read_text())

    assert res["settings"] == {"runs": 1, "tasks": 200, "executors": 2, "slots": 2, "cpus": os.cpu_count()}
    [run] = res["runs"]
    for key in ("flow_wall_s", "flow_per_task_us", "flow_first_start_s", "flow_last_end_s", "flow_bodies_s",
                "plain_wall_s", "plain_per_task_us", "flow_plain_ratio"):
        assert _positive(run[key]), (key, run)
    assert run["flow_plain_ratio"] == pytest.approx(run["flow_wall_s"] / run["plain_wall_s"], abs=0.002)
    assert abs(run["flow_per_task_us"] - run["flow_wall_s"] * 1e6 / 202) < 1, run   # wall / (n + 2)
    assert run["flow_first_start_s"] < run["flow_last_end_s"] <= run["flow_wall_s"], run   # the bodies fit in the run
    assert run["flow_fan_in_s"] >= 0 and run["flow_executors"] >= 1, run
    assert res["summary"]["flow_plain_ratio"]["median"] == run["flow_plain_ratio"]
    assert res["dask"]["available"] is False and res["dask"]["reason"].startswith("not installed"), res["dask"]
    assert "runs" not in res["dask"] and res["flow_dask_ratio"] is None   # no figure made up for a missing peer
    assert "dask: not installed" in text and "flow / plain" in text


def test_bench_functions_quick_reports_fn_plain_ratios(tmp_path):
    out = tmp_path / "functions.json"
    text = _run("bench_functions.py", out, 90)
    res = json.loads(out.read_text())

    st = res["settings"]
    assert (st["runs"], st["executors"], st["slots"]) == (1, 2, 2), st
    [run] = res["runs"]
    for key in ("chain_msgs_per_s", "fan_msgs_per_s", "plain_tasks_per_s", "chain_plain_ratio", "fan_plain_ratio",
                "call_p50_us", "call_p99_us", "invoke_p50_us", "invoke_p99_us", "p50_ratio", "p99_ratio"):
        assert _positive(run[key]), (key, run)
    assert run["chain_messages"] == st["ids"] * 2 * st["hops"] and run["fan_messages"] == st["ids"] * st["fan"], run
    for kind in ("chain", "fan"):   # the ratio is of the unrounded figures: compare within rounding
        assert run[f"{kind}_plain_ratio"] == pytest.approx(run[f"{kind}_msgs_per_s"] / run["plain_tasks_per_s"],
                                                           abs=0.002)
    assert run["p50_ratio"] == pytest.approx(run["call_p50_us"] / run["invoke_p50_us"], abs=0.002)
    assert run["call_p99_us"] >= run["call_p50_us"] and run["invoke_p99_us"] >= run["invoke_p50_us"], run
    assert run["call_samples"] == run["invoke_samples"] == st["latency"], run
    assert run["fn_instances"] >= 1 and _positive(res["first_call_s"]), (run, res)
    assert res["summary"]["chain_plain_ratio"]["median"] == run["chain_plain_ratio"]
    assert "chain / plain throughput" in text and "call / invoke p50" in text


def test_bench_streaming_quick_reports_ratios_to_the_limit_and_ray_missing(tmp_path):
    """Ray is not needed: its child is pointed at a module that does not exist, which must come
    back as "not installed" with no figures (the path a machine without Ray takes)."""
    out = tmp_path / "streaming.json"
    text = _run("bench_streaming.py", out, 90, ("--quick", "--silent", "--ray-module", "zeromesh_no_such_ray"))
    res = json.loads(out.read_text())

    st = res["settings"]
    assert (st["runs"], st["executors"], st["slots"]) == (1, 2, 2), st
    [run] = res["runs"]
    for key in ("stream_parts_per_s", "limit_parts_per_s", "parts_ratio", "first_part_p50_us",
                "limit_first_p50_us", "first_part_ratio", "aio_tasks_per_s", "limit_tasks_per_s",
                "aio_throughput_ratio", "aio_p50_us", "limit_p50_us", "aio_p50_ratio"):
        assert _positive(run[key]), (key, run)
    assert run["parts_ratio"] == pytest.approx(run["stream_parts_per_s"] / run["limit_parts_per_s"], abs=0.002)
    assert run["first_part_ratio"] == pytest.approx(run["first_part_p50_us"] / run["limit_first_p50_us"], abs=0.002)
    assert run["aio_p50_ratio"] == pytest.approx(run["aio_p50_us"] / run["limit_p50_us"], abs=0.002)
    assert run["async_instances"] >= 2, run
    assert res["summary"]["parts_ratio"]["median"] == run["parts_ratio"]
    assert res["ray"]["available"] is False and res["ray"]["reason"].startswith("not installed"), res["ray"]
    assert "runs" not in res["ray"] and res["vs_ray"] == {}   # no figure made up for a missing peer
    assert "ray: not installed" in text and "parts_ratio" in text

"""The runnable examples keep running (each starts its own local mesh and stops it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("example,expected", [
    ("echo/run_local.py", ["invoke -> EchoResponse(text='HELLO', count=1)", "20 submitted tasks -> 20 results"]),
    ("streaming/run_local.py", ["stream> sends each task to an instance", "invoke -> 6 parts: [Token(text='sends'), "
                                "Token(text='each')] ... sends each task to an instance",
                                "broke off after 3 tokens: the instance yields",
                                "async stream> sends each task to an instance", "3 prompts streamed concurrently",
                                "'instance' -> the stream ends when the instance yields each token as they arrive",
                                "async invoke -> 6 parts", "mesh stopped"]),
    ("deadlines/run_local.py", ["ran longer than its timeout of 1s", "cancelled: task", "mesh stopped"]),
    ("runner/run_local.py", ["sum_func(1, 3) -> 4", "Calculator.multiply(2, 3) -> 6",
                             "Counter: add(10), add(get_count()) -> 20", "shapes.area(3, 2) -> 6", "mesh stopped"]),
    ("functions/run_local.py", ["call example/hello/world -> 'Hello world!'",
                                "AnotherHello -> 'an AnotherHello from ada'",
                                "int -> refused: example/typed takes Hello or AnotherHello, not int",
                                "from example/replier/some-id", "state of example/caller/c1: {'replies': 1}",
                                "example/delayed/me reminded: stretch", "coffee reminder cancelled",
                                "'greeting': 'Nice to see you at the 4-nth time alice!'",
                                "state of example/person/alice: {'visits': 4}",
                                "example/person   app=walkthrough", "mesh stopped"]),
])
def test_example_runs(example: str, expected: list, tmp_path) -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example)], capture_output=True, text=True,
                       timeout=180, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    for line in expected:
        assert line in r.stdout, r.stdout


def test_flows_example(tmp_path) -> None:
    """The flow of flows (raw, file and db mappings) on two executors: the scan's tasks overlap, the PNG is written."""
    pytest.importorskip("numpy")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "flows", "run_local.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ["(the same as pipeline.composition(): True)", "validated:", ": succeeded",
                 "simulate/collect     succeeded", "analyze/compare      succeeded",
                 "scan tasks overlapped:", "summary (raw mapping): 4 runs, fastest to settle zeta=0.4",
                 "zeta=0.05  settling time simulated", f"plot (file mapping): {out / 'oscillator_scan.png'}",
                 "mesh stopped"]:
        assert line in r.stdout, r.stdout
    assert "on 2 executors" in r.stdout, r.stdout
    assert (out / "oscillator_scan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

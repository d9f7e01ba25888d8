"""The runnable examples keep running (each starts its own local mesh and stops it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("example,expected", [
    ("echo/run_local.py", ["invoke -> EchoResponse(text='HELLO', count=1)", "20 submitted tasks -> 20 results"]),
    ("deadlines/run_local.py", ["ran longer than its timeout of 1s", "cancelled: task", "mesh stopped"]),
    ("runner/run_local.py", ["sum_func(1, 3) -> 4", "Calculator.multiply(2, 3) -> 6",
                             "Counter: add(10), add(get_count()) -> 20", "shapes.area(3, 2) -> 6", "mesh stopped"]),
])
def test_example_runs(example: str, expected: list, tmp_path) -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example)], capture_output=True, text=True,
                       timeout=180, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    for line in expected:
        assert line in r.stdout, r.stdout

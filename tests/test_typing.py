"""mypy over the public packages: the typed API stays typed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_is_clean_on_mesh_executor_client():
    pytest.importorskip("mypy", reason="mypy comes with the [test] extra")
    r = subprocess.run([sys.executable, "-m", "mypy", "mesh", "executor", "client", "--ignore-missing-imports",
                        "--no-error-summary", "--cache-dir", os.path.join(ROOT, ".mypy_cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

"""A fresh, non-editable install carries every module, and old import paths still work.

The README's first command is ``pip install .``: a subpackage missing from
setup.py would pass every other test (they run from the source tree) and break
a newcomer's first run.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "executor", "client")


def _modules() -> list:
    names = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_a_plain_install_carries_every_module(tmp_path: pathlib.Path) -> None:
    # Given a clean copy of the source (no build/ left by an earlier build) installed, not
    # editable, into an empty directory
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # When every module of the source tree is imported from there, outside the source tree
    script = ("import importlib, sys\n"
              f"for name in {_modules()!r}:\n"
              "    m = importlib.import_module(name)\n"
              f"    assert m.__file__.startswith({str(target)!r}), (name, m.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n" + script],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    # Then each one is there (and the typing markers with them)
    assert r.returncode == 0, r.stdout + r.stderr
    for pkg in PACKAGES:
        assert (target / pkg / "py.typed").exists()
    # and the Statefun protocol's .proto files the HTTP handler reads (executor/_statefun_proto.py)
    for name in ("request-reply.proto", "types.proto", "kafka-egress.proto", "kinesis-egress.proto", "LICENSE",
                 "NOTICE"):
        assert (target / "executor" / "protos" / name).exists(), name
    # and the dashboard's page, script, styles and vendored chart library with its licence (no CDN)
    for name in ("templates/page.html", "static/app.js", "static/style.css", "static/uPlot.iife.min.js",
                 "static/uPlot.min.css", "static/uPlot.LICENSE"):
        assert (target / "client" / "dashboard" / name).exists(), name


@pytest.mark.parametrize("old", sorted(importlib.import_module("mesh").MOVED))
def test_old_flat_import_paths_name_the_same_modules(old: str) -> None:
    import mesh
    new = importlib.import_module(f"mesh.{mesh.MOVED[old]}")
    assert importlib.import_module(f"mesh.{old}") is new

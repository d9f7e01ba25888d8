"""The runner's package: the working directory as one deterministic archive, and its unpacking.

:func:`build` archives a directory (sorted entries, zeroed times and owners, gzip without a
timestamp), so the same files give the same bytes and the same content hash: a second runner with
the same code ships the same key of content, and each executor unpacks it once.
:func:`unpack` is what the runner service does on an executor: unpack into a temporary directory
beside the target, then rename it into place, so a half-unpacked package is never seen and two
instances racing to unpack the same hash both end up using one complete directory.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from typing import Iterable, List, Sequence, Tuple

IGNORE_FILE = ".zmeshignore"
ALWAYS_EXCLUDED = (".git", "__pycache__", "*.pyc", "venv", ".venv", IGNORE_FILE)


def ignore_patterns(root: str, excludes: Sequence[str] = ()) -> List[str]:
    """The built-in patterns, the lines of ``root/.zmeshignore`` (``#`` comments) and ``excludes``."""
    patterns = list(ALWAYS_EXCLUDED)
    path = os.path.join(root, IGNORE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            patterns += [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    patterns += list(excludes)
    return [p.rstrip("/") for p in patterns if p.rstrip("/")]


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    name = os.path.basename(rel)
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def files(root: str, excludes: Sequence[str] = ()) -> List[str]:
    """Paths (relative to ``root``, sorted) that go into the package.  A directory holding
    ``pyvenv.cfg`` is a virtual environment and is left out whatever its name."""
    patterns = ignore_patterns(root, excludes)
    out: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for d in sorted(dirnames):
            rel = os.path.normpath(os.path.join(rel_dir, d))
            full = os.path.join(dirpath, d)
            if _excluded(rel, patterns) or os.path.islink(full) or os.path.exists(os.path.join(full, "pyvenv.cfg")):
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, f))
            full = os.path.join(dirpath, f)
            if not _excluded(rel, patterns) and os.path.isfile(full):
                out.append(rel)
    return sorted(out)


def build(root: str, excludes: Sequence[str] = ()) -> Tuple[bytes, str]:
    """``(archive bytes, sha256 hex of them)`` for the files of ``root`` (see :func:`files`)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files(root, excludes):
            full = os.path.join(root, rel)
            info = tarfile.TarInfo(rel.replace(os.sep, "/"))
            info.size = os.path.getsize(full)
            info.mode = 0o755 if os.access(full, os.X_OK) else 0o644
            info.mtime = 0
            with open(full, "rb") as fh:
                tar.addfile(info, fh)
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    data = packed.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def unpack(data: bytes, digest: str, base: str) -> str:
    """The directory ``base/<digest>`` holding the archive ``data``, unpacked now unless it is there.

    Checks ``data`` against ``digest`` and refuses members that would land outside the directory."""
    final = os.path.join(base, digest)
    if os.path.isdir(final):
        return final
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"the runner package does not match its hash {digest}")
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=base)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.normpath(os.path.join(tmp, m.name))
                if not m.isfile() or os.path.isabs(m.name) or not target.startswith(tmp + os.sep):
                    raise ValueError(f"the runner package holds an unsafe entry: {m.name!r}")
            for m in members:
                target = os.path.join(tmp, m.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(target, m.mode & 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):   # not a lost race: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- dependencies ----------------------------------------------------------------------------------

DEPS_TIMEOUT = 1800.0   # seconds one pip install of a runner's dependencies may take


def dependencies_key(deps: Sequence[str]) -> str:
    """The name of a dependency set's directory: its requirements (sorted) and this Python's version."""
    import sys
    text = "\n".join(sorted(deps)) + f"\npython {sys.version_info[0]}.{sys.version_info[1]}"
    return "deps-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def install(deps: Sequence[str], root: str) -> str:
    """Install ``deps`` (pip requirement strings, paths or wheel files) once per machine and set into
    ``root/deps-<hash>`` and return that directory, to go first on ``sys.path``.

    pip installs into a temporary directory beside it (``--target``: a site directory of its own, no
    interpreter copy, so a service starts in milliseconds), which is then renamed into place: a
    half-installed set is never used, and instances racing on the same set share one.  pip reads its
    usual configuration from the environment, so an offline machine points it at a wheel directory
    or a local index (``PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels``, or ``PIP_INDEX_URL``) in the
    executor's environment.  A failed install raises RuntimeError with pip's last lines."""
    import subprocess
    import sys
    path = os.path.join(root, dependencies_key(deps))
    if os.path.isdir(path):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".deps-", dir=root)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-input", "--target", tmp, *deps], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=DEPS_TIMEOUT)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"installing the runner's dependencies {list(deps)} failed (pip exit "
                               f"{proc.returncode}):\n{tail}")
        try:
            os.rename(tmp, path)
        except OSError:   # another instance installed the same set first: use theirs
            if not os.path.isdir(path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path

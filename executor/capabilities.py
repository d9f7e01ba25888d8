"""What this executor host offers, reported to the manager at registration.

The manager places instances by comparing an app's ``resreq`` and ``labels``
with these numbers, so detection favours what this *process* may use (CPU
affinity, CUDA_VISIBLE_DEVICES) over raw machine totals.  Everything is
best-effort and never raises: a host that cannot be probed still registers,
just with conservative values.  The result is a plain msgpack-able dict.
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import socket
import subprocess
import sys
from typing import Any, Dict, List

NVIDIA_SMI_TIMEOUT = 2.0


def _cpu_count() -> int:
    # Affinity reflects taskset/cgroup cpusets; cpu_count() is the whole box.
    try:
        return max(1, len(os.sched_getaffinity(0)))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # CUDA stops enumerating at the first invalid entry ("-1" hides all).
        count = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-") or entry == "NoDevFiles":
                break
            count += 1
        return count
    return len(glob.glob("/dev/nvidia[0-9]*"))


def _gpu_names() -> List[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=True,
        ).stdout
    except Exception:  # timeout, driver missing, odd output: names are cosmetic
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def detect(slots: int, labels: Dict[str, Any]) -> Dict[str, Any]:
    """Probe the host; ``slots`` and ``labels`` are echoed from configuration."""
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_count(),
        "memory": _memory_bytes(),
        "gpu": _gpu_count(),
        "gpu_names": _gpu_names(),
        "labels": dict(labels or {}),
        "slots": int(slots),
        "python": platform.python_version(),
        "platform": sys.platform,
        "pid": os.getpid(),
    }

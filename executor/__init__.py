"""zeromesh executor: the per-machine daemon and the service SDK (``Instance``)."""
from __future__ import annotations

from .instance import Instance

__all__ = ["Instance"]

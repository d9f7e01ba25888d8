"""zeromesh client: ``Session`` to run tasks, ``Client`` to manage the mesh."""
from __future__ import annotations

from .api import Client
from .connection import Connection
from .session import Session

__all__ = ["Client", "Connection", "Session"]

"""zeromesh client: ``Session`` to run tasks, ``Client`` to manage the mesh."""
from __future__ import annotations

from .aio import AsyncPartStream, AsyncSession   # the asyncio client
from .api import Client, FilterOperator
from .connection import Connection
from .functions import EgressRecord, Functions   # stateful functions: docs/functions.md
from .objects import ObjectRef, delete_object, get_object, patch_object, put_object, update_object
from .runner import ObjectFuture, Runner, SessionContext   # the runner: docs/runner.md
from .session import Session
from .streams import PartStream

__all__ = ["AsyncPartStream", "AsyncSession", "Client", "Connection", "EgressRecord", "FilterOperator", "Functions", "ObjectFuture", "ObjectRef", "PartStream", "Runner", "Session", "SessionContext",
           "delete_object", "get_object", "patch_object", "put_object", "update_object"]

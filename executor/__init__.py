"""zeromesh executor: the per-machine daemon and the service SDK (``Instance``)."""
from __future__ import annotations

from .functions import Address, Context, StatefulFunctions, TypedValue, ValueSpec
from .instance import Instance
from .statefun_http import AsyncRequestReplyHandler, RequestReplyHandler

__all__ = ["Address", "AsyncRequestReplyHandler", "Context", "Instance", "RequestReplyHandler", "StatefulFunctions",
           "TypedValue", "ValueSpec"]

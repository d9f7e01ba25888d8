"""zeromesh executor: the per-machine daemon and the service SDK (``Instance``)."""
from __future__ import annotations

from .functions import Address, Context, StatefulFunctions, TypedValue, ValueSpec
from .instance import Instance

__all__ = ["Address", "Context", "Instance", "StatefulFunctions", "TypedValue", "ValueSpec"]

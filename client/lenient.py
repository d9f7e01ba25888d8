"""Answers and results unpickled leniently: the CLI and ``Client.get_task`` run anywhere, also
where the service's own classes cannot be imported."""
from __future__ import annotations

import io
import pickle
from typing import Any


class _Unknown:
    """Stands in for a class of the service that this machine cannot import (its fields kept)."""


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unknown,), {"__module__": module})


def _lenient_loads(data: Any) -> Any:
    """An answer, unpickled even where the service's own classes are not importable (the CLI runs
    anywhere): such an object comes back as its fields."""
    return _LenientUnpickler(io.BytesIO(bytes(data))).load()

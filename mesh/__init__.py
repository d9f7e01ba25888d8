"""zeromesh's shared package: the session manager and everything peers share.

Layers (docs/architecture.md), imports flowing downwards::

    manager        the event loop (one ROUTER socket)  -> core, data.store, wire
    core/          the manager's decisions, sans-I/O    -> model, data (pure parts), wire.protocol
    wire/          records and codec; sockets
    model/         applications, sessions, tasks, principals
    data/          versioned documents, the store batch, SQLite
    ops/           settings, systemd, metrics, logs, keys
    errors         one error hierarchy (stable codes)
    testing        the public testing kit

Modules that lived flat in ``mesh/`` before the layers (``mesh.protocol``, ``mesh.config``,
...) still import under their old names, as the same module objects.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional, Sequence

# old flat name -> where the module lives now
MOVED = {
    "protocol": "wire.protocol", "transport": "wire.transport",
    "state": "model.records", "spec": "model.spec", "resources": "model.resources", "auth": "model.auth",
    "scheduler": "core.scheduler", "query": "core.query",
    "store": "data.store", "batch": "data.batch", "patch": "data.patch", "replica": "data.replica",
    "context": "data.context", "objects": "data.objects", "cache": "data.cache",
    "config": "ops.config", "settings_file": "ops.settings_file", "sdnotify": "ops.sdnotify",
    "metrics": "ops.metrics", "log": "ops.log", "keys": "ops.keys", "process": "ops.process",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``mesh.<old>`` as the module at its new place (one object under both names)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        prefix, _, leaf = fullname.partition(".")
        if prefix != __name__ or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module: types.ModuleType) -> None:
        pass   # already executed under its new name


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.insert(0, _Alias())   # before path finders (an editable install could find an old copy)

"""A reader's copy of versioned objects: an LRU bounded by bytes.

Used twice with the same logic: by client processes (their own cache) and by
each executor (one cache shared by all instances on the machine, so a large
object crosses the network once per executor).  :meth:`ObjectCache.apply`
folds a ``get_object`` answer (``same`` / ``patches`` / ``full``, see
:mod:`mesh.objects`) into the cache.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, Optional

from . import patch
from .context import DOC
from .protocol import pack, unpack


class Entry:
    __slots__ = ("version", "kind", "value", "data", "size", "obj")

    def __init__(self, version: int, kind: str, value: Any, data: Optional[bytes], size: int) -> None:
        self.version = version
        self.kind = kind
        self.value = value      # the document, or the blob's bytes
        self.data = data        # encoded form when known (what a full answer sends on)
        self.size = size
        self.obj: Any = None    # a blob's unpickled object, filled by the client

    def encoded(self) -> bytes:
        if self.data is None:
            self.data = pack(self.value)
        return self.data


class ObjectCache:
    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.entries: "collections.OrderedDict[str, Entry]" = collections.OrderedDict()
        self.size = 0
        self.stats: Dict[str, int] = {"same": 0, "patches": 0, "full": 0, "bytes_in": 0, "evictions": 0}

    def version(self, key: str) -> int:
        e = self.entries.get(key)
        return e.version if e is not None else 0

    def get(self, key: str) -> Optional[Entry]:
        return self.entries.get(key)

    def apply(self, key: str, header: Dict[str, Any], data: Optional[bytes]) -> Entry:
        """Bring ``key`` to the answer's version.  A ``full`` answer must carry ``data``."""
        mode = header["mode"]
        entry = self.entries.get(key)
        if mode == "same" and entry is not None:
            self.stats["same"] += 1
        elif mode == "patches" and entry is not None and entry.kind == DOC:
            value = entry.value
            for ops in header["patches"]:
                value = patch.apply_patch(value, ops)
            self._drop(key)
            entry = Entry(header["version"], DOC, value, None, entry.size)
            self._add(key, entry)
            self.stats["patches"] += 1
        else:
            if data is None:
                raise ValueError(f"answer for {key!r} has no data and the cache cannot use {mode!r}")
            data = bytes(data)
            self._drop(key)
            value = unpack(data) if header["kind"] == DOC else data
            entry = Entry(header["version"], header["kind"], value, data, len(data))
            self._add(key, entry)
            self.stats["full"] += 1
            self.stats["bytes_in"] += len(data)
        self.entries.move_to_end(key)
        return entry

    def forget(self, key: str) -> None:
        self._drop(key)

    def _add(self, key: str, entry: Entry) -> None:
        self.entries[key] = entry
        self.size += entry.size
        while self.size > self.max_bytes and len(self.entries) > 1:
            old, e = self.entries.popitem(last=False)
            self.size -= e.size
            self.stats["evictions"] += 1

    def _drop(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.size -= e.size

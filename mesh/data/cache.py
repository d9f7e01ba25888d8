"""A reader's copy of versioned objects: replicas in an LRU bounded by bytes.

Used twice with the same logic: by client processes (their own cache) and by
each executor (one cache shared by all instances on the machine, so a large
object crosses the network once per executor).  Every entry is a
:class:`mesh.data.replica.Replica`, so an object's versions follow the same rules
as a session's context: patches apply only in version order, a duplicate or
stale answer is ignored, and a gap is answered by a whole snapshot.

:meth:`ObjectCache.apply` folds a ``get_object`` answer (see :mod:`mesh.data.objects`)
into the cache:

* ``same``     the reader's version is the newest: nothing to do.
* ``patches``  the writes after the reader's version, one per version, oldest
  first; they start at ``version - len(patches) + 1``.
* ``full``     the whole object, in the data frame.

When an answer does not bring the cache's copy up to date (the entry was
evicted or replaced meanwhile, or a patch does not apply), ``apply`` returns
None and the reader asks again for the whole object (``have=0``).
"""
from __future__ import annotations

import collections
from typing import Any, Dict, Optional

from mesh.data.replica import DOC, Replica
from mesh.errors import ProtocolError
from mesh.wire.protocol import Frame, pack

__all__ = ["Entry", "ObjectCache"]


class Entry(Replica):
    """One cached object.  ``obj`` is a blob's unpickled object, filled by the reader and
    dropped whenever the content changes, so it always matches ``version``."""

    __slots__ = ("obj", "charged")

    def __init__(self, kind: str = DOC, version: int = 0, value: Any = None, size_hint: int = 0) -> None:
        super().__init__(kind, version, value, size_hint)
        self.obj: Any = None
        self.charged = 0        # the bytes the cache counts for this entry

    @property
    def size(self) -> int:
        return self.size_hint

    def _changed(self) -> None:
        self.obj = None


class ObjectCache:
    """Objects by key, least recently used first; holds at most ``max_bytes`` (estimated,
    see :attr:`Replica.size_hint`) but always keeps the entry used last."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.entries: "collections.OrderedDict[str, Entry]" = collections.OrderedDict()
        self.size = 0
        self.stats: Dict[str, int] = {"same": 0, "patches": 0, "full": 0, "bytes_in": 0, "evictions": 0}

    def version(self, key: str) -> int:
        """The version to send as ``have``: 0 when the key is not cached."""
        e = self.entries.get(key)
        return e.version if e is not None else 0

    def get(self, key: str) -> Optional[Entry]:
        return self.entries.get(key)

    def apply(self, key: str, header: Dict[str, Any], data: Optional[Frame]) -> Optional[Entry]:
        """Bring ``key`` up to the answer's version; None when it cannot (ask again with ``have=0``).

        Raises ProtocolError for an answer of unknown mode or a ``full`` one without
        data, InvalidArgument for data that does not decode; the cache is then unchanged.
        """
        mode, version = header.get("mode"), header.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError(f"the answer for object {key!r} has no integer version", field="version")
        entry = self.entries.get(key)
        if mode == "full":
            if data is None:
                raise ProtocolError(f"the full answer for object {key!r} carries no data")
            data = bytes(data)   # a zmq.Frame from the socket; kept, so copied once here
            kind = header.get("kind")
            if not isinstance(kind, str):
                raise ProtocolError(f"the full answer for object {key!r} has no kind", field="kind")
            if entry is None:
                entry = Entry.from_wire(kind, data, version, keep_encoded=True)
                self.entries[key] = entry
            else:
                entry.restore(kind, version, data, keep_encoded=True)  # STALE: ours is as new
            self.stats["full"] += 1
            self.stats["bytes_in"] += len(data)
        elif mode == "same":
            if entry is None or entry.version < version:
                return None    # evicted or forgotten since the question
            self.stats["same"] += 1
        elif mode == "patches":
            if entry is None:
                return None
            patches = header.get("patches")
            if not isinstance(patches, list):
                raise ProtocolError(f"the patches answer for object {key!r} has no list of patches", field="patches")
            first = version - len(patches) + 1
            for i, ops in enumerate(patches):
                if entry.receive(first + i, ops, None, len(pack(ops))).needs_snapshot:
                    break
            if entry.version < version:   # a gap, or a patch that does not apply: what it holds stays
                self._charge(key, entry)
                return None
            self.stats["patches"] += 1
        else:
            raise ProtocolError(f"unknown get_object answer mode {mode!r}", field="mode")
        self._charge(key, entry)
        return entry

    def forget(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.size -= e.charged

    def _charge(self, key: str, entry: Entry) -> None:
        """Count the entry's size as it is now, mark it used last, evict from the oldest."""
        self.size += entry.size_hint - entry.charged
        entry.charged = entry.size_hint
        self.entries.move_to_end(key)
        while self.size > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.size -= old.charged
            self.stats["evictions"] += 1

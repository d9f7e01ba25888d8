"""The object cache's source of truth: versioned objects kept by the manager.

An object is a :class:`~mesh.data.context.Document` (a msgpack document that can be
patched, or an opaque blob replaced whole) with a key, an optional owning
session (deleted with it) and an optional time to live.  Its versions follow
the rules of :class:`mesh.data.replica.Replica`: the manager is the sequencer, and
every reader's cache (:mod:`mesh.data.cache`) is a replica.  Readers say which
version they hold; the answer is the cheapest that brings them up to date:
nothing (``same``), the writes since (``patches``: one op list per version,
oldest first, ending at ``version``), or the whole object (``full``).  This
module is pure state; the manager persists what it returns.
"""
from __future__ import annotations

import collections
import secrets
from typing import Any, Deque, Dict, List, Optional, Tuple

from mesh.data.context import DOC, KINDS, Document
from mesh.errors import InvalidArgument, NotFound

PATCH_HISTORY = 64  # recent patches kept per object, so a reader a few versions behind gets patches

Answer = Tuple[Dict[str, Any], Optional[bytes]]   # (reply header, data frame or None)


class StoredObject:
    __slots__ = ("key", "doc", "session", "expires_at", "recent")

    def __init__(self, key: str, doc: Document, session: Optional[str], expires_at: Optional[float]) -> None:
        self.key = key
        self.doc = doc
        self.session = session
        self.expires_at = expires_at
        # (version, ops) of the latest writes, one per version; ops None for a whole replacement
        self.recent: Deque[Tuple[int, Optional[List[Any]]]] = collections.deque(maxlen=PATCH_HISTORY)

    def since(self, have: int) -> Optional[List[List[Any]]]:
        """The op lists that bring version ``have`` to the newest, or None when the history
        does not reach back that far or a whole replacement lies between."""
        if not 0 < have < self.doc.version or not self.recent or self.recent[0][0] > have + 1:
            return None
        patches: List[List[Any]] = []
        for version, ops in self.recent:
            if version > have:
                if ops is None:
                    return None
                patches.append(ops)
        return patches

    def row(self) -> Tuple[str, Optional[str], Optional[float]]:
        return (self.key, self.session, self.expires_at)


class Objects:
    def __init__(self) -> None:
        self.items: Dict[str, StoredObject] = {}
        self.bytes_out = 0

    def _get(self, key: str) -> StoredObject:
        obj = self.items.get(key)
        if obj is None:
            raise NotFound(f"object {key!r} does not exist (deleted, expired, or its session closed)", key=key)
        return obj

    def put(self, kind: str, data: bytes, session: Optional[str], expires_at: Optional[float],
            key: Optional[str] = None) -> StoredObject:
        """A new object; ``key``: one drawn by a client (128 random bits or more), else drawn here."""
        if kind not in KINDS:
            raise InvalidArgument(f"object kind must be one of {KINDS}", argument="kind")
        key = key or secrets.token_hex(16)   # 128 bits: an unbound object's key is its capability
        obj = StoredObject(key, Document.from_wire(kind, data, 1, keep_encoded=True), session, expires_at)
        self.items[key] = obj
        return obj

    def load(self, key: str, doc: Document, session: Optional[str], expires_at: Optional[float]) -> None:
        self.items[key] = StoredObject(key, doc, session, expires_at)

    def get(self, key: str, have: int) -> Answer:
        """What a reader holding version ``have`` needs: (reply header, data frame or None)."""
        obj = self._get(key)
        doc = obj.doc
        head = {"key": key, "version": doc.version, "kind": doc.kind}
        if have == doc.version:
            return {**head, "mode": "same"}, None
        patches = obj.since(have)
        if patches is not None:
            return {**head, "mode": "patches", "patches": patches}, None
        data = doc.encoded()
        self.bytes_out += len(data)
        return {**head, "mode": "full"}, data

    def update(self, key: str, kind: str, data: bytes) -> StoredObject:
        obj = self._get(key)
        if kind not in KINDS:
            raise InvalidArgument(f"object kind must be one of {KINDS}", argument="kind")
        obj.recent.append((obj.doc.reset(kind, data, keep_encoded=True), None))
        return obj

    def patch(self, key: str, ops: List[Any]) -> StoredObject:
        obj = self._get(key)
        if obj.doc.kind != DOC:
            raise InvalidArgument(f"object {key!r} is opaque (a pickled object): update it whole", key=key)
        obj.doc.apply(ops, None)
        obj.recent.append((obj.doc.version, ops))
        return obj

    def delete(self, key: str) -> None:
        self._get(key)
        del self.items[key]

    def expired(self, now: float) -> List[str]:
        return [k for k, o in self.items.items() if o.expires_at is not None and o.expires_at <= now]

    def of_session(self, sid: str) -> List[str]:
        return [k for k, o in self.items.items() if o.session == sid]

"""A session's context: one versioned document, changed only by patches.

The manager is the sequencer (docs/context.md): every accepted write gets the
next version and is broadcast to the replicas in version order.  Two kinds:

* ``doc``  a msgpack-able document (see :func:`mesh.patch.is_document`);
  writes are JSON-patch ops, applied here atomically.  The manager decodes it
  with msgpack only: nothing is unpickled.
* ``blob`` an opaque cloudpickled object; writes replace it whole.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from . import patch
from .errors import InvalidArgument
from .protocol import pack, unpack

DOC = "doc"
BLOB = "blob"
KINDS = (DOC, BLOB)


class Document:
    __slots__ = ("kind", "version", "value", "_encoded")

    def __init__(self, kind: str = DOC, version: int = 0, value: Any = None) -> None:
        if kind not in KINDS:
            raise InvalidArgument(f"context kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.version = version
        self.value = value          # the document, or the blob's bytes
        self._encoded: Optional[bytes] = None

    @classmethod
    def from_wire(cls, kind: str, data: bytes, version: int = 0) -> "Document":
        if kind == DOC:
            try:
                value = unpack(data)
            except Exception as exc:
                raise InvalidArgument(f"context is not a valid msgpack document: {exc}") from None
            return cls(DOC, version, value)
        return cls(kind, version, bytes(data))

    def encoded(self) -> bytes:
        """The snapshot as sent to a joining replica; cached per version."""
        if self._encoded is None:
            self._encoded = pack(self.value) if self.kind == DOC else self.value
        return self._encoded

    def apply(self, ops: Optional[List[Any]], blob: Optional[bytes]) -> int:
        """Apply one write (ops, or a whole blob) atomically; returns the new version.

        Raises InvalidArgument for malformed ops or ops on a blob, Conflict when
        a ``test`` op fails.  On error the document is unchanged.
        """
        if ops is None:
            if blob is None:
                raise InvalidArgument("a context write needs ops or a blob")
            self.kind, self.value = BLOB, bytes(blob)
        elif self.kind == BLOB and _whole_replacement(ops):
            self.kind, self.value = DOC, patch.copy_document(ops[0]["value"])
        else:
            if self.kind != DOC:
                raise InvalidArgument("this session's context is an opaque object: replace it whole, it has no paths to patch")
            patch.validate_ops(ops)
            self.value = patch.apply_patch(self.value, ops)
        self.version += 1
        self._encoded = None
        return self.version

    def replay(self, entries: List[Tuple[int, Optional[bytes], Optional[bytes]]]) -> None:
        """Bring a snapshot up to date with the logged patches after it."""
        for version, ops, blob in entries:
            self.apply(unpack(ops) if ops is not None else None, blob)
            self.version = version


def _whole_replacement(ops: List[Any]) -> bool:
    """``[{"op": "replace", "path": "", "value": doc}]``: turns an opaque context back into a document."""
    return (len(ops) == 1 and isinstance(ops[0], dict) and ops[0].get("op") == "replace"
            and ops[0].get("path") == "" and "value" in ops[0])

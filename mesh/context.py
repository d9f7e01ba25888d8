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
from .errors import InvalidArgument, ResourceExhausted
from .protocol import pack, unpack

DOC = "doc"
BLOB = "blob"
KINDS = (DOC, BLOB)


class Document:
    __slots__ = ("kind", "version", "value", "_encoded", "size_hint")

    def __init__(self, kind: str = DOC, version: int = 0, value: Any = None, size_hint: int = 0) -> None:
        if kind not in KINDS:
            raise InvalidArgument(f"context kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.version = version
        self.value = value          # the document, or the blob's bytes
        self._encoded: Optional[bytes] = None
        self.size_hint = size_hint  # an upper bound of the encoded size, grown by each write's size

    @classmethod
    def from_wire(cls, kind: str, data: bytes, version: int = 0) -> "Document":
        if kind == DOC:
            try:
                value = unpack(data)
            except Exception as exc:
                raise InvalidArgument(f"context is not a valid msgpack document: {exc}") from None
            return cls(DOC, version, value, len(data))
        return cls(kind, version, bytes(data), len(data))

    def encoded(self) -> bytes:
        """The snapshot as sent to a joining replica; cached per version."""
        if self._encoded is None:
            self._encoded = pack(self.value) if self.kind == DOC else self.value
        return self._encoded

    def apply(self, ops: Optional[List[Any]], blob: Optional[bytes], max_size: Optional[int] = None,
              write_size: int = 0) -> int:
        """Apply one write (ops, or a whole blob) atomically; returns the new version.

        Raises InvalidArgument for malformed ops or ops on a blob, Conflict when
        a ``test`` op fails, ResourceExhausted when the result would exceed
        ``max_size`` encoded bytes.  On error the document is unchanged.
        """
        before = (self.kind, self.version, self.value, self._encoded, self.size_hint)
        version = self._apply(ops, blob)
        self.size_hint = len(blob) if blob is not None else self.size_hint + write_size
        if max_size is not None and self.size_hint > max_size:
            size = self.size_hint = len(self.encoded())   # the hint is an upper bound: measure first
            if size > max_size:
                self.kind, self.version, self.value, self._encoded, self.size_hint = before
                raise ResourceExhausted(f"this write would make the context {size} bytes; "
                                        f"max_context_size is {max_size}", limit="max_context_size", size=size)
        return version

    def _apply(self, ops: Optional[List[Any]], blob: Optional[bytes]) -> int:
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

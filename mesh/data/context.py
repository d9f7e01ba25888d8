"""A session's context as the manager holds it: the sequencer's copy of the replica.

The manager is the sequencer (docs/context.md): every accepted write gets the
next version and is broadcast to the replicas in version order.  The rules of
versions, order, gaps and errors are those of :class:`mesh.data.replica.Replica`;
a :class:`Document` adds what only the sequencer needs: a size limit checked
before a write is accepted, and the replay of the patch log after a restart.
The manager decodes a ``doc`` with msgpack only: nothing is unpickled.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from mesh.data.replica import BLOB, DOC, KINDS, Replica
from mesh.errors import Internal, ResourceExhausted
from mesh.wire.protocol import unpack

__all__ = ["BLOB", "DOC", "KINDS", "Document"]

LogEntry = Tuple[int, Optional[bytes], Optional[bytes]]   # (version, msgpack ops or None, blob or None)


class Document(Replica):
    __slots__ = ()

    def apply(self, ops: Optional[List[Any]], blob: Optional[bytes], max_size: Optional[int] = None,
              write_size: int = 0) -> int:
        """Apply one write (ops, or a whole blob) atomically; returns the new version.

        Raises InvalidArgument for malformed ops or ops on a blob, Conflict when
        a ``test`` op fails, ResourceExhausted when the result would exceed
        ``max_size`` encoded bytes.  On error the document is unchanged.
        ``write_size`` (the write's encoded size) grows the size estimate, so the
        whole document is measured only when the estimate passes ``max_size``,
        or when a ``copy`` op may have grown it by more than its own size.
        """
        before = (self.kind, self.version, self.value, self.size_hint, self._encoded)
        version = self.write(ops, blob, write_size)
        if max_size is not None and (self.size_hint > max_size or _copies(ops)):
            size = len(self.encoded())   # the estimate may be high (or, after a copy, low): measure
            if size > max_size:
                self.kind, self.version, self.value, self.size_hint, self._encoded = before
                raise ResourceExhausted(f"this write would make the context {size} bytes; "
                                        f"max_context_size is {max_size}", limit="max_context_size", size=size)
        return version

    def replay(self, entries: List[LogEntry]) -> None:
        """Bring a snapshot up to date with the patches logged after it, in version order.

        Entries the snapshot already holds are skipped.  A log that jumps a
        version, or a logged write that does not apply, raises Internal: the
        versions replicas saw would otherwise name different contents.
        """
        for version, ops, blob in entries:
            outcome = self.receive(version, unpack(ops) if ops is not None else None, blob,
                                   len(ops if ops is not None else blob or b""))
            if outcome.needs_snapshot:
                raise Internal(f"the patch log cannot be replayed: version {version} after {self.version} "
                               f"({outcome.value})", version=version, have=self.version)


def _copies(ops: Optional[List[Any]]) -> bool:
    return ops is not None and any(isinstance(op, dict) and op.get("op") == "copy" for op in ops)

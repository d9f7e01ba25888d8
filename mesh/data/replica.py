"""One versioned, patch-replicated value: the ZeroMQ guide's Clone pattern in one class.

Three places hold a copy of a value that one sequencer changes: the manager
(a session's context, an object), every service instance (its session's
context) and every object cache (a client's, an executor's).  All three use
:class:`Replica`, so the rules below hold in each of them:

1. **A version names exactly one content.**  Every accepted write raises the
   version by exactly one; two replicas of the same value at the same version
   hold equal content.
2. **Writes apply only in version order.**  :meth:`Replica.receive` applies a
   write only when it is the next version.  A write at a version already held
   (a duplicate, or one older than the snapshot the replica was built from) is
   ``STALE`` and ignored.
3. **A gap is detected and answered by a snapshot.**  A write beyond the next
   version is a ``GAP``; one that is next but does not apply to the content held
   is ``DIVERGED``.  Both leave the replica as it was and say so
   (:attr:`Outcome.needs_snapshot`); the owner fetches a snapshot and calls
   :meth:`Replica.restore`.  Nothing is ever guessed or skipped silently.
4. **Errors leave the replica unchanged.**  A write is computed beside the
   current content (:func:`mesh.data.patch.apply_patch` is copy-on-write) and
   committed only once it has applied whole.

Two kinds of value (``kind``):

* ``doc``  a msgpack document (:func:`mesh.data.patch.is_document`), changed by
  JSON-patch ops (plus ``incr``).  Encoded with msgpack: nothing is unpickled.
* ``blob`` opaque bytes (a cloudpickled object), replaced whole by each write.
  The one op list a blob accepts is a whole replacement by a document
  (``[{"op": "replace", "path": "", "value": doc}]``), which makes it a
  document again.

The sequencer (the manager) calls :meth:`Replica.write`, which assigns the next
version; replicas call :meth:`Replica.receive` with the version the sequencer
assigned.  Both run the same transition (:func:`transition`), so a replica can
never compute a different content than the sequencer did for the same write.
Pure: no sockets, no asyncio, no pickle.
"""
from __future__ import annotations

import enum
from typing import Any, List, Optional, Sequence, Tuple, Type, TypeVar

from mesh.data import patch
from mesh.errors import InvalidArgument, MeshError
from mesh.wire.protocol import Frame, pack, unpack

DOC = "doc"
BLOB = "blob"
KINDS = (DOC, BLOB)

Ops = Optional[List[Any]]
R = TypeVar("R", bound="Replica")


class Outcome(enum.Enum):
    """What :meth:`Replica.receive` or :meth:`Replica.restore` did with what it was given."""

    APPLIED = "applied"    # it was the next version (or a newer snapshot): the replica now holds it
    STALE = "stale"        # that version is already held (a duplicate, or older than our snapshot): ignored
    GAP = "gap"            # versions between ours and the write's are missing: unchanged, fetch a snapshot
    DIVERGED = "diverged"  # the next version, but it does not apply to our content: unchanged, fetch a snapshot

    @property
    def needs_snapshot(self) -> bool:
        return self is Outcome.GAP or self is Outcome.DIVERGED


def decode(kind: str, data: Any) -> Any:
    """A snapshot's bytes as the value a replica holds (a document, or the blob's bytes).

    Raises InvalidArgument for an unknown kind or a document that is not valid msgpack.
    """
    if kind == DOC:
        try:
            return unpack(data)
        except Exception as exc:
            raise InvalidArgument(f"not a valid msgpack document: {exc}") from None
    if kind == BLOB:
        return bytes(data)
    raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}", argument="kind")


def transition(kind: str, value: Any, ops: Ops, blob: Optional[Frame]) -> Tuple[str, Any]:
    """The (kind, value) one write makes of (kind, value); never mutates ``value``.

    A write is ``ops`` (JSON-patch ops) or, when ``ops`` is None, a whole new
    ``blob``.  Raises InvalidArgument for a write with neither, for malformed
    ops or ops on a blob (it has no paths), Conflict when a ``test`` op fails.
    """
    if ops is None:
        if blob is None:
            raise InvalidArgument("a write needs ops or a blob")
        try:
            return BLOB, bytes(blob)
        except TypeError:
            raise InvalidArgument(f"a blob must be bytes, not {type(blob).__name__}") from None
    if kind == BLOB:
        if _whole_replacement(ops):
            return DOC, patch.copy_document(ops[0]["value"])
        raise InvalidArgument("this value is an opaque object (pickled): replace it whole, it has no paths to patch")
    return DOC, patch.apply_patch(value, ops)


def _whole_replacement(ops: Sequence[Any]) -> bool:
    """``[{"op": "replace", "path": "", "value": doc}]``: turns an opaque value back into a document."""
    return (len(ops) == 1 and isinstance(ops[0], dict) and ops[0].get("op") == "replace"
            and ops[0].get("path") == "" and "value" in ops[0])


class Replica:
    """A versioned value changed only by writes applied in version order (see the module docstring).

    ``value`` is never mutated in place (patches are copy-on-write), so it may
    be shared with readers that treat it as read-only; hand callers a copy
    (:func:`mesh.data.patch.copy_document`) when they may change it.

    ``size_hint`` estimates the encoded size for limits and cache eviction: it
    is exact after a snapshot or :meth:`encoded`, and grows by the ``size`` each
    write reports (an op list's encoded size is an upper bound of what it adds,
    except ``copy``, which the sequencer measures instead).
    """

    __slots__ = ("kind", "version", "value", "size_hint", "_encoded")

    def __init__(self, kind: str = DOC, version: int = 0, value: Any = None, size_hint: int = 0) -> None:
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}", argument="kind")
        self.kind = kind
        self.version = version
        self.value = value          # the document, or the blob's bytes
        self.size_hint = size_hint
        self._encoded: Optional[bytes] = None

    @classmethod
    def from_wire(cls: Type[R], kind: str, data: Any, version: int = 0, keep_encoded: bool = False) -> R:
        """A replica built from a snapshot's bytes.  ``keep_encoded`` keeps ``data`` as the
        answer of :meth:`encoded` (a cache that forwards the snapshot as it came)."""
        data = bytes(data)
        replica = cls(kind, version, decode(kind, data), len(data))
        if keep_encoded or kind == BLOB:
            replica._encoded = data
        return replica

    def encoded(self) -> bytes:
        """The snapshot's bytes, as sent to a replica that joins or fell behind; cached per version."""
        if self._encoded is None:
            self._encoded = pack(self.value) if self.kind == DOC else self.value
            self.size_hint = len(self._encoded)
        return self._encoded

    # -- the sequencer's side -------------------------------------------------------
    def write(self, ops: Ops, blob: Optional[Frame], size: int = 0) -> int:
        """Apply one write as the sequencer and give it the next version, which is returned.

        Raises as :func:`transition` does; on error the replica is unchanged.
        """
        self._commit(*transition(self.kind, self.value, ops, blob), self.version + 1, ops, blob, size)
        return self.version

    def reset(self, kind: str, data: Any, keep_encoded: bool = False) -> int:
        """Replace the whole value by a snapshot's bytes as the sequencer: it becomes the next
        version, which is returned.  Raises InvalidArgument for data that does not decode."""
        self.restore(kind, self.version + 1, data, keep_encoded)
        return self.version

    # -- a replica's side -------------------------------------------------------------
    def receive(self, version: int, ops: Ops, blob: Optional[Frame], size: int = 0) -> Outcome:
        """Apply the write the sequencer numbered ``version``, if it is the next one.

        Never raises for a write that does not fit (any error :func:`transition` names):
        it is reported as ``DIVERGED``, since the sequencer applied it.
        """
        if version <= self.version:
            return Outcome.STALE
        if version != self.version + 1:
            return Outcome.GAP
        try:
            kind, value = transition(self.kind, self.value, ops, blob)
        except MeshError:   # the sequencer applied it, so what this replica holds is wrong
            return Outcome.DIVERGED
        self._commit(kind, value, version, ops, blob, size)
        return Outcome.APPLIED

    def restore(self, kind: str, version: int, data: Any, keep_encoded: bool = False) -> Outcome:
        """Take a snapshot of this same value (after a gap, or a cache's whole answer).

        A snapshot older than what is held is ``STALE`` and ignored, and one at the
        version held is too (rule 1: it holds the same content).  Raises
        InvalidArgument for data that does not decode; the replica is then unchanged.
        """
        if version <= self.version:
            return Outcome.STALE
        data = bytes(data)
        self.value = decode(kind, data)
        self.kind, self.version, self.size_hint = kind, version, len(data)
        self._encoded = data if keep_encoded or kind == BLOB else None
        self._changed()
        return Outcome.APPLIED

    # -- internals --------------------------------------------------------------------
    def _commit(self, kind: str, value: Any, version: int, ops: Ops, blob: Optional[Frame], size: int) -> None:
        self.kind, self.value, self.version = kind, value, version
        self._encoded = None
        self.size_hint = len(value) if ops is None and blob is not None else self.size_hint + size
        self._changed()

    def _changed(self) -> None:
        """Called after every change of content; subclasses drop what they derived from it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, version={self.version}, size_hint={self.size_hint})"

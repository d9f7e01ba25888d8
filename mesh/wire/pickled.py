"""The one pickle shape the manager writes and reads: a single ``bytes`` value.

Service instances unpickle their requests and pickle their results (executor/instance.py).
The flow engine (mesh/core/flows.py) must hand the flow service a request it builds itself and
read the small envelope the flow service answers with, without importing :mod:`pickle` (nothing
from the network is unpickled in the manager).  So it writes and reads only this shape: protocol
2+ ``PROTO``, an optional ``FRAME``, one ``SHORT_BINBYTES``/``BINBYTES``/``BINBYTES8``, an
optional ``MEMOIZE`` (or ``BINPUT 0``), ``STOP``.  Anything else is refused (``None``); nothing is executed.
"""
from __future__ import annotations

import struct
from typing import Optional

PROTO, FRAME, STOP, MEMOIZE = 0x80, 0x95, 0x2E, 0x94
SHORT_BINBYTES, BINBYTES, BINBYTES8 = 0x43, 0x42, 0x8E


def wrap_bytes(data: bytes) -> bytes:
    """``pickle.dumps(data, protocol=4)`` for ``bytes`` data, written by hand."""
    if len(data) < 2 ** 32:
        return b"\x80\x04B" + struct.pack("<I", len(data)) + bytes(data) + b"."
    return b"\x80\x04\x8e" + struct.pack("<Q", len(data)) + bytes(data) + b"."


def unwrap_bytes(payload: bytes) -> Optional[bytes]:
    """The ``bytes`` value pickled in ``payload`` if it has exactly the shape above, else None."""
    view = memoryview(payload)
    n = len(view)
    if n < 4 or view[0] != PROTO or view[1] < 3:
        return None
    i = 2
    if view[i] == FRAME:
        i += 9
    if i >= n:
        return None
    op = view[i]
    if op == SHORT_BINBYTES and i + 2 <= n:
        size, i = view[i + 1], i + 2
    elif op == BINBYTES and i + 5 <= n:
        size, i = struct.unpack_from("<I", view, i + 1)[0], i + 5
    elif op == BINBYTES8 and i + 9 <= n:
        size, i = struct.unpack_from("<Q", view, i + 1)[0], i + 9
    else:
        return None
    end = i + size
    if end > n:
        return None
    tail = bytes(view[end:])
    if tail not in (b".", b"\x94.", b"q\x00."):   # STOP, after MEMOIZE or BINPUT 0
        return None
    return bytes(view[i:end])

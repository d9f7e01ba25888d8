"""The client's side of streams: parts as they arrive, credit as they are taken (docs/streaming.md).

A :class:`StreamBuffer` sits between the connection's I/O thread, which puts each part in as it
arrives (in order: a part out of order is a protocol error), and one consumer, which takes them:
a :class:`PartStream` (``Session.stream``), an async iterator (``AsyncSession.stream``), or the
task's own future, which collects every part into a list (``invoke`` on a streaming entrypoint).
The consumer grants credit as it takes parts, so the producer never runs more than
``stream_window`` parts ahead of it; breaking off cancels the remote generator.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from mesh.errors import Cancelled, DeadlineExceeded, MeshError, ProtocolError

__all__ = ["StreamBuffer", "PartStream"]


class StreamBuffer:
    """Parts of one streaming task, from the I/O thread to one consumer."""

    def __init__(self, sid: str, window: int, collect: bool = False) -> None:
        self.sid = sid
        self.tag = 0                      # set when the task is queued
        self.window = window              # 0: no flow control
        self.collect = collect            # the future collects the parts (no consumer grants credit)
        self.parts: Deque[Tuple[int, Any]] = collections.deque()
        self.received = 0                 # parts in (seq of the next one expected)
        self.taken = 0                    # parts the consumer has taken
        self.granted = window             # the producer may send parts below this seq
        self.error: Optional[BaseException] = None
        self.ended = False
        self._cond = threading.Condition()
        self.wake: Optional[Callable[[], None]] = None   # an async consumer's callback (any thread)
        self.credit: Optional[Callable[[int], None]] = None   # sends a grant (upto; -1 cancels)

    # -- the I/O thread ------------------------------------------------------------------------
    def put(self, seq: int, frame: Any) -> None:
        with self._cond:
            if seq < self.received:
                return             # a restarted stream's part we have (the manager drops these too)
            if seq != self.received:
                self.error = ProtocolError(f"stream part {seq} arrived where {self.received} was expected")
                self.ended = True
            else:
                self.parts.append((seq, frame))
                self.received += 1
            self._cond.notify_all()
        if self.wake is not None:
            self.wake()

    def finish(self, error: Optional[BaseException]) -> None:
        with self._cond:
            if not self.ended:
                self.ended = True
                self.error = error
            self._cond.notify_all()
        if self.wake is not None:
            self.wake()

    # -- the consumer ----------------------------------------------------------------------------
    def take(self, timeout: Optional[float]) -> Tuple[bool, Any]:
        """(True, frame) for the next part; (False, None) at the end; raises the stream's error, or
        DeadlineExceeded if no part came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.parts and not self.ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"no part of the stream within {timeout:g}s ({self.taken} taken; "
                                           f"the stream goes on)", timeout=timeout, parts=self.taken)
                self._cond.wait(left)
            return self._next_locked()

    def poll(self) -> Tuple[bool, bool, Any]:
        """Non-blocking (for an async consumer): (ready, more, frame)."""
        with self._cond:
            if not self.parts and not self.ended:
                return False, False, None
            more, frame = self._next_locked()
            return True, more, frame

    def _next_locked(self) -> Tuple[bool, Any]:
        if self.parts:
            _, frame = self.parts.popleft()
            self.taken += 1
            self._grant_locked()
            return True, frame
        if self.error is not None:
            raise self.error
        return False, None

    def _grant_locked(self) -> None:
        if self.window and self.credit is not None and self.granted - self.taken <= self.window // 2:
            self.granted = self.taken + self.window
            self.credit(self.granted)

    def cancel(self) -> None:
        """The consumer broke off: the remote generator is closed, and what comes is dropped."""
        with self._cond:
            if self.ended:
                return
            self.ended = True
            self.error = Cancelled("the stream was closed by its consumer", parts=self.taken)
            self.parts.clear()
        if self.credit is not None:
            self.credit(-1)


class PartStream:
    """An iterator over a stream's parts (``Session.stream``): each part as it is made, in order.
    ``timeout``: seconds to wait for each part.  ``close()`` (or leaving a ``for`` loop early and
    dropping the iterator, or ``with``) cancels the remote generator."""

    def __init__(self, buffer: StreamBuffer, decode: Callable[[Any], Any], timeout: Optional[float],
                 future: Any = None) -> None:
        self._buf, self._decode, self._timeout, self.future = buffer, decode, timeout, future
        self._done = False

    def __iter__(self) -> "PartStream":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            more, frame = self._buf.take(self._timeout)
        except MeshError:
            self._done = True
            raise
        if not more:
            self._done = True
            raise StopIteration
        return self._decode(frame)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._buf.cancel()

    def __enter__(self) -> "PartStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def parts_taken(self) -> int:
        return self._buf.taken


def decode_all(buffer: StreamBuffer, decode: Callable[[Any], Any]) -> List[Any]:
    """Every part of a finished stream, decoded (``invoke`` on a streaming entrypoint)."""
    out = []
    while buffer.parts:
        out.append(decode(buffer.parts.popleft()[1]))
    return out

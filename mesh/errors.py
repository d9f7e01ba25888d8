"""One error hierarchy for the wire, the client and the CLI.

Every error has a stable string ``code`` that travels on the wire (see
docs/protocol.md, "Errors"); the client turns a wire error back into the same
class with :func:`from_wire`, and the CLI prints ``code: message`` and exits
with :attr:`MeshError.exit_code`.  Codes never change meaning once released.
"""
from __future__ import annotations

import concurrent.futures
import sys
from typing import Any, Dict, Optional, Type


class MeshError(Exception):
    """Base of every zeromesh error.  ``details`` is a small msgpack-able map."""

    code = "internal"
    exit_code = 1

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: Dict[str, Any] = details

    def __str__(self) -> str:
        return self.message or self.code

    def __reduce__(self):  # keep details when pickled (executor -> client)
        return (_rebuild, (type(self), self.message, self.details))

    def to_wire(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


def _rebuild(cls: Type[MeshError], message: str, details: Dict[str, Any]) -> MeshError:
    """Details are set after construction: a peer's key may be named ``message``."""
    exc = cls(message)
    exc.details = dict(details)
    return exc


class InvalidArgument(MeshError, ValueError):
    """The caller sent something the mesh cannot accept (bad spec, bad value, malformed endpoint).

    Also a ``ValueError``, so callers that catch that keep working."""

    code = "invalid_argument"
    exit_code = 2


class NotFound(MeshError):
    """An application, session, task or executor does not exist."""

    code = "not_found"
    exit_code = 3


class AlreadyExists(MeshError):
    code = "already_exists"
    exit_code = 4


class FailedPrecondition(MeshError):
    """The object exists but is in the wrong state (e.g. a closed session)."""

    code = "failed_precondition"
    exit_code = 5


class Conflict(MeshError):
    """A context or object patch could not apply (a ``test`` op failed)."""

    code = "conflict"
    exit_code = 6


class TaskFailed(MeshError):
    """The entrypoint raised.  Carries the remote type, message and traceback."""

    code = "task_failed"
    exit_code = 7

    @property
    def remote_type(self) -> str:
        return str(self.details.get("type", ""))

    @property
    def remote_traceback(self) -> str:
        return str(self.details.get("traceback", ""))


class Unavailable(MeshError):
    """The manager (or a needed peer) cannot be reached right now; retryable."""

    code = "unavailable"
    exit_code = 8


if sys.version_info >= (3, 11):          # concurrent.futures.TimeoutError is TimeoutError
    class _Timeout(TimeoutError):
        pass
else:                                     # pragma: no cover (3.9, 3.10: two distinct classes)
    class _Timeout(TimeoutError, concurrent.futures.TimeoutError):
        pass


class DeadlineExceeded(MeshError, _Timeout):
    """A wait ran out of time (the work itself may go on: a task keeps running).

    Also a ``TimeoutError`` and a ``concurrent.futures.TimeoutError``, so callers
    that catch those keep working."""

    code = "deadline_exceeded"
    exit_code = 9


class Cancelled(MeshError):
    code = "cancelled"
    exit_code = 10


class ResourceExhausted(MeshError):
    """A configured limit was hit; ``details['limit']`` names it."""

    code = "resource_exhausted"
    exit_code = 11


class ProtocolError(MeshError):
    """A peer sent a frame sequence that does not follow docs/protocol.md."""

    code = "protocol_error"
    exit_code = 12


class Unauthenticated(MeshError):
    code = "unauthenticated"
    exit_code = 13


class PermissionDenied(MeshError):
    code = "permission_denied"
    exit_code = 14


class Internal(MeshError):
    code = "internal"
    exit_code = 1


ERRORS: Dict[str, Type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Conflict,
        TaskFailed, Unavailable, DeadlineExceeded, Cancelled, ResourceExhausted,
        ProtocolError, Unauthenticated, PermissionDenied, Internal,
    )
}


def from_wire(err: Optional[Dict[str, Any]]) -> MeshError:
    """Rebuild the typed error a peer sent; unknown codes become ``Internal``."""
    if not isinstance(err, dict):
        return Internal(f"malformed error from peer: {err!r}")
    cls = ERRORS.get(str(err.get("code")), Internal)
    details = err.get("details")
    return _rebuild(cls, str(err.get("message", "")), details if isinstance(details, dict) else {})

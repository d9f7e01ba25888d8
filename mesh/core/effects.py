"""What the core asks the event loop to do: the only way a decision reaches the world.

The core (:class:`mesh.core.Core`) takes decoded messages and clock ticks and
returns a list of effects; it never touches a socket, a file or a thread.  The
loop (:mod:`mesh.manager`) performs them **in order**:

* :class:`Send`  one message to one peer (a ROUTER identity).  When the send
  fails (the peer vanished or stopped reading), the loop tells the core with
  :meth:`Core.lost`, which runs the send's ``if_lost`` (keep an undelivered
  answer for the client's resend).
* :class:`Call`  one function run off the event loop, on the store's writer
  thread (``STORE``: it gets the :class:`~mesh.data.store.Store`) or on a worker
  thread (``CPU``: password hashing); its result, or the exception it raised,
  is handed back to the core with :meth:`Core.complete`, whose effects are
  performed in turn.

Changes to tasks, contexts and objects are not effects: the core collects them
in its :class:`~mesh.data.store.Batch` (plain data), and the loop hands the batch
to the writer thread once per round (group commit).

**The durability rule.**  A ``Send`` with ``after_commit=True`` tells a peer
something that must survive a crash (a context or object version, a write's
acknowledgement).  The loop performs it only after every batch change the core
made *before* it has committed, and every later ``Send`` waits behind it, so
messages to one peer never overtake each other.  A ``Call`` runs after the
batch changes made before it have committed, so it reads what the core wrote.
Plain sends (a task's RESULT, a TASKS dispatch) go at once: what they say can
be rebuilt after a restart (the task runs again; docs/reliability.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

STORE = "store"   # run on the writer thread, with the Store as first argument
CPU = "cpu"       # run on a worker thread (slow pure work: scrypt)


@dataclass(frozen=True)
class Send:
    peer: bytes                      # ROUTER identity
    record: Any                      # a mesh.wire.protocol record
    payloads: Sequence[Any] = ()
    after_commit: bool = False       # wait for the batch changes made before it (see above)
    if_lost: Optional[Callable[[], None]] = None   # the loop could not send it: Core.lost calls this


@dataclass(eq=False)
class Call:
    fn: Callable[..., Any]           # fn(store, *args) on STORE, fn(*args) on CPU
    args: Sequence[Any] = ()
    then: Optional[Callable[[Any], None]] = None             # called by Core.complete with the result
    fail: Optional[Callable[[BaseException], None]] = None   # ... or with the exception
    where: str = STORE
    label: str = field(default="")   # what it is, for logs


Effect = Union[Send, Call]
Effects = List[Effect]

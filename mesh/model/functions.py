"""Stateful functions as plain data: type names, addresses, limits (docs/functions.md)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from mesh.errors import InvalidArgument

TYPENAME = re.compile(r"[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_.-]{1,64}")
DEAD_LETTERS = "zmesh/dead-letters"   # egress of messages that could not be delivered, with the reason
MAX_ID = 256                          # characters of an entity id
FN_BATCH = 64                         # messages of one address handed to its function at once
BATCH_RETRIES = 10                    # a batch with no answer (its instances kept dying) goes again this often
ROUTE_WAIT = 30.0                     # seconds a message for a type no application is known to serve waits
MAX_CALL_WAIT = 300.0                 # seconds a client's call may wait for its reply


def check_typename(typename: Any) -> str:
    """``namespace/name``, or InvalidArgument saying what a type name is."""
    if not isinstance(typename, str) or not TYPENAME.fullmatch(typename):
        raise InvalidArgument(f"a function type is <namespace>/<name> (letters, digits, '_', '.', '-'), "
                              f"not {typename!r}", argument="typename")
    return typename


def check_id(identity: Any) -> str:
    if not isinstance(identity, str) or not 0 < len(identity) <= MAX_ID:
        raise InvalidArgument(f"an entity id is a string of 1 to {MAX_ID} characters, not {identity!r}",
                              argument="id")
    return identity


def expired(record: Sequence[Any], now: float, called_at: float) -> bool:
    """A state value ``[value, written_at, expire_after_write, expire_after_call]`` at ``now``."""
    _, written, after_write, after_call = record[:4]
    return bool(after_write is not None and now >= written + after_write
                or after_call is not None and now >= max(called_at, written) + after_call)


def live_state(state: Dict[str, List[Any]], now: float, called_at: float) -> Dict[str, List[Any]]:
    """The values not expired at ``now``."""
    return {name: r for name, r in state.items() if not expired(r, now, called_at)}


def next_expiry(state: Dict[str, List[Any]], called_at: float) -> Optional[float]:
    times = [r[1] + r[2] for r in state.values() if r[2] is not None]
    times += [max(called_at, r[1]) + r[3] for r in state.values() if r[3] is not None]
    return min(times) if times else None

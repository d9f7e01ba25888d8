"""Stateful functions: addressed entities with durable state that message each other.

The SDK mirrors the Flink Stateful Functions Python SDK's names::

    functions = StatefulFunctions()

    @functions.bind("example/count", specs=[ValueSpec("count", expire_after_write=timedelta(hours=1))])
    def count_greeter(context, message: User):
        n = (context["count"] or 0) + 1
        context["count"] = n
        context.reply(f"Hello {message.name} #{n}")

    if __name__ == "__main__":
        functions.run()

A module's functions are served by one service instance (an ordinary application whose command
runs the module); the instance tells the manager the types it serves when it says hello, and the
manager routes messages by type (mesh/core/functions.py).  The manager owns every address's
state and sends it with each batch of messages for that address; this module runs the batch in
order and answers, per message, the state it leaves and everything it sends.  The manager commits
all of it at once (docs/functions.md): a function's effects happen exactly once.

The wire (msgpack inside a pickled ``bytes``, built and read by the manager without unpickling):

* request: ``{"address": [type, id], "state": {name: [value, written_at, expire_after_write,
  expire_after_call]}, "called_at": t, "now": t, "messages": [[mid, caller [type, id] | None,
  message (pickled)], ...]}``
* answer: ``{"results": [{"error": wire error} | {"rejected": reason} | {"sends": [[type, id,
  pickled]], "timers": [["delay", [seconds, type, id, pickled, token | None]] | ["cancel", token]]
  (in the order the function made them),
  "egress": [[type, pickled]], "reply": pickled?}], "state": {name: [value, written_at,
  expire_after_write, expire_after_call] | None}}`` (the state after the batch: changed names only).
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import os
import sys
import time
import traceback
import typing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import cloudpickle

from mesh.errors import FailedPrecondition, InvalidArgument, MeshError, TaskFailed
from mesh.model.functions import check_typename, expired
from mesh.wire.protocol import pack, unpack

from .instance import Instance, _build, main_as_module

__all__ = ["StatefulFunctions", "ValueSpec", "Address", "Context", "TypedValue"]

HELD_ADDRESSES = 10_000   # addresses whose state one instance keeps between batches (least recent out)


@dataclass(frozen=True)
class ValueSpec:
    """A declared state value; ``expire_after_write``/``expire_after_call`` make it read as None (and
    be deleted) that long after it was last written / after the address was last called."""
    name: str
    type: Any = None
    expire_after_write: Optional[timedelta] = None
    expire_after_call: Optional[timedelta] = None

    def __post_init__(self) -> None:
        if self.expire_after_write is not None and self.expire_after_call is not None:
            raise InvalidArgument(f"state {self.name!r} expires after write or after call, not both")


@dataclass(frozen=True)
class Address:
    """Where a message goes: ``namespace/type`` and the entity's ``identity``."""
    namespace: str
    type: str
    identity: str

    def typename(self) -> str:
        return f"{self.namespace}/{self.type}"

    @classmethod
    def of(cls, typename: str, identity: str) -> "Address":
        namespace, _, name = check_typename(typename).partition("/")
        return cls(namespace, name, identity)

    def __str__(self) -> str:
        return f"{self.typename()}/{self.identity}"


@dataclass(frozen=True)
class TypedValue:
    """A value under a type name zeromesh does not know (Statefun's TypedValue): passed through."""
    typename: str
    value: bytes


def _pickled(value: Any, what: str) -> bytes:
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        raise InvalidArgument(f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from None


def _seconds(delay: Union[timedelta, float, int]) -> float:
    s = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if s < 0:
        raise InvalidArgument(f"a delay is not negative, got {s:g}s")
    return s


class _Storage:
    """``context.storage.name`` spelling of ``context["name"]`` (the Statefun SDK's)."""

    def __init__(self, context: "Context") -> None:
        object.__setattr__(self, "_c", context)

    def __getattr__(self, name: str) -> Any:
        return self._c[name]

    def __setattr__(self, name: str, value: Any) -> None:
        self._c[name] = value

    def __delattr__(self, name: str) -> None:
        del self._c[name]


class Context:
    """What a function sees of one message: its address, the caller, its state, what it may send."""

    def __init__(self, address: Address, caller: Optional[Address], state: Dict[str, Any],
                 specs: Dict[str, ValueSpec]) -> None:
        self.address = address
        self.caller = caller
        self._state = state          # name -> value (already unpickled), absent if none
        self._specs = specs
        self.changed: Dict[str, bool] = {}   # names written or deleted by this message
        self.sends: List[List[Any]] = []
        self.delayed: List[List[Any]] = []
        self.cancels: List[str] = []
        self.timeline: List[List[Any]] = []   # ["delay", entry] | ["cancel", token], in the order made
        self.egress: List[List[Any]] = []
        self.replied: Optional[Any] = None   # bytes here
        self.storage = _Storage(self)

    def _encode(self, value: Any, what: str) -> Any:
        """How a value this function writes or sends travels (pickled here; the Statefun HTTP
        handler's context, executor/statefun_http.py, types it instead)."""
        return _pickled(value, what)

    # -- state ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self._state.get(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._encode(value, f"state {name!r}")   # fail here, in the function, not at commit
        self._state[name] = value
        self.changed[name] = True

    def __delitem__(self, name: str) -> None:
        self._state.pop(name, None)
        self.changed[name] = True

    def __contains__(self, name: object) -> bool:
        return name in self._state

    # -- messages ---------------------------------------------------------------------------
    def send(self, typename: str, id: str, message: Any) -> None:
        self.sends.append([check_typename(typename), str(id), self._encode(message, "a message")])

    def send_after(self, delay: Union[timedelta, float], typename: str, id: str, message: Any,
                   cancellation_token: Optional[str] = None) -> None:
        if cancellation_token is not None and not isinstance(cancellation_token, str):
            raise InvalidArgument("a cancellation token is a string")
        self.delayed.append([_seconds(delay), check_typename(typename), str(id),
                             self._encode(message, "a message"), cancellation_token])
        self.timeline.append(["delay", self.delayed[-1]])

    def cancel_delayed_message(self, cancellation_token: str) -> None:
        self.cancels.append(str(cancellation_token))
        self.timeline.append(["cancel", self.cancels[-1]])

    def reply(self, message: Any) -> None:
        """Answer the caller: the function that sent this message (as a message to it), or the
        client whose ``call`` sent it."""
        self.replied = self._encode(message, "a reply")

    def send_egress(self, typename: str, message: Any) -> None:
        self.egress.append([check_typename(typename), self._encode(message, "an egress record")])

    # the Statefun SDK's spellings
    pack_and_send = send
    pack_and_send_after = send_after
    pack_and_reply = reply
    pack_and_send_egress = send_egress

    def __repr__(self) -> str:
        return f"<Context {self.address} caller={self.caller}>"


class _Bound:
    def __init__(self, typename: str, fn: Callable[..., Any], specs: Sequence[ValueSpec]) -> None:
        self.typename, self.fn = typename, fn
        self.specs = {s.name: s for s in specs}
        self.accepts = _accepted_types(fn)

    def check(self, message: Any) -> Tuple[Any, Optional[str]]:
        """(the message to deliver, None), or (None, why it is not delivered).  A JSON object (a
        dict, as ``zmesh functions send`` sends) is built into the declared class from its fields."""
        if self.accepts is None or isinstance(message, self.accepts):
            return message, None
        names = " or ".join(t.__name__ for t in self.accepts)
        if isinstance(message, dict) and not any(t is dict for t in self.accepts):
            errors = []
            for t in self.accepts:
                try:
                    return _build(t, message, self.typename), None
                except InvalidArgument as exc:
                    errors.append(exc.message)
            return None, f"{self.typename} takes {names}, and the object sent is none of them: {'; '.join(errors)}"
        return None, f"{self.typename} takes {names}, not {type(message).__name__}"


def _accepted_types(fn: Callable[..., Any]) -> Optional[Tuple[type, ...]]:
    """The message parameter's declared types (a Union gives several), or None for any."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 2:
        raise InvalidArgument(f"a stateful function takes (context, message), {fn.__name__} takes {len(params)}")
    try:
        hint = typing.get_type_hints(fn).get(params[1].name)
    except Exception:
        return None
    if hint is None or hint is Any or hint is object:
        return None
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    types = tuple(typing.get_origin(a) or a for a in args)
    return types if all(isinstance(t, type) for t in types) else None


class StatefulFunctions:
    """The functions of one module: bind them, then ``run()`` serves them all from one instance."""

    def __init__(self) -> None:
        frame = sys._getframe(1)
        self._module = frame.f_globals.get("__name__", "")
        self._file = frame.f_globals.get("__file__")
        self._functions: Dict[str, _Bound] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # the state of the addresses this process ran last, as the manager will hold it (affinity)
        self._held: "collections.OrderedDict[Tuple[str, str], Tuple[str, Dict[str, List[Any]]]]" = \
            collections.OrderedDict()

    def bind(self, typename: str, specs: Optional[Sequence[ValueSpec]] = None) -> Callable[[Callable[..., Any]],
                                                                                          Callable[..., Any]]:
        """Decorator: serve ``fn(context, message)`` (sync or async) as ``typename``."""
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(typename, fn, specs)
            return fn
        return wrap

    def register(self, typename: str, fn: Callable[..., Any], specs: Optional[Sequence[ValueSpec]] = None) -> None:
        check_typename(typename)
        if typename in self._functions:
            raise InvalidArgument(f"{typename} is bound already")
        self._functions[typename] = _Bound(typename, fn, specs or ())

    @property
    def typenames(self) -> List[str]:
        return sorted(self._functions)

    def run(self) -> None:
        """Serve every bound type from this process (under an executor)."""
        module = main_as_module(self._module, self._file)   # run as a script: serve the imported module's
        if module is not None:                              # functions, whose classes clients pickle
            for value in vars(module).values():
                if isinstance(value, StatefulFunctions) and value is not self:
                    return value.run()
        ins = Instance()
        ins.functions = self.typenames
        ins.entrypoint(self.invoke)
        ins.run()

    # -- one batch ------------------------------------------------------------------------------
    def invoke(self, request: bytes) -> bytes:
        """Run one batch of messages for one address (the manager's request), in order."""
        req = unpack(request)
        typename, identity = req["address"]
        bound = self._functions.get(typename)
        if bound is None:
            raise InvalidArgument(f"this instance does not serve {typename}")
        address = Address.of(typename, identity)
        now = req.get("now") or time.time()
        key = (typename, identity)
        if req.get("state") is None:   # the manager counts on this process holding the state
            held = self._held.get(key)
            if held is None or held[0] != req.get("version"):
                raise FailedPrecondition(f"this instance does not hold the state of {address}", state_missing=True)
            records: Dict[str, List[Any]] = dict(held[1])
        else:
            records = dict(req["state"])
        called = req.get("called_at") or 0.0
        values = {name: cloudpickle.loads(r[0]) for name, r in records.items() if not expired(r, now, called)}
        results: List[Dict[str, Any]] = []
        changed: Dict[str, Optional[List[Any]]] = {}
        for mid, caller, blob in req["messages"]:
            try:
                message = cloudpickle.loads(blob)
            except Exception as exc:
                results.append({"rejected": f"the message could not be unpickled: {type(exc).__name__}: {exc}"})
                continue
            message, why = bound.check(message)
            if why is not None:
                results.append({"rejected": why})
                continue
            before = dict(values)
            ctx = Context(address, Address.of(*caller) if caller else None, values, bound.specs)
            try:
                out = bound.fn(ctx, message)
                if inspect.isawaitable(out):
                    if self._loop is None:
                        self._loop = asyncio.new_event_loop()
                    self._loop.run_until_complete(_awaited(out))
            except Exception as exc:   # this message fails; its state changes are undone
                values.clear()
                values.update(before)
                results.append({"error": _failure(exc)})
                continue
            for name in ctx.changed:
                if name in values:
                    spec = bound.specs.get(name)
                    changed[name] = [_pickled(values[name], f"state {name!r}"), now, _secs(spec, "write"),
                                     _secs(spec, "call")]
                else:
                    changed[name] = None
            result: Dict[str, Any] = {"sends": ctx.sends, "timers": ctx.timeline,
                                      "egress": ctx.egress}
            if ctx.replied is not None:
                result["reply"] = ctx.replied
            results.append(result)
        for name, rec in changed.items():   # what the manager will hold once this batch commits
            if rec is None:
                records.pop(name, None)
            else:
                records[name] = rec
        if req.get("next"):
            self._held[key] = (req["next"], records)
            self._held.move_to_end(key)
            if len(self._held) > HELD_ADDRESSES:
                self._held.popitem(last=False)
        return pack({"results": results, "state": changed, "instance": os.environ.get("ZMESH_INSTANCE_ID")})


def _secs(spec: Optional[ValueSpec], which: str) -> Optional[float]:
    if spec is None:
        return None
    d = spec.expire_after_write if which == "write" else spec.expire_after_call
    return None if d is None else d.total_seconds()


async def _awaited(out: Any) -> Any:
    return await out


def _failure(exc: BaseException) -> Dict[str, Any]:
    if isinstance(exc, MeshError):
        return exc.to_wire()
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return TaskFailed(f"{type(exc).__name__}: {exc}", type=type(exc).__name__, traceback=tb[-8000:]).to_wire()


"""Serve zeromesh stateful functions to an Apache Flink Stateful Functions cluster over HTTP.

The same ``StatefulFunctions`` a zeromesh executor serves can sit behind any HTTP framework and
answer the Statefun runtime's remote-function protocol (version 3: a ``ToFunction`` protobuf in,
a ``FromFunction`` out; docs/functions-http.md)::

    handler = RequestReplyHandler(functions)           # Flask, http.server...
    response_bytes = handler(request_bytes)

    handler = AsyncRequestReplyHandler(functions)      # aiohttp...
    response_bytes = await handler(request_bytes)

Over HTTP the runtime owns the state: each request carries the declared ``ValueSpec`` values
of one address and a batch of messages, and the answer carries what the batch changed and sent.
A request without some declared value is answered with ``incomplete_invocation_context``
naming the missing ones (with their expiry), as the Statefun SDK does; the runtime then
registers them and sends the batch again.  A function that raises fails the whole batch (the
framework answers 500 and the runtime retries it), as in Statefun.

Values and type names (``io.statefun.types/*`` are Statefun's built-in types):

* a message or state value under ``io.statefun.types/string|int|long|float|double|bool`` arrives
  as ``str``, ``int``, ``float`` or ``bool``; under :data:`PICKLED` (zeromesh's own values:
  cloudpickle bytes) as the object; under any other type name as
  ``TypedValue(typename, value: bytes)``;
* a message, reply or egress record sent goes out as ``io.statefun.types/string`` (``str``),
  ``/long`` (``int``), ``/double`` (``float``), ``/bool`` (``bool``); a ``TypedValue`` as it
  is (:func:`typed_value` builds one of a built-in type, e.g. a 32-bit ``int``;
  :func:`kafka_egress_record` and :func:`kinesis_egress_record` the records Statefun's Kafka and
  Kinesis egresses take); anything else pickled, under :data:`PICKLED`;
* a state value is stored under its ``ValueSpec``'s type: ``type=int`` is ``/long``, ``float``
  ``/double``, ``str`` ``/string``, ``bool`` ``/bool``, a type name string is that type name
  (a built-in one encodes the Python value; another one takes a ``TypedValue`` of it or
  ``bytes``), anything else (``None``, a class) is :data:`PICKLED`.

protobuf is imported only when a handler is built (``pip install 'zeromesh[statefun]'``).
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from datetime import timedelta
from typing import Any, Dict, Generator, List, Optional, Union

import cloudpickle

from mesh.errors import InvalidArgument, NotFound

from . import _statefun_proto
from .functions import Address, Context, StatefulFunctions, TypedValue, ValueSpec, _Bound

__all__ = ["RequestReplyHandler", "AsyncRequestReplyHandler", "PICKLED", "typed_value", "kafka_egress_record",
           "kinesis_egress_record"]

PICKLED = "zeromesh.types/cloudpickle"   # zeromesh's own values: a cloudpickle of the object

BOOL = "io.statefun.types/bool"
INT = "io.statefun.types/int"
LONG = "io.statefun.types/long"
FLOAT = "io.statefun.types/float"
DOUBLE = "io.statefun.types/double"
STRING = "io.statefun.types/string"
_WRAPPERS = {BOOL: "BooleanWrapper", INT: "IntWrapper", LONG: "LongWrapper", FLOAT: "FloatWrapper",
             DOUBLE: "DoubleWrapper", STRING: "StringWrapper"}
_PY_TYPES = {int: LONG, float: DOUBLE, str: STRING, bool: BOOL}
KAFKA_RECORD = "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
KINESIS_RECORD = "type.googleapis.com/io.statefun.sdk.egress.KinesisEgressRecord"

_RR = "io.statefun.sdk.reqreply."


def _pb(name: str) -> Any:
    return _statefun_proto.load()[name]


def _enum(message: str, enum: str, value: str) -> int:
    """An enum value's number (through the descriptor: protobuf 3.x classes do not nest)."""
    return int(_pb(message).DESCRIPTOR.enum_types_by_name[enum].values_by_name[value].number)


# -- values ---------------------------------------------------------------------------------------
def spec_typename(spec: ValueSpec) -> str:
    """The type name a declared state value is stored under (the module docstring)."""
    t = spec.type
    if isinstance(t, str):
        if "/" not in t:
            raise InvalidArgument(f"state {spec.name!r}: a type name is <namespace>/<name>, not {t!r}")
        return t
    if isinstance(t, type) and t in _PY_TYPES:
        return _PY_TYPES[t]
    return PICKLED


def _builtin(typename: str, value: Any, what: str) -> bytes:
    ok = {BOOL: isinstance(value, bool),
          INT: isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31,
          LONG: isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63,
          FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
          DOUBLE: isinstance(value, (int, float)) and not isinstance(value, bool),
          STRING: isinstance(value, str)}[typename]
    if not ok:
        raise InvalidArgument(f"{what}: {value!r} ({type(value).__name__}) is not a {typename}")
    wrapper = _pb("io.statefun.sdk.types." + _WRAPPERS[typename])()
    wrapper.value = float(value) if typename in (FLOAT, DOUBLE) else value
    return bytes(wrapper.SerializeToString())


def typed_value(typename: str, value: Any, what: str = "a value") -> TypedValue:
    """``value`` under ``typename``: a built-in type encodes the Python value
    (``typed_value("io.statefun.types/int", 7)``), :data:`PICKLED` pickles it, any other type
    name takes the encoded ``bytes`` (or a ``TypedValue`` of that type name)."""
    if isinstance(value, TypedValue):
        if value.typename != typename:
            raise InvalidArgument(f"{what}: a TypedValue of {value.typename}, not of {typename}")
        return value
    if typename in _WRAPPERS:
        return TypedValue(typename, _builtin(typename, value, what))
    if typename == PICKLED:
        try:
            return TypedValue(PICKLED, cloudpickle.dumps(value))
        except Exception as exc:
            raise InvalidArgument(f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return TypedValue(typename, bytes(value))
    raise InvalidArgument(f"{what}: a {typename} is given as its bytes or a TypedValue, not {type(value).__name__}")


def _outgoing(value: Any, what: str) -> TypedValue:
    """A message, reply or egress record as it goes out (the module docstring)."""
    if isinstance(value, TypedValue):
        return value
    if isinstance(value, bool):
        return typed_value(BOOL, value, what)
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise InvalidArgument(f"{what}: {value} does not fit io.statefun.types/long (64 bits)")
        return typed_value(LONG, value, what)
    if isinstance(value, float):
        return typed_value(DOUBLE, value, what)
    if isinstance(value, str):
        return typed_value(STRING, value, what)
    return typed_value(PICKLED, value, what)


def _incoming(tv: Any) -> Any:
    """A protobuf TypedValue as the function sees it (None if it has no value)."""
    if not tv.has_value:
        return None
    if tv.typename in _WRAPPERS:
        wrapper = _pb("io.statefun.sdk.types." + _WRAPPERS[tv.typename])()
        wrapper.ParseFromString(tv.value)
        return wrapper.value
    if tv.typename == PICKLED:
        return cloudpickle.loads(tv.value)
    return TypedValue(tv.typename, bytes(tv.value))


def _record(value: Union[str, bytes, bytearray], what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument(f"{what} is str (sent as UTF-8) or bytes, not {type(value).__name__}")


def kafka_egress_record(topic: str, value: Union[str, bytes], key: Optional[str] = None) -> TypedValue:
    """A record for a Statefun Kafka egress: ``context.send_egress("ns/egress", kafka_egress_record(...))``."""
    if not topic:
        raise InvalidArgument("a Kafka egress record names its topic")
    rec = _pb("io.statefun.sdk.egress.KafkaProducerRecord")(topic=topic, value_bytes=_record(value, "a Kafka value"))
    if key is not None:
        rec.key = key
    return TypedValue(KAFKA_RECORD, bytes(rec.SerializeToString()))


def kinesis_egress_record(stream: str, value: Union[str, bytes], partition_key: str,
                          explicit_hash_key: Optional[str] = None) -> TypedValue:
    """A record for a Statefun Kinesis egress."""
    if not stream or not partition_key:
        raise InvalidArgument("a Kinesis egress record names its stream and partition key")
    rec = _pb("io.statefun.sdk.egress.KinesisEgressRecord")(stream=stream, partition_key=partition_key,
                                                             value_bytes=_record(value, "a Kinesis value"))
    if explicit_hash_key is not None:
        rec.explicit_hash_key = explicit_hash_key
    return TypedValue(KINESIS_RECORD, bytes(rec.SerializeToString()))


# -- one message's context ------------------------------------------------------------------------
class _HttpContext(Context):
    """The SDK's Context whose sends are typed values and whose state is only the declared."""

    def __init__(self, address: Address, caller: Optional[Address], state: Dict[str, Any],
                 specs: Dict[str, ValueSpec]) -> None:
        super().__init__(address, caller, state, specs)

    def _encode(self, value: Any, what: str) -> Any:
        return _outgoing(value, what)

    def _spec(self, name: str) -> ValueSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise InvalidArgument(f"state {name!r} is not a declared ValueSpec of {self.address.typename()}: "
                                  "served over HTTP, a function has only its declared state")
        return spec

    def __getitem__(self, name: str) -> Any:
        self._spec(name)
        return super().__getitem__(name)

    def __setitem__(self, name: str, value: Any) -> None:
        if value is None:   # None is no value
            del self[name]
            return
        typed_value(spec_typename(self._spec(name)), value, f"state {name!r}")   # fail here, not at the end
        self._state[name] = value
        self.changed[name] = True

    def __delitem__(self, name: str) -> None:
        self._spec(name)
        super().__delitem__(name)

    pack_and_send = Context.send
    pack_and_send_after = Context.send_after
    pack_and_reply = Context.reply
    pack_and_send_egress = Context.send_egress


# -- the handlers ---------------------------------------------------------------------------------
def _address(pb_address: Any, addr: Address) -> None:
    pb_address.namespace, pb_address.type, pb_address.id = addr.namespace, addr.type, addr.identity


def _typename_to(pb_address: Any, typename: str, identity: str) -> None:
    pb_address.namespace, _, pb_address.type = typename.rpartition("/")
    pb_address.id = identity


def _argument(pb_tv: Any, tv: TypedValue) -> None:
    pb_tv.typename, pb_tv.has_value, pb_tv.value = tv.typename, True, tv.value


class _Handler:
    def __init__(self, functions: StatefulFunctions) -> None:
        if not isinstance(functions, StatefulFunctions):
            raise InvalidArgument(f"a handler serves a StatefulFunctions, not {type(functions).__name__}")
        _statefun_proto.load()   # FailedPrecondition naming the extra if protobuf is missing
        self.functions = functions

    def _batch(self, request: Union[bytes, bytearray, memoryview]) -> Generator[Any, None, bytes]:
        """Run one ToFunction's batch; yields each awaitable a function returns, returns the
        FromFunction bytes."""
        to = _pb(_RR + "ToFunction")()
        to.ParseFromString(bytes(request))
        if not to.HasField("invocation"):
            raise InvalidArgument("a ToFunction without an invocation batch")
        batch = to.invocation
        address = Address(batch.target.namespace, batch.target.type, batch.target.id)
        bound: Optional[_Bound] = self.functions._functions.get(address.typename())
        if bound is None:
            raise NotFound(f"no function of type {address.typename()} is bound here", typename=address.typename())
        received = {pv.state_name: pv.state_value for pv in batch.state}
        missing = [spec for spec in bound.specs.values() if spec.name not in received]
        out = _pb(_RR + "FromFunction")()
        if missing:
            self._incomplete(out, missing)
            return bytes(out.SerializeToString())
        values = {name: _incoming(received[name]) for name in bound.specs}
        values = {name: v for name, v in values.items() if v is not None}
        result = out.invocation_result
        result.SetInParent()   # an answer with no effects is still an invocation_result
        changed: Dict[str, bool] = {}
        for invocation in batch.invocations:
            c = invocation.caller
            caller = Address(c.namespace, c.type, c.id) if (c.namespace or c.type or c.id) else None
            message = _incoming(invocation.argument)
            message, why = bound.check(message)
            if why is not None:
                raise InvalidArgument(why)
            ctx = _HttpContext(address, caller, values, bound.specs)
            ret = bound.fn(ctx, message)
            if inspect.isawaitable(ret):
                yield ret
            self._effects(result, ctx)
            changed.update(ctx.changed)
        for name in changed:
            mutation = result.state_mutations.add(state_name=name)
            if name in values:
                mutation.mutation_type = _enum(_RR + "FromFunction.PersistedValueMutation", "MutationType", "MODIFY")
                _argument(mutation.state_value, typed_value(spec_typename(bound.specs[name]), values[name],
                                                            f"state {name!r}"))
            else:
                mutation.mutation_type = _enum(_RR + "FromFunction.PersistedValueMutation", "MutationType", "DELETE")
        return bytes(out.SerializeToString())

    @staticmethod
    def _incomplete(out: Any, missing: List[ValueSpec]) -> None:
        def mode(name: str) -> int:
            return _enum(_RR + "FromFunction.ExpirationSpec", "ExpireMode", name)

        for spec in missing:
            v = out.incomplete_invocation_context.missing_values.add(state_name=spec.name,
                                                                    type_typename=spec_typename(spec))
            if spec.expire_after_call is not None:
                v.expiration_spec.mode = mode("AFTER_INVOKE")
                v.expiration_spec.expire_after_millis = _millis(spec.expire_after_call)
            elif spec.expire_after_write is not None:
                v.expiration_spec.mode = mode("AFTER_WRITE")
                v.expiration_spec.expire_after_millis = _millis(spec.expire_after_write)
            else:
                v.expiration_spec.mode = mode("NONE")

    @staticmethod
    def _effects(result: Any, ctx: _HttpContext) -> None:
        for typename, identity, tv in ctx.sends:
            m = result.outgoing_messages.add()
            _typename_to(m.target, typename, identity)
            _argument(m.argument, tv)
        if ctx.replied is not None and ctx.caller is not None:   # a reply is a message to the caller
            m = result.outgoing_messages.add()
            _address(m.target, ctx.caller)
            _argument(m.argument, ctx.replied)
        for kind, entry in ctx.timeline:
            d = result.delayed_invocations.add()
            if kind == "cancel":
                d.is_cancellation_request = True
                d.cancellation_token = entry
                continue
            seconds, typename, identity, tv, token = entry
            d.delay_in_ms = int(round(seconds * 1000))
            _typename_to(d.target, typename, identity)
            _argument(d.argument, tv)
            if token is not None:
                d.cancellation_token = token
        for typename, tv in ctx.egress:
            e = result.outgoing_egresses.add()
            e.egress_namespace, _, e.egress_type = typename.rpartition("/")
            _argument(e.argument, tv)


def _millis(d: timedelta) -> int:
    return int(d.total_seconds() * 1000)


class RequestReplyHandler(_Handler):
    """``handler(request_bytes) -> response_bytes`` for a synchronous HTTP framework; an async
    function is run to completion on this thread's own event loop."""

    def __init__(self, functions: StatefulFunctions) -> None:
        super().__init__(functions)
        self._local = threading.local()

    def __call__(self, request: Union[bytes, bytearray, memoryview]) -> bytes:
        gen = self._batch(request)
        try:
            awaitable = next(gen)
            while True:
                self._loop().run_until_complete(_awaited(awaitable))
                awaitable = gen.send(None)
        except StopIteration as stop:
            return bytes(stop.value)

    handle_sync = __call__   # the Statefun SDK's name

    async def handle_async(self, request: Union[bytes, bytearray, memoryview]) -> bytes:
        return await _drive(self._batch(request))

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop: Optional[asyncio.AbstractEventLoop] = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = self._local.loop = asyncio.new_event_loop()
        return loop


class AsyncRequestReplyHandler(_Handler):
    """``await handler(request_bytes) -> response_bytes`` for an asyncio HTTP framework."""

    async def __call__(self, request: Union[bytes, bytearray, memoryview]) -> bytes:
        return await _drive(self._batch(request))

    handle_async = __call__


async def _drive(gen: Generator[Any, None, bytes]) -> bytes:
    try:
        awaitable = next(gen)
        while True:
            await awaitable
            awaitable = gen.send(None)
    except StopIteration as stop:
        return bytes(stop.value)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable

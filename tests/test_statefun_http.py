"""Stateful functions served over HTTP in the Flink Statefun remote-function protocol (v3).

Each test posts a real ``ToFunction`` protobuf, built with the message classes of Statefun's own
request-reply.proto (executor/protos/), and decodes the ``FromFunction`` answer."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import sys
import threading
import urllib.request
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import pytest

pytest.importorskip("google.protobuf", reason="the Statefun handler needs protobuf (the statefun extra)")

from executor import (Address, AsyncRequestReplyHandler, RequestReplyHandler, StatefulFunctions,  # noqa: E402
                      TypedValue, ValueSpec)
from executor import _statefun_proto, statefun_http  # noqa: E402
from executor.statefun_http import (PICKLED, kafka_egress_record, kinesis_egress_record,  # noqa: E402
                                    typed_value)
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PB = _statefun_proto.load()
ToFunction = PB["io.statefun.sdk.reqreply.ToFunction"]
FromFunction = PB["io.statefun.sdk.reqreply.FromFunction"]
Wrappers = {t: PB["io.statefun.sdk.types." + w] for t, w in statefun_http._WRAPPERS.items()}
S = "io.statefun.types/"
MODIFY, DELETE = 1, 0                      # FromFunction.PersistedValueMutation.MutationType
NONE, AFTER_WRITE, AFTER_INVOKE = 0, 1, 2  # FromFunction.ExpirationSpec.ExpireMode


@dataclasses.dataclass
class User:
    name: str


def builtin(typename: str, value: Any) -> Tuple[str, bytes]:
    return typename, Wrappers[typename](value=value).SerializeToString()


def to_function(target: str, identity: str, messages: List[Tuple[Optional[str], Tuple[str, bytes]]],
                state: Optional[Dict[str, Optional[Tuple[str, bytes]]]] = None) -> bytes:
    """A ToFunction: ``messages`` are (caller "ns/type/id" or None, (typename, bytes)); ``state``
    maps a name to (typename, bytes), or to None for a registered value never written."""
    req = ToFunction()
    batch = req.invocation
    batch.target.namespace, batch.target.type = target.split("/")
    batch.target.id = identity
    for name, value in (state or {}).items():
        pv = batch.state.add(state_name=name)   # the runtime sends a value never written without state_value
        if value is not None:
            pv.state_value.typename, pv.state_value.value = value
            pv.state_value.has_value = True
    for caller, (typename, value) in messages:
        inv = batch.invocations.add()
        if caller:
            inv.caller.namespace, inv.caller.type, inv.caller.id = caller.split("/")
        inv.argument.typename, inv.argument.has_value, inv.argument.value = typename, True, value
    return req.SerializeToString()


def from_function(data: bytes) -> Any:
    out = FromFunction()
    out.ParseFromString(data)
    return out


def unwrap(tv: Any) -> Any:
    w = Wrappers[tv.typename]()
    w.ParseFromString(tv.value)
    return w.value


# -- a count greeter ------------------------------------------------------------------------------------------
greeters = StatefulFunctions()


@greeters.bind("example/greeter", specs=[ValueSpec("seen", int, expire_after_write=timedelta(hours=1)),
                                         ValueSpec("last", str),
                                         ValueSpec("profile", expire_after_call=timedelta(minutes=5))])
def greeter(context, name: str) -> None:
    seen = (context["seen"] or 0) + 1
    context["seen"] = seen
    context.send("example/inbox", name, f"Hello {name} #{seen}")


def test_a_count_greeter_counts_in_the_state_the_runtime_keeps():
    handler = RequestReplyHandler(greeters)
    # Given every declared value registered, none written yet
    state: Dict[str, Any] = {"seen": None, "last": None, "profile": None}
    for n in (1, 2):
        # When a message for example/greeter/joe arrives
        out = from_function(handler(to_function("example/greeter", "joe", [(None, builtin(S + "string", "Joe"))],
                                                state)))
        # Then the answer writes the count (a long, as ValueSpec("seen", int) declares) and greets
        assert out.WhichOneof("response") == "invocation_result"
        result = out.invocation_result
        [mutation] = result.state_mutations
        assert (mutation.state_name, mutation.mutation_type) == ("seen", MODIFY)
        assert mutation.state_value.typename == S + "long" and mutation.state_value.has_value
        assert unwrap(mutation.state_value) == n
        [greeting] = result.outgoing_messages
        assert (greeting.target.namespace, greeting.target.type, greeting.target.id) == ("example", "inbox", "Joe")
        assert (greeting.argument.typename, unwrap(greeting.argument)) == (S + "string", f"Hello Joe #{n}")
        assert not result.delayed_invocations and not result.outgoing_egresses
        state["seen"] = (mutation.state_value.typename, mutation.state_value.value)   # the runtime keeps it


def test_a_request_without_declared_state_names_what_is_missing_with_its_expiry():
    handler = RequestReplyHandler(greeters)
    # Given a request that carries no state at all
    out = from_function(handler(to_function("example/greeter", "joe", [(None, builtin(S + "string", "Joe"))])))
    # Then nothing runs: the answer names every declared value, in declaration order, with its type and expiry
    assert out.WhichOneof("response") == "incomplete_invocation_context"
    missing = out.incomplete_invocation_context.missing_values
    assert [(m.state_name, m.type_typename, m.expiration_spec.mode, m.expiration_spec.expire_after_millis)
            for m in missing] == [("seen", S + "long", AFTER_WRITE, 3_600_000),
                                  ("last", S + "string", NONE, 0),
                                  ("profile", PICKLED, AFTER_INVOKE, 300_000)]
    # And a request with some of them names only the others
    out = from_function(handler(to_function("example/greeter", "joe", [(None, builtin(S + "string", "Joe"))],
                                            {"seen": builtin(S + "long", 3), "profile": None})))
    assert [m.state_name for m in out.incomplete_invocation_context.missing_values] == ["last"]


# -- a batch of two with every kind of effect ----------------------------------------------------------------
effects = StatefulFunctions()


@effects.bind("shop/cart", specs=[ValueSpec("items", int), ValueSpec("note", str)])
def cart(context, command: str) -> None:
    if command == "add":
        context["items"] = (context["items"] or 0) + 1
        context.send("shop/stock", "apple", "reserve")
        context.send_after(timedelta(seconds=90), "shop/cart", context.address.identity, "expire",
                           cancellation_token="expire-u1")
        context.reply("added")
    elif command == "checkout":
        context.cancel_delayed_message("expire-u1")
        del context["note"]
        context.send_egress("shop/orders", kafka_egress_record("orders", f"{context['items']} items", key="u1"))
        context.send_egress("shop/audit", kinesis_egress_record("audit", b"checkout", partition_key="u1"))
        context.send_after(2.5, "shop/mailer", "u1", User("u1"))


def test_a_batch_answers_state_mutations_messages_delays_cancellations_and_egress():
    handler = RequestReplyHandler(effects)
    out = from_function(handler(to_function(
        "shop/cart", "u1",
        [("web/session/s1", builtin(S + "string", "add")), (None, builtin(S + "string", "checkout"))],
        {"items": builtin(S + "long", 4), "note": builtin(S + "string", "gift")})))
    r = out.invocation_result
    # the state after the batch: items modified, note deleted
    assert [(m.state_name, m.mutation_type) for m in r.state_mutations] == [("items", MODIFY), ("note", DELETE)]
    assert unwrap(r.state_mutations[0].state_value) == 5
    assert not r.state_mutations[1].HasField("state_value")
    # the messages: one sent, and the reply to the caller of the first
    assert [(m.target.namespace, m.target.type, m.target.id, unwrap(m.argument)) for m in r.outgoing_messages] == [
        ("shop", "stock", "apple", "reserve"), ("web", "session", "s1", "added")]
    # delayed messages and the cancellation, in the order they were made
    d1, cancel, d2 = r.delayed_invocations
    assert (d1.target.type, d1.target.id, d1.delay_in_ms, d1.cancellation_token, unwrap(d1.argument)) == (
        "cart", "u1", 90_000, "expire-u1", "expire")
    assert not d1.is_cancellation_request
    assert cancel.is_cancellation_request and cancel.cancellation_token == "expire-u1"
    assert not cancel.HasField("target") and not cancel.HasField("argument")
    assert (d2.target.type, d2.delay_in_ms, d2.cancellation_token, d2.argument.typename) == ("mailer", 2500, "",
                                                                                            PICKLED)
    # egress: the Kafka and the Kinesis records, typed as Statefun's egresses take them
    kafka, kinesis = r.outgoing_egresses
    assert (kafka.egress_namespace, kafka.egress_type, kafka.argument.typename) == (
        "shop", "orders", "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord")
    record = PB["io.statefun.sdk.egress.KafkaProducerRecord"]()
    record.ParseFromString(kafka.argument.value)
    assert (record.topic, record.key, record.value_bytes) == ("orders", "u1", b"5 items")
    assert (kinesis.egress_type, kinesis.argument.typename) == (
        "audit", "type.googleapis.com/io.statefun.sdk.egress.KinesisEgressRecord")
    record = PB["io.statefun.sdk.egress.KinesisEgressRecord"]()
    record.ParseFromString(kinesis.argument.value)
    assert (record.stream, record.partition_key, record.value_bytes) == ("audit", "u1", b"checkout")


# -- types ---------------------------------------------------------------------------------------------------
typed = StatefulFunctions()
seen: List[Any] = []


@typed.bind("types/echo")
def echo(context, value) -> None:
    seen.append(value)
    context.reply(value)


@typed.bind("types/int32")
def int32(context, value: int) -> None:
    context.reply(typed_value(S + "int", value + 1))


@pytest.mark.parametrize("typename,value,python,out_typename", [
    (S + "string", "héllo", "héllo", S + "string"),
    (S + "int", -7, -7, S + "long"),
    (S + "long", 2**40, 2**40, S + "long"),
    (S + "float", 1.5, 1.5, S + "double"),
    (S + "double", 0.1, 0.1, S + "double"),
    (S + "bool", True, True, S + "bool"),
    (S + "bool", False, False, S + "bool"),
])
def test_built_in_types_arrive_as_python_values_and_go_out_as_them(typename, value, python, out_typename):
    seen.clear()
    request = to_function("types/echo", "1", [("a/b/c", builtin(typename, value))])
    out = from_function(RequestReplyHandler(typed)(request))
    assert seen == [python] and type(seen[0]) is type(python)
    [m] = out.invocation_result.outgoing_messages
    assert m.argument.typename == out_typename and unwrap(m.argument) == python


def test_a_built_in_type_can_be_chosen_for_what_goes_out():
    request = to_function("types/int32", "1", [("a/b/c", builtin(S + "int", 41))])
    out = from_function(RequestReplyHandler(typed)(request))
    [m] = out.invocation_result.outgoing_messages
    assert (m.argument.typename, unwrap(m.argument)) == (S + "int", 42)
    with pytest.raises(InvalidArgument, match="is not a io.statefun.types/int"):
        typed_value(S + "int", 2**31)


def test_an_unknown_typename_arrives_as_a_typed_value_and_passes_through():
    seen.clear()
    out = from_function(RequestReplyHandler(typed)(to_function(
        "types/echo", "1", [("a/b/c", ("com.example/Order", b'{"id": 7}'))])))
    assert seen == [TypedValue("com.example/Order", b'{"id": 7}')]
    [m] = out.invocation_result.outgoing_messages
    assert (m.argument.typename, m.argument.has_value, m.argument.value) == ("com.example/Order", True, b'{"id": 7}')


def test_zeromesh_values_travel_pickled_under_one_typename():
    import cloudpickle
    seen.clear()
    out = from_function(RequestReplyHandler(typed)(to_function(
        "types/echo", "1", [("a/b/c", (PICKLED, cloudpickle.dumps(User("ann"))))])))
    assert seen == [User("ann")]
    [m] = out.invocation_result.outgoing_messages
    assert m.argument.typename == PICKLED and cloudpickle.loads(m.argument.value) == User("ann")


# -- async ---------------------------------------------------------------------------------------------------
asyncs = StatefulFunctions()


@asyncs.bind("example/slow", specs=[ValueSpec("calls", int)])
async def slow(context, message: str) -> None:
    await asyncio.sleep(0.01)
    context["calls"] = (context["calls"] or 0) + 1
    context.send("example/inbox", "x", message.upper())


def test_the_async_handler_awaits_an_async_function():
    handler = AsyncRequestReplyHandler(asyncs)
    request = to_function("example/slow", "1", [(None, builtin(S + "string", "a")), (None, builtin(S + "string", "b"))],
                          {"calls": None})
    out = from_function(asyncio.run(handler(request)))
    r = out.invocation_result
    assert [unwrap(m.argument) for m in r.outgoing_messages] == ["A", "B"]
    assert unwrap(r.state_mutations[0].state_value) == 2
    # and so does the synchronous one, on its own loop, in any thread
    sync = RequestReplyHandler(asyncs)
    assert from_function(sync(request)) == out
    answers: List[Any] = []
    t = threading.Thread(target=lambda: answers.append(from_function(sync.handle_sync(request))))
    t.start()
    t.join(10)
    assert answers == [out]
    assert from_function(asyncio.run(sync.handle_async(request))) == out


# -- failures ------------------------------------------------------------------------------------------------
failing = StatefulFunctions()


@failing.bind("bad/undeclared", specs=[ValueSpec("kept", int)])
def undeclared(context, message: str) -> None:
    context["other"] = 1


@failing.bind("bad/raises")
def raises(context, message: str) -> None:
    context.send("a/b", "c", "never sent")
    raise RuntimeError("boom")


def test_failures_fail_the_whole_batch_for_the_runtime_to_retry():
    handler = RequestReplyHandler(failing)
    with pytest.raises(InvalidArgument, match="'other' is not a declared ValueSpec"):
        handler(to_function("bad/undeclared", "1", [(None, builtin(S + "string", "x"))], {"kept": None}))
    with pytest.raises(RuntimeError, match="boom"):
        handler(to_function("bad/raises", "1", [(None, builtin(S + "string", "x"))]))
    with pytest.raises(InvalidArgument, match="takes str, not int"):
        handler(to_function("bad/raises", "1", [(None, builtin(S + "long", 3))]))
    with pytest.raises(NotFound, match="no function of type bad/unknown"):
        handler(to_function("bad/unknown", "1", [(None, builtin(S + "string", "x"))]))


def test_the_wire_is_statefuns():
    """Hand-encoded protobuf, independent of the descriptors: field numbers and wire types."""
    assert Wrappers[S + "int"](value=5).SerializeToString() == b"\x0d\x05\x00\x00\x00"           # 1: sfixed32
    assert Wrappers[S + "long"](value=5).SerializeToString() == b"\x09\x05" + b"\x00" * 7           # 1: sfixed64
    request = (b"\xa2\x06" + bytes([21])                                   # 100: invocation (21 bytes)
               + b"\x0a\x0a" + b"\x0a\x01t" + b"\x12\x01e" + b"\x1a\x02id"  # 1: target t/e/id
               + b"\x1a\x07" + b"\x12\x05" + b"\x0a\x01x" + b"\x10\x01")    # 3: invocation, argument x (has_value)
    seen.clear()
    fns = StatefulFunctions()
    fns.register("t/e", lambda context, message: seen.append((context.address, message)))
    out = from_function(RequestReplyHandler(fns)(request))
    assert seen == [(Address("t", "e", "id"), TypedValue("x", b""))]
    assert out.SerializeToString() == b"\xa2\x06\x00"                      # 100: an empty invocation_result


def test_without_protobuf_a_handler_names_the_extra(monkeypatch):
    monkeypatch.setattr(_statefun_proto, "_messages", None)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(FailedPrecondition, match=r"zeromesh\[statefun\]"):
        RequestReplyHandler(greeters)


def test_the_example_serves_over_http():
    spec = importlib.util.spec_from_file_location("sf_http_example",
                                                  os.path.join(ROOT, "examples", "functions", "http_server.py"))
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    httpd = example.server("127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/statefun"

        def post(body: bytes) -> Any:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return from_function(r.read())

        out = post(to_function("example/greeter", "ann", [(None, builtin(S + "string", "Ann"))]))
        assert [m.state_name for m in out.incomplete_invocation_context.missing_values] == ["seen"]
        out = post(to_function("example/greeter", "ann", [(None, builtin(S + "string", "Ann"))], {"seen": None}))
        [egress] = out.invocation_result.outgoing_egresses
        record = PB["io.statefun.sdk.egress.KafkaProducerRecord"]()
        record.ParseFromString(egress.argument.value)
        assert (record.topic, record.key, record.value_bytes) == ("greetings", "Ann", b"Hello Ann, welcome!")
    finally:
        httpd.shutdown()
        httpd.server_close()


declared = StatefulFunctions()


@declared.bind("types/declared", specs=[ValueSpec("doc", "com.example/Doc"),
                                        ValueSpec("small", "io.statefun.types/int"), ValueSpec("obj")])
def declared_types(context, message: str) -> None:
    seen.append((context["doc"], context["small"], context["obj"]))
    context["doc"] = b"v2"
    context["small"] = context["small"] + 1
    context["obj"] = User(message)


def test_a_value_spec_names_the_type_its_state_is_stored_under():
    import cloudpickle
    seen.clear()
    out = from_function(RequestReplyHandler(declared)(to_function(
        "types/declared", "1", [(None, builtin(S + "string", "bo"))],
        {"doc": ("com.example/Doc", b"v1"), "small": builtin(S + "int", 9), "obj": None})))
    assert seen == [(TypedValue("com.example/Doc", b"v1"), 9, None)]
    doc, small, obj = out.invocation_result.state_mutations
    assert (doc.state_value.typename, doc.state_value.value) == ("com.example/Doc", b"v2")
    assert (small.state_value.typename, unwrap(small.state_value)) == (S + "int", 10)
    assert obj.state_value.typename == PICKLED and cloudpickle.loads(obj.state_value.value) == User("bo")

"""Wire codec (mesh.wire.protocol) and wire errors (mesh.errors): pure, no sockets.

``decode`` runs on untrusted bytes inside the manager's event loop, so besides
the round trips every malformed input must come back as ``ProtocolError`` and
never as any other exception.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, List, Tuple

import cloudpickle
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import errors
from mesh.errors import ERRORS, Internal, MeshError, NotFound, ProtocolError, TaskFailed, from_wire
from mesh.wire.protocol import MAGIC, RECORDS, VERSION, Cmd, Message, Submit, decode, encode, header_of, pack

# --------------------------------------------------------------------------------------------
# Valid headers: one per command, with the number of payload frames the command carries.
# --------------------------------------------------------------------------------------------

VALID: Dict[Cmd, List[Tuple[Any, int]]] = {
    Cmd.REQUEST: [({"rid": 1, "method": "session.open", "args": {"app": "echo"}}, 0)],
    Cmd.REPLY: [({"rid": 1, "ok": True, "result": [1, 2]}, 0),
                ({"rid": 2, "ok": False, "error": {"code": "not_found", "message": "x"}}, 0)],
    Cmd.GONE: [({"reason": "unknown peer"}, 0)],
    Cmd.HEARTBEAT: [({}, 0)],
    Cmd.SUBMIT: [(["s1", [1, 2, 3], "c1", False], 3), (["s1", [], "c1", True], 0)],
    Cmd.RESULT: [(["s1", [[1, None], [2, {"code": "task_failed", "message": "boom"}]]], 2)],
    Cmd.EXEC_HELLO: [({"id": "e1", "caps": {"slots": 2}}, 0)],
    Cmd.WELCOME: [({"heartbeat_ms": 200, "liveness": 5}, 0)],
    Cmd.LAUNCH: [({"iid": "i1", "app": {"name": "echo"}}, 0)],
    Cmd.STOP: [({"iid": "i1"}, 0)],
    Cmd.EXITED: [({"iid": "i1", "code": -9, "reason": "killed"}, 0)],
    Cmd.INST_HELLO: [({"iid": "i1", "eid": "e1", "pid": 4242}, 0)],
    Cmd.BIND: [({"session": "s1", "app": "echo", "kind": "pickle", "version": 3}, 1),
               ({"session": None, "app": "echo", "kind": "none", "version": 0}, 1)],
    Cmd.TASKS: [(["s1", 4, [[7, 0], [8, 2]]], 2), (["s1", 0, []], 0)],
    Cmd.DONE: [([[[7, None], [8, {"code": "task_failed"}]]], 2), ([[]], 0)],
    Cmd.CTX_WRITE: [({"session": "s1", "seq": 1, "ops": None}, 1),
                    ({"session": "s1", "seq": 2, "ops": [{"op": "add", "path": "/a", "value": 1}]}, 0)],
    Cmd.CTX_PATCH: [({"session": "s1", "version": 2, "ops": None}, 1),
                    ({"session": "s1", "version": 3, "ops": [], "seq": 4}, 0)],
    Cmd.CTX_REJECT: [({"session": "s1", "seq": 1, "error": {"code": "conflict", "message": "test failed"}}, 0)],
    Cmd.RESYNC: [({"session": "s1", "have": 3}, 0)],
    Cmd.DRAIN: [({}, 0)],
    Cmd.PARTS: [([[[7, 0], [7, 1]]], 2), ([[]], 0)],
    Cmd.CREDIT: [([[[7, 64], [8, -1]]], 0)],
    Cmd.STREAM: [(["s1", [[3, 0]]], 1), (["s1", []], 0)],
    Cmd.STREAM_CREDIT: [(["s1", "c1", [[3, 96], [4, -1]]], 0)],
}

VALID_CASES = [(cmd, header, n) for cmd, cases in VALID.items() for header, n in cases]


def frames_for(cmd: Cmd, header: Any, n_payloads: int) -> List[Any]:
    """Frames with a raw header, valid or not (``encode`` itself only takes records)."""
    return raw(cmd, pack(header), *[b"payload-%d" % k for k in range(n_payloads)])


def rejected(frames: List[Any]) -> str:
    """Decode ``frames``; it must fail with ProtocolError.  Returns the message."""
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return str(info.value)


def raw(cmd: Cmd, header_bytes: bytes, *payloads: bytes) -> List[bytes]:
    return [MAGIC, bytes((cmd,)), header_bytes, *payloads]


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def test_every_command_has_a_valid_example() -> None:
    assert set(VALID) == set(Cmd)


def test_magic_is_signature_plus_version() -> None:
    assert MAGIC == b"ZM" + bytes([VERSION])


@pytest.mark.parametrize("cmd,header,n", VALID_CASES, ids=lambda v: getattr(v, "name", None))
def test_round_trip(cmd: Cmd, header: Any, n: int) -> None:
    # Given a valid header and the right number of payload frames
    payloads = [b"payload-%d" % k for k in range(n)]
    frames = frames_for(cmd, header, n)
    # When decoded
    msg = decode(frames)
    # Then the command's record comes back with the header's fields, payloads unchanged
    assert isinstance(msg, Message)
    assert msg.cmd is cmd and type(msg.header) is RECORDS[cmd][0]
    assert header_of(msg.header) == header
    assert [bytes(p) for p in msg.payloads] == payloads
    # And the record encodes back to the same message (payloads maybe bundled on the way)
    again = decode(encode(msg.header, msg.payloads))
    back = again.header._replace(sizes=None) if "sizes" in again.header._fields else again.header
    assert header_of(back) == header and [bytes(p) for p in again.payloads] == payloads


@pytest.mark.parametrize("cmd,header,n", VALID_CASES, ids=lambda v: getattr(v, "name", None))
def test_round_trip_memoryview_frames(cmd: Cmd, header: Any, n: int) -> None:
    frames = [memoryview(bytes(f)) for f in frames_for(cmd, header, n)]
    msg = decode(frames)
    assert msg.cmd is cmd and header_of(msg.header) == header and len(msg.payloads) == n


def test_payload_frames_are_passed_through_untouched() -> None:
    blob = bytes(range(256)) * 10
    msg = decode(frames_for(Cmd.BIND, {"session": "s", "app": "a", "kind": "k", "version": 1}, 0)[:3] + [blob])
    assert bytes(msg.payloads[0]) == blob


# --------------------------------------------------------------------------------------------
# Framing errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [[], [MAGIC], [MAGIC, bytes((Cmd.HEARTBEAT,))]])
def test_too_few_frames(frames: List[bytes]) -> None:
    msg = rejected(frames)
    assert "frames" in msg and str(len(frames)) in msg


@pytest.mark.parametrize("magic", [b"", b"XX" + bytes([VERSION]), b"ZM", b"zm" + bytes([VERSION]),
                                   MAGIC + b"\x00", b"HTTP/1.1"])
def test_wrong_magic(magic: bytes) -> None:
    msg = rejected([magic, bytes((Cmd.HEARTBEAT,)), pack({})])
    assert "signature" in msg


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_other_protocol_version_names_it(version: int) -> None:
    msg = rejected([b"ZM" + bytes([version]), bytes((Cmd.HEARTBEAT,)), pack({})])
    assert "version" in msg
    assert str(version) in msg
    assert str(VERSION) in msg


@pytest.mark.parametrize("byte", [b for b in (0x00, 0x03, 0x12, 0x3F, 0x7F, 0xFF) if b not in set(Cmd)])
def test_unknown_command_byte(byte: int) -> None:
    msg = rejected([MAGIC, bytes((byte,)), pack({})])
    assert "unknown command" in msg
    assert f"0x{byte:02x}" in msg


@pytest.mark.parametrize("cmd_frame", [b"", bytes((Cmd.HEARTBEAT, 0)), bytes((0, Cmd.HEARTBEAT)), b"\x0e\x0e\x0e"])
def test_command_frame_not_one_byte(cmd_frame: bytes) -> None:
    msg = rejected([MAGIC, cmd_frame, pack({})])
    assert "command frame" in msg and "one byte" in msg


# --------------------------------------------------------------------------------------------
# Header encoding errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1k", b"\xdb\xff\xff\xff\xff",
                                     pack({}) + b"\x00"])
def test_non_msgpack_header(garbage: bytes) -> None:
    msg = rejected(raw(Cmd.HEARTBEAT, garbage))
    assert "HEARTBEAT" in msg and "msgpack" in msg


@pytest.mark.parametrize("header", [
    msgpack.ExtType(1, b"x"),
    {"nested": msgpack.ExtType(42, b"\x00\x01")},
    {"rid": 1, "method": "m", "args": {"x": [msgpack.ExtType(0, b"")]}},
], ids=["top", "nested", "deep"])
def test_msgpack_ext_types_rejected(header: Any) -> None:
    msg = rejected(raw(Cmd.REQUEST if isinstance(header, dict) and "rid" in header else Cmd.HEARTBEAT,
                       msgpack.packb(header, use_bin_type=True)))
    assert "msgpack" in msg


def test_msgpack_timestamp_ext_becomes_a_plain_float() -> None:
    # The timestamp is ext type -1, which msgpack decodes before any ext_hook; it
    # must not reach a handler as a foreign Timestamp object: it arrives as a float.
    header = {"rid": 1, "method": "m", "args": {"when": msgpack.Timestamp(1, 500_000_000)}}
    msg = decode(raw(Cmd.REQUEST, msgpack.packb(header, use_bin_type=True)))
    assert type(msg.header.args["when"]) is float and msg.header.args["when"] == 1.5


@pytest.mark.parametrize("header", [{1: 2}, {None: 1}, {"args": {3: "x"}}],
                         ids=["int", "nil", "nested-int"])
def test_non_str_map_keys_rejected(header: Any) -> None:
    rejected(raw(Cmd.HEARTBEAT, msgpack.packb(header, use_bin_type=True)))


@pytest.mark.parametrize("header", [{b"reason": "x"}, {"args": {b"k": 1}}], ids=["top", "nested"])
def test_binary_map_keys_rejected(header: Any) -> None:
    # "str map keys only": a msgpack bin (bytes) key is not a str key.
    rejected(raw(Cmd.HEARTBEAT, msgpack.packb(header, use_bin_type=True)))


# --------------------------------------------------------------------------------------------
# Header shapes per command
# --------------------------------------------------------------------------------------------

MAP_CMDS = [cmd for cmd in VALID if isinstance(VALID[cmd][0][0], dict)]
WRONG_VALUES = [None, "x", 1, 1.5, True, [], {}, b"b"]


# The type each map field must have, as documented on Cmd / docs/protocol.md.
FIELD_KINDS: Dict[Cmd, Dict[str, str]] = {
    Cmd.REQUEST: {"rid": "int", "method": "str", "args": "map"},
    Cmd.REPLY: {"rid": "int", "ok": "bool"},
    Cmd.GONE: {"reason": "str"},
    Cmd.HEARTBEAT: {},
    Cmd.EXEC_HELLO: {"id": "str", "caps": "map"},
    Cmd.WELCOME: {"heartbeat_ms": "int", "liveness": "int"},
    Cmd.LAUNCH: {"iid": "str", "app": "map"},
    Cmd.STOP: {"iid": "str"},
    Cmd.EXITED: {"iid": "str", "code": "int", "reason": "str"},
    Cmd.INST_HELLO: {"iid": "str", "eid": "str", "pid": "int"},
    Cmd.BIND: {"session": "opt_str", "app": "str", "kind": "str", "version": "int"},
    Cmd.CTX_WRITE: {"session": "str", "seq": "int", "ops": "opt_list"},
    Cmd.CTX_PATCH: {"session": "str", "version": "int", "ops": "opt_list", "seq": "opt_int"},
    Cmd.CTX_REJECT: {"session": "str", "seq": "int", "error": "map"},
    Cmd.RESYNC: {"session": "str", "have": "int"},
    Cmd.DRAIN: {},
}
ACCEPTS: Dict[str, Any] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "map": lambda v: isinstance(v, dict),
    "bool": lambda v: isinstance(v, bool),
    "opt_str": lambda v: v is None or isinstance(v, str),
    "opt_int": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "opt_list": lambda v: v is None or isinstance(v, list),
}


def test_field_table_covers_every_map_command() -> None:
    assert set(FIELD_KINDS) == set(MAP_CMDS)


def _wrong_map_cases() -> List[Tuple[Cmd, Any, str]]:
    """(cmd, header, substring expected in the message) for every map command."""
    cases: List[Tuple[Cmd, Any, str]] = []
    for cmd in MAP_CMDS:
        header, _ = VALID[cmd][0]
        for not_map in ([], "x", 1, None, [header]):
            cases.append((cmd, not_map, "must be a map"))
        for key, kind in FIELD_KINDS[cmd].items():
            missing = {k: v for k, v in header.items() if k != key}
            if key not in RECORDS[cmd][0]._field_defaults:   # an optional field may be left out
                cases.append((cmd, missing, f"lacks field {key!r}"))
            for bad in WRONG_VALUES:
                if not ACCEPTS[kind](bad):
                    cases.append((cmd, dict(header, **{key: bad}), f"field {key!r} has the wrong type"))
    return cases


@pytest.mark.parametrize("cmd,header,needle", _wrong_map_cases(),
                         ids=lambda v: getattr(v, "name", None) if isinstance(v, Cmd) else None)
def test_map_header_wrong_shape(cmd: Cmd, header: Any, needle: str) -> None:
    msg = rejected(frames_for(cmd, header, 0))
    assert cmd.name in msg
    assert needle in msg


@pytest.mark.parametrize("cmd,header", [
    (Cmd.REQUEST, {"rid": 1, "method": "m", "args": []}),
    (Cmd.REQUEST, {"rid": 1, "method": 5, "args": {}}),
    (Cmd.REQUEST, {"rid": "1", "method": "m", "args": {}}),
    (Cmd.REQUEST, {"rid": 1.0, "method": "m", "args": {}}),
    (Cmd.REPLY, {"rid": 1, "ok": 1}),
    (Cmd.REPLY, {"rid": 1, "ok": None}),
    (Cmd.GONE, {"reason": None}),
    (Cmd.EXEC_HELLO, {"id": "e", "caps": []}),
    (Cmd.LAUNCH, {"iid": "i", "app": "echo"}),
    (Cmd.EXITED, {"iid": "i", "code": None, "reason": "x"}),
    (Cmd.BIND, {"session": 1, "app": "a", "kind": "k", "version": 0}),
    (Cmd.CTX_WRITE, {"session": "s", "seq": 1, "ops": {}}),
    (Cmd.CTX_PATCH, {"session": "s", "version": 1, "ops": None, "seq": "1"}),
    (Cmd.CTX_REJECT, {"session": "s", "seq": 1, "error": None}),
], ids=lambda v: getattr(v, "name", None) if isinstance(v, Cmd) else None)
def test_map_header_specific_wrong_types(cmd: Cmd, header: Any) -> None:
    msg = rejected(frames_for(cmd, header, 1))
    assert cmd.name in msg and "wrong type" in msg


LIST_CASES: List[Tuple[Cmd, Any]] = []
# SUBMIT: [sid, [tag...], client id, resend]
LIST_CASES += [(Cmd.SUBMIT, h) for h in (
    {"session": "s"}, "s", None, ["s"], ["s", []], ["s", [], "c"], ["s", [], "c", False, 1], [1, [], "c", False],
    ["s", {}, "c", False], ["s", [], 1, False], ["s", [], "c", 0], ["s", [], "c", None], [b"s", [], "c", False],
    ["s", [1, "x"], "c", False], ["s", [1.5], "c", False], ["s", [[1]], "c", False], ["s", [None], "c", False])]
for _cmd, _items in ((Cmd.RESULT, [[1], [[1]], [[1, None, 3]], [["1", None]], [[1, "err"]], [[1, []]], [5]]),):
    LIST_CASES += [(_cmd, {"session": "s"}), (_cmd, "s"), (_cmd, None), (_cmd, ["s"]), (_cmd, ["s", [], 1]),
                   (_cmd, [1, []]), (_cmd, [None, []]), (_cmd, ["s", {}]), (_cmd, ["s", None]),
                   (_cmd, [b"s", []])]
    LIST_CASES += [(_cmd, ["s", items]) for items in _items]
# TASKS: [sid, context version, [[tid, attempt]...]]
LIST_CASES += [(Cmd.TASKS, h) for h in (
    {"session": "s"}, "s", None, ["s", []], ["s", 1], ["s", 1, [], 2], [1, 1, []], [None, 1, []], [b"s", 1, []],
    ["s", None, []], ["s", "1", []], ["s", 1.0, []], ["s", [], 1], ["s", 1, {}], ["s", 1, None],
    ["s", 1, [[1]]], ["s", 1, [[1, None]]], ["s", 1, [["1", 0]]], ["s", 1, [[1, 0, 0]]], ["s", 1, [1]],
    ["s", 1, [[1, 1.0]]], ["s", [[1, 0]]])]
LIST_CASES += [(Cmd.DONE, h) for h in ({}, None, "x", [1], [[1]], [[1, None, 2]], [["1", None]], [[[1]]],
                                       [[[1, "boom"]]], [[[1, []]]], [[[None, None]]], [[[1.0, None]]], [[], 1])]


@pytest.mark.parametrize("cmd,header", LIST_CASES,
                         ids=lambda v: getattr(v, "name", None) if isinstance(v, Cmd) else None)
def test_list_header_wrong_shape(cmd: Cmd, header: Any) -> None:
    msg = rejected(frames_for(cmd, header, 0))
    assert cmd.name in msg
    assert "header" in msg or "field" in msg


@pytest.mark.parametrize("cmd,header,n", [
    (Cmd.REQUEST, {"rid": True, "method": "m", "args": {}}, 0),
    (Cmd.REPLY, {"rid": False, "ok": True}, 0),
    (Cmd.WELCOME, {"heartbeat_ms": True, "liveness": 5}, 0),
    (Cmd.WELCOME, {"heartbeat_ms": 200, "liveness": False}, 0),
    (Cmd.EXITED, {"iid": "i", "code": False, "reason": "x"}, 0),
    (Cmd.INST_HELLO, {"iid": "i", "eid": "e", "pid": True}, 0),
    (Cmd.BIND, {"session": "s", "app": "a", "kind": "k", "version": True}, 1),
    (Cmd.CTX_WRITE, {"session": "s", "seq": True, "ops": []}, 0),
    (Cmd.CTX_PATCH, {"session": "s", "version": True, "ops": [], "seq": None}, 0),
    (Cmd.CTX_PATCH, {"session": "s", "version": 1, "ops": [], "seq": True}, 0),
    (Cmd.CTX_REJECT, {"session": "s", "seq": False, "error": {}}, 0),
    (Cmd.RESYNC, {"session": "s", "have": True}, 0),
    (Cmd.SUBMIT, ["s", [1, True], "c", False], 2),
    (Cmd.RESULT, ["s", [[True, None]]], 1),
    (Cmd.TASKS, ["s", 1, [[1, True]]], 1),
    (Cmd.TASKS, ["s", 1, [[False, 0]]], 1),
    (Cmd.TASKS, ["s", True, [[1, 0]]], 1),
    (Cmd.DONE, [[[True, None]]], 1),
], ids=lambda v: getattr(v, "name", None) if isinstance(v, Cmd) else None)
def test_bool_is_not_an_int(cmd: Cmd, header: Any, n: int) -> None:
    msg = rejected(frames_for(cmd, header, n))
    assert cmd.name in msg


@pytest.mark.parametrize("cmd,header,n,expected", [
    (Cmd.HEARTBEAT, {}, 1, 0),
    (Cmd.REQUEST, {"rid": 1, "method": "m", "args": {}}, 2, 0),
    (Cmd.SUBMIT, ["s", [1, 2], "c", False], 1, 2),
    (Cmd.SUBMIT, ["s", [1, 2], "c", False], 3, 2),
    (Cmd.SUBMIT, ["s", [], "c", False], 1, 0),
    (Cmd.RESULT, ["s", [[1, None]]], 0, 1),
    (Cmd.TASKS, ["s", 5, [[1, 0], [2, 0], [3, 0]]], 2, 3),
    (Cmd.TASKS, ["s", 5, []], 1, 0),
    (Cmd.DONE, [[[1, None]]], 2, 1),
    (Cmd.BIND, {"session": "s", "app": "a", "kind": "k", "version": 0}, 0, 1),
    (Cmd.BIND, {"session": "s", "app": "a", "kind": "k", "version": 0}, 2, 1),
    (Cmd.CTX_WRITE, {"session": "s", "seq": 1, "ops": None}, 0, 1),
    (Cmd.CTX_WRITE, {"session": "s", "seq": 1, "ops": []}, 1, 0),
    (Cmd.CTX_PATCH, {"session": "s", "version": 1, "ops": None, "seq": None}, 2, 1),
    (Cmd.CTX_PATCH, {"session": "s", "version": 1, "ops": [], "seq": 1}, 1, 0),
], ids=lambda v: getattr(v, "name", None) if isinstance(v, Cmd) else None)
def test_wrong_payload_frame_count(cmd: Cmd, header: Any, n: int, expected: int) -> None:
    msg = rejected(frames_for(cmd, header, n))
    assert cmd.name in msg
    assert f"{n} payload frames, expected {expected}" in msg


# --------------------------------------------------------------------------------------------
# Fuzz: decode raises ProtocolError and nothing else, whatever the frames
# --------------------------------------------------------------------------------------------

FIELD_NAMES = sorted({k for cases in VALID.values() for h, _ in cases if isinstance(h, dict) for k in h})

_int64 = st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
_scalars = st.one_of(st.none(), st.booleans(), _int64, st.floats(allow_nan=True), st.text(max_size=8),
                     st.binary(max_size=8),
                     st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)))
_keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=4))
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(_keys, children, max_size=5)),
    max_leaves=12,
)
_cmd_bytes = st.one_of(st.sampled_from([bytes((c,)) for c in Cmd]), st.binary(max_size=3))
_magics = st.one_of(st.just(MAGIC), st.binary(max_size=4), st.builds(lambda v: b"ZM" + bytes([v]), st.integers(0, 255)))
_payloads = st.lists(st.binary(max_size=8), max_size=5)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_only_protocol_errors(frames: List[Any]) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        assert str(exc)  # always says something
        return
    # a message that passes must be internally consistent
    assert isinstance(msg.cmd, Cmd)
    assert isinstance(msg.header, tuple) and type(msg.header) is RECORDS[msg.cmd][0]


@SETTINGS
@given(st.lists(st.binary(max_size=16), max_size=7))
def test_fuzz_arbitrary_frames(frames: List[bytes]) -> None:
    _decode_only_protocol_errors(frames)


@SETTINGS
@given(_magics, _cmd_bytes, st.binary(max_size=32), _payloads)
def test_fuzz_magic_cmd_random_header_bytes(magic: bytes, cmd: bytes, header: bytes, payloads: List[bytes]) -> None:
    _decode_only_protocol_errors([magic, cmd, header, *payloads])


@SETTINGS
@given(st.sampled_from(list(Cmd)), st.lists(st.sampled_from(
    [b"\x80", b"\x90", b"\x92", b"\x81", b"\xa1", b"a", b"\x01", b"\xc0", b"\xc3", b"\xd4\x01",
     b"\xc4\x01", b"\xd6\xff", b"\xdd", b"\xde", b"\xcf", b"\x93\x01\x02"]), max_size=12),
       _payloads)
def test_fuzz_msgpack_ish_header(cmd: Cmd, pieces: List[bytes], payloads: List[bytes]) -> None:
    _decode_only_protocol_errors([MAGIC, bytes((cmd,)), b"".join(pieces), *payloads])


@SETTINGS
@given(st.sampled_from(list(Cmd)), _values, _payloads)
def test_fuzz_packed_structures(cmd: Cmd, header: Any, payloads: List[bytes]) -> None:
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return
    _decode_only_protocol_errors([MAGIC, bytes((cmd,)), packed, *payloads])
    _decode_only_protocol_errors([memoryview(MAGIC), memoryview(bytes((cmd,))), memoryview(packed),
                                  *map(memoryview, payloads)])


@SETTINGS
@given(st.sampled_from(VALID_CASES), st.data())
def test_fuzz_mutated_valid_headers(case: Tuple[Cmd, Any, int], data: st.DataObject) -> None:
    cmd, header, n = case
    if isinstance(header, dict) and header:
        key = data.draw(st.sampled_from(sorted(header)))
        header = dict(header, **{key: data.draw(_values)})
    elif isinstance(header, list) and header:
        header = list(header)
        header[data.draw(st.integers(0, len(header) - 1))] = data.draw(_values)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return
    extra = data.draw(st.integers(-1, 2))
    _decode_only_protocol_errors([MAGIC, bytes((cmd,)), packed, *[b"p"] * max(0, n + extra)])


def test_deeply_nested_header_is_a_protocol_error_or_accepted() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    _decode_only_protocol_errors(raw(Cmd.HEARTBEAT, deep))
    _decode_only_protocol_errors(raw(Cmd.DONE, deep))


# --------------------------------------------------------------------------------------------
# Errors on the wire and through pickle
# --------------------------------------------------------------------------------------------

DETAILS = {"field": "spec.resreq.cpu", "limit": 3, "nested": {"a": [1, 2.5, None, True]}, "raw": b"\x00\x01"}


@pytest.mark.parametrize("cls", sorted(ERRORS.values(), key=lambda c: c.code), ids=lambda c: c.__name__)
def test_error_wire_round_trip(cls: type) -> None:
    # Given an error with a message and details
    err = cls("something went wrong", **DETAILS)
    # When it goes to the wire, through msgpack (the codec the manager uses), and back
    wire = err.to_wire()
    assert wire["code"] == cls.code
    back = from_wire(msgpack.unpackb(pack(wire), raw=False))
    # Then class, message and details survive
    assert type(back) is cls
    assert back.message == "something went wrong"
    assert str(back) == "something went wrong"
    assert back.details == DETAILS
    assert back.exit_code == cls.exit_code


def test_error_codes_are_unique_and_complete() -> None:
    subclasses = [getattr(errors, n) for n in dir(errors)]
    mesh_errors = {c for c in subclasses if isinstance(c, type) and issubclass(c, MeshError) and c is not MeshError}
    assert set(ERRORS.values()) == mesh_errors
    assert len({c.exit_code for c in ERRORS.values()}) == len(ERRORS)


@pytest.mark.parametrize("wire", [
    {"code": "no_such_code", "message": "odd", "details": {"x": 1}},
    {"code": None, "message": "odd"},
    {"message": "odd"},
    {"code": 17, "message": "odd", "details": {"x": 1}},
])
def test_unknown_code_becomes_internal(wire: Dict[str, Any]) -> None:
    back = from_wire(wire)
    assert type(back) is Internal
    assert back.message == "odd"
    assert back.details == (wire.get("details") or {})


@pytest.mark.parametrize("wire", [None, "boom", 3, ["internal", "x"]])
def test_malformed_wire_error_becomes_internal(wire: Any) -> None:
    back = from_wire(wire)
    assert type(back) is Internal
    assert "malformed" in back.message


@pytest.mark.parametrize("details", [None, "x", [1, 2], 5])
def test_non_map_details_are_dropped(details: Any) -> None:
    back = from_wire({"code": "not_found", "message": "m", "details": details})
    assert type(back) is NotFound and back.details == {}


@pytest.mark.parametrize("key", ["message", "self"])
def test_from_wire_tolerates_details_named_like_constructor_parameters(key: str) -> None:
    # Wire errors come from untrusted peers; a details map is "a small msgpack-able
    # map" with any str keys.  from_wire must still return a typed error.
    back = from_wire({"code": "not_found", "message": "m", "details": {key: "x", "other": 1}})
    assert type(back) is NotFound
    assert back.message == "m"


@given(st.sampled_from(sorted(ERRORS)), st.text(max_size=20),
       st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("message", "self")),
                       _values.filter(lambda v: not isinstance(v, msgpack.ExtType)), max_size=4))
@settings(max_examples=60, deadline=None)
def test_error_wire_round_trip_property(code: str, message: str, details: Dict[str, Any]) -> None:
    err = ERRORS[code](message, **details)
    back = from_wire(err.to_wire())
    assert type(back) is type(err) and back.message == message and back.details == details


@pytest.mark.parametrize("cls", sorted(ERRORS.values(), key=lambda c: c.code) + [MeshError],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("dumps", [cloudpickle.dumps, pickle.dumps], ids=["cloudpickle", "pickle"])
def test_error_pickles_with_details(cls: type, dumps: Any) -> None:
    err = cls("remote failure", type="ValueError", traceback="Traceback...", n=3)
    back = pickle.loads(dumps(err))
    assert type(back) is cls
    assert back.message == "remote failure"
    assert str(back) == "remote failure"
    assert back.details == {"type": "ValueError", "traceback": "Traceback...", "n": 3}
    assert back.code == cls.code


def test_task_failed_keeps_remote_info_through_cloudpickle() -> None:
    err = TaskFailed("ZeroDivisionError: division by zero", type="ZeroDivisionError", traceback="tb text")
    back = cloudpickle.loads(cloudpickle.dumps(err))
    assert isinstance(back, TaskFailed) and isinstance(back, MeshError)
    assert back.remote_type == "ZeroDivisionError"
    assert back.remote_traceback == "tb text"


def test_error_without_message_prints_its_code() -> None:
    assert str(NotFound()) == "not_found"
    assert str(cloudpickle.loads(cloudpickle.dumps(ProtocolError()))) == "protocol_error"


# --------------------------------------------------------------------------------------------
# Bundles: small payloads of the hot-path commands travel as one frame
# --------------------------------------------------------------------------------------------

def test_small_payloads_travel_as_one_frame_and_come_back_apart() -> None:
    payloads = [b"", b"a", b"bc" * 100, bytes(range(256))]
    frames = encode(Submit("s", [1, 2, 3, 4], "c", False), payloads)
    assert len(frames) == 4, "signature, command, header, one bundle"
    msg = decode(frames)
    assert msg.header.sizes == [len(p) for p in payloads]
    assert [bytes(p) for p in msg.payloads] == payloads


def test_a_large_payload_is_never_copied_into_a_bundle() -> None:
    big = b"x" * (64 * 1024)
    frames = encode(Submit("s", [1, 2], "c", False), [big, b"small"])
    assert len(frames) == 5 and frames[3] is big
    assert decode(frames).header.sizes is None


@pytest.mark.parametrize("sizes,frames", [([1, 2], [b"abcd"]), ([1, -1], [b""]), ([1, 1], [b"a", b"b"])],
                         ids=["short", "negative", "two-frames"])
def test_a_bundle_that_does_not_add_up_is_a_protocol_error(sizes: List[int], frames: List[bytes]) -> None:
    msg = rejected(raw(Cmd.SUBMIT, pack(["s", [1, 2], "c", False, None, sizes]), *frames))
    assert "SUBMIT" in msg and "bundle" in msg


# --------------------------------------------------------------------------------------------
# docs/protocol.md and the code agree field by field
# --------------------------------------------------------------------------------------------

def test_protocol_doc_lists_every_record_field_by_field() -> None:
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert f"version {VERSION}" in doc.splitlines()[0]
    for cmd, (record, shape) in RECORDS.items():
        # Given the command's row in the commands table
        rows = [line for line in doc.splitlines() if line.startswith(f"| 0x{cmd:02X} | {cmd.name} (`{record.__name__}`)")]
        assert len(rows) == 1, f"docs/protocol.md has no row for {cmd.name}"
        cells = [c.strip() for c in rows[0].split("|")[1:-1]]
        # Then it names the shape and exactly the record's fields, in order
        assert cells[3] == shape, cmd.name
        named = re.findall(r"(?:`|\[|, )([a-z_]+)\??:", cells[4])
        assert named == list(record._fields), (cmd.name, named)

"""Wire protocol: frames <-> messages.  Pure: no sockets, no asyncio, no pickle.

Every message a peer sends over its DEALER socket is a multipart message::

    frame 0   b"ZM" + version byte            (MAGIC)
    frame 1   command, one byte               (Cmd)
    frame 2   msgpack header                  (shape fixed per command)
    frame 3+  opaque payload frames           (pickled requests/results, context blobs)

The manager's ROUTER socket prepends the peer identity; :func:`decode` takes the
frames after it.  Payload frames are never decoded by the manager; they are
moved from one peer to another as they came.  See docs/protocol.md.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import msgpack

from .errors import ProtocolError

VERSION = 1
MAGIC = b"ZM" + bytes([VERSION])

Frame = Union[bytes, memoryview, Any]  # bytes or zmq.Frame


class Cmd(enum.IntEnum):
    REQUEST = 0x01      # peer -> manager: control call {rid, method, args, blob?} + [blob] when blob is true
    REPLY = 0x02        # manager -> peer: {rid, ok, result | error, blob?} + [blob] when blob is true
    GONE = 0x0F         # manager -> peer: "I do not know you" {reason}; peer re-introduces itself or exits
    HEARTBEAT = 0x0E    # both ways, any time {}; any traffic counts as liveness
    SUBMIT = 0x10       # client -> manager: [sid, [tag...], client id, resend, token?] + one payload per tag
    RESULT = 0x11       # manager -> client: [sid, [[tag, error|nil]...]] + one payload per outcome
    EXEC_HELLO = 0x20   # executor -> manager: {id, caps}
    WELCOME = 0x21      # manager -> executor/instance: {heartbeat_ms, liveness}
    LAUNCH = 0x22       # manager -> executor: {iid, app}
    STOP = 0x23         # manager -> executor: {iid}
    EXITED = 0x24       # executor -> manager: {iid, code, reason}
    DRAIN = 0x25        # executor -> manager: {}: take no new work here; STOP each instance once idle
    INST_HELLO = 0x30   # instance -> manager: {iid, eid, pid}
    BIND = 0x31         # manager -> instance: {sid|nil, app, kind, version} + [context bytes]
    TASKS = 0x32        # manager -> instance: [sid, context version, [[tid, attempt]...]] + one payload per task
    DONE = 0x33         # instance -> manager: [[tid, error|nil]...] + one payload per task
    CTX_WRITE = 0x34    # instance/client -> manager: {sid, seq, base, ops|nil} + [blob] when ops is nil
    CTX_PATCH = 0x35    # manager -> instance: {sid, version, ops|nil, seq|nil} + [blob] when ops is nil
    CTX_REJECT = 0x36   # manager -> instance: {sid, seq, error}
    RESYNC = 0x37       # instance -> manager: {sid, have}: replica saw a gap; answered with BIND


@dataclass
class Message:
    cmd: Cmd
    header: Any
    payloads: List[Frame] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _map(**fields: Callable[[Any], bool]) -> Callable[[Any], Optional[str]]:
    """Validator for a map header: each named key must be present and pass its check."""

    def check(h: Any) -> Optional[str]:
        if not isinstance(h, dict):
            return "header must be a map"
        for key, ok in fields.items():
            if key not in h:
                return f"header lacks {key!r}"
            if not ok(h[key]):
                return f"header field {key!r} has the wrong type"
        return None

    return check


def _pairs(h: Any, first: Callable[[Any], bool], second: Callable[[Any], bool]) -> bool:
    return isinstance(h, list) and all(
        isinstance(p, list) and len(p) == 2 and first(p[0]) and second(p[1]) for p in h
    )


def _err(v: Any) -> bool:
    return v is None or isinstance(v, dict)


_str = lambda v: isinstance(v, str)  # noqa: E731
_opt_str = lambda v: v is None or isinstance(v, str)  # noqa: E731
_opt_int = lambda v: v is None or _is_int(v)  # noqa: E731
_opt_list = lambda v: v is None or isinstance(v, list)  # noqa: E731
_any = lambda v: True  # noqa: E731


def _sid_list(check_item: Callable[[Any], bool]) -> Callable[[Any], Optional[str]]:
    def check(h: Any) -> Optional[str]:
        if not (isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], list)):
            return "header must be [session_id, [...]]"
        return None if check_item(h[1]) else "malformed item list"

    return check


HEADERS: Dict[Cmd, Callable[[Any], Optional[str]]] = {
    Cmd.REQUEST: _map(rid=_is_int, method=_str, args=lambda v: isinstance(v, dict)),
    Cmd.REPLY: _map(rid=_is_int, ok=lambda v: isinstance(v, bool)),
    Cmd.GONE: _map(reason=_str),
    Cmd.HEARTBEAT: lambda h: None if isinstance(h, dict) else "header must be a map",
    Cmd.SUBMIT: lambda h: None if (isinstance(h, list) and len(h) in (4, 5) and isinstance(h[0], str)
                                   and isinstance(h[1], list) and all(_is_int(t) for t in h[1])
                                   and isinstance(h[2], str) and isinstance(h[3], bool)
                                   and (len(h) == 4 or h[4] is None or isinstance(h[4], str)))
    else "header must be [session_id, [tag...], client_id, resend, token?]",
    Cmd.RESULT: _sid_list(lambda items: _pairs(items, _is_int, _err)),
    Cmd.EXEC_HELLO: _map(id=_str, caps=lambda v: isinstance(v, dict)),
    Cmd.WELCOME: _map(heartbeat_ms=_is_int, liveness=_is_int),
    Cmd.LAUNCH: _map(iid=_str, app=lambda v: isinstance(v, dict)),
    Cmd.STOP: _map(iid=_str),
    Cmd.EXITED: _map(iid=_str, code=_is_int, reason=_str),
    Cmd.DRAIN: lambda h: None if isinstance(h, dict) else "header must be a map",
    Cmd.INST_HELLO: _map(iid=_str, eid=_str, pid=_is_int),
    Cmd.BIND: _map(sid=_opt_str, app=_str, kind=_str, version=_is_int),
    Cmd.TASKS: lambda h: None if (isinstance(h, list) and len(h) == 3 and isinstance(h[0], str) and _is_int(h[1])
                                  and _pairs(h[2], _is_int, _is_int)) else "header must be [sid, version, [[tid, attempt]...]]",
    Cmd.DONE: lambda h: None if _pairs(h, _is_int, _err) else "header must be [[task_id, error|nil]...]",
    Cmd.CTX_WRITE: _map(sid=_str, seq=_is_int, base=_is_int, ops=_opt_list),
    Cmd.CTX_PATCH: _map(sid=_str, version=_is_int, ops=_opt_list, seq=_opt_int),
    Cmd.CTX_REJECT: _map(sid=_str, seq=_is_int, error=lambda v: isinstance(v, dict)),
    Cmd.RESYNC: _map(sid=_str, have=_is_int),
}

# How many payload frames each command carries; None means "one per header item".
_PAYLOADS: Dict[Cmd, Callable[[Any], int]] = {
    Cmd.SUBMIT: lambda h: len(h[1]),
    Cmd.RESULT: lambda h: len(h[1]),
    Cmd.TASKS: lambda h: len(h[2]),
    Cmd.DONE: lambda h: len(h),
    Cmd.BIND: lambda h: 1,
    Cmd.REQUEST: lambda h: 1 if h.get("blob") is True else 0,
    Cmd.REPLY: lambda h: 1 if h.get("blob") is True else 0,
    Cmd.CTX_WRITE: lambda h: 0 if h["ops"] is not None else 1,
    Cmd.CTX_PATCH: lambda h: 0 if h["ops"] is not None else 1,
}


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack ext types are not part of the protocol")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _str_keys(d: Dict[Any, Any]) -> Dict[Any, Any]:
    for k in d:
        if type(k) is not str:
            raise ValueError("map keys must be strings")
    return d


def unpack(data: Any) -> Any:
    """Decode one msgpack value: str map keys only, no ext types.

    The one ext type msgpack decodes natively (-1, timestamp) comes out as a
    float of seconds, so no foreign object type can reach a handler.
    """
    return msgpack.unpackb(data, raw=False, ext_hook=_no_ext, strict_map_key=True,
                           object_hook=_str_keys, timestamp=1)


def encode(cmd: Cmd, header: Any, payloads: Sequence[Frame] = ()) -> List[Frame]:
    return [MAGIC, bytes((cmd,)), pack(header), *payloads]


def decode(frames: Sequence[Frame]) -> Message:
    """Validate and decode one message (without the ROUTER identity frame).

    Raises ProtocolError, never anything else, whatever the bytes: this runs on
    untrusted input inside the manager's event loop.
    """
    if len(frames) < 3:
        raise ProtocolError(f"message has {len(frames)} frames; at least 3 expected")
    magic = bytes(frames[0])
    if magic != MAGIC:
        if magic[:2] == MAGIC[:2] and len(magic) == 3:
            raise ProtocolError(f"protocol version {magic[2]} not supported; this peer speaks {VERSION}")
        raise ProtocolError("first frame is not the zeromesh signature")
    cmd_frame = bytes(frames[1])
    if len(cmd_frame) != 1:
        raise ProtocolError("command frame must be one byte")
    try:
        cmd = Cmd(cmd_frame[0])
    except ValueError:
        raise ProtocolError(f"unknown command 0x{cmd_frame[0]:02x}") from None
    try:
        header = unpack(frames[2])
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"{cmd.name}: header is not valid msgpack ({type(exc).__name__})") from None
    try:
        problem = HEADERS[cmd](header)
    except Exception:  # a validator tripping on a weird shape is still a bad header
        problem = "header has the wrong shape"
    if problem:
        raise ProtocolError(f"{cmd.name}: {problem}")
    payloads = list(frames[3:])
    expected = _PAYLOADS.get(cmd, lambda h: 0)(header)
    if len(payloads) != expected:
        raise ProtocolError(f"{cmd.name}: {len(payloads)} payload frames, expected {expected}")
    return Message(cmd, header, payloads)

"""Wire protocol: frames <-> typed records.  Pure: no sockets, no asyncio, no pickle.

Every message a peer sends over its DEALER socket is a multipart message::

    frame 0   b"ZM" + version byte            (MAGIC)
    frame 1   command, one byte               (Cmd)
    frame 2   msgpack header                  (one record type per command)
    frame 3+  opaque payload frames           (pickled requests/results, context blobs)

Each command has one record type below (a ``NamedTuple``).  Its fields, in
order, are the header's fields: a *map* record travels as a msgpack map keyed
by field name, a *list* record (the hot path: SUBMIT, RESULT, TASKS, DONE) as
a msgpack array in field order.  :func:`decode` checks every field against its
annotation and returns the record; a missing, unknown or mistyped field is a
:class:`~mesh.errors.ProtocolError` naming the field.  :func:`encode` takes a
record.  The manager's ROUTER socket prepends the peer identity; :func:`decode`
takes the frames after it.  Payload frames are never decoded by the manager.
See docs/protocol.md, which lists the same records field by field.
"""
from __future__ import annotations

import enum
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import msgpack

from mesh.errors import ProtocolError

VERSION = 2
"""1: the first protocol.  2: typed records (unknown fields refused), DONE wrapped in a list,
CTX_WRITE without ``base``."""
MAGIC = b"ZM" + bytes([VERSION])

Frame = Union[bytes, memoryview, Any]  # bytes or zmq.Frame
Error = Dict[str, Any]                 # {code, message, details}: see mesh.errors
Outcome = Tuple[int, Optional[Error]]  # (tag or task id, error or nil): one answer


class Cmd(enum.IntEnum):
    REQUEST = 0x01      # peer -> manager: a control call
    REPLY = 0x02        # manager -> peer: a control call's answer
    HEARTBEAT = 0x0E    # both ways, when nothing else was said for a heartbeat interval
    GONE = 0x0F         # manager -> peer: "I do not know you"
    SUBMIT = 0x10       # client -> manager: tasks of one session
    RESULT = 0x11       # manager -> client: answers of one session
    STREAM = 0x12       # manager -> client: parts of streaming tasks of one session, in order
    STREAM_CREDIT = 0x13   # client -> manager: parts it can take (flow control), or cancel a stream
    EXEC_HELLO = 0x20   # executor -> manager: join with capabilities
    WELCOME = 0x21      # manager -> executor/instance: joined; the heartbeat contract
    LAUNCH = 0x22       # manager -> executor: start an instance
    STOP = 0x23         # manager -> executor: stop an instance
    EXITED = 0x24       # executor -> manager: an instance process ended
    DRAIN = 0x25        # executor -> manager: take no new work here
    INST_HELLO = 0x30   # instance -> manager: started, with its launch token
    BIND = 0x31         # manager -> instance: serve this session; its context snapshot
    TASKS = 0x32        # manager -> instance: tasks to run
    DONE = 0x33         # instance -> manager: answers
    CTX_WRITE = 0x34    # instance -> manager: a context write
    CTX_PATCH = 0x35    # manager -> instance: a sequenced context write
    CTX_REJECT = 0x36   # manager -> instance: a context write refused
    RESYNC = 0x37       # instance -> manager: replica saw a gap; answered with BIND
    PARTS = 0x38        # instance -> manager: parts of the streaming task it runs
    CREDIT = 0x39       # manager -> instance: how far its streams may go (or stop one)


# -- records: one per command; field order is wire order for list records -------------------

class Request(NamedTuple):
    """A control call.  ``blob``: one payload frame carries bulk data (zero-copy)."""
    rid: int
    method: str
    args: Dict[str, Any]
    token: Optional[str] = None
    blob: bool = False


class Reply(NamedTuple):
    """A control call's answer: ``result`` when ``ok``, else ``error``.  ``rid`` -1: a protocol error."""
    rid: int
    ok: bool
    result: Any = None
    error: Optional[Error] = None
    blob: bool = False


class Heartbeat(NamedTuple):
    """Executors add their current labels and object-cache counters."""
    labels: Optional[Dict[str, Any]] = None
    cache: Optional[Dict[str, Any]] = None


class Gone(NamedTuple):
    """The manager does not know the sender; ``fatal``: and never will (do not re-introduce yourself)."""
    reason: str
    fatal: bool = False


class Submit(NamedTuple):
    """Tasks of one session, one payload per tag.  ``(cid, tag)`` names a task across resends.
    ``timeout``: seconds each attempt of these tasks may run before it is stopped (else the
    application's ``task_timeout``)."""
    session: str
    tags: List[int]
    cid: str
    resend: bool
    token: Optional[str] = None
    sizes: Optional[List[int]] = None
    timeout: Optional[float] = None


class Result(NamedTuple):
    """Answers of one session: ``(tag, error|nil)`` each, one payload each (empty on error)."""
    session: str
    outcomes: List[Outcome]
    sizes: Optional[List[int]] = None


class ExecHello(NamedTuple):
    id: str
    caps: Dict[str, Any]


class Welcome(NamedTuple):
    heartbeat_ms: int
    liveness: int


class Launch(NamedTuple):
    """``token`` proves the instance's INST_HELLO came from this launch."""
    iid: str
    app: Dict[str, Any]
    token: str = ""


class Stop(NamedTuple):
    iid: str


class Exited(NamedTuple):
    """``code`` -1: could not start; < -1: killed by that signal."""
    iid: str
    code: int
    reason: str


class Drain(NamedTuple):
    pass


class InstHello(NamedTuple):
    iid: str
    eid: str
    pid: int
    token: str = ""
    functions: Optional[List[str]] = None   # the stateful function types it serves (docs/functions.md)
    stream: Optional[str] = None   # its entrypoint yields: "stream", or "restartable" (docs/streaming.md)


class Bind(NamedTuple):
    """Serve ``session`` (or none); one payload frame: the context snapshot at ``version``."""
    session: Optional[str]
    app: str
    kind: str
    version: int


class Tasks(NamedTuple):
    """Tasks to run, ``(task id, attempt)`` each, one payload each; ``version``: the
    session's context version at dispatch (a replica behind it resyncs first)."""
    session: str
    version: int
    items: List[Tuple[int, int]]
    sizes: Optional[List[int]] = None


class Done(NamedTuple):
    """Answers: ``(task id, error|nil)`` each, one payload each (empty on error)."""
    outcomes: List[Outcome]
    sizes: Optional[List[int]] = None


class CtxWrite(NamedTuple):
    """JSON-patch ``ops``, or nil and one payload frame: a blob that replaces the context."""
    session: str
    seq: int
    ops: Optional[List[Any]]


class CtxPatch(NamedTuple):
    """A sequenced write; ``seq`` is set only in the copy sent to its writer."""
    session: str
    version: int
    ops: Optional[List[Any]]
    seq: Optional[int] = None


class CtxReject(NamedTuple):
    session: str
    seq: int
    error: Error


class Resync(NamedTuple):
    session: str
    have: int


STREAM_END = b"\x00"   # a streaming task's answer: this byte, then its part count in ASCII (never a pickle)


def stream_end(parts: int) -> bytes:
    return STREAM_END + str(parts).encode()


def stream_end_count(payload: Any) -> Optional[int]:
    """The part count of a streaming task's answer, or None if ``payload`` is an ordinary result."""
    view = memoryview(getattr(payload, "buffer", payload))   # bytes, or a zmq.Frame: no copy
    if len(view) < 2 or view[0] != 0 or len(view) > 24:
        return None
    digits = bytes(view[1:])
    return int(digits) if digits.isdigit() else None


class Parts(NamedTuple):
    """Parts of streaming tasks (an entrypoint that yields), ``(task id, seq)`` each, seq from 0,
    one payload each (the pickled part), in order (docs/streaming.md)."""
    items: List[Tuple[int, int]]
    sizes: Optional[List[int]] = None


class Credit(NamedTuple):
    """Flow control of streams: ``(task id, upto)``: send parts below seq ``upto`` (-1: stop the
    generator, its ``finally`` runs, and answer ``cancelled``)."""
    items: List[Tuple[int, int]]


class Stream(NamedTuple):
    """Parts of the client's streaming tasks of one session, ``(tag, seq)`` each, one payload each."""
    session: str
    items: List[Tuple[int, int]]
    sizes: Optional[List[int]] = None


class StreamCredit(NamedTuple):
    """The client takes parts of its task ``tag`` below seq ``upto`` (-1: cancel the stream)."""
    session: str
    cid: str
    items: List[Tuple[int, int]]


Record = Union[Request, Reply, Heartbeat, Gone, Submit, Result, ExecHello, Welcome, Launch, Stop, Exited, Drain,
               InstHello, Bind, Tasks, Done, CtxWrite, CtxPatch, CtxReject, Resync, Parts, Credit, Stream,
               StreamCredit]

MAP, LIST = "map", "list"
RECORDS: Dict[Cmd, Tuple[Type[Any], str]] = {
    Cmd.REQUEST: (Request, MAP), Cmd.REPLY: (Reply, MAP), Cmd.HEARTBEAT: (Heartbeat, MAP), Cmd.GONE: (Gone, MAP),
    Cmd.SUBMIT: (Submit, LIST), Cmd.RESULT: (Result, LIST), Cmd.EXEC_HELLO: (ExecHello, MAP),
    Cmd.WELCOME: (Welcome, MAP), Cmd.LAUNCH: (Launch, MAP), Cmd.STOP: (Stop, MAP), Cmd.EXITED: (Exited, MAP),
    Cmd.DRAIN: (Drain, MAP), Cmd.INST_HELLO: (InstHello, MAP), Cmd.BIND: (Bind, MAP), Cmd.TASKS: (Tasks, LIST),
    Cmd.DONE: (Done, LIST), Cmd.CTX_WRITE: (CtxWrite, MAP), Cmd.CTX_PATCH: (CtxPatch, MAP),
    Cmd.CTX_REJECT: (CtxReject, MAP), Cmd.RESYNC: (Resync, MAP), Cmd.PARTS: (Parts, LIST),
    Cmd.CREDIT: (Credit, LIST), Cmd.STREAM: (Stream, LIST), Cmd.STREAM_CREDIT: (StreamCredit, LIST),
}
CMD_OF: Dict[Type[Any], Cmd] = {rec: cmd for cmd, (rec, _) in RECORDS.items()}

# Commands with one payload per item.  Small payloads travel bundled: one frame holding them all,
# cut by the header's ``sizes`` (a frame costs a system call and a Python call at each end; a few
# hundred no-op tasks then cost one frame, not hundreds).  Large ones travel one frame each, uncopied.
BUNDLED = frozenset({Cmd.SUBMIT, Cmd.RESULT, Cmd.TASKS, Cmd.DONE, Cmd.PARTS, Cmd.STREAM})
BUNDLE_ITEM_MAX = 64 * 1024        # a payload this large or larger is never copied into a bundle

# How many payloads each command carries, after unbundling (commands not listed carry none).
_PAYLOADS: Dict[Cmd, Callable[[Any], int]] = {
    Cmd.SUBMIT: lambda r: len(r.tags),
    Cmd.RESULT: lambda r: len(r.outcomes),
    Cmd.TASKS: lambda r: len(r.items),
    Cmd.DONE: lambda r: len(r.outcomes),
    Cmd.PARTS: lambda r: len(r.items),
    Cmd.STREAM: lambda r: len(r.items),
    Cmd.BIND: lambda r: 1,
    Cmd.REQUEST: lambda r: 1 if r.blob else 0,
    Cmd.REPLY: lambda r: 1 if r.blob else 0,
    Cmd.CTX_WRITE: lambda r: 0 if r.ops is not None else 1,
    Cmd.CTX_PATCH: lambda r: 0 if r.ops is not None else 1,
}


@dataclass
class Message:
    cmd: Cmd
    header: Any                      # the command's record
    payloads: List[Frame] = field(default_factory=list)


# -- field checks, built once from the records' annotations -----------------------------------

Check = Callable[[Any], bool]


def _is_outcomes(v: Any) -> bool:
    return type(v) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is int
                                   and (p[1] is None or type(p[1]) is dict) for p in v)


def _is_int_pairs(v: Any) -> bool:
    return type(v) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int
                                   for p in v)


def _is_ints(v: Any) -> bool:
    return type(v) is list and all(type(x) is int for x in v)


# The hot path's item lists, checked inline: one generator per list instead of a call per item
# (a DONE of 100 answers decoded 3x faster).  Same rules as the general checks below.
_FAST_CHECKS: Dict[Any, Check] = {List[Outcome]: _is_outcomes, List[Tuple[int, int]]: _is_int_pairs,
                                  List[int]: _is_ints, Optional[List[int]]: lambda v: v is None or _is_ints(v)}


def _check_for(tp: Any) -> Check:
    """A predicate for one annotation: str, int, bool, Any, Optional/Union, List[X], Dict, Tuple[...]."""
    if tp in _FAST_CHECKS:
        return _FAST_CHECKS[tp]
    if tp is Any:
        return lambda v: True
    if tp is int:
        return lambda v: type(v) is int
    if tp in (str, bool, float):
        return lambda v: isinstance(v, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        alts = [_check_for(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        return lambda v: (v is None and nullable) or any(c(v) for c in alts)
    if origin in (list, List):
        item = _check_for(args[0]) if args else _check_for(Any)
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    if origin in (dict, Dict):
        return lambda v: isinstance(v, dict)
    if origin in (tuple, Tuple):   # a fixed-length array on the wire
        parts = [_check_for(a) for a in args]
        n = len(parts)
        return lambda v: isinstance(v, list) and len(v) == n and all(c(x) for c, x in zip(parts, v))
    raise TypeError(f"no wire check for {tp!r}")  # a programming error in this module


_CHECKS: Dict[Cmd, List[Tuple[str, Check]]] = {}
for _cmd, (_rec, _) in RECORDS.items():
    _hints = typing.get_type_hints(_rec, vars(sys.modules[__name__]))
    _CHECKS[_cmd] = [(name, _check_for(_hints[name])) for name in _rec._fields]


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _from_map(cmd: Cmd, rec: Type[Any], h: Any) -> Any:
    if not isinstance(h, dict):
        raise ProtocolError(f"{cmd.name}: header must be a map")
    defaults = rec._field_defaults
    for key in h:
        if key not in defaults and key not in rec._fields:
            raise ProtocolError(f"{cmd.name}: unknown field {key!r}", field=key)
    values = []
    for name, ok in _CHECKS[cmd]:
        if name in h:
            v = h[name]
            if not ok(v):
                raise ProtocolError(f"{cmd.name}: field {name!r} has the wrong type "
                                    f"(expected {_describe(typing.get_type_hints(rec)[name])})", field=name)
            values.append(v)
        elif name in defaults:
            values.append(defaults[name])
        else:
            raise ProtocolError(f"{cmd.name}: header lacks field {name!r}", field=name)
    return rec._make(values)


def _from_list(cmd: Cmd, rec: Type[Any], h: Any) -> Any:
    checks = _CHECKS[cmd]
    required = len(checks) - len(rec._field_defaults)
    if not isinstance(h, list) or not required <= len(h) <= len(checks):
        names = ", ".join(rec._fields)
        raise ProtocolError(f"{cmd.name}: header must be [{names}]")
    for (name, ok), v in zip(checks, h):
        if not ok(v):
            raise ProtocolError(f"{cmd.name}: field {name!r} has the wrong type", field=name)
    return rec._make(h) if len(h) == len(checks) else rec(*h)


# -- msgpack -----------------------------------------------------------------------------------

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


# -- codec -------------------------------------------------------------------------------------

def header_of(record: Any) -> Any:
    """The msgpack value a record travels as: a list in field order, or a map; optional fields
    left at their defaults are not sent (trailing ones, for a list)."""
    cmd = CMD_OF[type(record)]
    defaults = type(record)._field_defaults
    if RECORDS[cmd][1] == LIST:
        values = list(record)
        while values and record._fields[len(values) - 1] in defaults \
                and values[-1] == defaults[record._fields[len(values) - 1]]:
            values.pop()   # trailing optional fields left at their defaults are not sent
        return values
    return {k: v for k, v in zip(record._fields, record) if k not in defaults or v != defaults[k]}


def encode(record: Any, payloads: Sequence[Frame] = ()) -> List[Frame]:
    """The frames of one message (without a ROUTER identity); small payloads of the hot-path
    commands are bundled into one frame (see ``BUNDLED``)."""
    cmd = CMD_OF[type(record)]
    if cmd in BUNDLED and len(payloads) > 1 and all(len(p) < BUNDLE_ITEM_MAX for p in payloads):
        record = record._replace(sizes=[len(p) for p in payloads])
        payloads = [b"".join(payloads)]
    return [MAGIC, _CMD_BYTES[cmd], pack(header_of(record)), *payloads]


def _unbundle(cmd: Cmd, sizes: List[int], frames: List[Frame]) -> List[Frame]:
    """The payloads of a bundled message: views into its one frame (no copy)."""
    if len(frames) != 1:
        raise ProtocolError(f"{cmd.name}: a bundle is one payload frame, got {len(frames)}", field="sizes")
    buf = memoryview(frames[0])
    if any(n < 0 for n in sizes) or sum(sizes) != buf.nbytes:
        raise ProtocolError(f"{cmd.name}: bundle sizes add up to {sum(sizes)}, the frame has {buf.nbytes} bytes",
                            field="sizes")
    out: List[Frame] = []
    at = 0
    for n in sizes:
        out.append(buf[at:at + n])
        at += n
    return out


_CMD_BYTES = {cmd: bytes((cmd,)) for cmd in Cmd}
_CMD_OF_BYTE = {int(cmd): cmd for cmd in Cmd}   # a dict lookup, not an Enum call, per message


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
    cmd = _CMD_OF_BYTE.get(cmd_frame[0])
    if cmd is None:
        raise ProtocolError(f"unknown command 0x{cmd_frame[0]:02x}")
    try:
        header = unpack(frames[2])
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"{cmd.name}: header is not valid msgpack ({type(exc).__name__})") from None
    rec, shape = RECORDS[cmd]
    try:
        record = _from_list(cmd, rec, header) if shape == LIST else _from_map(cmd, rec, header)
    except ProtocolError:
        raise
    except Exception:  # a check tripping on a weird shape is still a bad header
        raise ProtocolError(f"{cmd.name}: header has the wrong shape") from None
    payloads = list(frames[3:])
    if cmd in BUNDLED and record.sizes is not None:
        payloads = _unbundle(cmd, record.sizes, payloads)
    expected = _PAYLOADS[cmd](record) if cmd in _PAYLOADS else 0
    if len(payloads) != expected:
        raise ProtocolError(f"{cmd.name}: {len(payloads)} payload frames, expected {expected}")
    return Message(cmd, record, payloads)

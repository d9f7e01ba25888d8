"""``zmesh`` commands for stateful functions: ``functions list / send / state`` and ``egress tail``.

Messages typed on the command line are JSON, so they reach a function as a dict, list, str,
number, bool or None; a function typed for a class refuses them (``invalid_argument`` naming the
classes it takes).  Replies, state and egress records are unpickled leniently: a class of the
functions' module that is not importable here prints as its fields.  Tables for people,
``--json`` for scripts; errors as one line with the error's exit code.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Tuple

import click

from mesh.errors import InvalidArgument
from mesh.model.functions import MAX_CALL_WAIT, check_id, check_typename
from mesh.ops.config import default_manager
from mesh.wire.protocol import unpack

from .cli_common import _errors, _lenient_loads, _table, _Unknown, json_option, main, manager_option

if TYPE_CHECKING:
    from .functions import Functions

EGRESS_STEP = 10.0   # seconds one egress read waits in the manager (a --follow loop makes many)


def _functions(manager: Optional[str]) -> "Functions":
    from .functions import Functions
    return Functions(manager or default_manager())


def _json_value(text: str, what: str = "the message") -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None


def _plain(v: Any) -> Any:
    """A value as JSON-able data, all the way down: dataclasses, NamedTuples and classes not
    importable here as their fields, bytes as base64, sets and tuples as lists; anything else
    is left for ``default=repr``."""
    if isinstance(v, _Unknown):
        return {k: _plain(x) for k, x in vars(v).items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple) and hasattr(v, "_asdict"):
        return {k: _plain(x) for k, x in v._asdict().items()}
    if isinstance(v, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else repr(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    return v


def _dumps(v: Any) -> str:
    return json.dumps(_plain(v), default=repr)


def _loads(blob: Any) -> Any:
    """One pickled value, leniently; a value that cannot be unpickled at all prints as why."""
    try:
        return _lenient_loads(blob)
    except Exception as exc:
        return f"<cannot unpickle: {type(exc).__name__}: {exc}>"


def _record(kind: str, rec: bytes) -> Any:
    """An egress record: a function's (pickled) or the manager's own (``doc``: msgpack, e.g. a
    dead letter, whose undelivered message is shown unpickled too)."""
    if kind != "doc":
        return _loads(rec)
    doc = unpack(rec)
    if isinstance(doc, dict) and isinstance(doc.get("message"), (bytes, bytearray)):
        doc = {**doc, "message": _loads(doc["message"])}
    return doc


# -- functions ------------------------------------------------------------------------------
@main.group(name="functions")
def functions_group() -> None:
    """Stateful functions: the types served, messages to an address, an address's state."""


@functions_group.command(name="list")
@manager_option
@json_option
@_errors
def list_(manager: Optional[str], as_json: bool) -> None:
    """Function types: the application serving each, its instances, the addresses held, queued messages."""
    with _functions(manager) as fx:
        page = fx.list()
    rows = list(page.items)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    title = f"function types ({len(rows)} of {page.total})" if page.total > len(rows) else "function types"
    _table([{**r, "application": r.get("application") or "-"} for r in rows],
           ["type", "application", "instances", "addresses", "queued"], title)


@functions_group.command()
@manager_option
@click.argument("typename", metavar="TYPE")
@click.argument("identity", metavar="ID")
@click.argument("message", metavar="JSON")
@click.option("--call", "call", is_flag=True, help="Wait for the function's reply and print it (JSON).")
@click.option("--timeout", type=click.FloatRange(0, MAX_CALL_WAIT, min_open=True), default=30.0,
              show_default=True, help="With --call: seconds to wait for the reply.")
@json_option
@_errors
def send(manager: Optional[str], typename: str, identity: str, message: str, call: bool, timeout: float,
         as_json: bool) -> None:
    """Send the JSON value MESSAGE to the function TYPE (namespace/name) at ID.

    Returns once the manager has the message on disk; --call waits for the reply instead
    (no reply within --timeout: deadline_exceeded, exit 9; the message is still delivered).
    """
    value = _json_value(message)
    check_typename(typename)
    check_id(identity)
    with _functions(manager) as fx:
        if not call:
            mid = fx.send(typename, identity, value)
            click.echo(json.dumps({"mid": mid, "type": typename, "id": identity}) if as_json
                       else f"sent {mid} to {typename}/{identity}")
            return
        from .functions import _pickle   # the reply decoded leniently: the functions' classes need not be here
        conn = fx._conn
        r, blob = conn.call_blob("fn_call", {"type": typename, "id": identity, "timeout": float(timeout)},
                                 _pickle(value), timeout=timeout + conn.settings.request_timeout)
    reply = _loads(blob) if r.get("replied") and blob is not None else None
    click.echo(_dumps(reply))


@functions_group.command()
@manager_option
@click.argument("typename", metavar="TYPE")
@click.argument("identity", metavar="ID")
@json_option
@_errors
def state(manager: Optional[str], typename: str, identity: str, as_json: bool) -> None:
    """The live state of the function TYPE at ID (read-only), one "NAME = JSON" line per value."""
    with _functions(manager) as fx:
        r = fx._conn.call("fn_state", {"type": check_typename(typename), "id": check_id(identity)})
    values = {name: _loads(blob) for name, blob in sorted(r["state"].items())}
    if as_json:
        click.echo(_dumps(values))
    elif not values:
        click.echo(f"{typename}/{identity} holds no state")
    else:
        for name, v in values.items():
            click.echo(f"{name} = {_dumps(v)}")


# -- egress ---------------------------------------------------------------------------------
@main.group()
def egress() -> None:
    """Records that stateful functions wrote with context.send_egress (zmesh/dead-letters: messages not delivered)."""


def _tail(fx: "Functions", typename: str, offset: int, timeout: float,
          follow: bool) -> Iterator[Tuple[int, float, Any]]:
    """Records from ``offset`` on; ends once none came for ``timeout`` seconds unless ``follow``.
    Every read is bounded (it waits at most EGRESS_STEP in the manager)."""
    conn = fx._conn
    quiet_since = time.monotonic()
    while True:   # the records already there are read even with --timeout 0
        left = EGRESS_STEP if follow else timeout - (time.monotonic() - quiet_since)
        wait = min(max(left, 0.0), EGRESS_STEP)
        r = conn.call("fn_egress", {"typename": typename, "offset": offset, "wait": wait},
                      timeout=wait + conn.settings.request_timeout)
        for o, at, kind, rec in r["records"]:
            offset = o + 1
            quiet_since = time.monotonic()
            yield o, at, _record(kind, bytes(rec))
        if not r["records"] and not follow and time.monotonic() - quiet_since >= timeout:
            return


@egress.command()
@manager_option
@click.argument("typename", metavar="TYPE")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True,
              help="The first record to print (resume at the last offset + 1).")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new records until Ctrl-C.")
@click.option("--timeout", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Without --follow: stop after this many seconds without a new record.")
@json_option
@_errors
def tail(manager: Optional[str], typename: str, offset: int, follow: bool, timeout: float, as_json: bool) -> None:
    """Print the records of egress TYPE, one "OFFSET JSON" line each (--json: one JSON object each)."""
    check_typename(typename)
    with _functions(manager) as fx:
        try:
            for o, at, message in _tail(fx, typename, offset, timeout, follow):
                if as_json:
                    click.echo(json.dumps({"offset": o, "at": at, "message": _plain(message)}, default=repr))
                else:
                    click.echo(f"{o} {_dumps(message)}")
        except KeyboardInterrupt:
            pass


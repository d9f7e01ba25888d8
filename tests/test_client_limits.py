"""A caller's mistake costs that call only (issue 11, items 8-10).

8. A value the client cannot send (msgpack cannot encode it, a session id that is not a str, a
   payload that is not bytes) is the caller's ``InvalidArgument``, raised in the caller's thread;
   the connection's I/O thread lives on, tasks in flight are answered, later calls work.
9. A control call over ``max_message_size`` is ``ResourceExhausted`` naming the limit, at once,
   not ``Unavailable`` after the request timeout; and what the manager does with an oversized
   message from a peer that does not check (a raw DEALER) is pinned down.
10. A spec file is read up to ``MAX_SPEC_BYTES``: ``zmesh register -f /dev/zero`` is one error line.

Every wait is bounded (a call that could hang runs on a helper thread with a deadline), every
process is a LocalMesh child ended by its PID.
"""
from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator

import pytest
import zmq
from conftest import FAST, tools_spec
from test_client_errors import NOBODY, _raises, _within

from client import Client, Connection, Session
from client import objects as client_objects
from client.local import LocalMesh
from mesh.errors import InvalidArgument, ResourceExhausted
from mesh.model.spec import MAX_SPEC_BYTES, load_spec
from mesh.ops.config import Settings
from mesh.testing import wait_until
from mesh.wire.protocol import Cmd, Request, decode, encode

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOUND = 15.0                     # seconds any single step may take before the test fails
SMALL = 1 << 20                  # max_message_size of the small mesh below


def _alive(conn: Connection) -> None:
    """The connection still works: its I/O thread runs and the manager answers it."""
    assert conn._thread.is_alive() and conn._failure is None, conn._failure
    status, value = _within(BOUND, lambda: conn.call("ping", {}))
    assert status == "ok", value


@pytest.fixture(autouse=True)
def _object_connections() -> Iterator[None]:
    """put_object keeps one connection per manager for the process (client.objects): close ours."""
    yield
    with client_objects._lock:
        for conn in client_objects._conns.values():
            conn.close()
        client_objects._conns.clear()


# -- 8. arguments the client cannot send --------------------------------------------------------
def _bad_calls(c: Client, s: Session) -> Dict[str, Callable[[], Any]]:
    """One per way a caller's value could reach the I/O thread unsendable."""
    conn = c.conn
    return {
        "get_task(2**70)": lambda: c.get_task(2 ** 70),
        "get_task(-2**70)": lambda: c.get_task(-(2 ** 70)),
        "get_session(object())": lambda: c.get_session(object()),                      # type: ignore[arg-type]
        "find_sessions(filter 2**70)": lambda: c.find_sessions(filter={"created_at": (">=", 2 ** 70)}),
        "cancel_task(a set)": lambda: c.cancel_task({1, 2}),                             # type: ignore[arg-type]
        "Session(session_id=2**70)": lambda: Session(session_id=2 ** 70, connection=conn),  # type: ignore[arg-type]
        "Session(resreq=object)": lambda: Session("tools", resreq={"cpu": object()}, connection=conn),
        "put_object(ttl=object)": lambda: client_objects.put_object("x", ttl=object()),  # type: ignore[arg-type]
        "put_object(session=42)": lambda: client_objects.put_object("x", session=42),
        "call_blob(blob=str)": lambda: conn.call_blob("put_object", {"kind": "blob"}, "not bytes"),
        "call_blob(blob=strided view)": lambda: conn.call_blob("put_object", {"kind": "blob"},
                                                               memoryview(b"abcd")[::2]),
        "call(args=list)": lambda: conn.call("ping", [1]),                               # type: ignore[arg-type]
        "call(method=int)": lambda: conn.call(7),                                        # type: ignore[arg-type]
        "submit(session=int)": lambda: conn.submit(123, b"x", bytes),                   # type: ignore[arg-type]
        "submit(payload=str)": lambda: conn.submit(s.id(), "not bytes", bytes),          # type: ignore[arg-type]
        "submit(decode=None)": lambda: conn.submit(s.id(), b"x", None),                  # type: ignore[arg-type]
        "invoke(payload=int)": lambda: conn.invoke(s.id(), 12, bytes, timeout=BOUND),    # type: ignore[arg-type]
        "invoke(session=None)": lambda: conn.invoke(None, b"x", bytes, timeout=BOUND),   # type: ignore[arg-type]
    }


BAD = ["get_task(2**70)", "get_task(-2**70)", "get_session(object())", "find_sessions(filter 2**70)",
       "cancel_task(a set)", "Session(session_id=2**70)", "Session(resreq=object)", "put_object(ttl=object)",
       "put_object(session=42)", "call_blob(blob=str)", "call_blob(blob=strided view)", "call(args=list)",
       "call(method=int)", "submit(session=int)", "submit(payload=str)", "submit(decode=None)",
       "invoke(payload=int)", "invoke(session=None)"]


@pytest.mark.parametrize("bad", BAD)
def test_an_argument_that_cannot_be_sent_is_invalid_argument_and_the_connection_lives(mesh, monkeypatch, bad):
    monkeypatch.setenv("ZMESH_MANAGER", mesh.endpoint)
    with Client(mesh.endpoint) as c, Session("tools", connection=c.conn) as s:
        assert s.invoke(("echo", "warm"), timeout=60) == "warm"     # an instance is up
        # Given a task in flight on the connection
        in_flight = s.submit(("sleep", 0.3))
        # When the caller passes a value the client cannot send
        started = time.monotonic()
        exc = _raises(BOUND, _bad_calls(c, s)[bad], InvalidArgument)
        # Then it is InvalidArgument in the caller's thread, at once, saying what was wrong
        assert time.monotonic() - started < 2, "raised at the call site, not after a timeout"
        assert isinstance(exc, ValueError) and exc.code == "invalid_argument"
        # and the task in flight is answered, and the connection keeps working
        status, value = _within(BOUND, lambda: in_flight.result(BOUND))
        assert status == "ok" and isinstance(value, int), value
        _alive(c.conn)
        assert s.invoke(("echo", "after"), timeout=BOUND) == "after"
        assert s.submit(("echo", "later")).result(BOUND) == "later"


def test_a_token_that_is_not_a_str_fails_the_constructor():
    exc = _raises(BOUND, lambda: Connection(NOBODY, token=object()), InvalidArgument)  # type: ignore[arg-type]
    assert exc.details == {"argument": "token"}


def test_an_unencodable_argument_is_named_with_its_method(client):
    exc = _raises(BOUND, lambda: client.get_task(2 ** 70), InvalidArgument)
    assert exc.details == {"method": "get_task", "argument": "id"}
    assert "'get_task'" in str(exc) and "'id'" in str(exc) and str(2 ** 70) in str(exc)
    exc = _raises(BOUND, lambda: client.find_sessions(filter={"state": "open", "created_at": (">=", 2 ** 70)}),
                  InvalidArgument)
    assert exc.details["argument"] == "filter.created_at[1]", exc.details


@pytest.mark.parametrize("raised", [SystemExit(3), RuntimeError("callback bug")])
def test_a_done_callback_that_raises_does_not_kill_the_connection(mesh, raised):
    with Session("tools", manager=mesh.endpoint) as s:
        # Given a task whose done-callback (the caller's code, run by the I/O thread) raises
        fut = s.submit(("echo", 1))

        def callback(_: Any) -> None:
            raise raised

        fut.add_done_callback(callback)
        # When its answer arrives
        assert fut.result(BOUND) == 1
        # Then the connection lives on
        _alive(s._conn)
        assert s.invoke(("echo", 2), timeout=BOUND) == 2


# -- 9. control calls over max_message_size ---------------------------------------------------
@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    env = {**FAST, "ZMESH_MAX_MESSAGE_SIZE": str(SMALL)}
    with LocalMesh(executors=1, slots=1, env=env, log_dir=str(tmp_path_factory.mktemp("limits"))) as m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        yield m


BIG = b"x" * (SMALL + 1)


def _oversized_calls(conn: Connection, s: Session) -> Dict[str, Callable[[], Any]]:
    return {
        "put_object": lambda: client_objects.put_object(BIG),
        "update_object": lambda: client_objects.update_object("some-key", BIG),
        "update_context": lambda: s.update_context(BIG),
        "Session(ctx=...)": lambda: Session("tools", ctx=BIG, connection=conn),
        "patch_context": lambda: s.patch_context([{"op": "add", "path": "/big", "value": "y" * SMALL}]),
        "register_application": lambda: Client(connection=conn).register_application(
            tools_spec(labels={"pad": "z" * SMALL})),
        "call_blob": lambda: conn.call_blob("put_object", {"kind": "blob"}, memoryview(BIG)),
        "submit": lambda: s.submit(BIG),
    }


OVERSIZED = ["put_object", "update_object", "update_context", "Session(ctx=...)", "patch_context",
             "register_application", "call_blob", "submit"]


@pytest.mark.parametrize("call", OVERSIZED)
def test_an_oversized_call_is_resource_exhausted_at_once_naming_the_limit(small_mesh, monkeypatch, call):
    monkeypatch.setenv("ZMESH_MANAGER", small_mesh.endpoint)
    monkeypatch.setenv("ZMESH_MAX_MESSAGE_SIZE", str(SMALL))      # put_object's own connection
    with Connection(small_mesh.endpoint, Settings.load(max_message_size=SMALL)) as conn, \
            Session("tools", ctx={"n": 1}, connection=conn) as s:
        assert s.invoke(("echo", "warm"), timeout=60) == "warm"
        in_flight = s.submit(("sleep", 0.3))
        # When a call is larger than max_message_size
        started = time.monotonic()
        exc = _raises(BOUND, _oversized_calls(conn, s)[call], ResourceExhausted)
        # Then it is refused before it is sent, at once (not Unavailable after request_timeout),
        # naming the limit and the size
        assert time.monotonic() - started < 2, f"took {time.monotonic() - started:.1f}s"
        assert exc.details["limit"] == "max_message_size" and exc.details["size"] > SMALL, exc.details
        assert "max_message_size" in str(exc) and str(SMALL) in str(exc)
        # and nothing else is lost
        assert in_flight.result(BOUND) > 0
        _alive(conn)
        assert s.context() == {"n": 1}
        assert s.update_context(b"y" * (SMALL // 2)) >= 1      # under the limit: accepted


def test_a_call_just_under_the_limit_is_sent(small_mesh):
    with Connection(small_mesh.endpoint, Settings.load(max_message_size=SMALL)) as conn:
        # the whole message (signature, command, header, blob) counts: leave room for the header
        result, _ = conn.call_blob("put_object", {"kind": "blob", "ttl": 60}, b"x" * (SMALL - 200))
        assert result["version"] >= 1
        exc = _raises(BOUND, lambda: conn.call_blob("put_object", {"kind": "blob", "ttl": 60}, b"x" * SMALL),
                      ResourceExhausted)
        assert exc.details["size"] > SMALL


def test_the_manager_drops_an_oversized_message_from_a_raw_peer_and_serves_it_again(small_mesh):
    """What a peer that does not check gets (docs/reliability.md): libzmq's MAXMSGSIZE closes its
    connection as soon as the frame's length is read, before the manager sees any of it, so no
    reply can name the limit; the peer's DEALER reconnects and its next message is answered, and
    the manager never holds the oversized message in memory."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(small_mesh.endpoint)
    try:
        def ask(rid: int, args: Dict[str, Any], within: float) -> Any:
            raw.send_multipart(encode(Request(rid, "ping", args)))
            if not raw.poll(int(within * 1000)):
                return None
            return decode(raw.recv_multipart())

        first = ask(1, {}, BOUND)
        assert first is not None and first.cmd is Cmd.REPLY and first.header.ok
        # When a raw peer sends a request over max_message_size: no answer (bounded wait)
        assert ask(2, {"pad": "x" * (SMALL + 1)}, 2.0) is None
        # Then it is served again once reconnected, and so is everyone else
        again = wait_until(lambda: ask(3, {}, 0.5), timeout=BOUND, what="the raw peer to be answered again")
        assert again.header.rid == 3 and again.header.ok
        with Client(small_mesh.endpoint) as c:
            assert c.ping()["endpoint"]
    finally:
        raw.close(0)


# -- 10. spec files have a size limit ---------------------------------------------------------
SPEC = "metadata: {name: padded}\nspec: {command: /bin/true}\n"


def _padded_spec(path: pathlib.Path, size: int) -> str:
    text = SPEC + "#" * (size - len(SPEC) - 1) + "\n"
    path.write_text(text)
    assert path.stat().st_size == size
    return str(path)


def test_a_spec_file_over_the_limit_is_invalid_argument_naming_file_and_limit(tmp_path):
    assert load_spec(_padded_spec(tmp_path / "fits.yaml", MAX_SPEC_BYTES)).name == "padded"
    big = _padded_spec(tmp_path / "big.yaml", MAX_SPEC_BYTES + 1)
    with pytest.raises(InvalidArgument) as exc:
        load_spec(big)
    assert big in str(exc.value) and str(MAX_SPEC_BYTES) in str(exc.value)
    assert exc.value.details == {"path": big, "limit": "MAX_SPEC_BYTES", "max": MAX_SPEC_BYTES}
    with pytest.raises(InvalidArgument, match="/dev/zero"):
        load_spec("/dev/zero")


def test_client_register_application_reads_a_bounded_spec(client):
    exc = _raises(BOUND, lambda: client.register_application("/dev/zero"), InvalidArgument)
    assert "MAX_SPEC_BYTES" in str(exc)


def _limited_memory() -> None:
    """In the child: 1 GiB of address space, so an unbounded read fails fast instead of filling memory."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("source", ["/dev/zero", "big.yaml"])
def test_cli_register_of_an_endless_or_large_file_is_one_line_and_exit_2(tmp_path, source):
    path = source if source.startswith("/") else _padded_spec(tmp_path / source, 3 * MAX_SPEC_BYTES)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "client.cli", "register", "-f", path, "--manager", NOBODY],
                       capture_output=True, text=True, timeout=60, env=env, preexec_fn=_limited_memory)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == InvalidArgument.exit_code, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid_argument: "), r.stderr
    assert path in lines[0] and str(MAX_SPEC_BYTES) in lines[0]


def test_every_bad_call_and_oversized_call_is_covered():
    # the parametrised lists above name every case their builders make (none silently skipped)
    conn: Any = type("C", (), {"conn": None})()
    assert sorted(_bad_calls(conn, None)) == sorted(BAD)          # type: ignore[arg-type]
    assert sorted(_oversized_calls(None, None)) == sorted(OVERSIZED)  # type: ignore[arg-type]

"""A secured mesh: CURVE on every connection, executors on an allow-list, users and robots
with roles and expiring tokens.  Real processes, real keys."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import zmq
from conftest import FAST, tools_spec, wait_until
from zmq.utils.monitor import recv_monitor_message

from client import Client, Session
from client.auth import PasswordAuth, RobotAuth
from client.connection import Connection
from client.local import LocalMesh
from mesh import errors
from mesh.ops import keys
from mesh.ops.config import Settings
from mesh.wire.protocol import Request, encode

TTL = "3"   # seconds a token lives here, so renewal and expiry happen within a test


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    m = LocalMesh(executors=1, slots=2, env={**FAST, "ZMESH_TOKEN_TTL": TTL}, secure=True,
                  log_dir=str(tmp_path_factory.mktemp("secure")))
    with m:
        with m.client() as c:
            c.register_application(tools_spec())
            c.add_user("ana", "user", "ana-pw")
            c.add_user("bo", "user", "bo-pw")
            c.add_user("vic", "viewer", "vic-pw")
        yield m


def _session(m, user, pw, **kw):
    return Session("tools", manager=m.endpoint, manager_key=m.manager_key, auth=PasswordAuth(user, pw), **kw)


def test_a_user_runs_tasks_with_context_and_objects_over_curve(secure):
    with _session(secure, "ana", "ana-pw", ctx=[]) as s:
        assert s.invoke(("append", "x"), timeout=30)[1] == 1
        assert s.context() == ["x"]
        assert s.info()["id"] == s.id()


def test_wrong_manager_key_is_unavailable_in_time_not_a_hang(secure, tmp_path):
    other, _ = keys.generate(str(tmp_path), "impostor")
    conn = Connection(secure.endpoint, Settings.load(request_timeout=2.0), manager_key=other,
                      auth=PasswordAuth("ana", "ana-pw"))
    t0 = time.monotonic()
    try:
        with pytest.raises(errors.Unavailable):
            conn.call("ping")
    finally:
        conn.close()
    assert time.monotonic() - t0 < 10


def test_executor_with_a_key_not_on_the_allow_list_is_refused(secure, tmp_path):
    _, secret = keys.generate(str(tmp_path), "stranger")
    with secure.client() as c:
        before = c.stats()["auth_denied"]
    p = subprocess.Popen([sys.executable, "-m", "client.cli", "executor", "--manager", secure.endpoint,
                          "--manager-key", secure.manager_key, "--curve-secret", secret, "--name", "stranger"],
                         env={**os.environ, **FAST}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert p.wait(30) == 3, "a refused executor exits with code 3"
    finally:
        LocalMesh.end(p)
    assert "not allowed" in p.stderr.read()
    with secure.client() as c:
        assert "stranger" not in [e["id"] for e in c.list_executors()]
        assert c.stats()["auth_denied"] > before


def test_wrong_password_revoked_robot_and_expired_token_are_unauthenticated(secure):
    with Client(secure.endpoint, manager_key=secure.manager_key, auth=PasswordAuth("ana", "nope")) as wrong:
        with pytest.raises(errors.Unauthenticated, match="password"):
            wrong.ping()
        with pytest.raises(errors.Unauthenticated, match="password"):
            wrong.stats()
    with secure.client() as admin:
        robot = admin.create_robot("ci", "user")
    ci = Client(secure.endpoint, manager_key=secure.manager_key, auth=RobotAuth(robot["id"], robot["secret"]))
    try:
        assert ci.whoami()["name"] == robot["id"]
        robot_token = ci.conn._token
        with secure.client() as admin:
            admin.revoke_robot(robot["id"])
        with pytest.raises(errors.Unauthenticated, match="wrong robot id or secret"):   # as for an unknown robot
            ci.stats()
    finally:
        ci.close()
    revoked = Connection(secure.endpoint, manager_key=secure.manager_key, token=robot_token)
    try:
        with pytest.raises(errors.Unauthenticated):    # the revoked robot's token went with it
            revoked.whoami()
    finally:
        revoked.close()
    # Given ana's token, valid now; when its TTL passes, then it is refused as expired
    login = Connection(secure.endpoint, manager_key=secure.manager_key, auth=PasswordAuth("ana", "ana-pw"))
    try:
        login.whoami()
        token = login._token
    finally:
        login.close()
    stale = Connection(secure.endpoint, manager_key=secure.manager_key, token=token)

    def refused_as_expired():
        try:
            stale.whoami()
        except errors.Unauthenticated as exc:
            assert "expired" in str(exc), exc
            return True
        return False

    try:
        assert stale.whoami()["name"] == "ana", "the token works before it expires"
        wait_until(refused_as_expired, timeout=3 * float(TTL), interval=0.1, what="ana's token to expire")
    finally:
        stale.close()


def test_tokens_renew_transparently_during_a_long_session(secure):
    with _session(secure, "ana", "ana-pw") as s:
        tokens = [s._conn._token]
        t0 = time.monotonic()

        def work_until_renewed_three_times():       # steady work; a renewal at each half-life
            n = len(tokens)
            assert s.invoke(("echo", n), timeout=30) == n
            if s._conn._token != tokens[-1]:
                tokens.append(s._conn._token)
            return len(tokens) > 3

        wait_until(work_until_renewed_three_times, timeout=4 * float(TTL), interval=0.05,
                   what="three token renewals")
        assert time.monotonic() - t0 > float(TTL), "work went on past the first token's lifetime"


def test_users_see_and_touch_only_their_own_sessions_and_cannot_register(secure):
    with _session(secure, "ana", "ana-pw", ctx={"secret": 1}) as ana:
        bo = Client(secure.endpoint, manager_key=secure.manager_key, auth=PasswordAuth("bo", "bo-pw"))
        try:
            with pytest.raises(errors.PermissionDenied):
                bo.get_session(ana.id())
            with pytest.raises(errors.PermissionDenied):
                bo.conn.call("get_context", {"id": ana.id()})
            with pytest.raises(errors.PermissionDenied):
                bo.close_session(ana.id())
            assert ana.id() not in [s.id for s in bo.find_sessions().items]
            with pytest.raises(errors.PermissionDenied):
                Session(session_id=ana.id(), manager=secure.endpoint, manager_key=secure.manager_key,
                        auth=PasswordAuth("bo", "bo-pw"))
            with pytest.raises(errors.PermissionDenied, match="admin"):
                bo.register_application(tools_spec("bo-app"))
        finally:
            bo.close()
        with secure.client() as admin:                       # an admin can
            assert admin.get_session(ana.id()).application == "tools"
        vic = Client(secure.endpoint, manager_key=secure.manager_key, auth=PasswordAuth("vic", "vic-pw"))
        try:                                                  # a viewer reads, changes nothing
            assert vic.get_session(ana.id()) is not None
            with pytest.raises(errors.PermissionDenied):
                Session("tools", manager=secure.endpoint, manager_key=secure.manager_key,
                        auth=PasswordAuth("vic", "vic-pw"))
        finally:
            vic.close()


def test_plain_zeromq_and_raw_tcp_peers_reach_no_handler(secure):
    with secure.client() as c:
        before = c.stats()["requests"]
        # Given a plain (not CURVE) ZeroMQ peer that sends 20 control requests
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        failed = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        monitor = plain.get_monitor_socket(failed)
        plain.connect(secure.endpoint)
        try:
            for _ in range(20):
                plain.send_multipart(encode(Request(1, "stats", {})))
            # When the manager refuses its handshake (messages are delivered only after one succeeds)
            wait_until(lambda: monitor.poll(100) and recv_monitor_message(monitor)["event"] & failed,
                       timeout=10, what="the manager to refuse a plain peer's handshake")
            assert not plain.poll(0), "a plain peer got an answer"
        finally:
            plain.disable_monitor()
            monitor.close(0)
            plain.close(0)
        # and a raw TCP peer sends garbage: the manager hangs up on it
        host, port = secure.endpoint.replace("tcp://", "").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            raw.sendall(os.urandom(4096))

            def hung_up():
                try:
                    return raw.recv(4096) == b""     # the manager's greeting, then end of stream
                except ConnectionResetError:
                    return True
                except socket.timeout:
                    return False

            wait_until(hung_up, timeout=10, interval=0.01, what="the manager to close a raw TCP peer")
        # Then no request reached a handler:
        after = c.stats()["requests"]
        # our own second stats call, and perhaps our token's renewal: not the plain peer's 20 requests
        assert after - before <= 2, f"{after - before} requests reached a handler"
        assert s_ok(secure)


def s_ok(m) -> bool:
    with _session(m, "ana", "ana-pw") as s:
        return s.invoke(("echo", "still serving"), timeout=30) == "still serving"


def test_secret_file_readable_by_others_is_refused(tmp_path):
    _, secret = keys.generate(str(tmp_path), "loose")
    os.chmod(secret, 0o644)
    with pytest.raises(errors.InvalidArgument, match="loose.key_secret"):
        keys.load_secret(secret)
    r = subprocess.run([sys.executable, "-m", "client.cli", "manager", "--curve-secret", secret, "--db",
                        str(tmp_path / "m.db"), "--bind", "tcp://127.0.0.1:*"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == errors.InvalidArgument.exit_code and "loose.key_secret" in r.stderr
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o644


def test_manager_needs_a_choice_between_curve_and_insecure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "client.cli", "manager", "--db", str(tmp_path / "m.db")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.InvalidArgument.exit_code
    assert "--curve-secret" in r.stderr and "--insecure" in r.stderr


def test_bootstrap_offline_then_login_from_the_cli(secure, tmp_path):
    env = {**os.environ, "ZMESH_MANAGER": secure.endpoint, "ZMESH_MANAGER_KEY": secure.manager_key,
           "XDG_CONFIG_HOME": str(tmp_path)}
    add = subprocess.run([sys.executable, "-m", "client.cli", "users", "add", "dee", "--role", "admin",
                          "--password-stdin", "--db", secure.db], input="dee-pw\n", capture_output=True, text=True,
                         env=env, timeout=60)
    assert add.returncode == 0, add.stderr
    login = subprocess.run([sys.executable, "-m", "client.cli", "login", "--user", "dee", "--password-stdin"],
                           input="dee-pw\n", capture_output=True, text=True, env=env, timeout=60)
    assert login.returncode == 0, login.stderr
    token_file = tmp_path / "zeromesh" / "tokens.json"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert "dee-pw" not in token_file.read_text()
    users = subprocess.run([sys.executable, "-m", "client.cli", "users", "list", "--json"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert users.returncode == 0, users.stderr
    assert "dee-pw" not in users.stdout and "ana" in users.stdout
    refused = subprocess.run([sys.executable, "-m", "client.cli", "users", "list"], capture_output=True,
                             text=True, env={**env, "XDG_CONFIG_HOME": str(tmp_path / "nobody")}, timeout=60)
    assert refused.returncode == errors.Unauthenticated.exit_code and "log in" in refused.stderr

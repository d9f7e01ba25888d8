"""The operator's path (issue 18, items 4-10): what a new operator meets between the docs and a
running secured mesh.  The walkthrough itself, executed from the docs, is tests/test_walkthrough.py."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, tools_spec

from client.local import LocalMesh
from mesh import errors
from mesh.ops import keys

CLI = [sys.executable, "-m", "client.cli"]


def zmesh(*args: str, env: dict, input: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=input, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    m = LocalMesh(executors=1, slots=2, env=FAST, secure=True, log_dir=str(tmp_path_factory.mktemp("ops")))
    with m:
        with m.client() as c:
            c.register_application(tools_spec())
            c.add_user("ana", "admin", "ana-pw")
        yield m


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")}
    return {**env, **FAST, "XDG_CONFIG_HOME": str(tmp_path), **extra}


# -- item 5: --manager-key on every client subcommand, like --manager --------------------------------
def test_manager_key_is_taken_after_the_subcommand_too(secure, tmp_path):
    env = _env(tmp_path)
    login = zmesh("login", "--manager", secure.endpoint, "--manager-key", secure.manager_key,
                  "--user", "ana", "--password-stdin", env=env, input="ana-pw\n")
    assert login.returncode == 0, login.stderr
    listed = zmesh("users", "list", "--json", "-m", secure.endpoint, "--manager-key", secure.manager_key, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "ana" in {u["name"] for u in json.loads(listed.stdout)}
    before = zmesh("--manager-key", secure.manager_key, "users", "list", "--json", "-m", secure.endpoint, env=env)
    assert before.returncode == 0, before.stderr        # the old place still works


# -- item 10: a login token is the manager's, however it is addressed ---------------------------------
def test_a_token_saved_for_one_address_is_found_under_another(secure, tmp_path):
    port = secure.endpoint.rsplit(":", 1)[1]
    env = _env(tmp_path, ZMESH_MANAGER_KEY=secure.manager_key)
    login = zmesh("login", "-m", f"tcp://127.0.0.1:{port}", "--user", "ana", "--password-stdin",
                  env=env, input="ana-pw\n")
    assert login.returncode == 0, login.stderr
    other = zmesh("users", "list", "--json", "-m", f"tcp://localhost:{port}", env=env)
    assert other.returncode == 0, other.stderr
    saved = json.loads((tmp_path / "zeromesh" / "tokens.json").read_text())
    assert f"curve:{keys.load_public(secure.manager_key).decode()}" in saved


# -- item 6: a public key given as the secret: say so, not "chmod 600" ---------------------------------
def test_public_key_as_secret_says_it_holds_no_secret(tmp_path):
    public, _ = keys.generate(str(tmp_path), "manager")
    os.chmod(public, 0o644)
    with pytest.raises(errors.InvalidArgument) as ei:
        keys.load_secret(public)
    assert "holds no secret key" in str(ei.value) and "chmod" not in str(ei.value)
    assert "manager.key_secret" in str(ei.value)
    r = zmesh("manager", "--curve-secret", public, "--db", str(tmp_path / "m.db"), "--bind", "tcp://127.0.0.1:*",
              env=_env(tmp_path))
    assert r.returncode == errors.InvalidArgument.exit_code
    assert "holds no secret key" in r.stderr and "chmod" not in r.stderr


# -- item 7: the database is private whatever the umask -------------------------------------------------
def test_users_add_db_creates_a_private_database_whatever_the_umask(tmp_path):
    db = tmp_path / "state" / "manager.db"
    code = ("import os, sys; os.umask(0); from client.cli import main; "
            "sys.argv = ['zmesh'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "users", "add", "alice", "--role", "admin", "--password-stdin",
                        "--db", str(db)], input="pw\n", capture_output=True, text=True, env=_env(tmp_path),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    made = [p for p in db.parent.iterdir() if p.name.startswith("manager.db")]
    assert db in made
    for p in made:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # WAL and SHM while a connection is open, under umask 0
    code = ("import os, sys; os.umask(0); from mesh.data.store import Store; s = Store(sys.argv[1]); "
            "s.db.execute('CREATE TABLE IF NOT EXISTS t (x)'); s.db.execute('INSERT INTO t VALUES (1)'); "
            "print(sorted(f'{n}:{os.stat(os.path.join(os.path.dirname(sys.argv[1]), n)).st_mode & 0o777:o}' "
            "for n in os.listdir(os.path.dirname(sys.argv[1])) if n.startswith('manager.db')))")
    r = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "manager.db-wal:600" in r.stdout and "manager.db-shm:600" in r.stdout, r.stdout
    assert all(x.endswith(":600") for x in json.loads(r.stdout.replace("'", '"'))), r.stdout


def test_an_existing_world_readable_database_is_tightened(tmp_path):
    from mesh.data.store import Store
    db = tmp_path / "manager.db"
    Store(str(db)).close()
    os.chmod(db, 0o644)
    Store(str(db)).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


# -- item 9: piped tables are never cut -----------------------------------------------------------------
def test_piped_tables_are_not_truncated(tmp_path):
    long_id = "echo-app-" + "0123456789abcdef" * 4
    code = ("from client.cli_common import _table; "
            f"_table([{{'id': {long_id!r}, **{{c: 'x' * 30 for c in 'abcdefgh'}}}}], ['id', *'abcdefgh'], 't')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert long_id in r.stdout and "…" not in r.stdout, r.stdout


def test_piped_zmesh_list_sessions_shows_whole_ids(secure, tmp_path):
    from client import Session
    with Session("tools", manager=secure.endpoint, manager_key=secure.manager_key, auth=secure.admin) as s:
        assert s.invoke(("echo", 1), timeout=30) == 1
        sid = s.id()
        env = _env(tmp_path, ZMESH_USER=secure.admin_user or "", ZMESH_PASSWORD=secure.admin_password or "",
                   ZMESH_MANAGER_KEY=secure.manager_key, COLUMNS="40")
        r = zmesh("list", "-s", "-m", secure.endpoint, env=env)
    assert r.returncode == 0, r.stderr
    assert sid in r.stdout and "…" not in r.stdout, r.stdout


# -- item 8: instance ids unique across manager restarts; the run directory logged and removed -----------
def test_instance_ids_survive_a_manager_restart_and_the_run_dir_is_logged_and_removed(tmp_path):
    import re
    import signal

    from conftest import wait_until

    from client import Client, Session
    m = LocalMesh(executors=1, slots=1, env=FAST, log_dir=str(tmp_path))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        log = tmp_path / "executor-0.log"
        found = wait_until(lambda: re.search(r"executor started.*run_dir=(\S+)", log.read_text()), timeout=20,
                           what="the executor to log its run directory")
        run_dir = Path(found.group(1).strip('"'))
        assert run_dir.is_dir()

        def instance_logs():
            return sorted(p.name for p in run_dir.glob("*.log"))

        with Session("tools", manager=m.endpoint) as s:
            assert s.invoke(("echo", 1), timeout=30) == 1
        first = instance_logs()
        assert len(first) == 1, first
        LocalMesh.end(m.manager, signal.SIGKILL)
        m.start_manager()
        m.wait_executors(1, timeout=30)
        with Session("tools", manager=m.endpoint) as s:
            assert s.invoke(("echo", 2), timeout=30) == 2
        second = instance_logs()
        assert len(second) == 2, f"the restarted manager reused instance id {first}: {second}"
        LocalMesh.end(m.executors[0], signal.SIGINT)     # a clean stop
        assert m.executors[0].returncode == 0
        assert not run_dir.exists(), "a run directory the executor made is removed at a clean stop"
        assert f"removed_run_dir={run_dir}" in log.read_text()


# -- item 4: a wrong manager key is said at once, on both sides ----------------------------------------
def test_a_wrong_manager_key_is_reported_at_once_by_client_executor_and_manager(secure, tmp_path):
    import subprocess as sp

    from client.auth import PasswordAuth
    from client.connection import Connection
    from conftest import wait_until
    from mesh.ops.config import Settings
    impostor, _ = keys.generate(str(tmp_path), "impostor")
    conn = Connection(secure.endpoint, Settings.load(request_timeout=30.0), manager_key=impostor,
                      auth=PasswordAuth("ana", "ana-pw"))
    t0 = time.monotonic()
    try:
        with pytest.raises(errors.Unavailable) as ei:
            conn.call("ping")
    finally:
        conn.close()
    assert time.monotonic() - t0 < 5, "said at once, not after request_timeout"
    assert "rejected our CURVE handshake" in str(ei.value) and "public key" in str(ei.value)

    r = zmesh("users", "list", "-m", secure.endpoint, "--manager-key", impostor, env=_env(tmp_path), timeout=30)
    assert r.returncode == errors.Unavailable.exit_code and "rejected our CURVE handshake" in r.stderr, r.stderr

    _, secret = keys.generate(str(tmp_path), "exec-wrong")
    p = sp.Popen([*CLI, "executor", "--manager", secure.endpoint, "--manager-key", impostor, "--curve-secret",
                  secret, "--name", "exec-wrong"], env=_env(tmp_path), stdout=sp.DEVNULL, stderr=sp.PIPE, text=True)
    try:
        assert p.wait(20) == 3, "an executor the manager cannot authenticate exits 3 at once"
    finally:
        LocalMesh.end(p)
    assert "rejected our CURVE handshake" in p.stderr.read()
    manager_log = Path(secure.log_dir) / "manager.log"
    wait_until(lambda: "refused a CURVE handshake" in manager_log.read_text(), timeout=10,
               what="the manager to log the refused peer")
    line = [ln for ln in manager_log.read_text().splitlines() if "refused a CURVE handshake" in ln][0]
    assert "peer=127.0.0.1:" in line, line

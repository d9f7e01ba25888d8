"""``zmesh`` commands for a secured mesh: keys, executor allow-list, users, robots, login.

Every admin command talks to the running manager (an admin token is needed),
or, with ``--db PATH``, works offline on the manager's database: that is how
the first admin user and the first executor keys are made (docs/security.md).
"""
from __future__ import annotations

import getpass
import json
import sys
from typing import Any, Callable, Optional

import click

from mesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from mesh.model import auth
from mesh.ops import keys

from .cli_common import _client, _errors, _table, _when, json_option, main, manager_option

db_option = click.option("--db", "db", default=None, metavar="PATH",
                         help="Work offline on the manager's database instead of asking the manager.")


def _offline(db: str, fn: Callable[..., Any], *args: Any, revokes: bool = False) -> Any:
    """``fn(store, *args)`` on the manager's database: the same mesh.model.auth function the manager
    calls online, so the same mistake raises the same typed error.  A removal or revocation
    (``revokes``) is refused while a manager runs on the database: it would not see it (a removed
    user's tokens would stay valid).  Additions are fine: the manager reads them at each login."""
    import sqlite3

    from mesh.data.store import ManagerLock, Store
    lock = ManagerLock(db) if revokes else None   # held for the whole change: no manager starts meanwhile
    try:
        if lock is not None and not lock.acquire():
            pid = lock.holder()
            raise FailedPrecondition(
                f"a manager (pid {pid}) is running on {db}; it would not see an offline change. Make it "
                "through the manager instead (the same command without --db, logged in as an admin)",
                path=db, pid=pid)
    except OSError as exc:
        raise Unavailable(f"cannot lock the database {db}: {exc}", path=db) from None
    try:
        try:
            store = Store(db)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open the database {db}: {exc}", path=db) from None
        try:
            return fn(store, *args)
        except sqlite3.Error as exc:
            raise Unavailable(f"the database {db} failed: {exc}", path=db) from None
        finally:
            store.close()
    finally:
        if lock is not None:
            lock.release()


def _out(rows: Any, as_json: bool, columns: list, title: str) -> None:
    if as_json:
        click.echo(json.dumps(rows, default=str))
    else:
        _table([{**r, **{k: _when(r[k]) for k in ("added_at", "created_at", "revoked_at") if k in r and r[k]}}
                for r in rows], columns, title)


@main.group(name="keys")
def keys_() -> None:
    """CURVE key files (ZeroMQ certificate format)."""


@keys_.command(name="generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Writes DIRECTORY/NAME.key and NAME.key_secret (0600).")
@_errors
def keys_generate(directory: str, name: str) -> None:
    """Make a keypair for a manager, an executor or a client."""
    public, secret = keys.generate(directory, name)
    click.echo(f"public key {public}\nsecret key {secret} (mode 0600: keep it on this machine)")


@main.group(name="executor-keys")
def executor_keys() -> None:
    """The allow-list of executors' public keys."""


@executor_keys.command(name="add")
@manager_option
@db_option
@click.argument("key_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--name", default=None, help="A name for the key (default: the file name).")
@_errors
def executor_keys_add(manager: Optional[str], db: Optional[str], key_file: str, name: Optional[str]) -> None:
    """Allow the executor whose public key is in KEY_FILE to join."""
    public = keys.load_public(key_file).decode()
    name = name or key_file.rsplit("/", 1)[-1].split(".")[0]
    if db:
        _offline(db, auth.add_executor_key, public, name)
    else:
        with _client(manager) as c:
            c.add_executor_key(public, name)
    click.echo(f"allowed executor key {name} ({public})")


@executor_keys.command(name="list")
@manager_option
@db_option
@json_option
@_errors
def executor_keys_list(manager: Optional[str], db: Optional[str], as_json: bool) -> None:
    """The executor keys on the allow-list."""
    if db:
        rows = _offline(db, auth.list_executor_keys)
    else:
        with _client(manager) as c:
            rows = c.list_executor_keys()
    _out(rows, as_json, ["name", "public", "added_at"], "executor keys")


@executor_keys.command(name="revoke")
@manager_option
@db_option
@click.argument("key_or_name")
@_errors
def executor_keys_revoke(manager: Optional[str], db: Optional[str], key_or_name: str) -> None:
    """Remove a key (by its public key or name): the executor cannot join again."""
    if db:
        _offline(db, auth.revoke_executor_key, key_or_name, revokes=True)
    else:
        with _client(manager) as c:
            c.revoke_executor_key(key_or_name)
    click.echo(f"revoked {key_or_name}")


@main.group()
def users() -> None:
    """People: password login, roles admin / user / viewer."""


def _password(from_stdin: bool, prompt: str) -> str:
    if from_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = getpass.getpass(prompt)
    if not pw:
        raise InvalidArgument("the password is empty")
    return pw


@users.command(name="add")
@manager_option
@db_option
@click.argument("name")
@click.option("--role", type=click.Choice(auth.ROLES), default="user", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (else a prompt).")
@_errors
def users_add(manager: Optional[str], db: Optional[str], name: str, role: str, password_stdin: bool) -> None:
    """Add a user (stored as an scrypt hash)."""
    pw = _password(password_stdin, f"password for {name}: ")
    if db:
        _offline(db, auth.add_user, name, role, pw)
    else:
        with _client(manager) as c:
            c.add_user(name, role, pw)
    click.echo(f"added user {name} ({role})")


@users.command(name="list")
@manager_option
@db_option
@json_option
@_errors
def users_list(manager: Optional[str], db: Optional[str], as_json: bool) -> None:
    """The users and their roles."""
    if db:
        rows = _offline(db, auth.list_users)
    else:
        with _client(manager) as c:
            rows = c.list_users()
    _out(rows, as_json, ["name", "role", "created_at"], "users")


@users.command(name="remove")
@manager_option
@db_option
@click.argument("name")
@_errors
def users_remove(manager: Optional[str], db: Optional[str], name: str) -> None:
    """Remove a user; their tokens stop working at once."""
    if db:
        _offline(db, auth.remove_user, name, revokes=True)
    else:
        with _client(manager) as c:
            c.remove_user(name)
    click.echo(f"removed user {name}")


@main.group()
def robots() -> None:
    """Programs (CI, services): an id and a secret, roles admin / user / viewer."""


@robots.command(name="create")
@manager_option
@db_option
@click.argument("name")
@click.option("--role", type=click.Choice(auth.ROLES), default="user", show_default=True)
@json_option
@_errors
def robots_create(manager: Optional[str], db: Optional[str], name: str, role: str, as_json: bool) -> None:
    """Create a robot account; its secret is printed this once."""
    if db:
        r = _offline(db, auth.create_robot, name, role)
    else:
        with _client(manager) as c:
            r = c.create_robot(name, role)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"robot {r['name']} ({r['role']})\nZMESH_ROBOT_ID={r['id']}\nZMESH_ROBOT_SECRET={r['secret']}\n"
                   "the secret is shown only now", err=False)


@robots.command(name="list")
@manager_option
@db_option
@json_option
@_errors
def robots_list(manager: Optional[str], db: Optional[str], as_json: bool) -> None:
    """The robots, revoked ones included."""
    if db:
        rows = _offline(db, auth.list_robots)
    else:
        with _client(manager) as c:
            rows = c.list_robots()
    _out(rows, as_json, ["id", "name", "role", "created_at", "revoked_at"], "robots")


@robots.command(name="revoke")
@manager_option
@db_option
@click.argument("robot_id")
@_errors
def robots_revoke(manager: Optional[str], db: Optional[str], robot_id: str) -> None:
    """Revoke a robot; its tokens stop working at once."""
    if db:
        _offline(db, auth.revoke_robot, robot_id, revokes=True)
    else:
        with _client(manager) as c:
            c.revoke_robot(robot_id)
    click.echo(f"revoked {robot_id}")


@main.command()
@manager_option
@click.option("--user", default=None, help="User name (default: $ZMESH_USER, else a prompt).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_errors
def login(manager: Optional[str], user: Optional[str], password_stdin: bool) -> None:
    """Log in and keep a token for this manager (in ~/.config/zeromesh/tokens.json, mode 0600).

    On a secured mesh the token is kept under the manager's public key, so any address of the same
    manager finds it; for an --insecure manager, under the address exactly as given."""
    import os

    from mesh.ops.config import default_manager

    from .auth import PasswordAuth, store_token
    from .connection import Connection
    user = user or os.environ.get("ZMESH_USER") or click.prompt("user")
    env_pw = os.environ.get("ZMESH_PASSWORD")
    pw: str = env_pw if env_pw and not password_stdin else _password(password_stdin, "password: ")
    endpoint = manager or default_manager()
    conn = Connection(endpoint, auth=PasswordAuth(user, pw))
    try:
        r = conn.call("login", PasswordAuth(user, pw).credentials())
    finally:
        conn.close()
    path = store_token(endpoint, r["token"], r.get("expires_at"), r["name"], conn.manager_public)
    until = _when(r["expires_at"]) if r.get("expires_at") else "never (insecure manager)"
    click.echo(f"logged in as {r['name']} ({r['role']}) until {until}; token in {path}")

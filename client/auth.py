"""Credentials a client presents to a secured mesh.

``Session(..., auth=PasswordAuth("ana", "pw"))`` or ``Client(auth=RobotAuth(robot_id, secret))``;
without ``auth`` a connection looks for ``ZMESH_USER``/``ZMESH_PASSWORD``, then
``ZMESH_ROBOT_ID``/``ZMESH_ROBOT_SECRET``, then ``ZMESH_TOKEN``, then the token
``zmesh login`` stored for that manager.  The credentials are exchanged for a
short-lived token, renewed by the connection before it expires; they are
never logged or printed (``repr`` hides them).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional


class PasswordAuth:
    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._password = password

    def credentials(self) -> Dict[str, Any]:
        return {"user": self.user, "password": self._password}

    def __repr__(self) -> str:
        return f"PasswordAuth({self.user!r}, <hidden>)"


class RobotAuth:
    def __init__(self, robot_id: str, secret: str) -> None:
        self.robot_id = robot_id
        self._secret = secret

    def credentials(self) -> Dict[str, Any]:
        return {"robot": self.robot_id, "secret": self._secret}

    def __repr__(self) -> str:
        return f"RobotAuth({self.robot_id!r}, <hidden>)"


Auth = Any  # PasswordAuth | RobotAuth


def from_env() -> Optional[Auth]:
    env = os.environ
    if env.get("ZMESH_USER") and env.get("ZMESH_PASSWORD"):
        return PasswordAuth(env["ZMESH_USER"], env["ZMESH_PASSWORD"])
    if env.get("ZMESH_ROBOT_ID") and env.get("ZMESH_ROBOT_SECRET"):
        return RobotAuth(env["ZMESH_ROBOT_ID"], env["ZMESH_ROBOT_SECRET"])
    return None


def token_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "zeromesh", "tokens.json")


def token_keys(manager: str, manager_public: Optional[bytes] = None) -> List[str]:
    """Where a token for this manager is kept, most specific first.

    On a secured mesh the manager is its public key, however it is addressed (``tcp://m1:5555``
    or ``tcp://10.200.0.1:5555``): the token is found under ``curve:KEY``.  An insecure manager
    has no identity but its address, so there the endpoint, exactly as typed, is the key."""
    out = [f"curve:{manager_public.decode()}"] if manager_public else []
    return out + [manager]


def stored_token(manager: str, manager_public: Optional[bytes] = None) -> Optional[str]:
    """The unexpired token ``zmesh login`` saved for ``manager``, if any (see :func:`token_keys`)."""
    try:
        with open(token_file()) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return None
    for key in token_keys(manager, manager_public):
        entry = entries.get(key) or {}
        expires = entry.get("expires_at")
        if entry.get("token") and (expires is None or expires >= time.time()):
            return str(entry["token"])
    return None


def store_token(manager: str, token: str, expires_at: Optional[float], name: str,
                manager_public: Optional[bytes] = None) -> str:
    """Save a token for ``manager`` (under every name of :func:`token_keys`) in a file only its
    owner can read (0600)."""
    path = token_file()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        entries = {}
    for key in token_keys(manager, manager_public):
        entries[key] = {"token": token, "expires_at": expires_at, "name": name}
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(path + ".tmp", path)
    return path

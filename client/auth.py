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
from typing import Any, Dict, Optional


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


def stored_token(manager: str) -> Optional[str]:
    """The unexpired token ``zmesh login`` saved for ``manager``, if any."""
    try:
        with open(token_file()) as f:
            entry = json.load(f).get(manager) or {}
    except (OSError, ValueError):
        return None
    expires = entry.get("expires_at")
    if expires is not None and expires < time.time():
        return None
    return entry.get("token")


def store_token(manager: str, token: str, expires_at: Optional[float], name: str) -> str:
    """Save a token for ``manager`` in a file only its owner can read (0600)."""
    path = token_file()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        entries = {}
    entries[manager] = {"token": token, "expires_at": expires_at, "name": name}
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(path + ".tmp", path)
    return path

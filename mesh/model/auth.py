"""Who may do what: principals, roles, tokens, and the admin operations on them.

* **Roles**: ``admin`` (registry, users, robots, executor keys), ``user``
  (sessions and tasks of their own), ``viewer`` (reads everything, changes
  nothing).  Service instances act as ``instance``: objects only.
* **Credentials**: users log in with a password, robots with an id and a
  secret (both stored as scrypt hashes); either is exchanged for a token that
  expires after ``token_ttl`` and that clients renew by themselves.  Tokens
  are kept as SHA-256 digests, so the database holds no usable credential.
* On an ``--insecure`` manager every peer acts as admin.

The functions taking a :class:`~mesh.data.store.Store` are what both the running
manager (on its writer thread) and the offline CLI (``--db PATH``) call, so a
mistake (an unknown user, robot or executor key) is the same typed error with
the same message either way: ``NotFound`` for a name that matches nothing,
``AlreadyExists`` for a duplicate, ``InvalidArgument`` for a bad role or value.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

from mesh.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from mesh.ops import keys

if TYPE_CHECKING:   # the functions below run against a Store (on the manager's writer thread, or offline)
    from mesh.data.store import Store

ROLES = ("viewer", "user", "admin")
RANK = {"instance": 0, "viewer": 1, "user": 2, "admin": 3}

PUBLIC = frozenset({"ping", "login"})
OBJECT_WRITES = frozenset({"put_object", "update_object", "patch_object", "delete_object"})
# what a service instance may call (for its owner: see Principal); nothing else
INSTANCE = frozenset({"ping", "get_object", "open_session", "submit", "keep_result"}) | OBJECT_WRITES
VIEWER = frozenset({"stats", "metrics", "get_application", "find_applications", "find_executors", "get_executor",
                    "get_session", "find_sessions", "find_tasks", "get_task", "get_context", "whoami",
                    "get_object", "get_flow", "find_flows", "get_flow_run", "find_flow_runs",
                    "find_flow_schedules", "fn_state", "fn_list", "fn_egress"})
USER = frozenset({"create_session", "open_session", "close_session", "write_context", "cancel_task",
                  "submit", "create_lease", "renew_lease", "release_lease",
                  "register_temporary_application", "unregister_temporary_application",
                  "keep_result", "register_flow", "run_flow", "cancel_flow_run",
                  "cancel_flow_schedule", "fn_send", "fn_call"}) | OBJECT_WRITES   # a viewer writes nothing
# everything else (register_application, unregister_application, drain_executor, users, robots, executor
# keys) is admin


@dataclass(frozen=True)
class Principal:
    """Who is calling.  A service instance's principal carries the name of the user or robot it
    was started for (``kind`` instance, ``role`` instance): it touches what its owner may, within
    the few methods in :data:`INSTANCE`."""
    name: str
    role: str
    kind: str            # user | robot | instance | insecure

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_touch(self, owner: str) -> bool:
        """Change a session (or its tasks): its owner, or an admin."""
        return self.admin or owner == self.name

    def may_read(self, owner: str) -> bool:
        return self.may_touch(owner) or self.role == "viewer"


INSECURE = Principal("insecure", "admin", "insecure")


def required_role(method: str) -> str:
    if method in PUBLIC:
        return "public"
    if method in VIEWER:
        return "viewer"
    if method in USER:
        return "user"
    return "admin"


def authorize(p: Principal, method: str) -> None:
    need = required_role(method)
    if need == "public":
        return
    if p.role == "instance":
        if method not in INSTANCE:
            raise PermissionDenied(f"a service instance may not call {method!r}", method=method)
        return
    if RANK[p.role] < RANK[need]:
        raise PermissionDenied(f"{p.kind} {p.name!r} has role {p.role!r}; {method!r} needs {need!r}",
                               method=method, role=p.role)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _role(role: str) -> str:
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, got {role!r}", role=role)
    return role


# -- users and robots (store operations, offline or on the writer thread) --------------
def add_user(store: Store, name: str, role: str, password: str) -> Dict[str, Any]:
    if not name or not password:
        raise InvalidArgument("a user needs a name and a non-empty password")
    with store.tx():
        if store.user(name) is not None:
            raise AlreadyExists(f"user {name!r} already exists", user=name)
        store.insert_user(name, _role(role), keys.hash_secret(password), time.time())
    return {"name": name, "role": role}


def remove_user(store: Store, name: str) -> None:
    with store.tx():
        if not store.delete_user(name):
            raise NotFound(f"user {name!r} does not exist", user=name)


def list_users(store: Store) -> List[Dict[str, Any]]:
    return store.users()


def create_robot(store: Store, name: str, role: str) -> Dict[str, Any]:
    """A robot account: its secret is returned once and stored only as a hash."""
    rid, secret = f"robot-{secrets.token_hex(4)}", secrets.token_urlsafe(32)
    with store.tx():
        store.insert_robot(rid, name, _role(role), keys.hash_secret(secret), time.time())
    return {"id": rid, "name": name, "role": role, "secret": secret}


def revoke_robot(store: Store, rid: str) -> None:
    with store.tx():
        if not store.revoke_robot(rid, time.time()):
            raise NotFound(f"robot {rid!r} does not exist or is already revoked", robot=rid)


def list_robots(store: Store) -> List[Dict[str, Any]]:
    return store.robots()


# -- the executor allow-list (same rules offline and online) ---------------------------
def add_executor_key(store: Store, public: str, name: str) -> Dict[str, Any]:
    """Allow the executor with this CURVE public key (Z85) to join; re-adding a key renames it."""
    if not public or not name:
        raise InvalidArgument("an executor key needs a public key and a name")
    with store.tx():
        store.add_executor_key(public, name, time.time())
    return {"public": public, "name": name}


def revoke_executor_key(store: Store, key_or_name: str) -> Dict[str, Any]:
    """Remove a key, given as its public key or its name: ``NotFound`` if no key matches, the
    same error and message whether the manager does it or the offline CLI (``--db``)."""
    with store.tx():
        removed = store.remove_executor_key(key_or_name)
        if not removed:
            raise NotFound(f"no executor key {key_or_name!r} on the allow-list", key=key_or_name)
    return {"key": key_or_name, "public": removed}


def list_executor_keys(store: Store) -> List[Dict[str, Any]]:
    return store.executor_keys()


@functools.lru_cache(maxsize=1)
def dummy_hash() -> str:
    """What an unknown name's secret is checked against, so that a login costs the same whether
    the name exists or not (no timing oracle for user names)."""
    return keys.hash_secret(secrets.token_urlsafe(16))


def credentials(store: Store, args: Dict[str, Any]) -> Tuple[Principal, str, bool]:
    """The principal that ``args`` (user+password or robot+secret) claim, the stored hash to check,
    and whether the name exists (if not, the hash is :func:`dummy_hash`: check it all the same)."""
    if isinstance(args.get("user"), str):
        user = store.user(args["user"])
        if user is None:
            return Principal(args["user"], "viewer", "user"), dummy_hash(), False
        return Principal(args["user"], user[0], "user"), user[1], True
    if isinstance(args.get("robot"), str):
        robot = store.robot(args["robot"])
        if robot is None or robot[2] is not None:
            return Principal(args["robot"], "viewer", "robot"), dummy_hash(), False
        return Principal(args["robot"], robot[0], "robot"), robot[1], True
    raise Unauthenticated("login needs user and password, or robot and secret")


MAX_NAME = 256   # characters in a user or robot name a login may claim


class LoginLimits:
    """Failed logins per name and per peer (its CURVE key: one per client connection) within a
    sliding window: past ``limit`` of either, logins are refused at once (``ResourceExhausted``)
    until the oldest failure leaves the window.  An attempt counts as a failure from the moment it
    is checked (so logins sent all at once cannot outrun the limit) and is forgiven if it succeeds.
    (A consequence to know: someone failing on purpose can lock a name out for ``window`` seconds.)"""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: Dict[str, Deque[float]] = {}

    def _recent(self, key: str, now: float) -> Deque[float]:
        q = self._failures.get(key)
        if q is None:
            return collections.deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def check(self, name: str, peer: str, now: float) -> None:
        """Refuse if ``name`` or ``peer`` is over the limit; else count this attempt (see
        :meth:`succeeded`)."""
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"a user or robot name is at most {MAX_NAME} characters", argument="user")
        for key, what in ((f"name:{name}", f"for {name!r}"), (f"peer:{peer}", "from this peer")):
            q = self._recent(key, now)
            if len(q) >= self.limit:
                wait = q[0] + self.window - now
                raise ResourceExhausted(f"too many failed logins {what}; try again in {wait:.0f}s",
                                        limit="login_failures", retry_after=round(wait, 1))
        for key in (f"name:{name}", f"peer:{peer}"):
            self._failures.setdefault(key, collections.deque()).append(now)
            if len(self._failures) > 100_000:   # a spray of names: forget the oldest keys
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, name: str, peer: str, now: float) -> None:
        """The attempt counted at ``now`` succeeded: it is not a failure."""
        for key in (f"name:{name}", f"peer:{peer}"):
            q = self._failures.get(key)
            if q is not None:
                try:
                    q.remove(now)
                except ValueError:
                    pass

    def failures(self, name: str) -> int:
        return len(self._failures.get(f"name:{name}", ()))


def save_token(store: Store, token: str, p: Principal, expires_at: float) -> None:
    store.save_token(digest(token), p.name, p.kind, p.role, expires_at)


def token_table(rows: List[Tuple[str, str, str, str, float]]) -> Dict[str, Tuple[Principal, float]]:
    """Saved tokens (``Store.live_tokens`` rows) as :class:`Tokens` holds them: a restart logs nobody out."""
    return {d: (Principal(name, role, kind), expires) for d, name, kind, role, expires in rows}


class Tokens:
    """The manager's live view of tokens (mirrored in SQLite, so a restart logs nobody out)."""

    def __init__(self, saved: Dict[str, Tuple[Principal, float]]) -> None:
        self.live: Dict[str, Tuple[Principal, float]] = dict(saved)

    def issue(self, p: Principal, ttl: float) -> Tuple[str, float]:
        token = secrets.token_urlsafe(32)
        expires = time.time() + ttl
        self.live[digest(token)] = (p, expires)
        return token, expires

    def principal(self, token: Optional[str]) -> Principal:
        if not token:
            raise Unauthenticated("this mesh is secured: log in (zmesh login, or PasswordAuth/RobotAuth)")
        entry = self.live.get(digest(token))
        if entry is None:
            raise Unauthenticated("unknown token; log in again")
        p, expires = entry
        if expires < time.time():
            del self.live[digest(token)]
            raise Unauthenticated("the token expired; log in again", expired=True)
        return p

    def add(self, token: str, p: Principal, expires: float) -> None:
        self.live[digest(token)] = (p, expires)

    def drop(self, token: str) -> None:
        self.live.pop(digest(token), None)

    def drop_principal(self, name: str, kind: str) -> None:
        """End the tokens of a user or robot, and those of the instances that act for them."""
        for d, (p, _) in list(self.live.items()):
            if p.name == name and p.kind in (kind, "instance"):
                del self.live[d]

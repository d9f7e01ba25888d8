"""``Client``: the management API (registry, sessions, executors)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from mesh.errors import NotFound
from mesh.spec import AppSpec, load_spec

from .connection import Connection


class Client:
    def __init__(self, manager: Optional[str] = None, connection: Optional[Connection] = None) -> None:
        self._own = connection is None
        self.conn = connection or Connection(manager)

    def close(self) -> None:
        if self._own:
            self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def ping(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self.conn.call("ping", {}, timeout=timeout)

    def stats(self) -> Dict[str, Any]:
        return self.conn.call("stats")

    # registry
    def register_application(self, spec: Any, replace: bool = False) -> Dict[str, Any]:
        """``spec``: an AppSpec, a spec dict, or a path to a YAML file."""
        if isinstance(spec, str):
            spec = load_spec(spec)
        d = spec.to_dict() if isinstance(spec, AppSpec) else AppSpec.from_dict(spec).to_dict()
        return self.conn.call("register_app", {"spec": d, "replace": replace})

    def unregister_application(self, name: str) -> None:
        self.conn.call("unregister_app", {"name": name})

    def get_application(self, name: str) -> Optional[Dict[str, Any]]:
        return self._get("get_app", {"name": name})

    def list_applications(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_apps")

    # sessions
    def get_session(self, sid: str) -> Optional[Dict[str, Any]]:
        return self._get("get_session", {"id": sid})

    def list_sessions(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_sessions")

    def close_session(self, sid: str) -> Dict[str, Any]:
        return self.conn.call("close_session", {"id": sid})

    # executors
    def list_executors(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_executors")

    def _get(self, method: str, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        try:
            return self.conn.call(method, args)
        except NotFound:
            return None

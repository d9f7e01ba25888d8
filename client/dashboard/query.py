"""The dashboard's JSON API speaks the management API's find language in a URL (pure: no I/O).

``?filter=state=open&filter=created_at>=1700000000&limit=50&offset=0&sort=-created_at`` becomes
``find_*(filter={"state": ["=", "open"], "created_at": [">=", 1700000000]}, page={"limit": 50,
"offset": 0}, sort={"by": "created_at", "order": "descending"})``; the manager validates the fields
(mesh/core/query.py), so a bad field or operator comes back as its ``InvalidArgument``.  Errors map to
HTTP statuses by their stable code (:data:`HTTP_STATUS`), the body being ``{"error": {"code",
"message"}}`` (docs/dashboard.md, "Errors").
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from mesh.errors import InvalidArgument, MeshError

OPS = ("<=", ">=", "!=", "~", "<", ">", "=")   # longest first: "<=" before "<"
MAX_LIMIT = 1000                               # one page from the dashboard; the manager allows more

# stable error code -> HTTP status (anything else: 500)
HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "failed_precondition": 412,
    "resource_exhausted": 429,
    "unavailable": 503,
    "deadline_exceeded": 504,
}


def parse_filter(exprs: List[str]) -> Dict[str, List[Any]]:
    """``state=open``, ``state!=closed``, ``application~echo``, ``created_at>=1700000000``; values are
    JSON when they parse (numbers, booleans), else strings."""
    out: Dict[str, List[Any]] = {}
    for expr in exprs:
        at = [(expr.find(o), o) for o in OPS if o in expr]
        if not at:
            raise InvalidArgument(f"filter {expr!r}: use FIELD=VALUE or FIELD<op>VALUE with op in {' '.join(OPS)}")
        pos = min(p for p, _ in at)
        op = next(o for p, o in at if p == pos)   # the first operator, the longest at that place
        name, raw = expr[:pos].strip(), expr[pos + len(op):]
        if not name:
            raise InvalidArgument(f"filter {expr!r} names no field")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[name] = ["!" if op == "!=" else op, value]
    return out


def _int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_find(filters: List[str], params: Mapping[str, str],
               default_sort: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, int], Dict[str, str]]:
    """(filter, page, sort) for a ``find_*`` call from the URL's query parameters."""
    page = {"limit": _int(params, "limit", 50, 1, MAX_LIMIT), "offset": _int(params, "offset", 0, 0, 10**9)}
    spec = params.get("sort") or default_sort
    sort: Dict[str, str] = {}
    if spec:
        sort = {"by": spec.lstrip("-+"), "order": "descending" if spec.startswith("-") else "ascending"}
    return parse_filter(filters), page, sort


def error_body(exc: MeshError) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, JSON body) for a typed error."""
    return HTTP_STATUS.get(exc.code, 500), {"error": {"code": exc.code, "message": str(exc)}}


# -- a flow run's task graph -------------------------------------------------------------------------
RUN_TASK_FIELDS = ("state", "attempts", "started_at", "ended_at", "error", "executor", "task_id")


def task_graph(run: Mapping[str, Any], flows: Mapping[str, Optional[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """The run's tasks (``flow/task``) with what each needs (full names) and its dependency level: 0
    for a task that needs nothing, else one more than the deepest task it needs.  ``flows`` maps each
    of the run's flows to its ``get_flow`` answer (None when unknown: its tasks then show no needs).
    Sorted by level, then name.  A task's result key is left out: the page has no use for it."""
    needs: Dict[str, List[str]] = {}
    for flow, info in flows.items():
        for t in (info or {}).get("tasks", []):
            needs[f"{flow}/{t['name']}"] = [n if "/" in n else f"{flow}/{n}" for n in t.get("needs", [])]
    tasks = run.get("tasks") or {}
    level: Dict[str, int] = {}

    def depth(name: str, seen: Tuple[str, ...] = ()) -> int:
        if name not in level:
            deps = [d for d in needs.get(name, []) if d in tasks and d not in seen]   # a cycle cannot be: bounded anyway
            level[name] = 1 + max((depth(d, seen + (name,)) for d in deps), default=-1)
        return level[name]

    rows = []
    for name, t in tasks.items():
        started, ended = t.get("started_at"), t.get("ended_at")
        rows.append({"name": name, "flow": name.split("/", 1)[0], "task": name.split("/", 1)[-1],
                     "needs": [d for d in needs.get(name, []) if d in tasks], "level": depth(name),
                     "duration": ended - started if started is not None and ended is not None else None,
                     **{k: t.get(k) for k in RUN_TASK_FIELDS}})
    rows.sort(key=lambda r: (r["level"], r["name"]))
    return rows


# -- a session's context -------------------------------------------------------------------------------
CONTEXT_SHOWN = 16 * 1024   # bytes: a document up to this size (encoded) is shown on the session page


def context_view(ctx: Mapping[str, Any], unpack: Callable[[bytes], Any]) -> Dict[str, Any]:
    """``get_context``'s answer for the page: kind, version, size; a "doc" up to :data:`CONTEXT_SHOWN`
    bytes decoded with ``unpack`` as ``document``.  A "blob" (a pickle) is never unpickled here."""
    data = ctx.get("data") or b""
    kind = ctx.get("kind")
    small = kind == "doc" and len(data) <= CONTEXT_SHOWN
    return {"kind": kind, "version": ctx.get("version"), "size": len(data), "limit": CONTEXT_SHOWN,
            "shown": small, "document": unpack(bytes(data)) if small else None}

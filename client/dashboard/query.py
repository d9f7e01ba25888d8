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
from typing import Any, Dict, List, Mapping, Optional, Tuple

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

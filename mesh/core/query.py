"""find/filter/page/sort over lists of records, done in the manager.

The conventions people know from hub and REST clients::

    filter={"state": "open"}                       # equality
    filter={"created_at": (">=", 1700000000)}      # ops: = ! ~ < <= > >=
    page={"limit": 50, "offset": 0}
    sort={"by": "created_at", "order": "descending"}

``~`` is a case-insensitive substring match.  Unknown fields and ops are
InvalidArgument errors that name them; comparing values of different types
never raises (they simply do not match).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from mesh.errors import InvalidArgument

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 100


def _like(value: Any, pattern: Any) -> bool:
    return str(pattern).lower() in str(value).lower()


OPS: Dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!": operator.ne, "~": _like,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _predicate(filt: Optional[Mapping[str, Any]], fields: Sequence[str]) -> Callable[[Mapping[str, Any]], bool]:
    if not filt:
        return lambda row: True
    if not isinstance(filt, Mapping):
        raise InvalidArgument("filter must be a map of field -> value or field -> [op, value]")
    checks = []
    for name, cond in filt.items():
        if name not in fields:
            raise InvalidArgument(f"cannot filter on {name!r}; fields are {', '.join(fields)}", field=name)
        if isinstance(cond, (list, tuple)):
            if len(cond) != 2 or cond[0] not in OPS:
                raise InvalidArgument(f"filter on {name!r} must be [op, value] with op one of {' '.join(OPS)}",
                                      field=name)
            op, value = OPS[cond[0]], cond[1]
        else:
            op, value = operator.eq, cond
        checks.append((name, op, value))

    def match(row: Mapping[str, Any]) -> bool:
        for name, op, value in checks:
            try:
                if not op(row.get(name), value):
                    return False
            except TypeError:
                return False
        return True

    return match


def find(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], filter: Optional[Mapping[str, Any]] = None,
         page: Optional[Mapping[str, Any]] = None, sort: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``{"items": [...], "total": N}``: ``total`` counts every match, ``items`` is one page of them."""
    match = _predicate(filter, fields)
    hits: List[Mapping[str, Any]] = [r for r in rows if match(r)]
    if sort:
        by = sort.get("by")
        order = sort.get("order", "ascending")
        if not isinstance(by, str) or by not in fields:
            raise InvalidArgument(f"cannot sort by {by!r}; fields are {', '.join(fields)}", field=by)
        if order not in ("ascending", "descending"):
            raise InvalidArgument("sort order must be 'ascending' or 'descending'")
        # None sorts first ascending; mixed types sort by type name, then value
        key: str = by
        hits.sort(key=lambda r: (r.get(key) is not None, type(r.get(key)).__name__, r.get(key)),
                  reverse=order == "descending")
    page = page or {}
    limit, offset = page.get("limit", DEFAULT_LIMIT), page.get("offset", 0)
    for name, value, top in (("limit", limit, MAX_LIMIT), ("offset", offset, None)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (top and value > top):
            raise InvalidArgument(f"page {name} must be an integer from 0{f' to {top}' if top else ''}",
                                  field=name)
    return {"items": [dict(r) for r in hits[offset:offset + limit]], "total": len(hits)}

"""find/filter/page/sort over lists of records, done in the manager.

The conventions people know from hub and REST clients (the FLAME Hub client's among them)::

    filter={"state": "open"}                       # equality
    filter={"created_at": (">=", 1700000000)}      # ops: = ! ~ < <= > >=  (FilterOperator)
    filter={"name": "~echo", "state": "!closed", "created_at": ">2026-01-01"}   # the shorthand
    page={"limit": 50, "offset": 0}                # 50 is the default page (DEFAULT_LIMIT)
    sort={"by": "created_at", "order": "descending"}

``~`` is a case-insensitive substring match.  The shorthand is a string value that starts with
an op (``~`` ``!`` ``<`` ``<=`` ``>`` ``>=``, or ``=`` to match a value that itself starts with
one); a plain string is equality.  A string compared with a number field (``created_at``,
``pending``) is read as a number, or as an ISO date or time (``2026-01-01``,
``2026-01-01T12:00``, UTC unless it names its offset) turned into epoch seconds.  Unknown fields
and ops are InvalidArgument errors that name them; comparing values of different types never
raises (they simply do not match).
"""
from __future__ import annotations

import datetime
import enum
import operator
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mesh.errors import InvalidArgument

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 50   # as the FLAME Hub client's default page


class FilterOperator(str, enum.Enum):
    """The filter ops, named as in the FLAME Hub client: ``(FilterOperator.like, "echo")`` is
    ``("~", "echo")`` is the shorthand ``"~echo"``."""

    eq = "="      # equal
    neq = "!"     # not equal
    like = "~"    # case-insensitive substring
    lt = "<"
    le = "<="
    gt = ">"
    ge = ">="


def _like(value: Any, pattern: Any) -> bool:
    return str(pattern).lower() in str(value).lower()


OPS: Dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!": operator.ne, "~": _like,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


# longest first, so ">=" is not read as ">" followed by "=..."
_SHORTHAND = ("<=", ">=", "~", "!", "<", ">", "=")


def shorthand(value: Any) -> Tuple[str, Any]:
    """``"~echo"`` -> ``("~", "echo")``, ``">=2026-01-01"`` -> ``(">=", "2026-01-01")``; a value
    that is not such a string is equality with itself."""
    if isinstance(value, str):
        for op in _SHORTHAND:
            if value.startswith(op):
                return op, value[len(op):]
    return "=", value


def as_number(text: str) -> Optional[float]:
    """A string filter value compared with a number field: a number, or an ISO date or time as
    epoch seconds (naive ones are UTC); None if it is neither."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _op_name(op: Any) -> Any:
    return op.value if isinstance(op, FilterOperator) else op


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
            if len(cond) != 2 or _op_name(cond[0]) not in OPS:
                raise InvalidArgument(f"filter on {name!r} must be [op, value] with op one of {' '.join(OPS)}",
                                      field=name)
            sym, value = _op_name(cond[0]), cond[1]
        else:
            sym, value = shorthand(cond)
        number = as_number(value) if isinstance(value, str) and sym not in ("~",) else None
        checks.append((name, OPS[sym], value, number))

    def match(row: Mapping[str, Any]) -> bool:
        for name, op, value, number in checks:
            have = row.get(name)
            if number is not None and isinstance(have, (int, float)) and not isinstance(have, bool):
                value = number   # "created_at": ">2026-01-01", "pending": ">5"
            try:
                if not op(have, value):
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

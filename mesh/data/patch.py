"""Versioned-document patches for session contexts.

Many executors update one session context at once, so the mesh ships
*changes* (RFC 6902 JSON Patch plus ``incr``) instead of whole documents:
they are small on the wire, and appends ("/-") and increments commute, so
concurrent writers do not clobber each other.  A document is a msgpack-able
tree: None, bool, int (64-bit), float, str, bytes, list, dict with str keys.

:func:`apply_patch` never mutates its input.  It copies only the containers
on the paths it writes (copy-on-write) and shares everything else, so one
``incr`` on a context holding a 10 MB blob costs as much as on an empty one,
and a failing op just drops the partial copy -- which is what makes a patch
atomic.  The price: results share untouched subtrees with the input, so
callers must treat documents as immutable and patch them instead.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from mesh.errors import Conflict, InvalidArgument

__all__ = ["is_document", "copy_document", "apply_patch", "diff", "validate_ops"]

_ATOMS = frozenset((type(None), bool, int, float, str, bytes))
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack can carry
_OPS = frozenset(("add", "remove", "replace", "move", "copy", "test", "incr"))
_NEEDS_VALUE = frozenset(("add", "replace", "test", "incr"))
_NEEDS_FROM = frozenset(("move", "copy"))
_INDEX = re.compile(r"0|[1-9][0-9]{0,18}")  # RFC 6901: no leading zeros
_BAD_ESCAPE = re.compile(r"~(?![01])")

Tokens = Tuple[str, ...]


def is_document(value: Any, max_depth: int = 64) -> bool:
    """The depth bound keeps a cyclic or hostile value from recursing forever."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return True
    if isinstance(value, int):
        return _INT_MIN <= value <= _INT_MAX
    if max_depth < 1:
        return False
    if isinstance(value, list):
        return all(is_document(v, max_depth - 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_document(v, max_depth - 1)
                   for k, v in value.items())
    return False


def copy_document(doc: Any) -> Any:
    """Documents are trees of mostly immutable leaves, so unlike copy.deepcopy
    this needs no memo and shares leaves: cost is the container count, not
    the byte size."""
    if isinstance(doc, dict):
        return {k: v if type(v) in _ATOMS else copy_document(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [v if type(v) in _ATOMS else copy_document(v) for v in doc]
    return doc


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kind(x: Any) -> int:
    return 0 if isinstance(x, bool) else 1 if isinstance(x, int) else 2 if isinstance(x, float) else 3


def _equal(a: Any, b: Any) -> bool:
    """Python's == says True == 1 == 1.0; a context must not, or a flag
    flipping to a counter would be invisible to ``diff`` and ``test``."""
    if a is b:
        return True
    if isinstance(a, dict):
        return (isinstance(b, dict) and len(a) == len(b)
                and all(k in b and _equal(v, b[k]) for k, v in a.items()))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(b, (dict, list)) or _kind(a) != _kind(b):
        return False
    return a == b or (a != a and b != b)  # NaN equals itself, so diff stays quiet


class _Bad(Exception):
    """A malformed op; apply_patch adds the op index and path."""


class _Mismatch(Exception):
    """A failed ``test``; becomes Conflict."""


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _parse_pointer(ptr: Any) -> Tokens:
    if not isinstance(ptr, str):
        raise _Bad(f"pointer must be a string, not {type(ptr).__name__}")
    if ptr == "":
        return ()
    if ptr[0] != "/":
        raise _Bad(f"pointer {ptr!r} must be empty or start with '/'")
    if _BAD_ESCAPE.search(ptr):
        raise _Bad(f"pointer {ptr!r} has '~' not followed by 0 or 1")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in ptr[1:].split("/"))


def _key(node: Any, tok: str, new_key: bool = False, list_end: bool = False) -> Any:
    """Resolve one token; ``new_key`` lets a dict key be absent, ``list_end``
    allows ``-`` and len(list) (insert positions)."""
    if isinstance(node, dict):
        if not new_key and tok not in node:
            raise _Bad(f"no key {tok!r}")
        return tok
    if isinstance(node, list):
        n = len(node)
        if list_end and tok == "-":
            return n
        if not _INDEX.fullmatch(tok):
            raise _Bad(f"bad list index {tok!r}")
        i = int(tok)
        if i > n or (i == n and not list_end):
            raise _Bad(f"index {i} out of range for list of length {n}")
        return i
    raise _Bad(f"cannot look up {tok!r} in a {type(node).__name__}")


def _error(i: int, name: Any, path: Any, reason: str, cls: type = InvalidArgument) -> Exception:
    where = path if isinstance(path, str) else repr(path)
    return cls(f"patch op #{i} ({name}) at path {where!r}: {reason}", index=i, path=where)


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _parse_ops(ops: Any) -> List[Tuple[str, Tokens, Optional[Tokens], Any]]:
    if not isinstance(ops, list):
        raise InvalidArgument(f"patch must be a list of ops, not {type(ops).__name__}")
    parsed = []
    for i, op in enumerate(ops):
        name = op.get("op") if isinstance(op, dict) else None
        path = op.get("path") if isinstance(op, dict) else None
        try:
            if not isinstance(op, dict):
                raise _Bad(f"op must be a map, not {type(op).__name__}")
            if not isinstance(name, str) or name not in _OPS:
                raise _Bad(f"unknown op {name!r}")
            if "path" not in op:
                raise _Bad("missing 'path'")
            tokens, src = _parse_pointer(path), None
            if name in _NEEDS_FROM:
                if "from" not in op:
                    raise _Bad("missing 'from'")
                src = _parse_pointer(op["from"])
                if name == "move" and len(tokens) > len(src) and tokens[:len(src)] == src:
                    raise _Bad(f"cannot move {op['from']!r} into its own child")
            if name in _NEEDS_VALUE:
                if "value" not in op:
                    raise _Bad("missing 'value'")
                if name == "incr" and not _is_number(op["value"]):
                    raise _Bad(f"incr value must be an int or float, not {type(op['value']).__name__}")
                if not is_document(op["value"]):
                    raise _Bad("value is not a document")
            parsed.append((name, tokens, src, op.get("value")))
        except _Bad as e:
            raise _error(i, name, path, str(e)) from None
    return parsed


def validate_ops(ops: Any) -> None:
    """Cheap structural check for ops arriving off the network, before they
    are queued; whether they fit the document is only known at apply time."""
    _parse_ops(ops)


class _Patch:
    def __init__(self, root: Any) -> None:
        self.root = root
        # Containers this patch already copied, by id; holding them keeps
        # their ids from being reused by another object while we run.
        self.owned: Dict[int, Any] = {}

    def _own(self, node: Any) -> Any:
        if id(node) in self.owned:
            return node
        node = dict(node) if isinstance(node, dict) else list(node)
        self.owned[id(node)] = node
        return node

    def _get(self, tokens: Tokens) -> Any:
        node = self.root
        for tok in tokens:
            node = node[_key(node, tok)]
        return node

    def _parent(self, tokens: Tokens) -> Any:
        """Validate read-only first, then copy-on-write root-to-parent, so a
        bad path copies nothing and the original is never written."""
        keys, node = [], self.root
        for tok in tokens[:-1]:
            keys.append(_key(node, tok))
            node = node[keys[-1]]
        if not isinstance(node, (dict, list)):
            raise _Bad(f"parent of target is a {type(node).__name__}, not a container")
        node = self.root = self._own(self.root)
        for k in keys:
            child = self._own(node[k])
            node[k] = child
            node = child
        return node

    def _source(self, src: Tokens, remove: bool) -> Any:
        try:
            return self.op_remove(src, None, None) if remove else self._get(src)
        except _Bad as e:
            raise _Bad(f"from {''.join('/' + _escape(t) for t in src)!r}: {e}") from None

    def op_add(self, tokens: Tokens, src: Any, value: Any, fresh: bool = False) -> None:
        value = value if fresh else copy_document(value)
        if not tokens:
            self.root = value
            return
        parent = self._parent(tokens)
        k = _key(parent, tokens[-1], new_key=True, list_end=True)
        if isinstance(parent, list):
            parent.insert(k, value)
        else:
            parent[k] = value

    def op_remove(self, tokens: Tokens, src: Any, value: Any) -> Any:
        if not tokens:
            raise _Bad("cannot remove the whole document")
        parent = self._parent(tokens)
        return parent.pop(_key(parent, tokens[-1]))

    def op_replace(self, tokens: Tokens, src: Any, value: Any) -> None:
        if not tokens:
            self.root = copy_document(value)
            return
        parent = self._parent(tokens)
        parent[_key(parent, tokens[-1])] = copy_document(value)

    def op_move(self, tokens: Tokens, src: Tokens, value: Any) -> None:
        if src == tokens:
            self._source(src, remove=False)  # still must exist
            return
        # Detached from its old place, so it needs no copy: untouched
        # containers from the input are still copied before any write.
        self.op_add(tokens, None, self._source(src, remove=True), fresh=True)

    def op_copy(self, tokens: Tokens, src: Tokens, value: Any) -> None:
        self.op_add(tokens, None, copy_document(self._source(src, remove=False)), fresh=True)

    def op_test(self, tokens: Tokens, src: Any, value: Any) -> None:
        try:
            current = self._get(tokens)
        except _Bad as e:
            raise _Mismatch(f"path does not exist ({e})") from None
        if not _equal(current, value):
            raise _Mismatch(f"expected {_short(value)}, found {_short(current)}")

    def op_incr(self, tokens: Tokens, src: Any, value: Any) -> None:
        if not tokens:
            self.root = _sum(self.root, value)
            return
        parent = self._parent(tokens)
        k = _key(parent, tokens[-1], new_key=True)
        parent[k] = _sum(parent[k], value) if isinstance(parent, list) or k in parent else value


def _sum(current: Any, delta: Any) -> Any:
    if not _is_number(current):
        raise _Bad(f"incr target is a {type(current).__name__}, not a number")
    result = current + delta
    if isinstance(result, int) and not _INT_MIN <= result <= _INT_MAX:
        raise _Bad("incr result does not fit in 64 bits")
    return result


def apply_patch(doc: Any, ops: Any) -> Any:
    """Return the patched document; ``doc`` is never modified, so on any
    error the caller still holds the untouched original."""
    parsed = _parse_ops(ops)
    patch = _Patch(doc)
    for i, (name, tokens, src, value) in enumerate(parsed):
        try:
            getattr(patch, "op_" + name)(tokens, src, value)
        except _Bad as e:
            raise _error(i, name, ops[i]["path"], str(e)) from None
        except _Mismatch as e:
            raise _error(i, name, ops[i]["path"], str(e), Conflict) from None
    return patch.root


def diff(old: Any, new: Any) -> List[Dict[str, Any]]:
    """Appends become ``add /-`` so two writers appending to the same base
    commute instead of one overwriting the other's index."""
    ops: List[Dict[str, Any]] = []
    _diff(old, new, "", ops)
    return ops


def _diff(old: Any, new: Any, path: str, ops: List[Dict[str, Any]]) -> None:
    if old is new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k, v in old.items():
            p = path + "/" + _escape(k)
            if k in new:
                _diff(v, new[k], p, ops)
            else:
                ops.append({"op": "remove", "path": p})
        for k, v in new.items():
            if k not in old:
                ops.append({"op": "add", "path": path + "/" + _escape(k), "value": copy_document(v)})
        return
    if isinstance(old, list) and isinstance(new, list):
        lo, ln = len(old), len(new)
        if lo == ln:
            for i in range(lo):
                _diff(old[i], new[i], f"{path}/{i}", ops)
            return
        if all(map(_equal, old, new)):  # map stops at the shorter: prefix test
            if lo < ln:
                ops.extend({"op": "add", "path": path + "/-", "value": copy_document(v)}
                           for v in new[lo:])
            else:  # highest index first so earlier removes don't shift later ones
                ops.extend({"op": "remove", "path": f"{path}/{i}"} for i in range(lo - 1, ln - 1, -1))
            return
    elif _equal(old, new):
        return
    ops.append({"op": "replace", "path": path, "value": copy_document(new)})

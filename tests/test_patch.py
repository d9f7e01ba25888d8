from __future__ import annotations

import copy
import timeit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.data.patch import apply_patch, copy_document, diff, is_document, validate_ops
from mesh.errors import Conflict, InvalidArgument


def typed(x):
    """Comparable form where True, 1 and 1.0 all differ (plain == conflates them)."""
    if isinstance(x, dict):
        return ("dict", {k: typed(v) for k, v in x.items()})
    if isinstance(x, list):
        return ("list", [typed(v) for v in x])
    return (type(x).__name__, x)


def same(a, b):
    return typed(a) == typed(b)


def apply_keep(doc, ops):
    """Apply and assert the input document was not modified."""
    before = copy.deepcopy(doc)
    out = apply_patch(doc, ops)
    assert same(doc, before)
    return out


# --- single ops ---------------------------------------------------------------

def test_add():
    assert apply_keep({"a": 1}, [{"op": "add", "path": "/b", "value": [2]}]) == {"a": 1, "b": [2]}
    assert apply_keep({"a": 1}, [{"op": "add", "path": "/a", "value": 5}]) == {"a": 5}
    assert apply_keep([1, 3], [{"op": "add", "path": "/1", "value": 2}]) == [1, 2, 3]
    assert apply_keep([1, 2], [{"op": "add", "path": "/2", "value": 3}]) == [1, 2, 3]
    assert apply_keep([1, 2], [{"op": "add", "path": "/-", "value": 3}]) == [1, 2, 3]
    assert apply_keep({"a": 1}, [{"op": "add", "path": "", "value": [9]}]) == [9]


def test_remove():
    assert apply_keep({"a": 1, "b": 2}, [{"op": "remove", "path": "/a"}]) == {"b": 2}
    assert apply_keep({"l": [1, 2, 3]}, [{"op": "remove", "path": "/l/0"}]) == {"l": [2, 3]}
    for path in ("/zz", "", "/l/3", "/l/-"):
        with pytest.raises(InvalidArgument):
            apply_patch({"l": [1, 2, 3]}, [{"op": "remove", "path": path}])


def test_replace():
    assert apply_keep({"a": {"b": 1}}, [{"op": "replace", "path": "/a/b", "value": "x"}]) == {"a": {"b": "x"}}
    assert apply_keep([1, 2], [{"op": "replace", "path": "/1", "value": None}]) == [1, None]
    assert apply_keep({"a": 1}, [{"op": "replace", "path": "", "value": 7}]) == 7
    with pytest.raises(InvalidArgument):
        apply_patch({"a": 1}, [{"op": "replace", "path": "/b", "value": 1}])


def test_move():
    doc = {"a": {"x": [1, 2]}, "b": {}}
    assert apply_keep(doc, [{"op": "move", "from": "/a/x", "path": "/b/y"}]) == {"a": {}, "b": {"y": [1, 2]}}
    assert apply_keep([1, 2, 3, 4], [{"op": "move", "from": "/1", "path": "/3"}]) == [1, 3, 4, 2]
    assert apply_keep({"a": 1}, [{"op": "move", "from": "/a", "path": "/a"}]) == {"a": 1}
    with pytest.raises(InvalidArgument, match="own child"):
        apply_patch(doc, [{"op": "move", "from": "/a", "path": "/a/x/0"}])
    with pytest.raises(InvalidArgument, match="from '/nope'"):
        apply_patch(doc, [{"op": "move", "from": "/nope", "path": "/c"}])


def test_move_then_modify_does_not_touch_original():
    doc = {"a": {"x": {"n": 1}}}
    out = apply_keep(doc, [{"op": "move", "from": "/a/x", "path": "/y"},
                           {"op": "incr", "path": "/y/n", "value": 1}])
    assert out == {"a": {}, "y": {"n": 2}}


def test_copy_is_not_aliased():
    doc = {"a": {"n": 1}}
    out = apply_keep(doc, [{"op": "copy", "from": "/a", "path": "/b"},
                           {"op": "incr", "path": "/b/n", "value": 5}])
    assert out == {"a": {"n": 1}, "b": {"n": 6}}
    assert out["a"] is not out["b"]
    with pytest.raises(InvalidArgument, match="from"):
        apply_patch(doc, [{"op": "copy", "from": "/zz", "path": "/b"}])


def test_test_op():
    doc = {"a": [1, {"b": "c"}]}
    assert apply_keep(doc, [{"op": "test", "path": "/a/1", "value": {"b": "c"}}]) == doc
    with pytest.raises(Conflict, match="/a/0"):
        apply_patch(doc, [{"op": "test", "path": "/a/0", "value": 2}])
    with pytest.raises(Conflict, match="does not exist"):
        apply_patch(doc, [{"op": "test", "path": "/missing", "value": 1}])


def test_incr():
    assert apply_keep({"n": 1}, [{"op": "incr", "path": "/n", "value": 2}]) == {"n": 3}
    assert apply_keep({"n": 1}, [{"op": "incr", "path": "/n", "value": 0.5}]) == {"n": 1.5}
    assert apply_keep({}, [{"op": "incr", "path": "/n", "value": 4}]) == {"n": 4}
    assert apply_keep({"c": [0, 10]}, [{"op": "incr", "path": "/c/1", "value": -1}]) == {"c": [0, 9]}
    assert apply_keep(5, [{"op": "incr", "path": "", "value": 1}]) == 6
    bad = [
        ({"n": "s"}, {"op": "incr", "path": "/n", "value": 1}),
        ({"n": True}, {"op": "incr", "path": "/n", "value": 1}),
        ({"n": 1}, {"op": "incr", "path": "/n", "value": True}),
        ({"n": 1}, {"op": "incr", "path": "/n", "value": "1"}),
        ({"c": [1]}, {"op": "incr", "path": "/c/1", "value": 1}),
        ({"c": [1]}, {"op": "incr", "path": "/c/-", "value": 1}),
        ({"n": 2 ** 64 - 1}, {"op": "incr", "path": "/n", "value": 1}),
    ]
    for doc, op in bad:
        with pytest.raises(InvalidArgument):
            apply_patch(doc, [op])


def test_incr_commutes():
    base = {"n": 10, "f": 1.5}
    a = [{"op": "incr", "path": "/n", "value": 3}, {"op": "incr", "path": "/f", "value": 1}]
    b = [{"op": "incr", "path": "/n", "value": -7}, {"op": "incr", "path": "/new", "value": 2}]
    ab = apply_patch(apply_patch(base, a), b)
    ba = apply_patch(apply_patch(base, b), a)
    assert same(ab, ba) and ab == {"n": 6, "f": 2.5, "new": 2}


# --- pointers -------------------------------------------------------------------

def test_pointer_escapes():
    doc = {"a/b": 1, "m~n": 2, "~1": 3, "": 4}
    assert apply_patch(doc, [{"op": "test", "path": "/a~1b", "value": 1},
                             {"op": "test", "path": "/m~0n", "value": 2},
                             {"op": "test", "path": "/~01", "value": 3},
                             {"op": "test", "path": "/", "value": 4}]) == doc
    assert apply_patch(doc, [{"op": "remove", "path": "/a~1b"}]) == {"m~n": 2, "~1": 3, "": 4}
    ops = diff({}, {"x/y~z": 1})
    assert ops == [{"op": "add", "path": "/x~1y~0z", "value": 1}]


@pytest.mark.parametrize("path", ["a", "/a~2", "/a~", "/l/01", "/l/-1", "/l/x", "/l/0/q", "/a/b"])
def test_bad_pointers(path):
    with pytest.raises(InvalidArgument):
        apply_patch({"a": 1, "l": [1]}, [{"op": "replace", "path": path, "value": 0}])


# --- atomicity and aliasing -------------------------------------------------------

def test_atomic_when_third_op_fails():
    doc = {"a": {"b": [1, 2]}, "n": 1, "s": "x"}
    before = copy.deepcopy(doc)
    ops = [{"op": "add", "path": "/a/b/-", "value": 3},
           {"op": "incr", "path": "/n", "value": 1},
           {"op": "remove", "path": "/a/missing"},
           {"op": "add", "path": "/z", "value": 1}]
    with pytest.raises(InvalidArgument) as ei:
        apply_patch(doc, ops)
    assert same(doc, before)
    assert "#2" in str(ei.value) and "/a/missing" in str(ei.value)
    assert ei.value.details == {"index": 2, "path": "/a/missing"}


def test_atomic_when_test_fails():
    doc = {"n": 1}
    with pytest.raises(Conflict):
        apply_patch(doc, [{"op": "incr", "path": "/n", "value": 1},
                          {"op": "test", "path": "/n", "value": 1}])
    assert doc == {"n": 1}


def test_values_are_copied_not_aliased():
    value = {"inner": [1, 2]}
    out = apply_patch({}, [{"op": "add", "path": "/v", "value": value},
                           {"op": "replace", "path": "/v", "value": value},
                           {"op": "add", "path": "/w", "value": value}])
    value["inner"].append(3)
    assert out == {"v": {"inner": [1, 2]}, "w": {"inner": [1, 2]}}
    assert out["v"] is not out["w"]


def test_big_string_is_shared_not_copied():
    big = "x" * (10 * 1024 * 1024)
    sibling = {"deep": [1, 2, 3]}
    doc = {"blob": big, "stats": {"n": 0, "blob2": big}, "other": sibling}
    out = apply_patch(doc, [{"op": "incr", "path": "/stats/n", "value": 1}])
    assert out["blob"] is big and out["stats"]["blob2"] is big
    assert out["other"] is sibling  # untouched containers are shared too
    assert out["stats"] == {"n": 1, "blob2": big} and doc["stats"]["n"] == 0


def test_empty_patch_returns_doc():
    doc = {"a": 1}
    assert apply_patch(doc, []) is doc


# --- bool / int / float strictness ----------------------------------------------

def test_bool_int_float_strict():
    with pytest.raises(Conflict):
        apply_patch({"a": True}, [{"op": "test", "path": "/a", "value": 1}])
    with pytest.raises(Conflict):
        apply_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0}])
    with pytest.raises(Conflict):
        apply_patch({"a": [0]}, [{"op": "test", "path": "/a", "value": [False]}])
    assert diff({"a": True}, {"a": 1}) == [{"op": "replace", "path": "/a", "value": 1}]
    assert diff({"a": 1}, {"a": 1.0}) == [{"op": "replace", "path": "/a", "value": 1.0}]
    assert diff([0], [False]) == [{"op": "replace", "path": "/0", "value": False}]
    out = apply_patch({"a": True}, diff({"a": True}, {"a": 1}))
    assert type(out["a"]) is int


def test_is_document():
    good = [None, True, 0, -2 ** 63, 2 ** 64 - 1, 1.5, "s", b"b", [], {}, {"a": [1, {"b": None}]}]
    for v in good:
        assert is_document(v), v
    bad = [(1,), {1: "a"}, {"a": (1,)}, 2 ** 64, -2 ** 63 - 1, object(), {1, 2}, [set()]]
    for v in bad:
        assert not is_document(v), v
    nested = []
    for _ in range(64):
        nested = [nested]
    assert not is_document(nested) and is_document(nested, max_depth=65)
    cyclic = []
    cyclic.append(cyclic)
    assert not is_document(cyclic)


def test_copy_document():
    s = "y" * 1000
    doc = {"a": [1, {"b": s}], "c": b"z", "d": None}
    out = copy_document(doc)
    assert same(out, doc)
    assert out is not doc and out["a"] is not doc["a"] and out["a"][1] is not doc["a"][1]
    assert out["a"][1]["b"] is s


def test_copy_document_faster_than_deepcopy():
    doc = {f"k{i}": [i, str(i), {"x": float(i), "y": [True, None]}] for i in range(500)}
    fast = min(timeit.repeat(lambda: copy_document(doc), number=5, repeat=5))
    slow = min(timeit.repeat(lambda: copy.deepcopy(doc), number=5, repeat=5))
    assert fast < slow


# --- validation errors -----------------------------------------------------------

@pytest.mark.parametrize("ops, fragment", [
    ({"op": "add"}, "list of ops"),
    ([1], "map"),
    ([{"op": "frob", "path": "/a"}], "unknown op 'frob'"),
    ([{"path": "/a"}], "unknown op None"),
    ([{"op": "add", "value": 1}], "missing 'path'"),
    ([{"op": "add", "path": "/a"}], "missing 'value'"),
    ([{"op": "remove", "path": 5}], "string"),
    ([{"op": "move", "path": "/a"}], "missing 'from'"),
    ([{"op": "copy", "path": "/a", "from": 3}], "string"),
    ([{"op": "incr", "path": "/a", "value": "1"}], "int or float"),
    ([{"op": "add", "path": "/a", "value": (1, 2)}], "not a document"),
])
def test_validate_ops_errors(ops, fragment):
    with pytest.raises(InvalidArgument, match=None) as ei:
        validate_ops(ops)
    assert fragment in str(ei.value)
    with pytest.raises(InvalidArgument):
        apply_patch({}, ops)


def test_error_names_index_and_path():
    ops = [{"op": "test", "path": "", "value": {}}, {"op": "add", "path": "/x/y", "value": 1}]
    with pytest.raises(InvalidArgument) as ei:
        apply_patch({}, ops)
    assert "#1" in str(ei.value) and "'/x/y'" in str(ei.value) and "add" in str(ei.value)
    with pytest.raises(Conflict) as ei:
        apply_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    assert "'/a'" in str(ei.value) and "expected 2, found 1" in str(ei.value)


def test_validate_ops_accepts_good_patch():
    validate_ops([{"op": "add", "path": "/a", "value": 1}, {"op": "remove", "path": "/a"},
                  {"op": "move", "path": "/b", "from": "/a"}, {"op": "incr", "path": "", "value": 1.5}])


# --- diff ------------------------------------------------------------------------

def test_diff_rules():
    assert diff({"a": [1]}, {"a": [1]}) == []
    assert diff({"a": 1, "b": 2}, {"b": 3, "c": 4}) == [
        {"op": "remove", "path": "/a"},
        {"op": "replace", "path": "/b", "value": 3},
        {"op": "add", "path": "/c", "value": 4}]
    assert diff([1, 2, 3, 4], [1, 2]) == [{"op": "remove", "path": "/3"}, {"op": "remove", "path": "/2"}]
    assert diff([1, 2, 3], [2, 3]) == [{"op": "replace", "path": "", "value": [2, 3]}]
    assert diff({"a": 1}, [1]) == [{"op": "replace", "path": "", "value": [1]}]


def test_diff_appends_use_dash():
    ops = diff({"log": ["a"]}, {"log": ["a", "b", {"c": 1}]})
    assert ops == [{"op": "add", "path": "/log/-", "value": "b"},
                   {"op": "add", "path": "/log/-", "value": {"c": 1}}]


def test_concurrent_appends_commute():
    base = {"log": [1], "n": 0}
    a = diff(base, {"log": [1, "from-a"], "n": 0})
    b = diff(base, {"log": [1, "from-b"], "n": 0})
    ab = apply_patch(apply_patch(base, a), b)
    ba = apply_patch(apply_patch(base, b), a)
    assert ab["log"] == [1, "from-a", "from-b"]
    assert ba["log"] == [1, "from-b", "from-a"]
    assert base == {"log": [1], "n": 0}


scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=5) | st.binary(max_size=5))
keys = st.text(alphabet="ab/~01-", max_size=3)
documents = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4),
    max_leaves=20)


def check_roundtrip(old, new):
    old_snapshot, new_snapshot = copy.deepcopy(old), copy.deepcopy(new)
    ops = diff(old, new)
    validate_ops(ops)
    assert same(apply_patch(copy_document(old), ops), new)
    assert same(apply_patch(old, ops), new)
    assert same(old, old_snapshot) and same(new, new_snapshot)
    return ops


@settings(max_examples=300, deadline=None)
@given(documents, documents)
def test_diff_roundtrip_random(old, new):
    check_roundtrip(old, new)


@settings(max_examples=200, deadline=None)
@given(st.lists(documents, max_size=4), st.lists(documents, min_size=1, max_size=4))
def test_diff_roundtrip_appends(prefix, extra):
    ops = check_roundtrip({"l": prefix}, {"l": prefix + extra})
    assert [op["path"] for op in ops] == ["/l/-"] * len(extra)
    check_roundtrip({"l": prefix + extra}, {"l": prefix})


@settings(max_examples=200, deadline=None)
@given(documents, st.data())
def test_diff_roundtrip_mutations(old, data):
    """Random docs rarely share structure; edit one sub-tree so diff recurses."""
    new = copy_document(old)
    node = new
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], (dict, list)):
            node[key] = data.draw(documents)
            break
        node = node[key]
    else:
        if isinstance(node, dict):
            node[data.draw(keys)] = data.draw(documents)
        elif isinstance(node, list):
            node.append(data.draw(documents))
    check_roundtrip(old, new)

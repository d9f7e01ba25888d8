"""Object cache: versioned objects, one fetch per executor, patches travel as patches."""
from __future__ import annotations

from typing import Iterator

import pytest
from conftest import wait_until

from client import Session, delete_object, get_object, patch_object, put_object, update_object
from client import objects as client_objects
from mesh import errors


@pytest.fixture(autouse=True)
def _object_connections() -> Iterator[None]:
    """put_object and friends keep one connection per manager for the whole process (client.objects);
    close those this test opened, so the socket check sees only real leaks."""
    yield
    with client_objects._lock:
        for conn in client_objects._conns.values():
            conn.close()
        client_objects._conns.clear()


def _cache_stats(client, wanted, what):
    """The executors' cache counters, once ``wanted`` holds for them (heartbeats carry them)."""
    def stats():
        st = {e["id"]: e["cache"] for e in client.list_executors()}
        return st if wanted(st) else None
    return wait_until(stats, timeout=15, interval=0.1, what=what)


def test_put_get_update_patch_delete_roundtrip(mesh):
    ref = put_object({"a": [1, 2]})
    assert ref.version == 1 and get_object(ref) == {"a": [1, 2]}
    ref2 = patch_object(ref, [{"op": "add", "path": "/a/-", "value": 3}])
    assert ref2.version == 2
    before = dict(client_objects.cache.stats)
    assert get_object(ref) == {"a": [1, 2, 3]}, "an old ref still reads the newest version"
    assert client_objects.cache.stats["patches"] == before["patches"] + 1, "the reader got a patch, not the object"
    ref3 = update_object(ref, {1, 2})   # an opaque object replaces the document whole
    assert get_object(ref3) == {1, 2}
    with pytest.raises(errors.InvalidArgument, match="opaque"):
        patch_object(ref3, [{"op": "add", "path": "/x", "value": 1}])
    delete_object(ref)
    with pytest.raises(errors.NotFound, match=ref.key):
        get_object(ref)


def test_session_objects_die_with_the_session_and_ttl_expires(mesh):
    with Session("tools") as s:
        ref = put_object([1], session=s)
        assert get_object(ref) == [1]
    with pytest.raises(errors.NotFound):
        get_object(ref)
    short = put_object("brief", ttl=0.3)
    assert get_object(short) == "brief"

    def expired():
        try:
            get_object(short)
        except errors.NotFound:
            return True
        return False

    wait_until(expired, timeout=10, interval=0.1, what="the object to outlive its ttl no longer")
    with pytest.raises(errors.InvalidArgument, match="ttl"):
        put_object("x", ttl=-1)


def test_large_object_is_fetched_once_per_executor_then_patched(mesh, client):
    data = b"\x07" * (50 * 1024 * 1024)
    ref = put_object({"n": 0, "data": data})
    before = {e["id"]: dict(e["cache"]) for e in client.list_executors()}
    with Session("tools") as s:
        # first get instances serving on both executors (start-up is slow under load)
        wait_until(lambda: {f.result(60) for f in [s.submit(("where", 0.3)) for _ in range(8)]} == {"exec-0", "exec-1"},
                   timeout=120, interval=0.01, what="instances serving on both executors")
        results = [f.result(120) for f in [s.submit(("getobj", (ref, 0.15))) for _ in range(20)]]
        assert all(n == 0 and size == len(data) for _, n, size in results)
        used = {eid for eid, _, _ in results}
        assert len(used) == 2, f"tasks ran on {used}; the test needs both executors"
        stats = _cache_stats(client, lambda st: all(st[e].get("fetches", 0) - before.get(e, {}).get("fetches", 0) >= 1
                                                     for e in used), "a fetch counted on both executors")
        for eid in used:
            assert stats[eid]["full"] - before.get(eid, {}).get("full", 0) == 1, f"{eid} fetched the object more than once"
        patch_object(ref, [{"op": "incr", "path": "/n", "value": 1}])
        results = [f.result(120) for f in [s.submit(("getobj", (ref, 0.15))) for _ in range(20)]]
        assert all(n == 1 for _, n, _ in results)
        after = _cache_stats(client, lambda st: all(st[e]["patches"] - before.get(e, {}).get("patches", 0) >= 1
                                                    for e in {eid for eid, _, _ in results}), "a patch on every executor")
        for eid in {eid for eid, _, _ in results}:
            assert after[eid]["full"] - before.get(eid, {}).get("full", 0) == 1, "the patch arrived as a whole object"
    delete_object(ref)

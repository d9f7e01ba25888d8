"""Replicated session context: patches, versions, convergence, conflicts."""
from __future__ import annotations

import pytest
from conftest import tools_spec

from client import Session
from mesh import errors


def test_concurrent_incr_on_a_large_context_ships_patches_not_state(mesh):
    big = "x" * (10 * 1024 * 1024)
    with Session("tools", ctx={"n": 0, "big": big}) as s:
        futs = [s.submit(("incr", 1)) for _ in range(200)]
        for f in futs:
            f.result(120)
        ctx = s.context()
        assert ctx["n"] == 200 and ctx["big"] == big
        info = s.info()
        # 200 tasks with ~40-byte requests and ~40-byte incr patches: far below one context
        assert info["bytes_in"] < 200 * 1024, info["bytes_in"]
        assert info["context_version"] == 200


def test_replicas_converge_after_dropped_updates(mesh, client):
    """The lossy service loses every 3rd patch; gap detection and re-snapshot repair it."""
    client.register_application(tools_spec("lossy", arguments=["lossy_service.py"]))
    try:
        with Session("lossy", ctx=[]) as s:
            writers = {f.result(60)[0] for f in [s.submit(("append", i)) for i in range(60)]}
            final = s.context()
            assert sorted(final) == list(range(60))
            replicas = [f.result(60) for f in [s.submit(("replica", None)) for _ in range(40)]]
            assert writers & {pid for pid, _, _ in replicas}, "the replicas checked include one that wrote"
            for pid, ctx, _ in replicas:
                assert ctx == final, f"replica in pid {pid} diverged"
            resyncs = {pid: r for pid, _, r in replicas}   # the latest count of each instance
            assert sum(resyncs.values()) > 0, "the lossy replicas repaired themselves by snapshots"
            assert client.stats()["resyncs"] > 0
    finally:
        client.unregister_application("lossy")


def test_failed_test_op_is_a_conflict_for_instance_and_client(mesh):
    with Session("tools", ctx={"v": 1}) as s:
        s.invoke(("cas", (1, 2)), timeout=30)
        with pytest.raises(errors.Conflict, match="/v"):
            s.invoke(("cas", (1, 3)), timeout=30)
        with pytest.raises(errors.Conflict):
            s.patch_context([{"op": "test", "path": "/v", "value": 1}, {"op": "replace", "path": "/v", "value": 9}])
        assert s.context() == {"v": 2}
        assert s.info()["conflicts"] == 2


def test_client_writes_are_seen_by_the_next_task(mesh):
    with Session("tools", ctx={"k": 0}) as s:
        for i in range(1, 6):
            s.patch_context([{"op": "replace", "path": "/k", "value": i}])
            assert s.invoke(("context", None), timeout=30) == {"k": i}
        s.update_context({"k": "whole"})
        assert s.invoke(("context", None), timeout=30) == {"k": "whole"}


def test_opaque_context_works_by_whole_replacement(mesh):
    with Session("tools", ctx={1, 2, 3}) as s:   # a set is no document: cloudpickled whole
        assert s.context() == {1, 2, 3}
        assert s.invoke(("context", None), timeout=30) == {1, 2, 3}
        with pytest.raises(errors.InvalidArgument, match="opaque"):
            s.patch_context([{"op": "add", "path": "/x", "value": 1}])
        s.update_context(frozenset({4}))
        assert s.invoke(("context", None), timeout=30) == frozenset({4})
        s.update_context(["back", "to", "a", "document"])
        assert s.invoke(("context", None), timeout=30) == ["back", "to", "a", "document"]

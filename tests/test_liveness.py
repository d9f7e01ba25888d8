"""Liveness under load: a flooding client slows only itself (issue 11, item 4).

While the manager's store is behind, the core holds back new tasks of busy
sessions; everything else is still read and answered: executors' heartbeats,
instances' answers, control calls and a quiet session's tasks.  The benchmark
with default timers and a million tasks is ``scripts/bench_flood.py``; here a
backlog limit of 1 puts the manager in that state for real, many times over.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Dict, List

from conftest import FAST, tools_spec

from client import Client, Session
from client.local import LocalMesh

FLOOD = 20_000
QUIET = 40
WINDOW = 1_000


def test_a_flood_with_the_store_behind_evicts_nobody_and_the_quiet_session_is_served(tmp_path: Any) -> None:
    # every task written when queued (record_after 0) and a backlog limit of 1: the store falls behind
    env = {**FAST, "ZMESH_MAX_STORE_BACKLOG": "1", "ZMESH_BACKLOG_ADMIT": "8", "ZMESH_RECORD_AFTER": "0"}
    with LocalMesh(executors=2, slots=2, env=env, log_dir=str(tmp_path)) as m, Client(m.endpoint) as c:
        c.register_application(tools_spec())
        joined = {e.id: e.joined_at for e in c.find_executors()}
        quiet_answers: List[Any] = []
        quiet_errors: List[BaseException] = []
        with Session("tools", manager=m.endpoint) as flood, Session("tools", manager=m.endpoint) as quiet:
            quiet.invoke(("echo", "warm"), timeout=60)
            flood.invoke(("echo", "warm"), timeout=60)

            def quiet_client() -> None:
                try:
                    for i in range(QUIET):
                        quiet_answers.append(quiet.invoke(("echo", i), timeout=30))
                except BaseException as exc:  # noqa: B902 - reported by the test
                    quiet_errors.append(exc)

            # Given a client flooding its session while another session runs one task at a time
            t = threading.Thread(target=quiet_client)
            t.start()
            answers: List[Any] = []
            futures: "collections.deque[Any]" = collections.deque()
            for i in range(FLOOD):   # WINDOW tasks in flight, topped up as answers come
                futures.append(flood.submit(("echo", i)))
                if len(futures) >= WINDOW:
                    answers.append(futures.popleft().result(120))
            answers += [f.result(120) for f in futures]
            # Then every flood task is answered once, with its own answer
            assert answers == list(range(FLOOD))
            t.join(120)
            # And the quiet session was served throughout
            assert not quiet_errors and quiet_answers == list(range(QUIET))
        stats: Dict[str, Any] = c.stats()
        # And the store really fell behind (the flood's tasks were held back) ...
        assert stats["store_pauses"] > 0 and stats["submits_deferred"] > 0, stats
        # ... yet no executor was evicted: heartbeats were read all along
        assert {e.id: e.joined_at for e in c.find_executors()} == joined
        with open(f"{m.log_dir}/manager.log") as log:
            assert "executor lost" not in log.read()

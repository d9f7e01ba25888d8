"""Task rules: queue, credit, dispatch, answers, retries, resends.

Delivery is at-least-once (docs/reliability.md): the attempt counter is
incremented *before* each dispatch; an instance that dies takes its running
tasks back to the front of their session's queue while they are within the
application's ``max_retries``; an answer from an instance the task was taken
away from is dropped, so a client gets exactly one answer per task.
"""
from __future__ import annotations

import functools
import heapq
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mesh.core.base import AUTH_ERRORS, ENGINE_PEERS, Base, log
from mesh.core.effects import Call
from mesh.errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, MeshError, NotFound,
                         ResourceExhausted, TaskFailed, Unavailable)
from mesh.model.records import CANCELLED, DRAINING, FAILED, OPEN, PENDING, RUNNING, SUCCEEDED, Instance, Session, Task
from mesh.ops.log import event
from mesh.wire.protocol import Done, Outcome, Result, Submit, Tasks

TID_BLOCK = 100_000   # task ids reserved per write of the high-water mark
REPLAY_MAX = 32       # held-back SUBMITs taken per group commit once the store has caught up


def _json(err: Dict[str, Any]) -> str:
    return json.dumps(err, default=str)


class TaskRules(Base):
    def on_submit(self, peer: bytes, rec: Submit, payloads: Sequence[Any], held: bool = False) -> None:
        """New tasks (or a client's resend).  ``held``: taken now after being held back while the
        store was behind (see :meth:`set_backlogged`)."""
        s = self.sessions.get(rec.session)
        error: Optional[MeshError] = None
        if self.secured:   # who is asking comes first: a stranger learns nothing about what exists
            try:
                self.may_submit(rec.token, s.owner if s is not None else None)
            except AUTH_ERRORS as exc:
                self.denied(peer, "submit", exc)
                error = exc
        if error is None and s is None:
            error = NotFound(f"session {rec.session!r} does not exist", session=rec.session)
        if error is None and s is not None and s.state != OPEN:
            error = FailedPrecondition(f"session {rec.session!r} is closed", session=rec.session)
        if error is None and rec.timeout is not None and not 0 < rec.timeout < float("inf"):
            error = InvalidArgument(f"a task's timeout is a positive number of seconds, not {rec.timeout!r}",
                                    argument="timeout")
        if error is not None or s is None:
            self.refuse(peer, rec.session, rec.tags, error or NotFound(rec.session))
            return
        if not held and (s.deferred or self.backlogged
                         and len(s.pending) + s.running >= self.settings.backlog_admit):
            n, limit = len(rec.tags), self.settings.max_pending
            if len(s.pending) + s.running + s.deferred + n > limit or self.deferred_tasks + n > limit:
                self.refuse(peer, s.id, rec.tags, ResourceExhausted(
                    f"session {s.id!r} has {len(s.pending) + s.running + s.deferred} tasks queued, running or "
                    f"held while the store catches up; max_pending is {limit}", limit="max_pending", session=s.id))
                return
            s.deferred += n      # the store is behind and this session is busy: later, in order
            self.deferred_tasks += n
            self.stats["submits_deferred"] += 1
            self.deferred.append((peer, rec, payloads))
            return
        timeout = rec.timeout
        if timeout is None:
            app = self.apps.get(s.app)
            timeout = app.spec.task_timeout if app is not None else None
        if rec.resend:
            self.resend(peer, s, rec.tags, rec.cid, payloads, timeout)
        else:
            self.enqueue(peer, s, rec.tags, rec.cid, payloads, timeout)

    def set_backlogged(self, backlogged: bool) -> None:
        """The loop's view of the store: behind (hold busy sessions' new tasks) or caught up
        (take what was held, in arrival order, until it falls behind again)."""
        self.backlogged = backlogged
        deferred = self.deferred
        for _ in range(min(len(deferred), 0 if backlogged else REPLAY_MAX)):
            peer, rec, payloads = deferred.popleft()
            s = self.sessions.get(rec.session)
            self.deferred_tasks -= len(rec.tags)
            if s is not None:
                s.deferred -= len(rec.tags)
            self.on_submit(peer, rec, payloads, held=True)

    def refuse(self, peer: bytes, sid: str, tags: Sequence[int], error: MeshError) -> None:
        err = error.to_wire()
        self.send(peer, Result(sid, [(tag, err) for tag in tags]), [b""] * len(tags))

    def enqueue(self, peer: bytes, s: Session, tags: Sequence[int], cid: str, payloads: Sequence[Any],
                timeout: Optional[float] = None, on: Optional[Instance] = None) -> None:
        """Queue new tasks (refusing what passes ``max_pending``) and dispatch what credit allows.
        ``on``: an instance of ``s`` that should run them (the functions engine's affinity), if it is
        ready and has credit for all of them; otherwise they queue like any."""
        room = max(self.settings.max_pending - len(s.pending), 0)
        if room < len(tags):
            self.refuse(peer, s.id, tags[room:], ResourceExhausted(
                f"session {s.id!r} has {len(s.pending)} tasks queued; max_pending is {self.settings.max_pending}",
                limit="max_pending", session=s.id))
            tags, payloads = tags[:room], payloads[:room]
        now = self.now
        young = self.young
        sid = s.id
        last = self.tids_reserved
        for tag, payload in zip(tags, payloads):
            tid = next(self._next_tid)
            if tid > last:   # reserve a block on disk before any id of it can be seen (ids never reused)
                last = self.tids_reserved = self.batch.task_ids_reserved = tid + TID_BLOCK
            t = self.tasks[tid] = Task(tid, sid, peer, tag, payload, 0, cid, now)
            if timeout is not None:
                t.timeout = timeout
            self.by_tag[(cid, tag)] = tid
            s.pending.append(tid)
            s.bytes_in += len(payload)
            young.append(tid)
        self.stats["tasks_submitted"] += len(tags)
        if on is not None and on.session is s and on.identity is not None and not on.draining \
                and on.credit_limit(self.settings.queue_target) - len(on.inflight) >= len(tags):
            mine = [s.pending.pop() for _ in tags][::-1]
            self._give(on, s, [(tid, self.tasks[tid]) for tid in mine])
        self.dispatch(s)

    def _give(self, inst: Instance, s: Session, tasks: List[Tuple[int, Task]]) -> None:
        """Send ``tasks`` (pending, taken off the queue) to ``inst``: the attempt counts now."""
        assert inst.identity is not None
        items: List[Tuple[int, int]] = []
        frames: List[Any] = []
        for tid, t in tasks:
            t.state = RUNNING
            t.attempt += 1          # counted before the run: at-least-once, see docs/reliability.md
            t.instance = inst.id
            items.append((tid, t.attempt))
            frames.append(t.payload)
        idle = not inst.inflight
        inst.inflight.update(dict.fromkeys(i[0] for i in items))
        if idle:
            inst.busy_since = self.now
            self.start_clock(inst)
        s.running += len(items)
        self.send(inst.identity, Tasks(s.id, s.context.version, items), frames,
                  if_lost=functools.partial(self.undelivered, inst, items))

    def resend(self, peer: bytes, s: Session, tags: Sequence[int], cid: str, payloads: Sequence[Any],
               timeout: Optional[float] = None) -> None:
        """A client that lost its connection (or saw the manager restart) resends what it has no
        answer for: a task still here answers the new connection; a finished one is answered from
        the database; an unknown one runs.  Each task answers once from the client's view."""
        self.stats["tasks_resent"] += len(tags)
        lookup: List[Tuple[int, Any]] = []
        for tag, payload in zip(tags, payloads):
            tid = self.by_tag.get((cid, tag))
            t = self.tasks.get(tid) if tid is not None else None
            if t is not None:
                t.client = peer
            else:
                lookup.append((tag, payload))
        if lookup:
            self.call(Call(lambda store, c, ts: store.find_by_tags(c, ts), (cid, [tag for tag, _ in lookup]),
                           then=lambda known: self.resent(peer, s, cid, lookup, known, timeout),
                           label="find_by_tags"))

    def resent(self, peer: bytes, s: Session, cid: str, lookup: List[Tuple[int, Any]],
               known: Dict[int, Tuple[str, Optional[bytes], Optional[str]]], timeout: Optional[float] = None) -> None:
        """The database's answer for resent tasks the manager no longer held."""
        items: List[Outcome] = []
        frames: List[Any] = []
        fresh_tags, fresh_payloads = [], []
        for tag, payload in lookup:
            state, output, error = known.get(tag, (None, None, None))
            if state == SUCCEEDED and output is not None:
                items.append((tag, None))
                frames.append(output)
            elif state in (FAILED, CANCELLED) and error:
                items.append((tag, json.loads(error)))
                frames.append(b"")
            elif (cid, tag) in self.by_tag:      # resent twice while the lookup ran: already queued
                self.tasks[self.by_tag[(cid, tag)]].client = peer
            else:                                # unknown, or its answer died with the old manager
                fresh_tags.append(tag)
                fresh_payloads.append(payload)
        if items:
            self.send(peer, Result(s.id, items), frames)
        if fresh_tags and s.state == OPEN:
            self.enqueue(peer, s, fresh_tags, cid, fresh_payloads, timeout)

    def dispatch(self, s: Session) -> None:
        """Give each ready instance of ``s`` as many pending tasks as it has credit for."""
        pending = s.pending
        if not pending:
            return
        tasks = self.tasks
        instances = s.instances
        n = len(instances)
        s.rr += 1
        target = self.settings.queue_target
        for k in range(n):
            inst = instances[(s.rr + k) % n]
            if inst.identity is None or inst.draining:
                continue
            credit = inst.credit_limit(target) - len(inst.inflight)
            if credit <= 0:
                continue
            chosen: List[Tuple[int, Task]] = []
            while credit > 0 and pending:
                tid = pending.popleft()
                t = tasks.get(tid)
                if t is None or t.state != PENDING:
                    continue
                chosen.append((tid, t))
                credit -= 1
            if chosen:
                self._give(inst, s, chosen)
            if not pending:
                break
        if pending:
            if s.id not in self.waiting:
                self.waiting.add(s.id)
                self.plan_soon()   # more work than credit: maybe more instances
        else:
            self.waiting.discard(s.id)

    def undelivered(self, inst: Instance, items: List[Tuple[int, int]]) -> None:
        """Tasks whose TASKS message never left: back to the front of the queue, attempt not spent."""
        s = inst.session
        for tid, _ in reversed(items):
            t = self.tasks.get(tid)
            if t is None or t.instance != inst.id or t.state != RUNNING:
                continue
            inst.inflight.pop(tid, None)
            t.state, t.instance, t.attempt = PENDING, None, t.attempt - 1
            if s is not None:
                s.running -= 1
                s.pending.appendleft(tid)
        self.plan_soon()

    def on_done(self, peer: bytes, rec: Done, payloads: Sequence[Any]) -> None:
        inst = self.peers.get(peer)
        if not isinstance(inst, Instance):
            self.gone(peer, "unknown instance")
            return
        now = self.now
        out: Dict[Tuple[bytes, str], Tuple[List[Outcome], List[Any], List[Task]]] = {}
        finish, tasks, by_tag, observe, iid = self.finish_record, self.tasks, self.by_tag, self.latency.observe, inst.id
        key: Any = None
        s: Optional[Session] = None
        items: List[Outcome] = []
        frames: List[Any] = []
        done: List[Task] = []
        inflight = inst.inflight
        head = next(iter(inflight), None)
        keep_results, results = self.settings.result_retention > 0, self.batch.results
        keep_max = self.settings.result_max_size
        for (tid, err), payload in zip(rec.outcomes, payloads):
            t = tasks.get(tid)
            if t is None or t.instance != iid or t.state != RUNNING:
                continue  # a late answer for a task reassigned elsewhere: dropped
            inflight.pop(tid, None)
            del tasks[tid]
            by_tag.pop((t.cid, t.tag), None)
            if key != (t.client, t.sid):   # an instance's answers are nearly always one session's
                key = (t.client, t.sid)
                s = self.sessions.get(t.sid)
                items, frames, done = out.setdefault(key, ([], [], []))
            state = SUCCEEDED if err is None else FAILED
            t.state = state
            if s is not None:
                s.running -= 1
                s.counts[state] += 1
            finish(t, state, None if err is None else _json(err))
            if err is None and keep_results and len(payload) <= keep_max and t.client not in ENGINE_PEERS:
                # for get_task (result_retention); the engines' own tasks are read back by them
                results.append((tid, t.sid, payload))
            if t.keep is not None:   # another task will read this answer on its executor
                self.keep_answer(t, err, payload)
            observe(now - t.created_at)
            items.append((t.tag, err))
            frames.append(payload if err is None else b"")
            done.append(t)
        if inflight and next(iter(inflight)) != head:
            self.start_clock(inst)   # the next task in its queue starts now
        accepted = sum(len(items) for items, _, _ in out.values())
        self.stats["tasks_finished"] += accepted
        self.stats["late_answers_dropped"] += len(rec.outcomes) - accepted
        inst.observe(now, len(rec.outcomes))
        for (client, sid), (items, frames, done) in out.items():
            self.stats["bytes_out"] += sum(len(f) for f in frames)
            keep = lambda done=done, items=items, frames=frames: self.keep_outputs(done, items, frames)  # noqa: E731
            if client:
                self.send(client, Result(sid, items), frames, if_lost=keep)
            else:   # its client is away (the manager restarted): keep the output for its resend
                keep()
        s = inst.session
        if s is not None and s.pending and not inst.draining:
            self.dispatch(s)
        if not inst.inflight:
            inst.idle_since = now
            ex = self.executors.get(inst.executor)
            if ex is not None and ex.state == DRAINING:
                self.stop_instance(inst)
            elif self.waiting or inst.draining or s is None or s.state != OPEN:
                self.plan_soon()   # an idle instance may serve a session that waits

    def expire_results(self) -> None:
        """Now and then (a tenth of the retention, at most once a minute), drop the results of
        sessions closed longer ago than ``result_retention`` (get_task stops answering them at once)."""
        retention = self.settings.result_retention
        if retention <= 0 or self.now < self.results_pruned_at + min(60.0, retention / 10):
            return
        self.results_pruned_at = self.now
        cutoff = self.now - retention
        self.call(Call(lambda store: store.prune_results(cutoff), label="prune results"))

    def keep_outputs(self, done: Sequence[Task], items: Sequence[Outcome], frames: Sequence[Any]) -> None:
        """Answers that could not be delivered are written down for the client's resend."""
        for t, (_, err), payload in zip(done, items, frames):
            if err is None:
                self.batch.keep_output(t.id, payload, t.cid, t.tag)

    def fail_tasks(self, tasks: List[Task], error: MeshError, state: str = FAILED) -> None:
        """Finish tasks without a result (cancelled, or out of retries): one RESULT per client."""
        err = error.to_wire()
        text = _json(err)
        out: Dict[Tuple[bytes, str], List[Outcome]] = {}
        for t in tasks:
            self.tasks.pop(t.id, None)
            self.by_tag.pop((t.cid, t.tag), None)
            t.state = state
            s = self.sessions.get(t.sid)
            if s is not None:
                s.counts[state] += 1
            self.finish_record(t, state, text)
            if t.keep is not None:   # a call waits for this answer on its executor: it fails too
                self.keep_answer(t, err, b"")
            if t.client:
                out.setdefault((t.client, t.sid), []).append((t.tag, err))
        for (client, sid), items in out.items():
            self.send(client, Result(sid, items), [b""] * len(items))

    def requeue(self, inst: Instance, reason: str) -> None:
        """The instance is gone: its tasks run again elsewhere, within the app's retry budget."""
        s = inst.session
        app = self.apps.get(inst.app)
        max_retries = app.spec.max_retries if app else 0
        for tid in sorted(inst.inflight, reverse=True):   # appendleft: the oldest ends up first
            t = self.tasks.get(tid)
            if t is None:
                continue
            if s is not None:
                s.running -= 1
            if t.parts and inst.stream != "restartable":   # mid-stream, and it cannot start over
                self.fail_tasks([t], Unavailable(
                    f"task {tid}: its instance was lost after {t.parts} parts of its stream, and its entrypoint "
                    f"is not restartable ({reason})", task=tid, parts=t.parts, executor=inst.executor))
            elif t.attempt > max_retries:
                self.fail_tasks([t], TaskFailed(
                    f"task {tid} failed: {t.attempt} attempts died (max_retries={max_retries}); "
                    f"last on executor {inst.executor}: {reason}",
                    type="InstanceLost", attempts=t.attempt, executor=inst.executor, reason=reason))
            elif s is not None and s.state == OPEN:
                t.state = PENDING
                t.instance = None
                s.pending.appendleft(tid)
                self.stats["tasks_retried"] += 1
            else:   # its session closed while it ran: nothing will run it again
                self.fail_tasks([t], Cancelled(f"task {tid} was cancelled: its session closed while it ran "
                                               f"and its instance was lost ({reason})", task=tid), CANCELLED)
        inst.inflight.clear()

    # -- stopping a running task -----------------------------------------------------------
    def interrupt(self, t: Task, error: MeshError, state: str, retry: bool) -> None:
        """Stop the running task ``t`` by stopping its instance (and the instance's process tree).

        The instance's other tasks had not started (an instance runs its tasks one at a time, in
        order): they go back to the front of their queue with their attempt not spent.  ``t``
        itself is retried within its app's ``max_retries`` if ``retry``, else finished with
        ``error`` in ``state``."""
        s = self.sessions.get(t.sid)
        inst = self.instances.get(t.instance) if t.instance else None
        if inst is not None:
            others = [tid for tid in inst.inflight if tid != t.id]   # in the order they were sent
            inst.inflight.clear()
            self.stop_instance(inst)
            for tid in reversed(others):   # appendleft, newest first: the oldest ends up first
                o = self.tasks.get(tid)
                if o is None or o.state != RUNNING:
                    continue
                os_ = self.sessions.get(o.sid)
                o.state, o.instance, o.attempt = PENDING, None, o.attempt - 1
                if os_ is not None:
                    os_.running -= 1
                if os_ is not None and os_.state == OPEN:
                    os_.pending.appendleft(tid)
                else:
                    self.fail_tasks([o], Cancelled(f"task {tid} was cancelled: its session closed",
                                                   task=tid), CANCELLED)
        if s is not None:
            s.running -= 1
        app = self.apps.get(s.app) if s is not None else None
        if t.parts and (inst is None or inst.stream != "restartable"):
            retry = False   # parts went out: a run from the start would repeat or change them
        if retry and s is not None and s.state == OPEN and t.attempt <= (app.spec.max_retries if app else 0):
            t.state, t.instance = PENDING, None
            s.pending.appendleft(t.id)
            self.stats["tasks_retried"] += 1
        else:
            self.fail_tasks([t], error, state)
        if s is not None:
            self.dispatch(s)
        self.plan_soon()

    def start_clock(self, inst: Instance) -> None:
        """The first task in ``inst``'s queue starts running now: if it has a timeout, its clock
        starts (a task waiting behind another at the instance is not running yet)."""
        tid = next(iter(inst.inflight), None)
        t = self.tasks.get(tid) if tid is not None else None
        if t is not None and t.timeout is not None:
            t.run = next(self._runs)
            heapq.heappush(self.deadlines, (self.now + t.timeout, t.id, t.run))

    def check_deadlines(self) -> None:
        """Tasks that ran past their timeout are interrupted (see :meth:`interrupt`); sessions
        closed ``close_grace`` ago have their still running tasks cancelled."""
        now, heap = self.now, self.deadlines
        while heap and heap[0][0] <= now:
            _, tid, run = heapq.heappop(heap)
            t = self.tasks.get(tid)
            if t is None or t.state != RUNNING or t.run != run:
                continue   # answered, requeued or cancelled since (a later run has its own entry)
            event(log, logging.WARNING, "task timed out", task=tid, attempt=t.attempt, instance=t.instance,
                  timeout=t.timeout)
            self.interrupt(t, DeadlineExceeded(
                f"task {tid} ran longer than its timeout of {t.timeout:g}s (attempt {t.attempt}); its instance "
                "was stopped", task=tid, timeout=t.timeout, attempts=t.attempt), FAILED, retry=True)
        if len(heap) > 64 + 2 * len(self.instances):   # at most one live entry per instance: drop the stale
            live = [e for e in heap if (t := self.tasks.get(e[1])) is not None and t.state == RUNNING
                    and t.run == e[2]]
            heapq.heapify(live)
            self.deadlines = live
        for sid, due in list(self.closing.items()):
            s = self.sessions.get(sid)
            if s is None or s.running <= 0:
                del self.closing[sid]
            elif now >= due:
                del self.closing[sid]
                running = [self.tasks[tid] for inst in self.instances.values() if inst.session is s
                           for tid in inst.inflight if tid in self.tasks]
                for t in running:
                    if t.state == RUNNING:   # an earlier interrupt may have settled it
                        self.interrupt(t, Cancelled(f"task {t.id} was cancelled: its session {sid!r} closed "
                                                    f"{self.settings.close_grace:g}s ago", task=t.id,
                                                    session=sid), CANCELLED, retry=False)

    def start_failed(self, app: str, reason: str) -> None:
        """An app whose instances keep dying before hello fails its queued tasks instead of looping,
        and is launched again only after a backoff that doubles with each failure in a row."""
        streak = self.start_streak[app] = self.start_streak.get(app, 0) + 1
        self.start_backoff[app] = self.now + min(self.settings.start_backoff * 2 ** (streak - 1),
                                                 self.settings.start_backoff_max)
        n = self.start_failures[app] = self.start_failures.get(app, 0) + 1
        if n < self.settings.start_failures:
            return
        self.start_failures[app] = 0
        err = TaskFailed(f"application {app!r} failed to start {n} times in a row; last: {reason}",
                         type="StartFailed", application=app, reason=reason)
        for s in self.sessions.values():
            if s.app == app and s.state == OPEN and s.pending:
                doomed = [self.tasks[tid] for tid in s.pending if tid in self.tasks]
                s.pending.clear()
                self.waiting.discard(s.id)
                self.fail_tasks(doomed, err)

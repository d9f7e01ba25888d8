"""Flow rules: registered flows, their runs, schedules; the manager drives every run itself.

A run (one flow, or a flow of flows composed by :func:`mesh.model.flows.compose`) is a graph of
tasks.  A task starts as soon as the tasks whose results it takes have succeeded: the engine
submits it like a client would, into a session of the run (one per application: the built-in
flow service, ``python3 -m client.flow_service``, under the flow's labels, or a registered
application for ``Flow.app_task``), as the pseudo-peer :data:`FLOW_PEER`.  Answers to that peer
never reach a socket: :meth:`Base.send` collects them and :meth:`FlowRules.flow_answers` takes
them when the event's effects are taken.

What is guaranteed (docs/flows.md):

* **Durable.** Every change of a run (its state, each task's state, attempts, result key) goes
  into the same group commit as what caused it; a task's result is an object written in that
  commit.  After a restart, a task that had succeeded is never run again; a task that was
  running re-attaches to its restored core task, or runs again if that task died with the manager.
* **Results outlive the run.** Each result is an unbound object (its key, 128 random bits, is its
  capability), listed in the run to whoever may read the run.
* **Failure.** A task failing after its retries skips every task downstream of it; the others go
  on; the run ends ``failed``.  ``cancel_flow_run`` stops what has not finished.
* **Schedules.** A run's ``scheduled_start_time`` and a recurring ``schedule`` (cron) are stored;
  the clock starts a run no earlier than its time, also after a restart.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import secrets
from typing import Any, Dict, List, Optional, Tuple

from mesh.core import query
from mesh.core.base import FLOW_PEER, Base, log
from mesh.core.control import Args, Later, RunWait, _arg
from mesh.core.effects import Call
from mesh.errors import (Cancelled, FailedPrecondition, Internal, InvalidArgument, MeshError, NotFound,
                         PermissionDenied)
from mesh.model import flows as model
from mesh.model.auth import INSECURE, Principal
from mesh.model.records import ALIVE, OPEN, PENDING, RUNNING, App, Session
from mesh.model.spec import AppSpec
from mesh.ops.log import event
from mesh.wire.pickled import unwrap_bytes, wrap_bytes
from mesh.wire.protocol import pack, unpack

FLOW_SERVICE = "client.flow_service"
FLOW_APP = "zmesh-flow"           # the built-in flow service's application (one per label set)
PLACEMENT_CHECK = 5.0             # seconds between looks for queued tasks no executor can take
UNPLACEABLE_GRACE = 30.0          # seconds such a task waits for an executor with its labels, then fails
LOST_RETRIES = 3                  # a task whose instance died runs again this often, beside its retries
INLINE_TOTAL = 1 << 20            # bytes of results inlined into one request, at most
INLINE_MAX = 64 * 1024            # bytes: a raw-mapped result up to this size is sent inside the request
TAG_SPAN = 1024                   # a task's tag is its index in the run times this, plus its attempt
MAX_RUN_WAIT = 60.0               # seconds one get_flow_run {wait} may be parked
KEEP_FINISHED = 256               # finished runs kept in memory (the rest are read from the store)
RUN_FIELDS = ("id", "name", "flows", "state", "owner", "created_at", "scheduled_start_time", "started_at",
              "ended_at", "schedule")
FLOW_FIELDS = ("name", "version", "owner", "created_at", "tasks", "parameters", "labels")


class Run:
    """One run in memory: its header ``h`` and task records (both persisted as they are), the graph,
    and counters that keep each answer O(its dependents): tasks not finished, and per task the
    inputs it still waits for."""

    __slots__ = ("h", "tasks", "graph", "deps_of", "index", "left", "waiting")

    def __init__(self, h: Dict[str, Any], tasks: Dict[str, Dict[str, Any]], graph: Dict[str, Any]) -> None:
        self.h, self.tasks, self.graph = h, tasks, graph
        self.deps_of = model.dependents(graph["tasks"])
        self.index = {name: i for i, name in enumerate(graph["order"])}   # tags: index * TAG_SPAN + attempt
        self.left = sum(t["state"] not in model.TASK_FINISHED for t in tasks.values())
        self.waiting = {name: sum(tasks[d]["state"] != "succeeded" for d in node["deps"])
                        for name, node in graph["tasks"].items()}

    @property
    def finished(self) -> bool:
        return self.h["state"] in model.FINISHED


def run_view(h: Dict[str, Any], tasks: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """What get_flow_run answers: the header without parameters, with every task's record."""
    view = {k: h.get(k) for k in RUN_FIELDS}
    view["error"] = h.get("error")
    view["labels"] = h.get("labels")
    view["tasks"] = {name: {k: t.get(k) for k in ("state", "attempts", "started_at", "ended_at", "error", "result",
                                                  "kind", "executor", "task_id")}
                     for name, t in tasks.items()}
    return view


def _after_commit(store: Any) -> None:
    """A Call that does nothing: its ``then`` runs once every change made before it has committed."""


class FlowRules(Base):
    def init_flows(self) -> None:
        self.flows: Dict[str, Dict[str, Any]] = {}                 # name -> newest {version, owner, created_at, doc}
        self.flow_versions: Dict[Tuple[str, int], Dict[str, Any]] = {}
        self.runs: Dict[str, Run] = {}                              # unfinished, and the latest finished
        self.finished_runs: "collections.deque[str]" = collections.deque()
        self.flow_tags: Dict[Tuple[str, int], Tuple[str, str]] = {}  # (session, tag) -> (run, task)
        self.run_waiters: Dict[str, List[Tuple[bytes, int, float, Principal]]] = {}
        self.schedules: Dict[str, Dict[str, Any]] = {}
        self.placement_checked = 0.0

    # -- registry -------------------------------------------------------------------------
    def do_register_flow(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        doc = model.check_flow(unpack(blob) if blob is not None else _arg(args, "flow", dict))
        name = doc["name"]
        old = self.flows.get(name)
        if old is not None and old["doc"] == doc:   # unchanged: anyone may "register" it again (Flow.run does)
            return self._flow_view(old)
        if old is not None and not who.may_touch(old["owner"]):
            raise PermissionDenied(f"flow {name!r} belongs to {old['owner']!r}", flow=name)
        for t in doc["tasks"]:
            if t.get("app") is not None and t["app"] not in self.apps:
                raise NotFound(f"task {name}/{t['name']} runs application {t['app']!r}, which is not registered",
                               application=t["app"])
        version = old["version"] + 1 if old else 1
        rec = {"name": name, "version": version, "owner": who.name, "created_at": self.now, "doc": doc}
        self.flows[name] = self.flow_versions[(name, version)] = rec
        self.batch.rows[("flows", (name, version))] = (name, version, who.name, self.now, pack(doc))
        event(log, logging.INFO, "flow registered", flow=name, version=version)
        return self._flow_view(rec)

    def _flow_view(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        doc = rec["doc"]
        return {"id": f"{rec['name']}:{rec['version']}", "name": rec["name"], "version": rec["version"],
                "owner": rec["owner"], "created_at": rec["created_at"], "labels": doc.get("labels") or {},
                "parameters": {p: {"required": "default" not in i} for p, i in (doc.get("parameters") or {}).items()},
                "tasks": [{"name": t["name"], "app": t.get("app"), "retries": t.get("retries", 0),
                           "needs": sorted({r["task"] if "mapped" not in r else f"{r['mapped']}/{r['task']}"
                                            for r in model.refs(t) if "task" in r})} for t in doc["tasks"]]}

    def _flow(self, name: str) -> Dict[str, Any]:
        rec = self.flows.get(name)
        if rec is None:
            raise NotFound(f"flow {name!r} is not registered", flow=name)
        return rec

    def do_get_flow(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """A flow's newest version; with ``document``, the document itself (its pickled functions too)."""
        rec = self._flow(_arg(args, "name", str))
        view = self._flow_view(rec)
        if args.get("document"):   # its pickled code and constants only to whoever may change it
            view["document"] = rec["doc"] if who.may_touch(rec["owner"]) else model.structure(rec["doc"])
        return view

    def do_find_flows(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        rows = [self._flow_view(r) for r in self.flows.values()]
        for r in rows:
            r["tasks"] = len(r["tasks"])
            r["parameters"] = sorted(r["parameters"])
        return query.find(rows, FLOW_FIELDS, args.get("filter"), args.get("page"), args.get("sort"))

    # -- runs ---------------------------------------------------------------------------------
    def do_run_flow(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """Start (or schedule) a run of one flow or a flow of flows.  Args: ``flows`` (names, in any
        order), ``parameters`` {flow: {name: pickled}}, ``run_name``, ``labels`` (override the flows'
        labels for function tasks), ``scheduled_start_time`` (epoch seconds), ``schedule`` (cron)."""
        names = _arg(args, "flows", list)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise InvalidArgument("flows is a list of distinct registered flow names", argument="flows")
        params = args.get("parameters") or {}
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise InvalidArgument("parameters map each flow to {name: pickled value}", argument="parameters")
        labels = args.get("labels")
        if labels is not None and (not isinstance(labels, dict)
                                   or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
            raise InvalidArgument("labels map strings to strings", argument="labels")
        when = args.get("scheduled_start_time")
        if when is not None and (not isinstance(when, (int, float)) or isinstance(when, bool)):
            raise InvalidArgument("scheduled_start_time is a time (epoch seconds)", argument="scheduled_start_time")
        mapped = args.get("mapped_parameters") or {}
        if not isinstance(mapped, dict) or not all(isinstance(v, dict) for v in mapped.values()):
            raise InvalidArgument("mapped_parameters map each flow to {name: mapped reference}",
                                  argument="mapped_parameters")
        params = {f: {**(params.get(f) or {}), **(mapped.get(f) or {})} for f in set(params) | set(mapped)}
        cron = model.check_schedule(args.get("schedule"))
        run_name = _arg(args, "run_name", str, required=False)
        recs = {n: self._flow(n) for n in names}
        model.compose({n: r["doc"] for n, r in recs.items()}, params)   # validate before anything is stored
        sched = None
        if cron is not None:
            first = model.next_fire(cron, max(self.now, when or 0.0) - 1e-6)
            sched = {"id": secrets.token_hex(6), "flows": names, "parameters": params, "labels": labels,
                     "versions": {n: r["version"] for n, r in recs.items()},
                     "cron": cron, "owner": who.name, "run_name": run_name, "next_at": first, "active": True,
                     "created_at": self.now}
            self.schedules[sched["id"]] = sched
            self._save_schedule(sched)
            when = first
        run = self._new_run(names, params, run_name, labels, when, who.name, sched["id"] if sched else None)
        if sched is not None:
            sched["next_at"] = model.next_fire(sched["cron"], when + 1e-6) if when is not None else None
            self._save_schedule(sched)
        return run_view(run.h, run.tasks)

    def _new_run(self, names: List[str], params: Dict[str, Any], run_name: Optional[str], labels: Optional[Dict[str, str]],
                 when: Optional[float], owner: str, schedule: Optional[str],
                 versions: Optional[Dict[str, int]] = None) -> Run:
        """A new run of ``names`` at their newest versions, or at ``versions`` (a schedule runs the
        versions it was created with: a later version of someone else's flow is not run for you)."""
        rid = secrets.token_hex(8)
        versions = versions or {n: self.flows[n]["version"] for n in names}
        try:
            docs = {n: self.flow_versions[(n, v)]["doc"] for n, v in versions.items()}
        except KeyError as exc:
            raise NotFound(f"flow version {exc.args[0]} is not registered", flow=str(exc.args[0])) from None
        graph = model.compose(docs, params)
        h = {"id": rid, "name": run_name or f"{'+'.join(names)}-{rid[:6]}", "flows": names, "versions": versions,
             "parameters": params, "labels": labels, "owner": owner, "state": "pending", "created_at": self.now,
             "scheduled_start_time": when, "started_at": None, "ended_at": None, "error": None, "sessions": {},
             "schedule": schedule}
        tasks = {name: {"state": PENDING, "attempts": 0} for name in graph["order"]}
        run = self.runs[rid] = Run(h, tasks, graph)
        for name in tasks:
            self._save_task(run, name)
        if when is not None and when > self.now:
            h["state"] = "scheduled"
            self._save_run(run)
        else:
            self._start_run(run)
        event(log, logging.INFO, "flow run created", run=rid, flows=",".join(names), state=h["state"])
        return run

    def _start_run(self, run: Run) -> None:
        run.h["state"], run.h["started_at"] = "running", self.now
        self._save_run(run)
        self._submit_ready(run)

    def _submit_ready(self, run: Run) -> None:
        for name in run.graph["order"]:
            if run.tasks[name]["state"] == PENDING and not run.waiting[name]:
                self._submit(run, name)
        self._maybe_finish(run)

    def _set(self, run: Run, name: str, **fields: Any) -> None:
        """Change a task's record (and write it down), keeping the run's counters."""
        task = run.tasks[name]
        was = task["state"]
        task.update(fields)
        if was not in model.TASK_FINISHED and task["state"] in model.TASK_FINISHED:
            run.left -= 1
        if task["state"] == "succeeded" and was != "succeeded":
            for d in run.deps_of[name]:
                run.waiting[d] -= 1
        self._save_task(run, name)

    def _session_for(self, run: Run, app_name: str) -> Session:
        sid = run.h["sessions"].get(app_name)
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.state == OPEN:
            return s
        sid = f"flow-{run.h['id']}-{len(run.h['sessions']) + 1}"
        while sid in self.sessions or sid in self.creating:
            sid += "x"
        s = self.open_engine_session(sid, app_name, run.h["owner"])
        run.h["sessions"][app_name] = sid
        self._save_run(run)
        return s

    def _flow_app(self, labels: Dict[str, str]) -> str:
        """The built-in flow service's application for these labels (registered on first use)."""
        name = FLOW_APP
        if labels:
            name += "-" + hashlib.sha256(pack(sorted(labels.items()))).hexdigest()[:10]
        app = self.apps.get(name)
        if app is not None and (app.lease is not None or list(app.spec.arguments) != ["-m", FLOW_SERVICE]):
            raise FailedPrecondition(f"application {name!r} is not the built-in flow service: the name is "
                                     f"reserved (unregister it)", application=name)
        if app is None:
            # prefetch 1: an instance holds one task at a time, so independent tasks wait for a free
            # instance (or a new one) rather than queue behind each other on a busy one; max_retries
            # 0: the engine owns retries (a task's ``retries``, and LOST_RETRIES for lost instances)
            spec = AppSpec.from_dict({"metadata": {"name": name, "description": "zeromesh flow tasks"},
                                      "spec": {"command": "python3", "arguments": ["-m", FLOW_SERVICE],
                                               "labels": dict(labels), "prefetch": 1, "max_retries": 0}})
            self.apps[name] = App(spec, self.now)
            self.call(Call(lambda store: store.put_app(name, spec.to_dict(), self.now), label="flow application"))
        return name

    def _submit(self, run: Run, name: str) -> None:
        node = run.graph["tasks"][name]
        task = run.tasks[name]
        try:
            if node["app"] is not None:
                app_name = node["app"]
                app = self.apps.get(app_name)
                if app is None:
                    raise NotFound(f"application {app_name!r} is not registered", application=app_name)
                if app.lease is not None and app.owner != run.h["owner"]:   # as create_session refuses it
                    raise PermissionDenied(f"application {app_name!r} is a temporary application of "
                                           f"{app.owner!r}", application=app_name)
                payload = self._app_request(run, node)
            else:
                labels = run.h["labels"] if run.h.get("labels") is not None else node["labels"]
                app_name = self._flow_app(labels)
                budget = [INLINE_TOTAL]
                payload = wrap_bytes(pack({"fn": node["fn"],
                                           "args": [self._arg_value(run, a, budget) for a in node["args"]],
                                           "kwargs": {k: self._arg_value(run, a, budget)
                                                      for k, a in node["kwargs"].items()},
                                           "record": bool(node.get("record")), "task": name,
                                           "run": run.h["id"]}))
        except MeshError as exc:
            self._set(run, name, attempts=task["attempts"] + 1)
            self._task_failed(run, name, exc.to_wire())
            return
        s = self._session_for(run, app_name)
        attempts = task["attempts"] + 1
        tag = run.index[name] * TAG_SPAN + attempts % TAG_SPAN   # (run, tag) names one attempt, also after a restart
        cid = "flow/" + run.h["id"]
        self.flow_tags[(s.id, tag)] = (run.h["id"], name)
        self.enqueue(FLOW_PEER, s, [tag], cid, [payload], node.get("timeout"))
        self._set(run, name, state=RUNNING, attempts=attempts, tag=tag, submitted_at=self.now, error=None,
                  task_id=self.by_tag.get((cid, tag)))

    def _arg_value(self, run: Run, a: Dict[str, Any], budget: List[int]) -> List[Any]:
        if "value" in a:
            return ["value", a["value"]]
        up = run.tasks[a["task"]]
        key = up.get("result")
        if a["as"] == "db":
            obj = self.objects.items.get(key) if key else None
            if obj is None or obj.doc.kind != "doc":
                raise InvalidArgument(f"{a['task']} did not return a record (a mapping of plain values), so it "
                                      f"cannot be mapped as db", task=a["task"])
            try:
                return ["plain", model.pick(obj.doc.value, a["attribute"], a["index"])]
            except InvalidArgument as exc:
                raise InvalidArgument(f"mapping {a['task']} as db: {exc.message}", task=a["task"]) from None
        if a["as"] == "raw":   # a small result travels in the request: no fetch per argument
            obj = self.objects.items.get(key) if key else None
            if obj is not None and obj.doc.size_hint <= min(INLINE_MAX, budget[0]):
                budget[0] -= obj.doc.size_hint
                return ["value" if obj.doc.kind == "blob" else "doc", obj.doc.encoded()]
        return ["file" if a["as"] == "file" else "object", key]

    def _app_request(self, run: Run, node: Dict[str, Any]) -> bytes:
        a = node["args"][0]
        if "value" in a:
            return a["value"]
        obj = self.objects.items.get(run.tasks[a["task"]].get("result") or "")
        if obj is None or obj.doc.kind != "blob":
            raise InvalidArgument(f"{node['flow']}/{node['name']} runs an application: its request must be a "
                                  f"pickled value, and {a['task']}'s result is not", task=node["name"])
        return obj.doc.encoded()

    # -- answers ------------------------------------------------------------------------------
    def flow_answers(self) -> None:
        """Take the answers the core sent to FLOW_PEER (see Base.send)."""
        inbox, self.flow_inbox = self.flow_inbox, []
        for res, frames in inbox:
            for (tag, err), frame in zip(res.outcomes, frames):
                found = self.flow_tags.pop((res.session, tag), None)
                run = self.runs.get(found[0]) if found else None
                if run is None or found is None:
                    continue
                name = found[1]
                task = run.tasks.get(name)
                if task is None or task["state"] != RUNNING or task.get("tag") != tag or run.finished:
                    continue   # a late answer: the task was cancelled, or retried under another tag
                try:
                    if err is None:
                        self._task_succeeded(run, name, bytes(frame))
                    else:
                        self._task_failed(run, name, err)
                except Exception as exc:   # a bug (or a forged answer) fails this task, not the others
                    log.exception("flow answer failed")
                    if run.tasks[name]["state"] == RUNNING:
                        self._task_failed(run, name, Internal(f"{name}: its answer could not be used: "
                                                              f"{type(exc).__name__}: {exc}").to_wire())

    def _task_succeeded(self, run: Run, name: str, frame: bytes) -> None:
        node, task = run.graph["tasks"][name], run.tasks[name]
        kind: Any = "blob"
        started: Any = task.get("submitted_at")
        ended: Any = self.now
        where: Any = None
        data: Any = frame
        if node["app"] is None:   # the flow service's envelope: msgpack [kind, started, ended, where, data]
            inner = unwrap_bytes(frame)
            try:
                kind, started, ended, where, data = unpack(inner) if inner is not None else (None,) * 5
            except Exception:
                kind = None
            if kind not in ("doc", "blob") or not isinstance(data, bytes):
                self._task_failed(run, name, InvalidArgument(
                    f"{name}: the flow service answered with something that is not its envelope").to_wire())
                return
        key = secrets.token_hex(16)
        obj = self.objects.put(kind, data, None, None, key=key)
        self.persist_object(obj)
        self._set(run, name, state="succeeded", result=key, kind=kind, started_at=started, ended_at=ended,
                  executor=where, error=None)
        ready = [d for d in run.deps_of[name] if run.tasks[d]["state"] == PENDING and not run.waiting[d]]
        if ready:   # they start once this success has committed: a restart never runs this task again
            self.call(Call(_after_commit, label="flow step", then=lambda _: self._submit_ready_ones(run, ready)))
        self._maybe_finish(run)

    def _submit_ready_ones(self, run: Run, names: List[str]) -> None:
        for d in names:
            if run.h["state"] == "running" and run.tasks[d]["state"] == PENDING and not run.waiting[d]:
                self._submit(run, d)

    def _task_failed(self, run: Run, name: str, err: Dict[str, Any]) -> None:
        node, task = run.graph["tasks"][name], run.tasks[name]
        code = err.get("code") if isinstance(err, dict) else None
        lost = isinstance(err, dict) and (err.get("details") or {}).get("type") == "InstanceLost"
        if lost and task.get("lost", 0) < LOST_RETRIES and run.h["state"] == "running":
            task["lost"] = task.get("lost", 0) + 1   # its instance died (an executor lost): not its fault
            task["attempts"] -= 1
            self._submit(run, name)
            return
        if task["attempts"] <= node.get("retries", 0) and code != Cancelled.code and run.h["state"] == "running":
            task["error"] = err
            event(log, logging.INFO, "flow task retried", run=run.h["id"], task=name, attempt=task["attempts"])
            self._submit(run, name)
            return
        self._set(run, name, state="failed", error=err, ended_at=self.now)
        for d in model.downstream(name, run.deps_of):
            if run.tasks[d]["state"] == PENDING:
                self._set(run, d, state="skipped", error={"code": "skipped", "message": f"{name} failed"})
        if run.h.get("error") is None:
            run.h["error"] = {"task": name, **err}
        self._maybe_finish(run)

    def _maybe_finish(self, run: Run) -> None:
        if run.h["state"] != "running" or run.left:
            return
        ok = all(t["state"] == "succeeded" for t in run.tasks.values())
        self._finish_run(run, "succeeded" if ok else "failed")

    def _finish_run(self, run: Run, state: str) -> None:
        run.h.update(state=state, ended_at=self.now)
        self._save_run(run)
        for sid in run.h["sessions"].values():
            s = self.sessions.get(sid)
            if s is not None and s.state == OPEN:
                self.close_and_record(s, f"ended with flow run {run.h['id']}")
        if any(v[0] == run.h["id"] for v in self.flow_tags.values()):   # answers that will never come
            self.flow_tags = {k: v for k, v in self.flow_tags.items() if v[0] != run.h["id"]}
        event(log, logging.INFO, "flow run ended", run=run.h["id"], state=state)
        view = run_view(run.h, run.tasks)
        for peer, rid, _, who in self.run_waiters.pop(run.h["id"], []):
            self.reply(peer, rid, result=view, after_commit=True)
        self.finished_runs.append(run.h["id"])
        while len(self.finished_runs) > KEEP_FINISHED:
            self.runs.pop(self.finished_runs.popleft(), None)

    def do_cancel_flow_run(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        rid = _arg(args, "id", str)
        run = self._run(rid, who, change=True)
        if run is None:   # not in memory: ended long ago (its record says how), or unknown
            def found(row: Any) -> Dict[str, Any]:
                if row is None or not who.may_touch(row[0]["owner"]):
                    raise NotFound(f"flow run {rid!r} does not exist", run=rid)
                return run_view(*row)
            return Later(lambda store: store.flow_run(rid), then=found)
        if run.finished:
            return run_view(run.h, run.tasks)
        why = Cancelled(f"flow run {run.h['id']} was cancelled", run=run.h["id"])
        for name, task in run.tasks.items():
            if task["state"] == RUNNING:
                t = self.tasks.get(task.get("task_id") or -1)
                if t is not None and t.cid == "flow/" + run.h["id"]:
                    if t.state == RUNNING:
                        self.interrupt(t, why, "cancelled", retry=False)
                    else:
                        s = self.sessions.get(t.sid)
                        if s is not None and t.id in s.pending:
                            s.pending.remove(t.id)
                        self.fail_tasks([t], why, "cancelled")
            if task["state"] in (PENDING, RUNNING):
                self._set(run, name, state="cancelled", ended_at=self.now, error=why.to_wire())
        self._finish_run(run, "cancelled")
        return run_view(run.h, run.tasks)

    def _run(self, rid: str, who: Principal, change: bool = False) -> Optional[Run]:
        """The run in memory (None: finished long ago, read it from the store), if ``who`` may see it."""
        run = self.runs.get(rid)
        if run is not None:
            owner = run.h["owner"]
            if not (who.may_touch(owner) if change else who.may_read(owner)):
                raise NotFound(f"flow run {rid!r} does not exist", run=rid)
        return run

    def do_get_flow_run(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        """One run with its tasks; ``wait`` (seconds, at most 60): answer when it ends, or then."""
        rid = _arg(args, "id", str)
        run = self._run(rid, who)
        if run is None:
            def found(row: Any) -> Dict[str, Any]:
                if row is None or not who.may_read(row[0]["owner"]):
                    raise NotFound(f"flow run {rid!r} does not exist", run=rid)
                return run_view(*row)
            return Later(lambda store: store.flow_run(rid), then=found)
        wait = args.get("wait")
        if not run.finished and isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
            return RunWait(rid, self.now + min(float(wait), MAX_RUN_WAIT), who)
        return run_view(run.h, run.tasks)

    def wait_for_run(self, peer: bytes, rid: int, waiting: RunWait) -> None:
        self.run_waiters.setdefault(waiting.run, []).append((peer, rid, waiting.deadline, waiting.who))

    def expire_run_waits(self) -> None:
        for run_id, waiters in list(self.run_waiters.items()):
            keep = []
            for peer, rid, deadline, who in waiters:
                if deadline <= self.now:
                    run = self.runs.get(run_id)
                    self.reply(peer, rid, result=run_view(run.h, run.tasks) if run else None)
                else:
                    keep.append((peer, rid, deadline, who))
            if keep:
                self.run_waiters[run_id] = keep
            else:
                del self.run_waiters[run_id]

    def do_find_flow_runs(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        def found(headers: List[Dict[str, Any]]) -> Dict[str, Any]:
            rows = []
            for h in headers:
                if who.may_read(h["owner"]):
                    row = {k: h.get(k) for k in RUN_FIELDS}
                    row["flows"] = ",".join(h["flows"])
                    rows.append(row)
            return query.find(rows, RUN_FIELDS, args.get("filter"), args.get("page"), args.get("sort"))
        return Later(lambda store: store.flow_run_headers(), then=found)

    # -- schedules -------------------------------------------------------------------------------
    def do_find_flow_schedules(self, args: Args, blob: Optional[bytes] = None,
                               who: Principal = INSECURE) -> Dict[str, Any]:
        rows = [{"id": s["id"], "flows": ",".join(s["flows"]), "cron": s["cron"], "owner": s["owner"],
                 "next_at": s["next_at"], "active": s["active"]}
                for s in self.schedules.values() if who.may_read(s["owner"])]
        return query.find(rows, ("id", "flows", "cron", "owner", "next_at", "active"), args.get("filter"),
                          args.get("page"), args.get("sort"))

    def do_cancel_flow_schedule(self, args: Args, blob: Optional[bytes] = None,
                                who: Principal = INSECURE) -> Dict[str, Any]:
        sid = _arg(args, "id", str)
        s = self.schedules.get(sid)
        if s is None or not who.may_read(s["owner"]):
            raise NotFound(f"flow schedule {sid!r} does not exist", schedule=sid)
        if not who.may_touch(s["owner"]):
            raise PermissionDenied(f"flow schedule {sid!r} belongs to {s['owner']!r}", schedule=sid)
        s["active"] = False
        self._save_schedule(s)
        for run in self.runs.values():   # its run waiting for its time goes too
            if run.h.get("schedule") == sid and run.h["state"] == "scheduled":
                for name in run.tasks:
                    self._set(run, name, state="cancelled")
                self._finish_run(run, "cancelled")
        return {"id": sid, "active": False}

    def flow_clock(self) -> None:
        """Start runs whose time has come; fire recurring schedules (one run per due time)."""
        for run in list(self.runs.values()):
            if run.h["state"] == "scheduled" and (run.h["scheduled_start_time"] or 0) <= self.now:
                s = self.schedules.get(run.h.get("schedule") or "")
                if s is not None and s["next_at"] is not None and s["next_at"] <= self.now:
                    s["next_at"] = model.next_fire(s["cron"], self.now)   # late (a restart): times passed fire once
                    self._save_schedule(s)
                self._start_run(run)
        for s in list(self.schedules.values()):
            if not s["active"] or s["next_at"] is None or s["next_at"] > self.now:
                continue
            if any(r.h.get("schedule") == s["id"] and r.h["state"] == "scheduled" for r in self.runs.values()):
                continue   # its next run is created already and waits for its time
            due = s["next_at"]
            s["next_at"] = model.next_fire(s["cron"], max(due, self.now))
            self._save_schedule(s)
            try:
                self._new_run(s["flows"], s["parameters"], s["run_name"], s["labels"], due, s["owner"], s["id"],
                              s.get("versions"))
            except MeshError as exc:   # a flow changed under the schedule: say so, keep the clock going
                event(log, logging.WARNING, "scheduled flow run refused", schedule=s["id"], error=str(exc))
        if self.now - self.placement_checked >= PLACEMENT_CHECK:
            self.placement_checked = self.now
            for run in list(self.runs.values()):
                if run.h["state"] == "running":
                    self._fail_unplaceable(run)
        self.expire_run_waits()

    def _fail_unplaceable(self, run: Run) -> None:
        """Tasks queued for UNPLACEABLE_GRACE seconds that no executor can take (no live executor has
        their labels) fail, saying so, instead of waiting for ever."""
        for name, task in run.tasks.items():
            if task["state"] != RUNNING:
                continue
            t = self.tasks.get(task.get("task_id") or -1)
            if t is None or t.state != PENDING:
                task.pop("unplaced_since", None)
                continue
            s = self.sessions.get(t.sid)
            app = self.apps.get(s.app) if s is not None else None
            labels = app.spec.labels if app is not None else {}
            if any(e.state == ALIVE and all(e.labels.get(k) == v for k, v in labels.items())
                   for e in self.executors.values()):
                task.pop("unplaced_since", None)
                continue
            since = task.setdefault("unplaced_since", self.now)
            if self.now - since >= UNPLACEABLE_GRACE and s is not None:
                s.pending.remove(t.id)
                self.fail_tasks([t], FailedPrecondition(
                    f"{name}: no executor has the labels {dict(labels)} it needs (waited "
                    f"{UNPLACEABLE_GRACE:g}s)", labels=dict(labels)))

    # -- persistence ---------------------------------------------------------------------------
    def _save_run(self, run: Run) -> None:
        h = run.h
        self.batch.rows[("flow_runs", h["id"])] = (h["id"], ",".join(h["flows"]), h["state"], h["created_at"],
                                                        h["owner"], pack(h))

    def _save_task(self, run: Run, name: str) -> None:
        self.batch.rows[("flow_tasks", (run.h["id"], name))] = (run.h["id"], name, pack(run.tasks[name]))

    def _save_schedule(self, s: Dict[str, Any]) -> None:
        self.batch.rows[("flow_schedules", s["id"])] = (s["id"], pack(s))

    def restore_flows(self, saved: Dict[str, Any]) -> None:
        """Rebuild flows, unfinished runs and schedules (Core.restore, after sessions and tasks)."""
        for name, version, owner, created_at, doc in saved.get("flows", []):
            rec = {"name": name, "version": version, "owner": owner, "created_at": created_at, "doc": unpack(doc)}
            self.flow_versions[(name, version)] = rec
            if name not in self.flows or self.flows[name]["version"] < version:
                self.flows[name] = rec
        for _, data in saved.get("schedules", []):
            s = unpack(data)
            self.schedules[s["id"]] = s
        for h, tasks in saved.get("runs", []):
            try:
                docs = {n: self.flow_versions[(n, v)]["doc"] for n, v in h["versions"].items()}
                graph = model.compose(docs, h["parameters"])
            except (KeyError, MeshError) as exc:   # it can never go on: it ends failed, saying why
                event(log, logging.ERROR, "flow run cannot be restored", run=h["id"], error=str(exc))
                h.update(state="failed", ended_at=self.now,
                         error=Internal(f"the run could not be restored: {exc}").to_wire())
                self.batch.rows[("flow_runs", h["id"])] = (h["id"], ",".join(h["flows"]), h["state"],
                                                           h["created_at"], h["owner"], pack(h))
                continue
            for name in graph["order"]:
                tasks.setdefault(name, {"state": PENDING, "attempts": 0})
            run = Run(h, tasks, graph)
            self.runs[h["id"]] = run
            cid = "flow/" + h["id"]
            for name, task in tasks.items():
                if task["state"] != RUNNING:
                    continue
                t = self.tasks.get(task.get("task_id") or -1)
                if t is not None and t.cid == cid and t.tag == task.get("tag"):
                    t.client = FLOW_PEER   # its core task was restored: it answers the engine
                    t.timeout = graph["tasks"][name].get("timeout")
                    self.flow_tags[(t.sid, t.tag)] = (h["id"], name)
                else:   # it died with the manager before it was written: it runs again (a new attempt)
                    task["state"] = PENDING
            event(log, logging.INFO, "flow run restored", run=h["id"], state=h["state"])
        for run in list(self.runs.values()):
            if run.h["state"] == "running":
                self._submit_ready(run)


__all__ = ["FLOW_PEER", "FlowRules", "RunWait", "run_view"]

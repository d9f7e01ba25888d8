"""Membership rules: executors join and heartbeat, instances start, bind, die; placement.

Liveness (docs/reliability.md): any message from an executor counts as a
heartbeat; one silent for ``liveness x heartbeat_interval`` is evicted and its
instances' running tasks are requeued.  An instance that does not say hello
within ``instance_start_timeout`` is stopped; an application whose instances
die before hello ``start_failures`` times in a row fails its queued tasks.
Placement decisions come from the pure :func:`mesh.core.scheduler.plan`.
"""
from __future__ import annotations

import hmac
import logging
from typing import List, Optional

from mesh.core import scheduler
from mesh.core.base import Base, log
from mesh.core.effects import Call
from mesh.errors import ProtocolError
from mesh.model import auth
from mesh.model.records import ALIVE, DRAINING, LOST, OPEN, Executor, Instance, Session
from mesh.model.resources import Resources
from mesh.ops.log import event
from mesh.wire.protocol import Bind, ExecHello, Exited, Heartbeat, InstHello, Launch, Stop, Welcome, pack

IID_BLOCK = 1000   # instance numbers reserved per write of the high-water mark


class MemberRules(Base):
    def welcome(self, peer: bytes) -> None:
        self.send(peer, Welcome(int(self.settings.heartbeat_interval * 1000), self.settings.liveness))

    # -- executors ---------------------------------------------------------------------
    def on_exec_hello(self, peer: bytes, rec: ExecHello, key: Optional[str]) -> None:
        if not self.secured:
            self.join_executor(peer, rec, "")
            return
        self.admitting.add(peer)   # a secured mesh admits only keys on the allow-list
        self.call(Call(lambda store, k: store.executor_key_allowed(k), (key or "",), label="executor_key_allowed",
                       then=lambda allowed: self.admitted(peer, rec, key or "", bool(allowed)),
                       fail=lambda exc: self.admitted(peer, rec, key or "", False)))

    def admitted(self, peer: bytes, rec: ExecHello, key: str, allowed: bool) -> None:
        self.admitting.discard(peer)
        if allowed:
            self.join_executor(peer, rec, key)
            return
        self.stats["auth_denied"] += 1
        event(log, logging.WARNING, "executor refused: key not on the allow-list", executor=rec.id, key=key)
        self.gone(peer, f"executor key {key} is not allowed; on the manager run: "
                        "zmesh executor-keys add PUBLIC_KEY_FILE", fatal=True)

    def join_executor(self, peer: bytes, rec: ExecHello, key: str) -> None:
        caps = rec.caps
        try:
            slots = int(caps.get("slots", 1))
            capacity = Resources(float(caps.get("cpu", 0)), int(caps.get("memory", 0)), int(caps.get("gpu", 0)))
            labels = {str(k): str(v) for k, v in dict(caps.get("labels") or {}).items()}
        except (TypeError, ValueError):
            raise ProtocolError("EXEC_HELLO: field 'caps' is malformed", field="caps") from None
        old = self.executors.get(rec.id)
        if old is not None:
            self.lose_executor(old, "executor reconnected")
        ex = Executor(rec.id, peer, caps, slots, capacity, labels, self.now, self.now, key=key)
        self.executors[rec.id] = ex
        self.peers[peer] = ex
        event(log, logging.INFO, "executor joined", executor=rec.id, slots=slots, host=caps.get("hostname"))
        self.welcome(peer)
        self.plan_soon()

    def on_heartbeat(self, peer: bytes, rec: Heartbeat) -> None:
        ex = self.peers.get(peer)
        if isinstance(ex, Executor):
            if isinstance(rec.labels, dict):
                ex.labels = {str(k): str(v) for k, v in rec.labels.items()}
            if isinstance(rec.cache, dict):
                ex.cache = rec.cache
        elif ex is None and peer not in self.admitting:
            self.gone(peer, "unknown peer; introduce yourself again")

    def heard_from(self, peer: bytes) -> None:
        """Any traffic from an executor counts as a heartbeat."""
        ex = self.peers.get(peer)
        if ex.__class__ is Executor:
            ex.last_seen = self.now

    def drain_executor(self, ex: Executor) -> None:
        """No new instances or tasks on ``ex``; each of its instances stops once its tasks are done."""
        if ex.state == DRAINING:
            return
        ex.state = DRAINING
        event(log, logging.INFO, "executor draining", executor=ex.id, instances=len(ex.instances))
        for iid in list(ex.instances):
            inst = self.instances.get(iid)
            if inst is None or inst.stopping:
                continue
            inst.draining = True
            if not inst.inflight:
                self.stop_instance(inst)
        self.plan_soon()

    def on_drain(self, peer: bytes) -> None:
        ex = self.peers.get(peer)
        if isinstance(ex, Executor):
            self.drain_executor(ex)

    def revoked_executor_keys(self, public: List[str]) -> None:
        """Executors connected with a key just taken off the allow-list are told to go (fatal: they
        exit instead of reconnecting) and lost at once: their tasks run elsewhere."""
        for ex in [e for e in self.executors.values() if e.key and e.key in public]:
            event(log, logging.WARNING, "executor key revoked: disconnecting", executor=ex.id, key=ex.key)
            self.gone(ex.identity, f"executor key {ex.key} was revoked", fatal=True)
            self.lose_executor(ex, "its key was revoked")

    def lose_executor(self, ex: Executor, reason: str) -> None:
        event(log, logging.WARNING, "executor lost", executor=ex.id, reason=reason)
        ex.state = LOST
        for iid in list(ex.instances):
            inst = self.instances.get(iid)
            if inst is not None:
                if inst.identity is not None:
                    self.gone(inst.identity, f"executor {ex.id} lost: {reason}")
                self.remove_instance(inst, f"executor {ex.id} lost: {reason}")
        self.executors.pop(ex.id, None)
        self.peers.pop(ex.identity, None)
        self.plan_soon()

    # -- instances ---------------------------------------------------------------------
    def on_inst_hello(self, peer: bytes, rec: InstHello) -> None:
        inst = self.instances.get(rec.iid)
        if inst is None or inst.stopping or inst.executor != rec.eid \
                or not hmac.compare_digest(inst.token, rec.token):
            self.stats["auth_denied"] += 1
            self.gone(peer, f"instance {rec.iid} is not expected", fatal=True)
            return
        inst.identity = peer
        inst.pid = rec.pid
        inst.stream = rec.stream
        self.start_failures.pop(inst.app, None)
        self.start_backoff.pop(inst.app, None)
        self.start_streak.pop(inst.app, None)
        inst.idle_since = self.now
        self.peers[peer] = inst
        self.welcome(peer)
        self.learn_functions(inst.app, rec.functions)
        self.bind(inst, inst.session)
        if inst.session is not None:
            self.dispatch(inst.session)
        self.plan_soon()

    def bind(self, inst: Instance, s: Optional[Session], keep_draining: bool = False) -> None:
        """Point an instance at a session (or none) and send it that session's context."""
        old = inst.session
        if old is not None and old is not s and inst in old.instances:
            old.instances.remove(inst)
        inst.session = s
        inst.draining = inst.draining and keep_draining
        if s is not None and inst not in s.instances:
            s.instances.append(inst)
        if inst.identity is None:
            return  # it gets BIND when it says hello
        if s is None:
            self.send(inst.identity, Bind(None, inst.app, "doc", 0), [pack(None)])
        else:   # a snapshot names a version: sent once that version is on disk
            self.send(inst.identity, Bind(s.id, inst.app, s.context.kind, s.context.version), [s.context.encoded()],
                      after_commit=True)

    def on_exited(self, peer: bytes, rec: Exited) -> None:
        ex = self.peers.get(peer)
        if not isinstance(ex, Executor):
            return
        inst = self.instances.get(rec.iid)
        if inst is None or inst.executor != ex.id:
            return
        reason = rec.reason or f"instance exited with code {rec.code}"
        if not inst.stopping:
            event(log, logging.WARNING, "instance died", instance=inst.id, executor=ex.id, reason=reason)
        self.remove_instance(inst, reason)
        if not inst.ready and not inst.stopping:
            self.start_failed(inst.app, reason)  # ended before hello: exit 0, an error or a signal alike
        self.plan_soon()

    def remove_instance(self, inst: Instance, reason: str) -> None:
        self.requeue(inst, reason)
        self.tokens.drop(inst.token)
        self.instances.pop(inst.id, None)
        if inst.identity is not None:
            self.peers.pop(inst.identity, None)
        if inst.session is not None and inst in inst.session.instances:
            inst.session.instances.remove(inst)
        ex = self.executors.get(inst.executor)
        if ex is not None and inst.id in ex.instances:
            ex.instances.discard(inst.id)
            ex.used_slots -= 1
            ex.allocated = ex.allocated - inst.resreq
        if inst.session is not None:
            self.dispatch(inst.session)

    def stop_instance(self, inst: Instance) -> None:
        inst.stopping = True
        if inst.session is not None and inst in inst.session.instances:
            inst.session.instances.remove(inst)
        ex = self.executors.get(inst.executor)
        if ex is not None:
            self.send(ex.identity, Stop(inst.id))

    # -- placement -----------------------------------------------------------------------
    def plan(self) -> None:
        """Run the scheduler over a view of the state and carry out what it decides."""
        self.plan_wanted = False
        sessions = []
        for s in self.sessions.values():
            if s.state != OPEN:
                continue
            app = self.apps.get(s.app)
            if app is None or self.start_backoff.get(s.app, 0.0) > self.now:
                continue   # not known, or it failed to start a moment ago: no launch before its backoff
            bounds = [b for b in (app.spec.max_instances, s.max_instances) if b is not None]
            sessions.append(scheduler.SessionView(
                s.id, s.app, len(s.pending) + s.running + s.hint, s.resreq, dict(app.spec.labels),
                min(bounds) if bounds else None, s.created_at, s.owner))
        executors = [scheduler.ExecutorView(e.id, e.slots, e.used_slots, e.capacity, e.allocated, e.labels,
                                            e.state != ALIVE) for e in self.executors.values()]
        instances = [scheduler.InstanceView(
            i.id, i.executor, i.app,
            i.session.id if i.session is not None and i.session.state == OPEN else None,
            i.resreq, i.ready, bool(i.inflight), i.draining, i.stopping, i.idle_since, i.owner)
            for i in self.instances.values()]
        for action in scheduler.plan(sessions, executors, instances, self.now, self.settings.idle_timeout,
                                     self.settings.bind_grace):
            self.carry_out(action)

    def carry_out(self, action: scheduler.Action) -> None:
        if isinstance(action, scheduler.Launch):
            s, ex = self.sessions[action.session], self.executors[action.executor]
            app = self.apps[s.app]
            n = next(self._iids)
            reserving = n > self.iids_reserved
            if reserving:   # reserve a block on disk: ids are unique across restarts
                self.iids_reserved = self.batch.instance_ids_reserved = n + IID_BLOCK
            iid = f"{ex.id}.{n}"
            inst = Instance(iid, ex.id, s.app, s.resreq, app.spec.prefetch or self.settings.prefetch,
                            launched_at=self.now, idle_since=self.now, owner=s.owner)
            self.instances[iid] = inst
            ex.instances.add(iid)
            ex.used_slots += 1
            ex.allocated = ex.allocated + s.resreq
            self.bind(inst, s)
            # the instance acts for its owner, within the instance role (mesh.model.auth.INSTANCE)
            self.tokens.add(inst.token, auth.Principal(s.owner, "instance", "instance"), float("inf"))
            event(log, logging.INFO, "launch instance", instance=iid, session=s.id, executor=ex.id)
            # the first id of a block is seen only once the block is on disk (a crash cannot reuse it)
            self.send(ex.identity, Launch(iid, app.spec.to_dict(), inst.token), after_commit=reserving)
        elif isinstance(action, scheduler.Rebind):
            inst = self.instances[action.instance]
            target = self.sessions.get(action.session) if action.session else None
            if target is not None and target.owner != inst.owner:   # the scheduler never asks this
                log.error("refused to rebind instance %s of %r to a session of %r", inst.id, inst.owner, target.owner)
                return
            self.bind(inst, target)
            if target is not None:
                self.dispatch(target)
        elif isinstance(action, scheduler.Stop):
            self.stop_instance(self.instances[action.instance])
        elif isinstance(action, scheduler.Drain):
            self.instances[action.instance].draining = True

    # -- the clock -------------------------------------------------------------------------
    def check_liveness(self) -> None:
        """Heartbeats out, silent executors evicted, slow starters given up on."""
        now = self.now
        dead_after = self.settings.dead_after
        for ex in list(self.executors.values()):
            if now - ex.last_seen > dead_after:
                self.lose_executor(ex, f"no heartbeat for {now - ex.last_seen:.1f}s")
            else:
                self.send(ex.identity, Heartbeat())
        for inst in list(self.instances.values()):
            if not inst.ready and not inst.stopping and now - inst.launched_at > self.settings.instance_start_timeout:
                event(log, logging.WARNING, "instance did not start in time", instance=inst.id)
                self.stop_instance(inst)

"""Function rules: stateful functions addressed by ``(type, id)``, their messages, state, delays, egress.

The manager is the Statefun runtime: it keeps every address's state and inbox, and hands an
address's queued messages, with its state, to an instance of the application that serves its
type (learned from the instances' INST_HELLO), as one core task submitted by the pseudo-peer
:data:`FN_PEER` into the application's functions session.  **One batch per address at a time**,
messages in arrival order; different addresses run in parallel on the session's instances.

**Exactly-once effects.**  The instance answers, per message, what it sends, delays, cancels,
egresses and replies, and the address's state after the batch (executor/functions.py).  The
engine applies all of it in one handler, so it lands in one group commit with the removal of
the batch's messages from the inbox: after any crash the batch either committed whole or is
still in the inbox and runs again (a late or duplicate answer is dropped by the task core).
A client's ``fn_send`` is acknowledged after its message has committed; a ``fn_call``'s reply
is sent after the invocation that made it has committed.
"""
from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import secrets
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from mesh.core import query
from mesh.core.base import FN_PEER, Base, log
from mesh.core.control import Args, CallWait, EgressWait, Later, _arg
from mesh.errors import DeadlineExceeded, InvalidArgument, NotFound
from mesh.model import functions as model
from mesh.model.auth import INSECURE, Principal
from mesh.model.records import OPEN, Session
from mesh.ops.log import event
from mesh.wire.pickled import unwrap_bytes, wrap_bytes
from mesh.wire.protocol import Reply, pack, unpack

Key = Tuple[str, str]   # (type, id)
MAX_EGRESS_PAGE = 1000
RECENT_MIDS = 100_000   # ids of delivered messages remembered (in memory) so a resend is not delivered twice
MAX_EGRESS_WAIT = 60.0


class Msg:
    """One message in an address's inbox (a client's call waits for it in ``call_waiters``)."""

    __slots__ = ("mid", "seq", "caller", "blob")

    def __init__(self, mid: str, seq: int, caller: Optional[List[str]], blob: bytes) -> None:
        self.mid, self.seq, self.caller, self.blob = mid, seq, caller, blob


class Addr:
    __slots__ = ("key", "queue", "busy", "state", "called_at", "since", "failures", "holder", "version", "next")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.queue: Deque[Msg] = collections.deque()
        self.busy: Optional[int] = None            # messages in the batch out now (the first ones of queue)
        self.state: Dict[str, List[Any]] = {}      # name -> [pickled value, written_at, expire_w, expire_c]
        self.called_at = 0.0
        self.since = 0.0                            # when its first queued message found no route
        self.failures = 0                           # batches in a row that got no answer
        # affinity: the instance that ran the last batch holds the state as of ``version`` (this boot's
        # token of the last commit); the next batch goes to it without the state if it can take it
        self.holder: Optional[str] = None
        self.version = ""
        self.next = ""                              # the version the batch out now will make


class FunctionRules(Base):
    def init_functions(self) -> None:
        self.fn_types: Dict[str, str] = {}            # type -> application serving it
        self.fn_apps: Dict[str, List[str]] = {}       # application -> types it said it serves (this boot)
        self.addrs: Dict[Key, Addr] = {}
        self.fn_sessions: Dict[str, str] = {}         # application -> its functions session
        self.fn_out: Dict[Tuple[str, int], Tuple[Key, int]] = {}   # (session, tag) -> (address, batch size)
        self.fn_tags = itertools.count(1)
        self.fn_cid = "fn/" + secrets.token_hex(6)   # tags are this boot's: older ones are never answered here
        self.fn_seq = itertools.count(1)
        self.delayed: Dict[str, Tuple[float, Key, Optional[List[str]], bytes]] = {}
        self.delay_heap: List[Tuple[float, str]] = []
        self.egress_next: Dict[str, int] = {}
        self.egress_waiters: Dict[str, List[Tuple[bytes, int, int, int, float]]] = {}
        self.call_waiters: Dict[str, Tuple[bytes, int, float]] = {}   # mid -> (peer, rid, deadline)
        self.expiring: Set[Key] = set()
        self.unrouted: Set[Key] = set()
        self.fn_mids: Set[str] = set()                # ids of the messages in the inboxes
        self.fn_mids_made = itertools.count(1)
        self.fn_versions = itertools.count(1)
        self.fn_recent: "collections.OrderedDict[str, None]" = collections.OrderedDict()   # delivered lately

    # -- client calls ----------------------------------------------------------------------
    def _message_args(self, args: Args, blob: Optional[bytes]) -> Tuple[Key, bytes, str]:
        typename = model.check_typename(_arg(args, "type", str))
        identity = model.check_id(_arg(args, "id", str))
        if blob is None:
            raise InvalidArgument("the message travels as the blob frame")
        self.check_object_size(blob)
        mid = _arg(args, "mid", str, required=False) or self._mid()
        return (typename, identity), bytes(blob), mid

    def do_fn_send(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """Accept a message for ``(type, id)``: answered once it is in the store (durably accepted).
        A ``mid`` the caller gave that is queued, or was delivered lately (the last RECENT_MIDS), is
        not accepted twice: a resend after a lost answer delivers once."""
        key, data, mid = self._message_args(args, blob)
        self._check_route(key[0])
        if mid in self.fn_mids or mid in self.fn_recent:
            return {"mid": mid, "duplicate": True}
        self._accept(key, mid, None, data)
        return {"mid": mid}

    def do_fn_call(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        """Send a message and wait (``timeout`` seconds) for the function's ``context.reply``."""
        key, data, mid = self._message_args(args, blob)
        self._check_route(key[0])
        timeout = args.get("timeout", 30.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= model.MAX_CALL_WAIT:
            raise InvalidArgument(f"timeout is 0 to {model.MAX_CALL_WAIT:g} seconds", argument="timeout")
        self._accept(key, mid, None, data, call=True)
        return CallWait(mid, self.now + float(timeout))

    def wait_for_call(self, peer: bytes, rid: int, waiting: CallWait) -> None:
        self.call_waiters[waiting.mid] = (peer, rid, waiting.deadline)

    def do_fn_state(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """An address's live state: {name: pickled value} (read-only, for debugging and admin)."""
        key = (model.check_typename(_arg(args, "type", str)), model.check_id(_arg(args, "id", str)))
        a = self.addrs.get(key)
        if a is None:
            return {"state": {}}
        return {"state": {n: r[0] for n, r in model.live_state(a.state, self.now, a.called_at).items()}}

    def do_fn_list(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """Types with the application and instances serving them and the addresses they hold."""
        held: Dict[str, int] = collections.Counter(k[0] for k in self.addrs)
        queued: Dict[str, int] = collections.Counter()
        for k, a in self.addrs.items():
            queued[k[0]] += len(a.queue)
        rows = []
        for typename in sorted(set(self.fn_types) | set(held)):
            app = self.fn_types.get(typename)
            s = self.sessions.get(self.fn_sessions.get(app or "", ""))
            rows.append({"type": typename, "application": app, "instances": len(s.instances) if s else 0,
                         "addresses": held.get(typename, 0), "queued": queued.get(typename, 0)})
        return query.find(rows, ("type", "application", "instances", "addresses", "queued"), args.get("filter"),
                          args.get("page"), args.get("sort"))

    def do_fn_egress(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        """Records of egress ``typename`` from ``offset`` (at most ``limit``); ``wait``: seconds to
        wait for one when there is none yet."""
        typename = model.check_typename(_arg(args, "typename", str))
        offset = _arg(args, "offset", int, required=False) or 0
        limit = min(_arg(args, "limit", int, required=False) or MAX_EGRESS_PAGE, MAX_EGRESS_PAGE)
        wait = args.get("wait") or 0
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
            raise InvalidArgument("wait is a number of seconds", argument="wait")
        if offset >= self.egress_next.get(typename, 0) and wait > 0:
            deadline = self.now + min(float(wait), MAX_EGRESS_WAIT)
            return EgressWait(typename, offset, limit, deadline)
        return self._egress_read(typename, offset, limit)

    def _egress_read(self, typename: str, offset: int, limit: int) -> Later:
        def page(rows: List[Tuple[int, float, str, bytes]]) -> Dict[str, Any]:
            return {"records": [[o, at, kind, bytes(rec)] for o, at, kind, rec in rows],
                    "next": rows[-1][0] + 1 if rows else offset}
        return Later(lambda store: store.egress(typename, offset, limit), then=page)

    def wait_for_egress(self, peer: bytes, rid: int, w: EgressWait) -> None:
        self.egress_waiters.setdefault(w.typename, []).append((peer, rid, w.offset, w.limit, w.deadline))

    # -- accepting and routing ------------------------------------------------------------------
    def _addr(self, key: Key) -> Addr:
        a = self.addrs.get(key)
        if a is None:
            a = self.addrs[key] = Addr(key)
        return a

    def _accept(self, key: Key, mid: str, caller: Optional[List[str]], data: bytes, call: bool = False) -> None:
        """A new message: into the inbox (same commit as whatever sent it), then dispatch."""
        seq = next(self.fn_seq)
        a = self._addr(key)
        a.queue.append(Msg(mid, seq, caller, data))
        self.fn_mids.add(mid)
        self.batch.rows[("fn_inbox", mid)] = (mid, seq, key[0], key[1], pack(caller) if caller else None, data)
        self._dispatch(a)

    def learn_functions(self, app: str, types: Optional[List[str]]) -> None:
        """An instance of ``app`` said hello, serving ``types`` (none: not a functions application)."""
        served = sorted(t for t in (types or []) if isinstance(t, str) and model.TYPENAME.fullmatch(t))
        self.fn_apps[app] = served
        for t in served:
            if self.fn_types.get(t) != app:
                self.fn_types[t] = app
                self.batch.rows[("fn_types", t)] = (t, app)
                event(log, logging.INFO, "function type served", type=t, application=app)
        s = self.sessions.get(self.fn_sessions.get(app, ""))
        if s is not None:
            s.hint = 0   # probed
            if not served and not s.pending and not s.running:
                self._close_fn_session(app)
        for key in list(self.unrouted):
            if key[0] in self.fn_types:
                self.unrouted.discard(key)
                self._dispatch(self.addrs[key])

    def _unheard(self) -> List[str]:
        """Applications that may serve functions and have not said yet (no instance said hello this
        boot; the mesh's own and users' temporary applications aside)."""
        return [name for name, app in self.apps.items()
                if name not in self.fn_apps and app.lease is None and not name.startswith("zmesh-")]

    def _probe(self) -> None:
        """Some message's type is not known: start one instance of each application not heard from."""
        for name in self._unheard():
            self._fn_session(name).hint = 1

    def _check_route(self, typename: str) -> None:
        """NotFound at once for a type nobody serves when every application has said what it serves."""
        if typename not in self.fn_types and not self._unheard():
            raise NotFound(f"no application serves function type {typename!r} (it serves "
                           f"{', '.join(sorted(self.fn_types)) or 'nothing'}; an application's instance "
                           f"says which types it serves when it starts)", type=typename)

    def _fn_session(self, app_name: str) -> Session:
        sid = self.fn_sessions.get(app_name)
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.state == OPEN:
            return s
        sid = f"fn-{app_name}-{self.fn_cid[3:]}"
        s = self.open_engine_session(sid, app_name, "")
        self.fn_sessions[app_name] = sid
        self.plan_soon()
        return s

    def _close_fn_session(self, app: str) -> None:
        s = self.sessions.get(self.fn_sessions.pop(app, ""))
        if s is not None and s.state == OPEN:
            self.close_and_record(s, "serves no function")

    def _dispatch(self, a: Addr) -> None:
        """Hand the address's queued messages (up to FN_BATCH) to its type's application."""
        if a.busy is not None or not a.queue:
            return
        app = self.fn_types.get(a.key[0])
        if app is None or app not in self.apps:
            if a.key not in self.unrouted:
                self.unrouted.add(a.key)
                a.since = self.now
                self._probe()
            return
        s = self._fn_session(app)
        batch = list(itertools.islice(a.queue, model.FN_BATCH))
        holder = self.instances.get(a.holder) if a.holder and a.version else None
        if holder is not None and not (holder.session is s and holder.identity is not None and not holder.draining
                                       and holder.credit_limit(self.settings.queue_target) > len(holder.inflight)):
            holder = None   # gone, or busy: the batch goes to any instance, with the state
        a.next = f"{self.fn_cid[3:]}:{next(self.fn_versions)}"
        payload = wrap_bytes(pack({"address": list(a.key), "called_at": a.called_at, "now": self.now,
                                   "state": None if holder else model.live_state(a.state, self.now, a.called_at),
                                   "version": a.version, "next": a.next,
                                   "messages": [[m.mid, m.caller, m.blob] for m in batch]}))
        tag = next(self.fn_tags)
        a.busy = len(batch)
        self.fn_out[(s.id, tag)] = (a.key, len(batch))
        self.enqueue(FN_PEER, s, [tag], self.fn_cid, [payload], on=holder)

    # -- answers ------------------------------------------------------------------------------------
    def fn_answers(self) -> None:
        inbox, self.fn_inbox = self.fn_inbox, []
        for res, frames in inbox:
            for (tag, err), frame in zip(res.outcomes, frames):
                found = self.fn_out.pop((res.session, tag), None)
                if found is None:
                    continue
                key, n = found
                a = self.addrs.get(key)
                if a is None or a.busy != n:
                    continue
                if err is not None and (err.get("details") or {}).get("state_missing"):
                    a.holder = None   # it ran on an instance that does not hold the state: again, with it
                    a.busy = None
                    self._dispatch(a)
                    continue
                if err is not None and a.failures < model.BATCH_RETRIES:
                    # the batch did not run to an answer (its instances died past the application's
                    # retries, a deadline): its messages stay first in the inbox and go again
                    a.failures += 1
                    event(log, logging.WARNING, "function batch failed; again", type=key[0], id=key[1],
                          failures=a.failures, error=err.get("message"))
                    a.busy = None
                    self._dispatch(a)
                    continue
                a.failures = 0
                try:
                    self._apply(a, n, err, bytes(frame))
                except Exception:   # a bug must not stop the other addresses
                    log.exception("function answer failed")
                a.busy = None
                self._dispatch(a)
                if not a.queue and a.busy is None and not a.state:   # nothing to keep in memory
                    del self.addrs[key]
                    self.expiring.discard(key)

    def _apply(self, a: Addr, n: int, err: Optional[Dict[str, Any]], frame: bytes) -> None:
        batch = [a.queue.popleft() for _ in range(n)]
        for m in batch:
            self._delivered(m)
        if err is not None:   # the whole batch failed (its instances kept dying, or a deadline)
            for m in batch:
                self._undeliverable(a, m, err.get("message", "failed"), err)
            return
        inner = unwrap_bytes(frame)
        answer: Any = None
        results: List[Dict[str, Any]] = []
        changed: Dict[str, Any] = {}
        try:
            answer = unpack(inner) if inner is not None else None
            results, changed = answer["results"], answer["state"]
        except Exception:
            answer = None
        if answer is None or not isinstance(results, list) or len(results) != n:
            why = InvalidArgument(f"{a.key[0]}: the instance answered something that is not a functions answer")
            for m in batch:
                self._undeliverable(a, m, why.message, why.to_wire())
            return
        me = list(a.key)
        for m, r in zip(batch, results):
            if "rejected" in r:
                self._undeliverable(a, m, str(r["rejected"]), InvalidArgument(str(r["rejected"])).to_wire())
                continue
            if "error" in r:
                self._undeliverable(a, m, str(r["error"].get("message")), r["error"])
                continue
            for typename, identity, blob in r.get("sends") or []:
                self._accept((typename, identity), self._mid(), me, blob)
            for kind, entry in r.get("timers") or []:   # in the order the function made them
                if kind == "delay":
                    delay, typename, identity, blob, token = entry
                    self._delay(token or self._mid(), self.now + float(delay), (typename, identity), me, blob)
                elif self.delayed.pop(entry, None) is not None:
                    self.batch.rows[("fn_delayed", entry)] = None
            for typename, blob in r.get("egress") or []:
                self._egress(typename, "blob", blob)
            if "reply" in r:
                self._reply(a, m, r["reply"])
            elif m.mid in self.call_waiters:   # a call the function did not answer: say so now
                peer, rid, _ = self.call_waiters.pop(m.mid)
                self.send(peer, Reply(rid, True, {"replied": False}), after_commit=True)
        a.called_at = self.now
        for name, rec in (changed or {}).items():
            if rec is None:
                a.state.pop(name, None)
            else:
                a.state[name] = list(rec)
        a.holder, a.version = answer.get("instance"), a.next   # it holds the state as of this commit
        self._save_state(a)

    def _mid(self) -> str:
        """A message id: this boot's random prefix and a counter (unique, cheap)."""
        return f"{self.fn_cid[3:]}-{next(self.fn_mids_made)}"

    def _delivered(self, m: Msg) -> None:
        """``m`` leaves the inbox (in this commit); its id is remembered for a while against resends."""
        rows, k = self.batch.rows, ("fn_inbox", m.mid)
        if k in rows and rows[k] is not None:
            del rows[k]            # written in this same commit: neither the row nor its deletion is needed
        else:
            rows[k] = None
        self.fn_mids.discard(m.mid)
        self.fn_recent[m.mid] = None
        if len(self.fn_recent) > RECENT_MIDS:
            self.fn_recent.popitem(last=False)

    def _reply(self, a: Addr, m: Msg, blob: bytes) -> None:
        waiter = self.call_waiters.pop(m.mid, None)
        if waiter is not None:
            peer, rid, _ = waiter
            self.send(peer, Reply(rid, True, {"replied": True}, blob=True), [blob], after_commit=True)
        elif m.caller:   # a function called: the reply is a message to it
            self._accept((m.caller[0], m.caller[1]), self._mid(), list(a.key), blob)

    def _undeliverable(self, a: Addr, m: Msg, reason: str, err: Dict[str, Any]) -> None:
        """A message not delivered (wrong type, the function raised, no route): the caller's call
        gets the error; otherwise it goes to the dead-letter egress with the reason."""
        waiter = self.call_waiters.pop(m.mid, None)
        if waiter is not None:
            peer, rid, _ = waiter
            self.send(peer, Reply(rid, False, error=err), after_commit=True)
            return
        self._egress(model.DEAD_LETTERS, "doc", pack({"reason": reason, "error": err, "address": list(a.key),
                                                      "caller": m.caller, "message": m.blob, "mid": m.mid}))

    def _egress(self, typename: str, kind: str, record: bytes) -> None:
        offset = self.egress_next.get(typename, 0)
        self.egress_next[typename] = offset + 1
        self.batch.rows[("fn_egress", (typename, offset))] = (typename, offset, self.now, kind, record)
        for peer, rid, start, limit, _ in self.egress_waiters.pop(typename, []):
            self.answer(peer, rid, "fn_egress", functools.partial(self._egress_read, typename, start, limit))

    def _delay(self, token: str, due: float, key: Key, caller: Optional[List[str]], blob: bytes) -> None:
        self.delayed[token] = (due, key, caller, blob)
        heapq.heappush(self.delay_heap, (due, token))
        self.batch.rows[("fn_delayed", token)] = (token, due, key[0], key[1], pack(caller) if caller else None, blob)

    def _save_state(self, a: Addr) -> None:
        self.batch.rows[("fn_state", a.key)] = (a.key[0], a.key[1], pack(a.state), a.called_at)
        if any(r[2] is not None or r[3] is not None for r in a.state.values()):
            self.expiring.add(a.key)

    # -- the clock ------------------------------------------------------------------------------------
    def function_clock(self) -> None:
        """Fire delayed messages that are due, expire state, time out calls, unroutable messages and
        egress waits."""
        now = self.now
        heap = self.delay_heap
        while heap and heap[0][0] <= now:
            due, token = heapq.heappop(heap)
            d = self.delayed.get(token)
            if d is None or d[0] != due:
                continue   # cancelled, or replaced under the same token
            del self.delayed[token]
            self.batch.rows[("fn_delayed", token)] = None
            self._accept(d[1], self._mid(), d[2], d[3])
        for key in list(self.expiring):
            a = self.addrs.get(key)
            if a is None:
                self.expiring.discard(key)
                continue
            live = model.live_state(a.state, now, a.called_at)
            if len(live) != len(a.state):
                a.state = live
                a.version = ""   # changed here, not by its holder: the next batch carries the state
                self._save_state(a)
            if model.next_expiry(a.state, a.called_at) is None:
                self.expiring.discard(key)
        self._refuse_unrouted()
        for mid, (peer, rid, deadline) in list(self.call_waiters.items()):
            if deadline <= now:
                del self.call_waiters[mid]
                self.send(peer, Reply(rid, False, error=DeadlineExceeded(
                    f"no reply within the call's timeout (message {mid} stays queued)", mid=mid).to_wire()))
        for typename, waiters in list(self.egress_waiters.items()):
            keep = []
            for w in waiters:
                if w[4] <= now:
                    self.answer(w[0], w[1], "fn_egress", functools.partial(self._egress_read, typename, w[2], w[3]))
                else:
                    keep.append(w)
            if keep:
                self.egress_waiters[typename] = keep
            else:
                del self.egress_waiters[typename]

    def _refuse_unrouted(self) -> None:
        """Messages whose type nobody serves, past ROUTE_WAIT: NotFound to a call, else dead letters."""
        now = self.now
        for key in list(self.unrouted):
            a = self.addrs[key]
            if now - a.since >= model.ROUTE_WAIT and key[0] not in self.fn_types:
                self.unrouted.discard(key)
                why = NotFound(f"no application serves function type {key[0]!r} (an instance of the application "
                               f"says which types it serves when it starts)", type=key[0])
                while a.queue:
                    m = a.queue.popleft()
                    self._delivered(m)
                    self._undeliverable(a, m, why.message, why.to_wire())

    # -- restart ------------------------------------------------------------------------------------------
    def restore_functions(self, saved: Dict[str, Any]) -> None:
        """Routes, state, the inbox (dispatched again), delayed messages, egress heads; the functions
        sessions of the last boot are closed (their tasks were batches this boot redoes)."""
        for typename, app in saved.get("types", []):
            self.fn_types[typename] = app
        for typename, identity, state, called_at in saved.get("state", []):
            a = self._addr((typename, identity))
            a.state, a.called_at = unpack(state), called_at
            if model.next_expiry(a.state, a.called_at) is not None:
                self.expiring.add(a.key)
        seq = 0
        for mid, seq, typename, identity, caller, message in saved.get("inbox", []):
            self._addr((typename, identity)).queue.append(Msg(mid, seq, unpack(caller) if caller else None,
                                                              bytes(message)))
            self.fn_mids.add(mid)
        self.fn_seq = itertools.count(seq + 1)
        for token, due, typename, identity, caller, message in saved.get("delayed", []):
            self.delayed[token] = (due, (typename, identity), unpack(caller) if caller else None, bytes(message))
            heapq.heappush(self.delay_heap, (due, token))
        for typename, last in saved.get("egress", []):
            self.egress_next[typename] = last + 1
        for s in list(self.sessions.values()):
            if s.id.startswith("fn-") and s.state == OPEN:
                self.close_and_record(s, "belonged to the manager's last run")
        for a in list(self.addrs.values()):
            self._dispatch(a)


__all__ = ["FunctionRules"]

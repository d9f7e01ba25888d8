"""Every timer and limit of the mesh, named, documented and overridable.

Values come from the dataclass defaults, then from ``ZMESH_<NAME>`` environment
variables (so tests and systemd units can shrink or raise them without code),
then from explicit keyword arguments.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, cast

DEFAULT_MANAGER = "tcp://127.0.0.1:5555"


def default_manager() -> str:
    """Where clients look for the manager: ``ZMESH_MANAGER`` or loopback:5555."""
    return os.environ.get("ZMESH_MANAGER") or DEFAULT_MANAGER


def default_db() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "zeromesh", "manager.db")


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"ZMESH_{name.upper()} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats each side sends when it has nothing else to say."""
    liveness: int = 3
    """Missed heartbeat intervals after which a silent peer is declared dead."""
    prefetch: int = 16
    """Tasks kept queued ahead at each instance (credit); an app spec may override it."""
    stream_window: int = 64
    """Parts of one stream that may be on their way to a consumer that has not taken them (flow
    control: a slow consumer pauses the generator there; docs/streaming.md).  0: no limit (the
    negative control of the memory test; never in production)."""
    queue_target: float = 0.005
    """Seconds of work kept queued at each instance; credit is this over the measured task time."""
    flush_interval: float = 0.02
    """Seconds between group commits of task and context changes to SQLite."""
    bind_grace: float = 1.0
    """Seconds an idle instance stays with its session before another session may take it."""
    idle_timeout: float = 60.0
    """Seconds an instance bound to no session is kept warm before it is stopped."""
    persist_input_max: int = 64 * 1024
    """Largest request kept in SQLite while its task waits; a larger one is resent by its client
    after a manager restart instead of being written (a 10 MiB write per task costs more than it saves)."""
    record_after: float = 0.5
    """Seconds a queued or running task lives in memory only: a task that finishes sooner is
    written once, finished and without its request; one that lives longer is written with its
    request and again when it ends.  A manager crash forgets younger tasks; their clients resend them."""
    max_store_backlog: int = 64
    """Group commits the writer thread may fall behind before the manager holds back new tasks of
    busy sessions (everything else is still read and answered: heartbeats, answers, calls)."""
    backlog_admit: int = 64
    """While the store is behind, a session with fewer tasks than this queued or running still has
    its submissions taken at once; a busier one's wait in memory until the store catches up, so one
    flooding client slows only itself.  Held tasks count against ``max_pending`` (per session, and
    in all), so what is held stays bounded."""
    writer_nice: int = 10
    """How much lower the CPU priority (nice value, Linux) of the manager's SQLite writer thread is
    than its event loop's, so that the loop, which every peer waits on, wins the CPU and the GIL
    while the writer catches up in its gaps (docs/performance.md, "A flood and another client");
    0 keeps them equal.  A writer that falls behind holds back busy sessions (``backlog_admit``)."""
    max_message_size: int = 256 * 1024 * 1024
    """Largest multipart message accepted from a peer (ZMQ_MAXMSGSIZE)."""
    login_failures: int = 5
    """Failed logins one user (or robot) name, or one peer, may have within ``login_window``;
    more logins are refused at once with ResourceExhausted until the window moves on."""
    login_window: float = 60.0
    """Seconds over which failed logins are counted (see ``login_failures``)."""
    token_ttl: float = 3600.0
    """Seconds a login token lives; clients renew theirs before it ends."""
    metrics_host: str = "127.0.0.1"
    """Address the --metrics-port HTTP endpoint listens on (loopback unless you expose it)."""
    max_context_size: int = 64 * 1024 * 1024
    """Largest encoded session context; a write that would pass it is refused (ResourceExhausted)."""
    max_patch_ops: int = 10_000
    """Most ops one context or object patch may carry: the manager applies a patch on its event
    loop, so one patch must not hold it (400,000 ops took 9 s); more are refused (ResourceExhausted)."""
    max_object_size: int = 64 * 1024 * 1024
    """Largest object put_object / update_object accept (ResourceExhausted beyond)."""
    send_hwm: int = 10_000
    """Messages queued towards one peer before sends to it fail (a peer that stopped reading);
    undelivered answers are kept in the database and collected by the client's resend."""
    resend_after: float = 60.0
    """Seconds without any answer after which a client resends its unanswered tasks (idempotent)."""
    max_inflight: int = 100_000
    """Tasks one client connection may have awaiting answers; submit() blocks beyond it."""
    max_pending: int = 1_000_000
    """Tasks one session may have queued in the manager; more are refused (ResourceExhausted)."""
    request_timeout: float = 10.0
    """Seconds a client waits for a control reply before raising Unavailable."""
    snapshot_every: int = 200
    """Context patches between two snapshots written to the patch log."""
    instance_start_timeout: float = 30.0
    """Seconds a launched instance has to say hello before it counts as crashed."""
    max_lease_ttl: float = 3600.0
    """Longest time to live a lease may ask for (its holder renews it well within that)."""
    result_retention: float = 3600.0
    """Seconds a task's result stays retrievable (``Client.get_task``, ``zmesh view -t``) after its
    session closes; while the session is open it always is.  Each result is written to the
    database with its task's record (as pickled bytes: the manager never unpickles it) and
    removed past this.  0: results are not kept (nothing extra is written)."""
    result_max_size: int = 1024 * 1024
    """Largest result kept for ``get_task`` (see ``result_retention``); a larger one is delivered to
    its caller as always but not written a second time (a 10 MiB write per task costs more than
    reading it back later is worth; get_task then says ``has_result`` false)."""
    close_grace: float = 30.0
    """Seconds the tasks still running when their session closes may finish; then their instances
    are stopped and the tasks cancelled (an idle instance is free at once)."""
    drain_grace: float = 30.0
    """Seconds a draining executor (SIGTERM) gives running tasks before it stops their instances."""
    start_failures: int = 3
    """Instances of one app that may end before saying hello (whatever their exit status), in a row,
    before its queued tasks fail."""
    start_backoff: float = 0.25
    """Seconds before an app whose instance ended before hello is launched again; doubles with each
    failure in a row, up to ``start_backoff_max``."""
    start_backoff_max: float = 30.0
    """Longest wait between launches of an app that keeps failing to start."""
    instance_write_timeout: float = 30.0
    """Seconds an instance waits for the manager to sequence one of its context writes (or resend
    a snapshot) before the write fails with Unavailable."""
    stop_grace: float = 5.0
    """Seconds an executor gives a stopped instance after SIGTERM before it sends SIGKILL."""
    cache_bytes: int = 1 << 30
    """Bytes of objects an executor's shared object cache holds before it evicts (LRU)."""
    unsafe_ack_before_commit: bool = False
    """UNSAFE, never in production: send acknowledgements (replies, context versions) before the
    group commit that makes them true, so a kill -9 loses acknowledged writes.  It exists only as
    the negative control of the durability tests (tests/test_durability.py)."""

    @classmethod
    def load(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Settings":
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            raw = env.get("ZMESH_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse_bool(f.name, raw) if isinstance(f.default, bool) \
                    else cast(Any, type(f.default))(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def dead_after(self) -> float:
        return self.heartbeat_interval * self.liveness

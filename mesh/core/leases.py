"""Leases: what a client holds only while it keeps renewing.

A lease (``create_lease {ttl}``) is renewed by its holder (``renew_lease``) well within its
time to live.  A temporary application (``register_temporary_application {spec, lease}``),
sessions (``create_session {..., lease}``) and objects (``put_object {..., lease}``) may be
attached to it; when the lease ends, released by its holder or expired because the holder
stopped renewing (it crashed, was killed, lost its network), the manager closes those
sessions, deletes those objects and unregisters that application.  This is how the runner
leaves nothing behind a killed client (docs/runner.md).  Leases are written to the store:
a manager restart keeps them, with their expiry times.

A temporary application may be registered by a ``user`` (not only an admin): it belongs to
that user and lives only as long as the lease.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any, Dict, Optional

from mesh.core.base import Base, log
from mesh.core.control import Args, Later, _arg
from mesh.core.effects import Call
from mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from mesh.model.auth import INSECURE, Principal
from mesh.model.records import OPEN, App, Lease
from mesh.model.flows import check_app_name
from mesh.model.spec import AppSpec
from mesh.ops.log import event


class LeaseRules(Base):
    # -- the calls ----------------------------------------------------------------------
    def do_create_lease(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        ttl = args.get("ttl")
        limit = self.settings.max_lease_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= limit:
            raise InvalidArgument(f"a lease's ttl is a number of seconds in (0, {limit:g}] (max_lease_ttl)",
                                  argument="ttl")
        lease = Lease(f"lease-{secrets.token_hex(8)}", who.name, float(ttl), self.now + ttl)
        self.leases[lease.id] = lease
        self.save_lease(lease)
        return lease.view()

    def do_renew_lease(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        lease = self.lease(_arg(args, "id", str), who)
        lease.expires_at = self.now + lease.ttl
        self.save_lease(lease)
        return lease.view()

    def do_release_lease(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        lease = self.lease(_arg(args, "id", str), who)
        return self.end_lease(lease, "released")

    def do_register_temporary_application(self, args: Args, blob: Optional[bytes] = None,
                                          who: Principal = INSECURE) -> Later:
        """An application that lives as long as a lease of the caller's (a user may register one)."""
        lease = self.lease(_arg(args, "lease", str), who)
        spec = AppSpec.from_dict(_arg(args, "spec", dict))
        check_app_name(spec.name)
        if spec.name in self.apps:
            raise AlreadyExists(f"application {spec.name!r} is already registered", application=spec.name)
        created = self.now

        def registered(_: Any) -> Dict[str, Any]:
            if lease.id not in self.leases:   # it ended while the row was written: undo
                self.call(Call(lambda store, name: store.delete_app(name), (spec.name,), label="delete_app"))
                raise NotFound(f"lease {lease.id!r} ended", lease=lease.id)
            self.apps[spec.name] = App(spec, created, owner=who.name, lease=lease.id)
            lease.apps.add(spec.name)
            self.save_lease(lease)
            event(log, logging.INFO, "temporary application registered", application=spec.name, lease=lease.id,
                  owner=who.name)
            return self.apps[spec.name].view()

        return Later(lambda store: store.put_app(spec.name, spec.to_dict(), created), then=registered)

    # -- rules ---------------------------------------------------------------------------
    def lease(self, lid: str, who: Principal) -> Lease:
        """The caller's lease ``lid`` (an admin may touch any)."""
        lease = self.leases.get(lid)
        if lease is None:
            raise NotFound(f"lease {lid!r} does not exist (released, or expired: it was not renewed in time)",
                           lease=lid)
        if not who.may_touch(lease.owner):
            raise PermissionDenied(f"lease {lid!r} belongs to {lease.owner!r}", lease=lid)
        return lease

    def attach(self, lid: Optional[str], who: Principal) -> Optional[Lease]:
        """The lease a new session or object joins (``lease`` argument), checked now."""
        return None if lid is None else self.lease(lid, who)

    def save_lease(self, lease: Lease) -> None:
        self.batch.leases[lease.id] = lease.row()

    def expire_leases(self) -> None:
        for lease in [x for x in self.leases.values() if x.expires_at <= self.now]:
            event(log, logging.WARNING, "lease expired: cleaning up", lease=lease.id, owner=lease.owner,
                  applications=sorted(lease.apps), sessions=len(lease.sessions), objects=len(lease.objects))
            self.end_lease(lease, "expired")

    def end_lease(self, lease: Lease, reason: str) -> Dict[str, Any]:
        """Close the lease's sessions, delete its objects, unregister its applications."""
        self.leases.pop(lease.id, None)
        self.batch.leases[lease.id] = None
        closed = []
        for sid in sorted(lease.sessions):
            s = self.sessions.get(sid)
            if s is not None and s.state == OPEN:
                self.close_and_record(s, f"its lease {lease.id} was {reason}")
                closed.append(sid)
        self.delete_objects([k for k in sorted(lease.objects) if k in self.objects.items])
        removed = []
        for name in sorted(lease.apps):
            app = self.apps.get(name)
            if app is None or app.lease != lease.id:
                continue
            users = [s.id for s in self.sessions.values() if s.app == name and s.state == OPEN]
            if users:   # another runner reused it: the lease of one of its sessions takes it over
                heir = next((x for x in self.leases.values() if x.sessions & set(users) and x.owner == lease.owner),
                            None)
                app.lease = heir.id if heir is not None else None
                if heir is not None:
                    heir.apps.add(name)
                    self.save_lease(heir)
                event(log, logging.WARNING, "temporary application kept: others have sessions on it",
                      application=name, lease=lease.id, now_with=app.lease)
                continue
            self.apps.pop(name)
            for inst in list(self.instances.values()):
                if inst.app == name and not inst.stopping:
                    self.stop_instance(inst)
            self.call(Call(lambda store, n: store.delete_app(n), (name,), label="delete_app"))
            removed.append(name)
        self.plan_soon()
        return {"id": lease.id, "applications": removed, "sessions": closed, "objects": len(lease.objects)}

    def do_unregister_temporary_application(self, args: Args, blob: Optional[bytes] = None,
                                            who: Principal = INSECURE) -> Later:
        """Its owner (or an admin) ends a temporary application before its lease does."""
        name = _arg(args, "name", str)
        app = self.apps.get(name)
        if app is None or app.lease is None:
            raise NotFound(f"no temporary application {name!r}", application=name)
        if not who.may_touch(app.owner):
            raise PermissionDenied(f"application {name!r} belongs to {app.owner!r}", application=name)
        if any(s.app == name and s.state == OPEN for s in self.sessions.values()):
            raise FailedPrecondition(f"application {name!r} has open sessions; close them first", application=name)

        def unregistered(_: Any) -> Dict[str, Any]:
            self.apps.pop(name, None)
            lease = self.leases.get(app.lease or "")
            if lease is not None:
                lease.apps.discard(name)
                self.save_lease(lease)
            for inst in list(self.instances.values()):
                if inst.app == name and not inst.stopping:
                    self.stop_instance(inst)
            return {"name": name}

        return Later(lambda store: store.delete_app(name), then=unregistered)

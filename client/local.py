"""A mesh on this machine for ``zmesh up``, the examples and the benchmarks.

The implementation is :class:`mesh.testing.LocalMesh` (real processes on random
loopback ports, each ended by its PID); this subclass adds what needs the client
library, which the mesh package may not import: :meth:`LocalMesh.client` and the
``admin`` credentials of a secured mesh.
"""
from __future__ import annotations

from typing import Optional

from mesh.testing import LocalMesh as _LocalMesh
from mesh.testing import end_process

from .api import Client
from .auth import PasswordAuth

__all__ = ["LocalMesh", "end_process"]


class LocalMesh(_LocalMesh):
    @property
    def admin(self) -> Optional[PasswordAuth]:
        """Credentials of the ``admin`` user of a secured mesh (None when insecure)."""
        if self.admin_user is None or self.admin_password is None:
            return None
        return PasswordAuth(self.admin_user, self.admin_password)

    def client(self) -> Client:
        """A management client with admin rights on this mesh."""
        return Client(self.endpoint, manager_key=self.manager_key, auth=self.admin)

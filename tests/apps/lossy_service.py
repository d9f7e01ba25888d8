"""tools_service with a fault injected: this replica loses every 3rd context patch it receives.

Dropping a message inside one TCP connection cannot happen for real, so the
fault is injected here, in the test service, not in zeromesh.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tools_service  # noqa: E402
from tools_service import ins  # noqa: E402

_real = type(ins)._apply_patch
_seen = [0]


def _lossy(self, msg):
    _seen[0] += 1
    if _seen[0] % 3 == 0:
        return  # dropped on the floor
    _real(self, msg)


type(ins)._apply_patch = _lossy
tools_service.ins = ins

if __name__ == "__main__":
    ins.run()

"""``zmesh dashboard``: a live web page of the mesh, a client of the management API (docs/dashboard.md).

Needs the ``dashboard`` extra (Starlette and uvicorn); the chart library (uPlot, MIT) ships in
``static/``, so the page works offline.
"""
from __future__ import annotations

from .server import Settings, create_app, serve

__all__ = ["Settings", "create_app", "serve"]

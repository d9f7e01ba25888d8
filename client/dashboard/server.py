"""The dashboard's web server: pages, the JSON API (docs/dashboard.md), live snapshots over SSE.

It is a client of the management API like ``zmesh top``, never part of the manager:
- one :class:`~client.dashboard.sampler.Sampler` reads the mesh once per interval with the dashboard's
  own credentials (a viewer robot is enough) and every open page gets that same snapshot pushed;
- what a person asks for (sessions, tasks, a drain) goes through *their* login: a cookie maps to a
  :class:`~client.api.Client` logged in with their zeromesh user and password, so the manager decides
  what they may read or do.  Those reads are cached for one interval and bounded by a token bucket
  (``resource_exhausted``, HTTP 429, past it), so no number of tabs can flood the manager.
On an insecure mesh there is nobody to log in as: every visitor acts through the dashboard's client.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import html
import json
import os
import secrets
import time
import urllib.parse
from typing import Any, AsyncIterator, Callable, Dict, Optional, Tuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mesh.errors import InvalidArgument, MeshError, NotFound, ResourceExhausted, Unauthenticated
from mesh.wire.protocol import unpack

from ..api import Client
from ..auth import PasswordAuth
from ..functions import Functions
from .query import context_view, error_body, parse_find, task_graph
from .sampler import Sampler

HERE = os.path.dirname(os.path.abspath(__file__))
COOKIE = "zmesh_dashboard"
LOGIN_TTL = 8 * 3600.0      # an idle login is forgotten (and its connection closed) after this long
MAX_LOGINS = 100            # logins kept at once; the least recently used goes first
READS_PER_SECOND = 20.0     # management calls on behalf of browsers, all of them together
PAGES = {"/": "overview", "/executors": "executors", "/applications": "applications", "/sessions": "sessions",
         "/functions": "functions", "/flows": "flows"}
ONE = {"sessions": "session", "flows": "flow"}   # /sessions/ID and /flows/ID: one of them


@dataclasses.dataclass
class Settings:
    """Every limit of the dashboard, named (the CLI and tests shrink them)."""
    manager: Optional[str] = None
    manager_key: Optional[str] = None
    interval: float = 1.0                      # seconds between snapshots (and between pushes)
    reads_per_second: float = READS_PER_SECOND
    login_ttl: float = LOGIN_TTL
    secure: Optional[bool] = None              # None: secured when a manager key is known


@dataclasses.dataclass
class Login:
    client: Client
    who: Dict[str, Any]
    last_used: float


class Reads:
    """Browser-driven reads: one answer per (login, call) per interval, at most ``rate`` calls a second."""

    def __init__(self, rate: float, ttl: float) -> None:
        self.rate, self.ttl = rate, ttl
        self.tokens, self.stamp = rate, time.monotonic()
        self.cache: Dict[Tuple[Any, ...], Tuple[float, Any]] = {}
        self.calls = 0

    def _take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            raise ResourceExhausted("the dashboard's read budget for the manager is spent; try again in a second")
        self.tokens -= 1

    async def get(self, key: Tuple[Any, ...], fn: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self.cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        self._take()
        self.calls += 1
        value = await run_in_threadpool(fn)
        if len(self.cache) > 1000:
            self.cache = {k: v for k, v in self.cache.items() if now - v[0] < self.ttl}
        self.cache[key] = (time.monotonic(), value)
        return value


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, default=str), status_code=status, media_type="application/json")


def _page_json(page: Any, params: Dict[str, int]) -> Dict[str, Any]:
    return {"items": [dataclasses.asdict(x) for x in page], "total": page.total, **params}


class Dashboard:
    def __init__(self, settings: Settings, client: Optional[Client] = None) -> None:
        self.settings = settings
        key = settings.manager_key or os.environ.get("ZMESH_MANAGER_KEY")
        self.manager_key = key
        self.secure = bool(key) if settings.secure is None else settings.secure
        self.client = client or Client(settings.manager, manager_key=key)
        self.sampler = Sampler(self.client, settings.interval)
        self.reads = Reads(settings.reads_per_second, settings.interval)
        self.logins: Dict[str, Login] = {}
        self.version = 0
        self.changed: Optional[asyncio.Condition] = None    # made in the server's loop (lifespan)
        self.stopping = False

    # -- the shared snapshot --------------------------------------------------------------------
    async def sample_forever(self) -> None:
        assert self.changed is not None
        while not self.stopping:
            started = time.monotonic()
            await run_in_threadpool(self.sampler.sample)
            async with self.changed:
                self.version += 1
                self.changed.notify_all()
            await asyncio.sleep(max(0.0, self.settings.interval - (time.monotonic() - started)))

    async def events(self, request: Request) -> Response:
        await self.principal(request)

        changed = self.changed
        assert changed is not None

        async def stream() -> AsyncIterator[str]:
            seen = -1
            while not self.stopping:
                async with changed:
                    if self.version == seen:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(changed.wait(), timeout=max(2 * self.settings.interval, 1))
                if self.version == seen:
                    yield ": keep-alive\n\n"
                    continue
                seen = self.version
                yield f"event: snapshot\ndata: {json.dumps(self.sampler.latest, default=str)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- who is asking ----------------------------------------------------------------------------
    def _login(self, request: Request) -> Optional[Login]:
        token = request.cookies.get(COOKIE)
        login = self.logins.get(token) if token else None
        if login is None:
            return None
        if time.monotonic() - login.last_used > self.settings.login_ttl:
            self.logins.pop(token or "", None)
            login.client.close()
            return None
        login.last_used = time.monotonic()
        return login

    async def principal(self, request: Request) -> Tuple[str, Client, Dict[str, Any]]:
        """(cache key, client, whoami) of whoever asks; ``Unauthenticated`` on a secured mesh without login."""
        if not self.secure:
            return "", self.client, {"name": "insecure", "role": "admin", "kind": "insecure"}
        login = self._login(request)
        if login is None:
            raise Unauthenticated("log in with your zeromesh user on this page first")
        return request.cookies[COOKIE], login.client, login.who

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.render("login", next_=request.query_params.get("next", "/"))
        # an urlencoded form, parsed here (Starlette's form parser would need python-multipart)
        form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        user, password = form.get("user", ""), form.get("password", "")
        target = form.get("next") or "/"
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        client = Client(self.settings.manager, manager_key=self.manager_key, auth=PasswordAuth(user, password))
        try:
            who = await run_in_threadpool(client.whoami)
        except MeshError as exc:
            client.close()
            return self.render("login", next_=target, error=f"{exc.code}: {exc}", status=401)
        while len(self.logins) >= MAX_LOGINS:
            oldest = min(self.logins, key=lambda t: self.logins[t].last_used)
            self.logins.pop(oldest).client.close()
        token = secrets.token_urlsafe(32)
        self.logins[token] = Login(client, who, time.monotonic())
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=int(self.settings.login_ttl))
        return response

    async def logout(self, request: Request) -> Response:
        login = self.logins.pop(request.cookies.get(COOKIE, ""), None)
        if login is not None:
            login.client.close()
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # -- pages ------------------------------------------------------------------------------------
    def render(self, view: str, id_: str = "", who: Optional[Dict[str, Any]] = None, next_: str = "/",
               error: str = "", status: int = 200) -> HTMLResponse:
        with open(os.path.join(HERE, "templates", "page.html")) as f:
            page = f.read()
        user = f"{who.get('name')} ({who.get('role')})" if who else ""
        values = {"view": view, "id": id_, "user": user, "role": (who or {}).get("role", ""), "next": next_,
                  "error": error, "secure": "yes" if self.secure else "no"}
        for k, v in values.items():
            page = page.replace("{{" + k + "}}", html.escape(str(v), quote=True))
        return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

    async def page(self, request: Request) -> Response:
        path = request.url.path
        view, id_ = PAGES.get(path) or ONE[path.split("/")[1]], request.path_params.get("id", "")
        try:
            _, _, who = await self.principal(request)
        except Unauthenticated:
            return RedirectResponse(f"/login?next={path}", status_code=303)
        return self.render(view, id_, who)

    # -- the JSON API -----------------------------------------------------------------------------
    async def api(self, request: Request) -> Response:
        try:
            return _json(await self._api(request))
        except MeshError as exc:
            status, body = error_body(exc)
            headers = {"Retry-After": "1"} if status == 429 else None
            return JSONResponse(body, status_code=status, headers=headers)

    async def _api(self, request: Request) -> Any:
        key, client, who = await self.principal(request)
        name = request.scope["route"].name
        qp = request.query_params
        params = {k: v for k, v in qp.items() if k != "filter"}
        filters = qp.getlist("filter")
        if name == "whoami":
            return {**who, "secure": self.secure}
        if name == "overview":
            return self.sampler.latest
        if name == "drain":
            if request.headers.get("x-zmesh-dashboard") != "1":   # a cross-site form cannot set it
                raise InvalidArgument("a drain needs the X-Zmesh-Dashboard: 1 header")
            ex = request.path_params["id"]
            await run_in_threadpool(client.drain_executor, ex)
            return {"drained": ex}
        if name == "task":
            try:
                tid = int(request.path_params["id"])
            except ValueError:
                raise InvalidArgument(f"a task id is an integer, got {request.path_params['id']!r}") from None
            task = await self.reads.get((key, "task", tid), lambda: client.get_task(tid))
            if task is None:
                raise NotFound(f"no task {tid}")
            return dataclasses.asdict(task)
        if name == "session":
            sid = request.path_params["id"]
            info = await self.reads.get((key, "session", sid), lambda: client.get_session(sid))
            if info is None:
                raise NotFound(f"no session {sid!r}")
            flt, page, sort = parse_find(filters, params, "id")
            tasks = await self.reads.get((key, "tasks", sid, str(flt), str(page), str(sort)),
                                         lambda: client.find_tasks(sid, flt, page, sort))
            ctx = await self.reads.get((key, "context", sid),
                                       lambda: context_view(client.conn.call("get_context", {"id": sid}), unpack))
            return {"session": dataclasses.asdict(info), "context": ctx, "tasks": _page_json(tasks, page)}
        if name == "flow":
            return await self._flow_run(key, client, request.path_params["id"])
        finders: Dict[str, Tuple[Callable[..., Any], str]] = {
            "executors": (client.find_executors, "id"), "sessions": (client.find_sessions, "-created_at"),
            "applications": (client.find_applications, "name"), "flows": (client.find_flow_runs, "-created_at"),
            "functions": (Functions(connection=client.conn).list, "type")}
        find, default_sort = finders[name]
        flt, page, sort = parse_find(filters, params, default_sort)
        found = await self.reads.get((key, name, str(flt), str(page), str(sort)), lambda: find(flt, page, sort))
        if name in ("flows", "functions"):   # rows that are dicts already
            return {"items": list(found), "total": found.total, **page}
        return _page_json(found, page)

    async def _flow_run(self, key: str, client: Client, rid: str) -> Dict[str, Any]:
        """One run and its task graph: the dependencies come from its flows' registered (newest) versions."""
        run = await self.reads.get((key, "flow", rid), lambda: client.get_flow_run(rid))
        if run is None:
            raise NotFound(f"no flow run {rid!r}")
        flows: Dict[str, Any] = {}
        for flow in run.get("flows") or sorted({t.split("/", 1)[0] for t in run.get("tasks") or {}}):
            try:
                flows[flow] = await self.reads.get((key, "flow-def", flow), functools.partial(client.get_flow, flow))
            except NotFound:
                flows[flow] = None
        tasks = task_graph(run, flows)
        header = {k: v for k, v in run.items() if k != "tasks"}
        return {"run": header, "tasks": tasks, "levels": 1 + max((t["level"] for t in tasks), default=-1)}

    async def api_not_found(self, request: Request) -> Response:
        status, body = error_body(NotFound(f"no API endpoint {request.url.path}"))
        return JSONResponse(body, status_code=status)

    def close(self) -> None:
        self.stopping = True
        for login in self.logins.values():
            login.client.close()
        self.logins.clear()
        self.client.close()


def create_app(settings: Settings, client: Optional[Client] = None) -> Starlette:
    """The Starlette application; its lifespan runs the sampler and closes every connection."""
    dash = Dashboard(settings, client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dash.changed = asyncio.Condition()
        task = asyncio.get_running_loop().create_task(dash.sample_forever())
        try:
            yield
        finally:
            dash.stopping = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MeshError):
                await task
            await run_in_threadpool(dash.close)

    api = dash.api
    routes = [Route(p, dash.page) for p in PAGES] + [
        Route("/sessions/{id}", dash.page),
        Route("/flows/{id}", dash.page),
        Route("/login", dash.login, methods=["GET", "POST"]),
        Route("/logout", dash.logout, methods=["POST"]),
        Route("/api/events", dash.events),
        Route("/api/whoami", api, name="whoami"),
        Route("/api/overview", api, name="overview"),
        Route("/api/executors", api, name="executors"),
        Route("/api/executors/{id}/drain", api, methods=["POST"], name="drain"),
        Route("/api/applications", api, name="applications"),
        Route("/api/sessions", api, name="sessions"),
        Route("/api/sessions/{id}", api, name="session"),
        Route("/api/tasks/{id}", api, name="task"),
        Route("/api/functions", api, name="functions"),
        Route("/api/flows", api, name="flows"),
        Route("/api/flows/{id}", api, name="flow"),
        Route("/api/{rest:path}", dash.api_not_found),
        Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = dash
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8265,
          ready: Optional[Callable[[str], None]] = None) -> None:
    """Run the dashboard in the foreground until SIGINT/SIGTERM; ``ready(url)`` once it listens."""
    import uvicorn
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                            lifespan="on")
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and ready is not None:
            sockets = [s for srv in getattr(server, "servers", []) for s in srv.sockets]
            bound = sockets[0].getsockname()[1] if sockets else port
            ready(f"http://{host if ':' not in host else f'[{host}]'}:{bound}/")
        await task

    asyncio.run(main())

"""The dashboard on a real mesh: its JSON API over HTTP, and its pages in a real headless browser.

The browser is Debian's chromium driven by Selenium through Debian's chromedriver (both installed by
.ci/run; nothing is downloaded at run time).  Every wait is bounded and waits on a page element or an
HTTP answer; every process started here is ended by its PID.  The screenshots land in docs/img/.
"""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
from conftest import FAST, ROOT, tools_spec, wait_until

from client import Client, Functions, Session
from client.dashboard.query import CONTEXT_SHOWN, context_view, parse_filter, parse_find, task_graph
from client.flows import Flow
from test_flows import failing_flow
from client.dashboard.sampler import parse_metrics, quantile
from client.local import LocalMesh, end_process
from mesh import errors
from mesh.wire.protocol import pack, unpack

IMG = os.path.join(ROOT, "docs", "img")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 30.0


# -- pure parts ----------------------------------------------------------------------------------------
def test_filters_in_a_url_become_find_filters():
    # Given query strings as the sessions page writes them, when parsed, then they are the find API's
    assert parse_filter(["state=open", "created_at>=17", "application~ech", "state!=closed"]) == {
        "state": ["!", "closed"], "created_at": [">=", 17], "application": ["~", "ech"]}
    flt, page, sort = parse_find([], {"limit": "5", "offset": "10", "sort": "-created_at"})
    assert page == {"limit": 5, "offset": 10} and sort == {"by": "created_at", "order": "descending"}
    for bad in (["nonsense"], ["=x"]):
        with pytest.raises(errors.InvalidArgument):
            parse_filter(bad)
    for params in ({"limit": "0"}, {"limit": "x"}, {"offset": "-1"}):
        with pytest.raises(errors.InvalidArgument):
            parse_find([], params)


def test_latency_quantiles_come_from_histogram_deltas():
    text = ('zeromesh_task_latency_seconds_bucket{le="0.01"} %d\nzeromesh_task_latency_seconds_bucket{le="0.1"} %d\n'
            'zeromesh_task_latency_seconds_bucket{le="+Inf"} %d\n# HELP x\n')
    before = [(float(s[1]["le"]), s[2]) for s in parse_metrics(text % (100, 100, 100))]
    after = [(float(s[1]["le"]), s[2]) for s in parse_metrics(text % (110, 200, 201))]
    # 101 new observations: 10 under 10 ms, 90 under 100 ms, one beyond: p50 is 0.1, p99 too
    assert quantile(before, after, 0.5) == 0.1 and quantile(before, after, 0.05) == 0.01
    assert quantile(before, after, 1.0) == 0.1 and not math.isinf(quantile(before, after, 1.0))
    assert quantile(after, after, 0.5) is None      # nothing observed in between


def test_a_runs_task_graph_has_levels_and_full_names():
    # Given a run of flows a (x -> y, z) and b (w needs a/y), when drawn, then each task sits one level
    # past the deepest task it needs, named flow/task, and the result keys are left out
    run = {"tasks": {"a/x": {"state": "succeeded", "started_at": 1.0, "ended_at": 3.5, "result": "secret-key"},
                     "a/y": {"state": "failed", "error": {"message": "no"}}, "a/z": {"state": "skipped"},
                     "b/w": {"state": "skipped"}}}
    flows = {"a": {"tasks": [{"name": "x", "needs": []}, {"name": "y", "needs": ["x"]}, {"name": "z", "needs": ["x"]}]},
             "b": {"tasks": [{"name": "w", "needs": ["a/y"]}]}}
    rows = task_graph(run, flows)
    assert [(r["name"], r["level"], r["needs"]) for r in rows] == [
        ("a/x", 0, []), ("a/y", 1, ["a/x"]), ("a/z", 1, ["a/x"]), ("b/w", 2, ["a/y"])]
    assert rows[0]["duration"] == 2.5 and "result" not in rows[0] and rows[1]["error"] == {"message": "no"}
    assert [r["level"] for r in task_graph(run, {"a": None, "b": None})] == [0, 0, 0, 0]   # flows unknown


def test_a_context_is_shown_when_it_is_a_small_document_and_never_unpickled():
    small = context_view({"kind": "doc", "version": 3, "data": pack({"k": [1, 2]})}, unpack)
    assert small == {"kind": "doc", "version": 3, "size": len(pack({"k": [1, 2]})), "limit": CONTEXT_SHOWN,
                     "shown": True, "document": {"k": [1, 2]}}
    big = context_view({"kind": "doc", "version": 1, "data": pack("x" * CONTEXT_SHOWN)}, unpack)
    assert not big["shown"] and big["document"] is None and big["size"] > CONTEXT_SHOWN

    def refuse(data: bytes) -> Any:
        raise AssertionError("a blob was decoded")
    blob = context_view({"kind": "blob", "version": 2, "data": b"\x80\x04pickle"}, refuse)
    assert blob["kind"] == "blob" and blob["size"] == 8 and not blob["shown"] and blob["document"] is None


# -- a dashboard process -------------------------------------------------------------------------------
def start_dashboard(mesh: LocalMesh, env: Optional[Dict[str, str]] = None,
                    interval: float = 0.5) -> Tuple[subprocess.Popen, str]:
    """``zmesh dashboard --port 0`` against ``mesh``; returns the process and the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "dashboard", "--manager", mesh.endpoint,
                             "--port", "0", "--interval", str(interval)],
                            env={**mesh.env, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.monotonic() + WAIT, []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("zeromesh dashboard: http://"):
            assert "bound to 127.0.0.1: this machine only" in line
            return proc, line.split()[2].rstrip("/")
    end_process(proc)
    raise AssertionError("the dashboard printed no address: " + "".join(seen))


def get(url: str, cookie: str = "", method: str = "GET", data: Optional[bytes] = None) -> Tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=data,
                                 headers={"Cookie": cookie, "X-Zmesh-Dashboard": "1"} if cookie else
                                 {"X-Zmesh-Dashboard": "1"})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def dash(tmp_path_factory) -> Iterator[Any]:
    """An insecure mesh (one executor, four slots, tools registered) and a dashboard reading it."""
    m = LocalMesh(executors=1, slots=4, env=FAST, log_dir=str(tmp_path_factory.mktemp("dash")))
    with m:
        with m.client() as c:
            c.register_application(tools_spec())
        proc, url = start_dashboard(m)
        try:
            m.url = url
            yield m
        finally:
            end_process(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path) and not os.environ.get("CI"):
            pytest.skip(f"needs Debian's {package} package ({path}); .ci/run installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: Any, check: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(check, message=what)


def text_of(driver: Any, css: str) -> str:
    """The text of the first match, "" when there is none (or it was just re-rendered: the next poll reads it)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def click(driver: Any, css: str, what: str) -> None:
    """Click the first match once it is there; a live page re-renders, so a stale element is found again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def done(d: Any) -> bool:
        try:
            found = d.find_elements(By.CSS_SELECTOR, css)
            if found:
                found[0].click()
                return True
        except StaleElementReferenceException:
            pass
        return False
    until(driver, done, what)


def shot(driver: Any, name: str) -> None:
    os.makedirs(IMG, exist_ok=True)
    driver.save_screenshot(os.path.join(IMG, name))


# -- the JSON API --------------------------------------------------------------------------------------
def test_api_filters_sorts_pages_and_types_its_errors(dash):
    sessions = [Session("tools", manager=dash.endpoint) for _ in range(6)]
    try:
        for s in sessions[:2]:
            s.close()
        status, page = get(dash.url + "/api/sessions?filter=state=closed&limit=10")
        assert status == 200 and page["total"] >= 2 and all(s["state"] == "closed" for s in page["items"])
        status, page = get(dash.url + "/api/sessions?filter=state=open&limit=2&offset=1&sort=-created_at")
        stamps = [s["created_at"] for s in page["items"]]
        assert status == 200 and len(stamps) == 2 and page["total"] >= 4 and stamps == sorted(stamps, reverse=True)
        status, body = get(dash.url + "/api/sessions?filter=colour=blue")
        assert status == 400 and body["error"]["code"] == "invalid_argument" and "colour" in body["error"]["message"]
        status, body = get(dash.url + "/api/sessions?limit=-1")
        assert status == 400 and body["error"]["code"] == "invalid_argument"
        status, body = get(dash.url + "/api/sessions/no-such-session")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = get(dash.url + "/api/tasks/abc")
        assert status == 400 and body["error"]["code"] == "invalid_argument"
        status, body = get(dash.url + "/api/nothing-here")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, page = get(dash.url + "/api/executors?filter=id~exec&sort=-id")
        assert status == 200 and page["total"] == 1 and page["items"][0]["id"] == "exec-0"
        status, page = get(dash.url + "/api/applications?filter=name=tools")
        assert status == 200 and [a["name"] for a in page["items"]] == ["tools"]
    finally:
        for s in sessions[2:]:
            s.close()


FN_SPEC = {"metadata": {"name": "fn-counter"},
           "spec": {"command": sys.executable, "arguments": ["fn_counter.py"],
                    "working_directory": os.path.join(ROOT, "tests", "apps")}}


@pytest.fixture(scope="module")
def served(dash) -> Dict[str, Any]:
    """On ``dash``: the counter function app after it served one message, and a flow run that failed
    (first -> explode -> after; explode raises)."""
    from fn_counter import Tick   # tests/apps is on the path (conftest)
    with Client(dash.endpoint) as c:
        c.register_application(FN_SPEC)
        with Functions(dash.endpoint) as fn:
            assert fn.call("test/count", "ann", Tick("m1"), timeout=WAIT * 2) == 1
        f = failing_flow("dash-failing", c)
        with pytest.raises(errors.TaskFailed):
            f.run_and_return({"x": 1}, timeout=WAIT * 2)
        [run] = c.find_flow_runs(filter={"flows": "dash-failing"})
    return {"run": run["id"]}


def test_api_functions_and_flow_runs_filter_sort_page_and_type_their_errors(dash, served):
    status, page = get(dash.url + "/api/functions?filter=type~test/&sort=-type&limit=2")
    types = [f["type"] for f in page["items"]]
    assert status == 200 and page["total"] >= 3 and types == sorted(types, reverse=True) and len(types) == 2
    status, page = get(dash.url + "/api/functions?filter=type=test/count")
    [row] = page["items"]
    assert row["application"] == "fn-counter" and row["addresses"] >= 1 and row["instances"] >= 1, row
    status, page = get(dash.url + "/api/functions?limit=1&offset=1&sort=type")
    assert status == 200 and len(page["items"]) == 1 and page["offset"] == 1
    status, body = get(dash.url + "/api/functions?filter=colour=blue")
    assert status == 400 and body["error"]["code"] == "invalid_argument"

    status, page = get(dash.url + "/api/flows?filter=state=failed&filter=flows~dash-failing&sort=-created_at")
    assert status == 200 and [r["id"] for r in page["items"]] == [served["run"]] and page["total"] == 1
    status, page = get(dash.url + "/api/flows?limit=1&offset=5")
    assert status == 200 and page["items"] == [] and page["total"] >= 1
    status, body = get(dash.url + "/api/flows?sort=colour")
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    status, body = get(dash.url + "/api/flows?limit=5000")
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    status, body = get(dash.url + "/api/flows/no-such-run")
    assert status == 404 and body["error"]["code"] == "not_found"

    status, d = get(dash.url + f"/api/flows/{served['run']}")
    assert status == 200 and d["run"]["state"] == "failed" and d["levels"] == 3
    tasks = {t["name"]: t for t in d["tasks"]}
    assert [t["name"] for t in d["tasks"]] == ["dash-failing/first", "dash-failing/explode", "dash-failing/after"]
    assert tasks["dash-failing/explode"]["needs"] == ["dash-failing/first"]
    assert [tasks[n]["state"] for n in tasks] == ["succeeded", "failed", "skipped"]
    assert tasks["dash-failing/first"]["duration"] is not None and "result" not in tasks["dash-failing/first"]
    err = tasks["dash-failing/explode"]["error"]
    assert "cannot use 2" in err["message"] and err["details"]["type"] == "ValueError"


def test_api_session_has_its_context(dash):
    with Session("tools", manager=dash.endpoint, ctx={"model": "m-7", "weights": [1, 2, 3]}) as s:
        status, d = get(dash.url + f"/api/sessions/{s.id()}")
        c = d["context"]
        assert status == 200 and c["kind"] == "doc" and c["shown"] and c["document"] == {"model": "m-7", "weights": [1, 2, 3]}
        s.update_context({"big": "x" * (CONTEXT_SHOWN + 1)})
        wait_until(lambda: get(dash.url + f"/api/sessions/{s.id()}")[1]["context"]["version"] > c["version"], WAIT,
                   what="the new context version")
        big = get(dash.url + f"/api/sessions/{s.id()}")[1]["context"]
        assert not big["shown"] and big["document"] is None and big["size"] > CONTEXT_SHOWN


def test_api_drain_without_the_page_header_is_refused(dash):
    req = urllib.request.Request(dash.url + "/api/executors/exec-0/drain", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=WAIT)
    assert info.value.code == 400 and json.loads(info.value.read())["error"]["code"] == "invalid_argument"


def test_snapshots_are_pushed_over_sse(dash):
    with urllib.request.urlopen(dash.url + "/api/events", timeout=WAIT) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        stamps = []
        for raw in r:
            line = raw.decode()
            if line.startswith("data: "):
                snap = json.loads(line[6:])
                assert snap["error"] is None and snap["counters"]["executors"] == 1
                stamps.append(snap["at"])
                if len(stamps) == 3:
                    break
    assert stamps == sorted(stamps) and stamps[2] - stamps[0] < 2.5   # at least one a second (interval 0.5)


# -- the pages in a browser ----------------------------------------------------------------------------
def test_overview_appears_and_its_counters_move_while_tasks_run(dash, browser):
    browser.get(dash.url + "/")
    until(browser, lambda d: text_of(d, "#c-executors") == "1", "the overview shows one executor")
    before = float(text_of(browser, "#c-succeeded"))
    with Session("tools", manager=dash.endpoint) as s:
        futures = [s.submit(("sleep", 0.02)) for _ in range(200)]
        until(browser, lambda d: 0 < float(text_of(d, "#c-succeeded") or 0) - before < 200,
              "the succeeded counter moves while tasks still run")
        for f in futures:
            f.result(WAIT)
        until(browser, lambda d: float(text_of(d, "#c-succeeded")) - before >= 200, "every task counted")
    until(browser, lambda d: "tasks/s" in text_of(d, "#latency-now"), "the rates line")
    shot(browser, "dashboard-overview.png")


def test_a_failed_tasks_traceback_is_two_clicks_from_the_sessions_page(dash, browser):
    from selenium.webdriver.common.by import By
    with Session("tools", manager=dash.endpoint) as s:
        s.submit(("echo", 1)).result(WAIT)
        with pytest.raises(errors.TaskFailed):
            s.submit(("raise", 7)).result(WAIT)
        browser.get(dash.url + f"/sessions?filter=id={s.id()}")
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "a.session-link"), "the session's row")
        shot(browser, "dashboard-sessions.png")
        click(browser, "a.session-link", "the session's row")                    # click 1
        click(browser, "button.traceback", "the failed task")                    # click 2
        until(browser, lambda d: "ValueError: bad value 7" in text_of(d, "pre.traceback-text"),
              "the remote traceback")
        assert "tools_service.py" in text_of(browser, "pre.traceback-text")
        shot(browser, "dashboard-session.png")


def test_executors_and_applications_pages(dash, browser):
    from selenium.webdriver.common.by import By
    browser.get(dash.url + "/applications")
    until(browser, lambda d: "tools" in text_of(d, "#applications"), "the registry")
    shot(browser, "dashboard-applications.png")
    browser.get(dash.url + "/executors")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-executor="exec-0"]'), "the executor row")
    assert "/4" in text_of(browser, "#executors")
    shot(browser, "dashboard-executors.png")


def test_functions_flows_and_a_sessions_context_in_the_browser(dash, served, browser):
    from selenium.webdriver.common.by import By
    browser.get(dash.url + "/functions")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-type="test/count"]'), "the function type's row")
    assert "fn-counter" in text_of(browser, 'tr[data-type="test/count"]')
    shot(browser, "dashboard-functions.png")

    browser.get(dash.url + "/flows?filter=flows~dash-failing")
    until(browser, lambda d: "failed" in text_of(d, "#flows tbody"), "the failed run's row")
    shot(browser, "dashboard-flows.png")
    click(browser, "a.run-link", "the run")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#graph g.node"), "the task graph")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph g.node")) == 3
    assert "cannot use 2" in text_of(browser, "#run-error")
    click(browser, "button.traceback", "the failed task's error")
    until(browser, lambda d: "in explode" in text_of(d, "pre.traceback-text"), "the failed task's traceback")
    shot(browser, "dashboard-flow-run.png")

    with Session("tools", manager=dash.endpoint, ctx={"model": "m-7", "weights": [1, 2, 3]}) as s:
        browser.get(dash.url + f"/sessions/{s.id()}")
        until(browser, lambda d: '"model": "m-7"' in text_of(d, "#context-doc"), "the context, pretty-printed")
        assert text_of(browser, "#context-kind") == "doc" and text_of(browser, "#context-version") == "0"
        shot(browser, "dashboard-session-context.png")


# -- a secured mesh: logins and roles ------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure_dash(tmp_path_factory) -> Iterator[Any]:
    """A secured mesh with a viewer ``vic``; the dashboard reads as a viewer robot."""
    m = LocalMesh(executors=2, slots=1, env=FAST, secure=True, log_dir=str(tmp_path_factory.mktemp("sdash")))
    with m:
        with m.client() as c:
            c.add_user("vic", "viewer", "vic-pw")
            robot = c.create_robot("dashboard", "viewer")
        proc, url = start_dashboard(m, {"ZMESH_MANAGER_KEY": str(m.manager_key), "ZMESH_ROBOT_ID": robot["id"],
                                        "ZMESH_ROBOT_SECRET": robot["secret"]})
        try:
            m.url = url
            yield m
        finally:
            end_process(proc)


def log_in(driver: Any, url: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    driver.delete_all_cookies()
    driver.get(url + "/login?next=/executors")
    until(driver, lambda d: d.find_elements(By.ID, "login-user"), "the login form")
    driver.find_element(By.ID, "login-user").send_keys(user)
    driver.find_element(By.ID, "login-password").send_keys(password)
    driver.find_element(By.ID, "login-submit").click()
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "button.drain"), "the executors page after login")


def test_secured_mesh_needs_a_login_and_only_an_admin_drains(secure_dash, browser):
    from selenium.webdriver.common.by import By
    url = secure_dash.url
    status, body = get(url + "/api/executors")
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    browser.delete_all_cookies()
    browser.get(url + "/sessions")
    until(browser, lambda d: "/login" in d.current_url, "a page without login goes to the login form")
    browser.find_element(By.ID, "login-user").send_keys("vic")
    browser.find_element(By.ID, "login-password").send_keys("wrong")
    browser.find_element(By.ID, "login-submit").click()
    until(browser, lambda d: "unauthenticated" in text_of(d, "#login-error"), "a wrong password is refused")
    shot(browser, "dashboard-login.png")

    # a viewer sees the executors and is refused a drain
    log_in(browser, url, "vic", "vic-pw")
    assert "vic (viewer)" in text_of(browser, "#user")
    click(browser, 'button.drain[data-executor="exec-0"]', "drain as a viewer")
    until(browser, lambda d: "permission_denied" in text_of(d, "#banner"), "the viewer's drain is refused")
    with secure_dash.client() as c:
        assert c.get_executor("exec-0").state == "alive"

    # an admin drains from the page
    assert secure_dash.admin is not None
    log_in(browser, url, secure_dash.admin.user, secure_dash.admin._password)
    click(browser, 'button.drain[data-executor="exec-0"]', "drain as admin")
    until(browser, lambda d: "drained exec-0" in text_of(d, "#banner"), "the admin's drain is done")
    with secure_dash.client() as c:
        wait_until(lambda: c.get_executor("exec-0") is None or c.get_executor("exec-0").state != "alive",
                   WAIT, what="exec-0 leaves the alive state")
    until(browser, lambda d: "exec-1" in text_of(d, "#executors"), "the page goes on")
    shot(browser, "dashboard-drain.png")


def http_login(url: str, user: str, password: str) -> str:
    """POST the login form (the 303 not followed); the cookie it sets."""
    import http.client
    import urllib.parse
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=WAIT)
    try:
        conn.request("POST", "/login", urllib.parse.urlencode({"user": user, "password": password, "next": "/"}),
                     {"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 303, (r.status, r.read())
        return (r.getheader("Set-Cookie") or "").split(";")[0]
    finally:
        conn.close()


def test_flow_runs_and_contexts_are_read_as_the_logged_in_user(secure_dash):
    # Given ann's scheduled run and ann's session, when bob (a user) asks, then he sees neither;
    # a viewer reads both; the function types are readable by any login
    from client.auth import PasswordAuth
    url = secure_dash.url
    with secure_dash.client() as c:
        for name, role in (("ann", "user"), ("bob", "user")):
            c.add_user(name, role, f"{name}-pw")
        c.register_application(tools_spec(), replace=True)
    with Client(secure_dash.endpoint, manager_key=secure_dash.manager_key, auth=PasswordAuth("ann", "ann-pw")) as ann:
        f = Flow("anns-later", client=ann)

        @f.task
        def noop() -> int:
            return 1

        with f:
            noop()
        run = f.run(scheduled_start_time=time.time() + 3600)
        with Session("tools", manager=secure_dash.endpoint, manager_key=secure_dash.manager_key,
                     auth=PasswordAuth("ann", "ann-pw"), ctx={"owner": "ann"}) as s:
            ann_cookie, bob_cookie, vic_cookie = (http_login(url, u, f"{u}-pw") for u in ("ann", "bob", "vic"))
            status, page = get(url + "/api/flows?filter=name~anns-later", ann_cookie)
            assert status == 200 and [r["id"] for r in page["items"]] == [run.id]
            status, page = get(url + "/api/flows?filter=name~anns-later", bob_cookie)
            assert status == 200 and page["total"] == 0
            status, body = get(url + f"/api/flows/{run.id}", bob_cookie)
            assert status == 404 and body["error"]["code"] == "not_found"
            status, d = get(url + f"/api/flows/{run.id}", vic_cookie)
            assert status == 200 and d["run"]["state"] == "scheduled" and [t["name"] for t in d["tasks"]] == ["anns-later/noop"]
            status, body = get(url + f"/api/sessions/{s.id()}", bob_cookie)
            assert status in (403, 404), body
            status, d = get(url + f"/api/sessions/{s.id()}", vic_cookie)
            assert status == 200 and d["context"]["document"] == {"owner": "ann"}
            status, page = get(url + "/api/functions", bob_cookie)
            assert status == 200 and page["items"] == []
        ann.cancel_flow_run(run.id)


def test_browsers_do_not_multiply_the_managers_load(dash):
    # Given one dashboard, when ten event streams are open for a few snapshots, then the manager's
    # request counter grows by the sampler's five calls per snapshot, not by ten times that
    with dash.client() as c:
        start = c.stats()["requests"]
        t0 = time.monotonic()
        streams = [urllib.request.urlopen(dash.url + "/api/events", timeout=WAIT) for _ in range(10)]
        try:
            for r in streams:
                seen = 0
                for raw in r:
                    if raw.startswith(b"data: "):
                        seen += 1
                        if seen == 3:
                            break
        finally:
            for r in streams:
                r.close()
        elapsed = time.monotonic() - t0
        grew = c.stats()["requests"] - start - 2
    snapshots = elapsed / 0.5 + 2
    assert grew <= 5 * snapshots + 5, (grew, elapsed)


def test_the_command_says_what_it_needs_without_its_extra(tmp_path):
    # the CLI without starlette installed: a one-line error, exit code of failed_precondition
    shadow = tmp_path / "starlette"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('starlette hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "client.cli", "dashboard", "--port", "0"], env=env,
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == errors.FailedPrecondition.exit_code, r.stderr
    assert r.stderr.strip().startswith("error: failed_precondition:") and "zeromesh[dashboard]" in r.stderr
    assert shutil.which(sys.executable)

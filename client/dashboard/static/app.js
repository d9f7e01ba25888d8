// zeromesh dashboard: renders the view named by <body data-view>, live from /api/events (SSE).
// No framework: the DOM API, uPlot for the charts (vendored beside this file, MIT).
"use strict";
(function () {
  const body = document.body, view = body.dataset.view, main = document.getElementById("main");
  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v === null || v === undefined ? "" : v).replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "-";
  const secs = (s) => s === null || s === undefined ? "-" : (s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s");
  const bytes = (n) => n >= 1 << 30 ? (n / (1 << 30)).toFixed(1) + " GiB" : n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : n >= 1 << 10 ? (n / (1 << 10)).toFixed(1) + " KiB" : n + " B";
  const labels = (o) => Object.entries(o || {}).map(([k, v]) => `<span class="label">${esc(k)}=${esc(v)}</span>`).join(" ");

  function banner(text) { const b = $("banner"); b.textContent = text; b.hidden = !text; }
  async function api(path, options) {
    const r = await fetch(path, Object.assign({credentials: "same-origin", headers: {"X-Zmesh-Dashboard": "1"}}, options || {}));
    const data = await r.json();
    if (!r.ok) throw Object.assign(new Error(data.error ? data.error.code + ": " + data.error.message : r.statusText), {status: r.status, data});
    return data;
  }

  if (view === "login") { $("nav-overview").parentElement.hidden = true; $("logout-form").hidden = true; return; }
  $("login").remove();
  if (body.dataset.secure !== "yes") $("logout-form").hidden = true;
  const nav = $("nav-" + ({session: "sessions", flow: "flows"}[view] || view)); if (nav) nav.classList.add("here");

  // -- overview -------------------------------------------------------------------------------------
  const COUNTERS = [["executors", "executors"], ["instances", "instances"], ["sessions_open", "sessions open"],
    ["queued", "tasks queued"], ["running", "tasks running"], ["succeeded", "tasks succeeded"], ["failed", "tasks failed"]];
  let rateChart = null, latChart = null;
  function chart(el, title, series) {
    return new uPlot({title, width: Math.min(560, el.clientWidth || 560), height: 220,
      series: [{}].concat(series), axes: [{}, {size: 60}]}, [[], ...series.map(() => [])], el);
  }
  function overviewInit() {
    main.innerHTML = `<section id="overview"><div class="cards">${COUNTERS.map(([k, t]) =>
      `<div class="card"><div class="n" id="c-${k}">-</div><div>${t}</div></div>`).join("")}</div>
      <div class="charts"><div id="rate-chart"></div><div id="lat-chart"></div></div>
      <p id="latency-now"></p></section>`;
    rateChart = chart($("rate-chart"), "tasks per second", [{label: "tasks/s", stroke: "#2a6"}]);
    latChart = chart($("lat-chart"), "latency (submit to answer), s", [{label: "p50", stroke: "#26c"}, {label: "p99", stroke: "#c42"}]);
  }
  function overview(s) {
    for (const [k] of COUNTERS) $("c-" + k).textContent = s.counters[k] === undefined ? "-" : s.counters[k];
    const h = s.history || {};
    if (h.t) { rateChart.setData([h.t, h.rate]); latChart.setData([h.t, h.p50, h.p99]); }
    const l = s.latency || {};
    $("latency-now").textContent = `now: ${s.tasks_per_second} tasks/s; latency p50 ${secs(l.p50)}, p99 ${secs(l.p99)} over the last ${l.window_seconds || 0} s`;
  }

  // -- executors ------------------------------------------------------------------------------------
  function executors(s) {
    const rows = s.executors.map((e) => `<tr data-executor="${esc(e.id)}"><td>${esc(e.id)}</td>
      <td class="state state-${esc(e.state)}">${esc(e.state)}</td><td>${labels(e.labels)}</td>
      <td>${e.used_slots}/${e.slots}</td><td>${e.cpu_used ?? 0}/${e.cpu}</td>
      <td>${bytes(e.memory_used ?? 0)}/${bytes(e.memory)}</td><td>${e.gpu_used ?? 0}/${e.gpu}</td>
      <td class="instances">${(e.instance_list || []).map((i) => `<div>${esc(i.id)}: ${esc(i.application)}${
        i.session ? ` <a href="/sessions/${encodeURIComponent(i.session)}">${esc(i.session)}</a>` : ""}${
        i.busy ? " (busy)" : ""}</div>`).join("") || e.instances}</td><td>${esc(e.hostname)}</td><td>${when(e.last_seen)}</td>
      <td><button class="drain" data-executor="${esc(e.id)}" ${e.state === "alive" ? "" : "disabled"}>drain</button></td></tr>`);
    main.innerHTML = `<table id="executors"><thead><tr><th>name</th><th>state</th><th>labels</th><th>slots used/total</th>
      <th>CPU used/advertised</th><th>memory used/advertised</th><th>GPU used/advertised</th><th>instances</th><th>host</th><th>last seen</th><th></th></tr></thead>
      <tbody>${rows.join("")}</tbody></table>`;
  }
  main.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button.drain");
    if (!b) return;
    try { await api(`/api/executors/${encodeURIComponent(b.dataset.executor)}/drain`, {method: "POST"});
          banner(`drained ${b.dataset.executor}`); b.disabled = true; }
    catch (err) { banner(`drain refused: ${err.message}`); }
  });

  // -- applications ---------------------------------------------------------------------------------
  function applications(s) {
    const rows = s.applications.map((a) => `<tr><td>${esc(a.name)}</td><td>${esc(a.command)} ${esc((a.arguments || []).join(" "))}</td>
      <td>${labels(a.labels)}</td><td>${a.open_sessions}</td><td>${a.tasks_per_second}</td>
      <td><details><summary>spec</summary><pre>${esc(JSON.stringify(a.spec, null, 2))}</pre></details></td></tr>`);
    main.innerHTML = `<table id="applications"><thead><tr><th>name</th><th>command</th><th>labels</th><th>open sessions</th>
      <th>tasks/s</th><th></th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  // -- sessions -------------------------------------------------------------------------------------
  const qs = new URLSearchParams(location.search);
  // the find form of /sessions, /functions and /flows: filter, sort, page size, in the address bar
  function findInit(path, placeholder, sort, then) {
    main.innerHTML = `<form id="find"><label>filter <input name="filter" id="filter" placeholder="${esc(placeholder)}"
      value="${esc(qs.getAll("filter").join(", "))}"></label>
      <label>sort <input name="sort" id="sort" value="${esc(qs.get("sort") || sort)}"></label>
      <label>page size <input name="limit" id="limit" type="number" value="${esc(qs.get("limit") || 50)}"></label>
      <button>find</button></form><div id="result"></div>`;
    $("find").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const p = new URLSearchParams();
      $("filter").value.split(",").map((x) => x.trim()).filter(Boolean).forEach((f) => p.append("filter", f));
      p.set("sort", $("sort").value); p.set("limit", $("limit").value);
      history.replaceState(null, "", path + "?" + p); then();
    });
  }
  function pager(path, p, page) {
    const offset = page.offset, limit = page.limit, prev = new URLSearchParams(p), next = new URLSearchParams(p);
    prev.set("offset", Math.max(0, offset - limit)); next.set("offset", offset + limit);
    return `<p class="pager">${page.items.length ? offset + 1 : 0}–${offset + page.items.length} of <span id="total">${page.total}</span>
      ${offset > 0 ? `<a href="${path}?${prev}">previous</a>` : ""} ${offset + limit < page.total ? `<a href="${path}?${next}">next</a>` : ""}</p>`;
  }
  const sessionsInit = () => findInit("/sessions", "state=open, application~echo", "-created_at", sessions);
  async function sessions() {
    const p = new URLSearchParams(location.search);
    try {
      const page = await api("/api/sessions?" + p);
      const offset = page.offset, limit = page.limit;
      const rows = page.items.map((s) => `<tr><td><a class="session-link" href="/sessions/${encodeURIComponent(s.id)}">${esc(s.id)}</a></td>
        <td>${esc(s.application)}</td><td class="state state-${esc(s.state)}">${esc(s.state)}</td><td>${when(s.created_at)}</td>
        <td>${s.pending}</td><td>${s.running}</td><td>${s.succeeded}</td><td class="${s.failed ? "bad" : ""}">${s.failed}</td><td>${s.instances}</td></tr>`);
      const prev = new URLSearchParams(p), next = new URLSearchParams(p);
      prev.set("offset", Math.max(0, offset - limit)); next.set("offset", offset + limit);
      $("result").innerHTML = `<table id="sessions"><thead><tr><th>id</th><th>application</th><th>state</th><th>created</th>
        <th>queued</th><th>running</th><th>succeeded</th><th>failed</th><th>instances</th></tr></thead><tbody>${rows.join("")}</tbody></table>
        <p class="pager">${offset + 1}–${offset + page.items.length} of <span id="total">${page.total}</span>
        ${offset > 0 ? `<a href="/sessions?${prev}">previous</a>` : ""} ${offset + limit < page.total ? `<a href="/sessions?${next}">next</a>` : ""}</p>`;
      banner("");
    } catch (err) { banner(err.message); }
  }

  // -- one session ----------------------------------------------------------------------------------
  const open = new Set();
  async function session() {
    const id = body.dataset.id;
    try {
      const d = await api(`/api/sessions/${encodeURIComponent(id)}?` + new URLSearchParams(location.search));
      const s = d.session;
      const rows = d.tasks.items.map((t) => {
        const e = t.error || {}, det = e.details || {};
        const dur = t.finished_at ? secs(t.finished_at - t.created_at) : "-";
        const tb = t.state === "failed" ? `<button class="traceback" data-task="${t.id}">${esc(det.type || e.code || "error")}</button>` : "";
        const shown = open.has(String(t.id)) ? "" : "hidden";
        return `<tr data-task="${t.id}"><td>${t.id}</td><td class="state state-${esc(t.state)}">${esc(t.state)}</td><td>${t.attempts}</td>
          <td>${esc(t.instance || "")}</td><td>${when(t.created_at)}</td><td>${dur}</td><td>${tb}</td></tr>` +
          (t.state === "failed" ? `<tr class="tb" id="tb-${t.id}" ${shown}><td colspan="7"><b>${esc(det.type || "")}</b> ${esc(e.message)}
          <pre class="traceback-text">${esc(det.traceback || "")}</pre></td></tr>` : "");
      });
      main.innerHTML = `<h2 id="session-id">${esc(s.id)}</h2>
        <p>application <a href="/applications">${esc(s.application)}</a>, <span class="state state-${esc(s.state)}">${esc(s.state)}</span>,
        created ${when(s.created_at)}; tasks: ${s.pending} queued, ${s.running} running, ${s.succeeded} succeeded, ${s.failed} failed,
        ${s.cancelled} cancelled; ${s.instances} instances; ${bytes(s.bytes_in)} in</p>${contextView(d.context)}
        <table id="tasks"><thead><tr><th>task</th><th>state</th><th>attempts</th><th>instance</th><th>created</th><th>duration</th><th>error</th></tr></thead>
        <tbody>${rows.join("")}</tbody></table><p class="pager">${d.tasks.items.length} of ${d.tasks.total} tasks</p>`;
      banner("");
    } catch (err) { banner(err.message); }
  }
  function contextView(c) {
    if (!c) return "";
    const doc = c.shown ? `<pre id="context-doc">${esc(JSON.stringify(c.document, null, 2))}</pre>`
      : `<p class="note">${c.kind === "doc" ? `larger than ${bytes(c.limit)}: not shown` : "a pickle: not shown (the dashboard never unpickles)"}</p>`;
    return `<details id="context" ${contextOpen ? "open" : ""}><summary>context: <span id="context-kind">${esc(c.kind)}</span>,
      version <span id="context-version">${c.version}</span>, <span id="context-size">${bytes(c.size)}</span></summary>${doc}</details>`;
  }
  let contextOpen = true;
  main.addEventListener("toggle", (ev) => { if (ev.target.id === "context") contextOpen = ev.target.open; }, true);

  // -- functions ------------------------------------------------------------------------------------
  const functionsInit = () => findInit("/functions", "type~counter, queued>0", "type", functions);
  async function functions() {
    const p = new URLSearchParams(location.search);
    try {
      const page = await api("/api/functions?" + p);
      const rows = page.items.map((f) => `<tr data-type="${esc(f.type)}"><td>${esc(f.type)}</td><td>${f.application ?
        `<a href="/applications">${esc(f.application)}</a>` : "-"}</td><td>${f.instances}</td><td>${f.addresses}</td>
        <td class="${f.queued ? "busy" : ""}">${f.queued}</td></tr>`);
      $("result").innerHTML = `<table id="functions"><thead><tr><th>function type</th><th>application</th><th>instances</th>
        <th>addresses held</th><th>messages queued</th></tr></thead><tbody>${rows.join("")}</tbody></table>` + pager("/functions", p, page);
      banner("");
    } catch (err) { banner(err.message); }
  }

  // -- flow runs ------------------------------------------------------------------------------------
  const dur = (a, b) => a && b ? secs(b - a) : "-";
  const flowsInit = () => findInit("/flows", "state=failed, name~nightly, flows~simulate", "-created_at", flows);
  async function flows() {
    const p = new URLSearchParams(location.search);
    try {
      const page = await api("/api/flows?" + p);
      const rows = page.items.map((r) => `<tr><td><a class="run-link" href="/flows/${encodeURIComponent(r.id)}">${esc(r.id)}</a></td>
        <td>${esc(r.name)}</td><td>${esc(r.flows)}</td><td class="state state-${esc(r.state)}">${esc(r.state)}</td><td>${esc(r.owner)}</td>
        <td>${when(r.created_at)}</td><td>${when(r.started_at)}</td><td>${dur(r.started_at, r.ended_at)}</td><td>${esc(r.schedule || "")}</td></tr>`);
      $("result").innerHTML = `<table id="flows"><thead><tr><th>run</th><th>name</th><th>flows</th><th>state</th><th>owner</th>
        <th>created</th><th>started</th><th>duration</th><th>schedule</th></tr></thead><tbody>${rows.join("")}</tbody></table>` + pager("/flows", p, page);
      banner("");
    } catch (err) { banner(err.message); }
  }

  // -- one flow run: its task graph (an SVG of the levels, and a table by level) ---------------------
  const COLOURS = {succeeded: "#cfeccf", failed: "#f6c9c9", running: "#cfe0f6", skipped: "#e6e6e6", cancelled: "#eee0c8"};
  function graphSvg(tasks, levels) {
    const W = 190, H = 34, GX = 60, GY = 14, pos = {}, per = {};
    for (const t of tasks) { const i = per[t.level] = (per[t.level] || 0) + 1; pos[t.name] = [t.level * (W + GX), (i - 1) * (H + GY)]; }
    const height = Math.max(1, ...Object.values(per)) * (H + GY), width = Math.max(1, levels) * (W + GX) - GX;
    const lines = tasks.flatMap((t) => t.needs.filter((n) => pos[n]).map((n) =>
      `<line x1="${pos[n][0] + W}" y1="${pos[n][1] + H / 2}" x2="${pos[t.name][0]}" y2="${pos[t.name][1] + H / 2}" stroke="#889" marker-end="url(#arrow)"/>`));
    const boxes = tasks.map((t) => `<g class="node" data-task="${esc(t.name)}"><title>${esc(t.name)}: ${esc(t.state)}</title>
      <rect x="${pos[t.name][0]}" y="${pos[t.name][1]}" width="${W}" height="${H}" rx="5" fill="${COLOURS[t.state] || "#fff"}" stroke="#99a"/>
      <text x="${pos[t.name][0] + 8}" y="${pos[t.name][1] + 21}">${esc(t.name.length > 26 ? t.name.slice(0, 25) + "…" : t.name)}</text></g>`);
    return `<svg id="graph" width="${width + 12}" height="${height}" font-size="12"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5"
      markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#889"/></marker></defs>${lines.join("")}${boxes.join("")}</svg>`;
  }
  async function flow() {
    const id = body.dataset.id;
    try {
      const d = await api(`/api/flows/${encodeURIComponent(id)}`);
      const r = d.run;
      const rows = d.tasks.map((t) => {
        const e = t.error || {}, det = e.details || {}, key = "run:" + t.name;
        const failed = t.state === "failed";
        const tb = failed ? `<button class="traceback" data-task="${esc(key)}">${esc(det.type || e.code || "error")}</button>`
          : (e.message ? esc(e.message) : "");
        return `<tr data-task="${esc(t.name)}"><td>${t.level}</td><td>${esc(t.name)}</td><td>${t.needs.map(esc).join(", ") || "-"}</td>
          <td class="state state-${esc(t.state)}">${esc(t.state)}</td><td>${t.attempts || 0}</td><td>${esc(t.executor || "")}</td>
          <td>${when(t.started_at)}</td><td>${secs(t.duration)}</td><td>${tb}</td></tr>` +
          (failed ? `<tr class="tb" id="tb-${esc(key)}" ${open.has(key) ? "" : "hidden"}><td colspan="9"><b>${esc(det.type || e.code || "")}</b>
          <span class="error-message">${esc(e.message)}</span><pre class="traceback-text">${esc(det.traceback || "")}</pre></td></tr>` : "");
      });
      const err = r.error ? `; failed at <b>${esc(r.error.task)}</b>: <span id="run-error">${esc(r.error.message)}</span>` : "";
      main.innerHTML = `<h2 id="run-id">${esc(r.name || r.id)} <small>${esc(r.id)}</small></h2>
        <p>flows ${esc((r.flows || []).join(", "))}, <span class="state state-${esc(r.state)}" id="run-state">${esc(r.state)}</span>, owner ${esc(r.owner)},
        created ${when(r.created_at)}, started ${when(r.started_at)}, duration ${dur(r.started_at, r.ended_at)}${err}</p>
        <div class="graph">${graphSvg(d.tasks, d.levels)}</div>
        <table id="run-tasks"><thead><tr><th>level</th><th>task</th><th>needs</th><th>state</th><th>attempts</th><th>executor</th>
        <th>started</th><th>duration</th><th>error</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
      banner("");
    } catch (err) { banner(err.message); }
  }

  main.addEventListener("click", (ev) => {
    const b = ev.target.closest("button.traceback");
    if (!b) return;
    const row = $("tb-" + b.dataset.task); row.hidden = !row.hidden;
    if (row.hidden) open.delete(b.dataset.task); else open.add(b.dataset.task);
  });

  // -- live -----------------------------------------------------------------------------------------
  const render = {overview, executors, applications, sessions, session, functions, flows, flow}[view];
  if (view === "overview") overviewInit();
  if (view === "sessions") sessionsInit();
  if (view === "functions") functionsInit();
  if (view === "flows") flowsInit();
  let staleBanner = false;
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (ev) => {
    const s = JSON.parse(ev.data);
    $("live").textContent = "live " + when(s.at);
    // a snapshot's error stays shown until a good snapshot; what an action said stays until the next action
    if (s.error) { banner(`the manager did not answer: ${s.error.code}: ${s.error.message}`); staleBanner = true; }
    else if (staleBanner) { banner(""); staleBanner = false; }
    if (view === "executors" && document.activeElement && document.activeElement.closest("#executors")) return;
    render(s);
  });
  events.onerror = () => { $("live").textContent = "reconnecting…"; };
  if (["sessions", "session", "functions", "flows", "flow"].includes(view)) render();
})();

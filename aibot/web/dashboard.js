// aibot dashboard: live queue over the WebSocket (/ws), actions and panels over the JSON API.
// No build step, no dependencies. Chat text is user-controlled: it is only ever set as textContent.
//
// Test hook: loading the page with ?test_retry=<jobId> clicks that dead job's Retry button once the
// failed-jobs table has rendered (the same click path an operator uses), then records the outcome in
// <body data-test-retry="ok:<id>"> or "error:<message>" for a headless browser to read.
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");
const TEST_RETRY = params.get("test_retry");
const BANDS = ["critical", "high", "medium", "low", "background"];

const state = { items: new Map(), stats: {}, configVersion: null, ws: null, retryDelay: 500 };

function band(p) {
  if (p <= 10) return "critical";
  if (p <= 30) return "high";
  if (p <= 60) return "medium";
  if (p <= 90) return "low";
  return "background";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function $(id) { return document.getElementById(id); }

function fmtSeconds(s) {
  if (s === null || s === undefined || isNaN(s)) return "-";
  s = Math.max(0, s);
  if (s < 10) return s.toFixed(1) + "s";
  if (s < 60) return Math.round(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.round(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  return (n / 1e9).toFixed(1) + " GB";
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function api(path, method = "GET") {
  const headers = {};
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  const res = await fetch(path, { method, headers });
  let body = null;
  try { body = await res.json(); } catch (e) { body = { error: res.statusText }; }
  if (!res.ok) throw new Error(body && body.error ? body.error : res.status + " " + res.statusText);
  return body;
}

// --- actions (buttons and the test hook share these) ---------------------------------------------

async function retryJob(id) {
  try {
    await api(`/api/jobs/${id}/retry`, "POST");
    say(`job ${id} requeued`);
    await refreshFailed();
    return true;
  } catch (e) {
    say(`retry ${id}: ${e.message}`, true);
    throw e;
  }
}

async function cancelJob(id) {
  try {
    await api(`/api/jobs/${id}/cancel`, "POST");
    say(`job ${id} cancelled`);
    state.items.delete(id);
    renderQueue();
  } catch (e) {
    say(`cancel ${id}: ${e.message}`, true);
  }
}

async function clearAll() {
  if (!confirm("Cancel every queued job? Running jobs will finish.")) return;
  try {
    const r = await api("/queue-clear", "POST");
    say(`${r.cleared} queued job(s) cancelled`);
  } catch (e) {
    say(`clear: ${e.message}`, true);
  }
}

// --- rendering -------------------------------------------------------------------------------------

function renderStats() {
  const s = state.stats || {};
  const set = (id, v) => { $(id).textContent = v === undefined || v === null ? "-" : v; };
  set("st-total", s.totalItems);
  set("st-unclaimed", s.unclaimedItems);
  set("st-claimed", s.claimedItems);
  set("st-throughput", s.throughput);
  set("st-hour", s.throughputHour !== undefined ? Number(s.throughputHour).toFixed(2) : "-");
  set("st-last", s.lastSuccess ? fmtSeconds((Date.now() - s.lastSuccess) / 1000) + " ago" : "never");
  set("st-wait", fmtSeconds((s.averageWaitTime || 0) / 1000));
  set("st-avgwait", fmtSeconds((s.avgWait || 0) / 1000));
  set("st-oldest", fmtSeconds((s.oldestItemAge || 0) / 1000));
  set("st-stale", s.staleClaims);
  const ul = $("bands");
  ul.replaceChildren(...BANDS.map(b =>
    el("li", { class: "pri band-" + b }, `${b}: ${(s.priorityBands || {})[b] ?? 0}`)));
}

function renderQueue() {
  const rows = [...state.items.values()].sort((a, b) =>
    (b.state === "running") - (a.state === "running") || a.priority - b.priority || a.timestamp - b.timestamp || a.id - b.id);
  $("queue-count").textContent = `(${rows.length})`;
  $("queue").tBodies[0].replaceChildren(...rows.map(it => {
    const running = it.state === "running";
    return el("tr", { dataset: { jobId: it.id }, class: it._new ? "flash" : null },
      el("td", {}, it.id),
      el("td", {}, el("span", { class: "pri band-" + band(it.priority), title: band(it.priority) }, it.priority)),
      el("td", {}, it.entity),
      el("td", {}, it.model || "-"),
      el("td", { class: "msg", title: it.message || "" }, it.message || ""),
      el("td", { class: "state-" + it.state }, running ? `processing on ${it.server || it.serverId || "?"}` : "waiting"),
      el("td", {}, el("button", {
        dataset: { cancel: it.id }, disabled: running, title: running ? "running jobs finish first" : "cancel this job",
        onclick: () => cancelJob(it.id) }, "cancel")));
  }));
  for (const it of rows) delete it._new;
}

async function refreshFailed() {
  const [dead, rejected] = await Promise.all([api("/api/jobs?state=dead&limit=50"), api("/api/jobs?state=rejected&limit=20")]);
  const jobs = [...dead.jobs, ...rejected.jobs];
  $("failed").tBodies[0].replaceChildren(...jobs.map(j => el("tr", { dataset: { jobId: j.id } },
    el("td", {}, j.id), el("td", {}, j.state), el("td", {}, j.entity_id), el("td", {}, j.model || "-"),
    el("td", {}, `${j.attempts}/${j.max_attempts}`),
    el("td", { class: "msg", title: (j.reason || "") + (j.last_error ? "\n" + j.last_error : "") }, j.reason || j.last_error || ""),
    el("td", {}, j.finished_at ? new Date(j.finished_at).toLocaleTimeString() : "-"),
    el("td", {}, j.model ? el("button", { dataset: { retry: j.id }, onclick: () => retryJob(j.id).catch(() => {}) }, "retry") : ""))));
  return jobs;
}

function memoryBar(s) {
  if (!s.memory_bytes) return el("span", {}, fmtBytes(s.accounted_bytes) + " / no budget");
  const frac = s.accounted_bytes / s.memory_bytes;
  const title = `models ${fmtBytes(s.models_bytes)} + in-flight ${fmtBytes(s.inflight_bytes)} + reserve and safety`;
  return el("div", { class: "bar" + (frac > 1 ? " over" : ""), title },
    el("span", { style: `width:${Math.min(100, frac * 100).toFixed(1)}%` }),
    el("em", {}, `${fmtBytes(s.accounted_bytes)} / ${fmtBytes(s.memory_bytes)}`));
}

async function refreshServers() {
  const { servers } = await api("/api/servers");
  $("servers").tBodies[0].replaceChildren(...servers.map(s => el("tr", { dataset: { server: s.name } },
    el("td", { title: s.url }, s.name),
    el("td", { class: "status-" + s.status }, s.status),
    el("td", {}, s.failure_count),
    el("td", {}, s.backoff_level ? `L${s.backoff_level} ${fmtSeconds(s.backoff_left_seconds)}` : "-"),
    el("td", {}, `${s.slots_used}/${s.slots_total}`),
    el("td", {}, memoryBar(s)),
    el("td", { class: "msg", title: s.last_error || "" }, s.last_error || ""))));
}

async function refreshModels() {
  const { models } = await api("/api/models");
  $("models").tBodies[0].replaceChildren(...models.map(m => el("tr", {},
    el("td", {}, m.server), el("td", {}, m.model), el("td", {}, m.instance_state),
    el("td", {}, fmtBytes(m.size_bytes)), el("td", {}, m.parallel ?? "-"),
    el("td", {}, el("div", { class: "bar", title: `${m.slots_free} free` },
      el("span", { style: `width:${m.slots_total ? (100 * m.slots_used / m.slots_total).toFixed(1) : 0}%` }),
      el("em", {}, `${m.slots_used} / ${m.slots_total}`))))));
}

// An SVG element (and a maker of its children) for a bar chart of W × H user units, stretched to its box.
const SVG_NS = "http://www.w3.org/2000/svg";
function ns(tag, attrs, text) {
  const n = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}
function chartSvg(W, H) {
  return ns("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
}

async function refreshChart() {
  const { series } = await api("/api/replies-per-minute?minutes=60");
  const W = 600, H = 140, pad = 18;
  const max = Math.max(1, ...series.map(p => p.replies));
  const bw = (W - pad) / Math.max(series.length, 1);
  const svg = chartSvg(W, H);
  series.forEach((p, i) => {
    const h = (H - pad) * p.replies / max;
    const r = ns("rect", { x: pad + i * bw + 1, y: H - pad - h, width: Math.max(bw - 2, 1), height: h });
    r.append(ns("title", {}, `${new Date(p.minute).toLocaleTimeString()}: ${p.replies}`));
    svg.append(r);
  });
  svg.append(ns("text", { x: 0, y: 10 }, String(max)), ns("text", { x: 0, y: H - pad }, "0"),
             ns("text", { x: pad, y: H - 4 }, "-60 min"), ns("text", { x: W - 30, y: H - 4 }, "now"));
  $("chart").replaceChildren(svg);
}

async function refreshModelQueue() {
  const { models } = await api("/api/model-queue");
  $("model-queue").tBodies[0].replaceChildren(...models.map(m => el("tr", { dataset: { model: m.model } },
    el("td", {}, m.model), el("td", {}, m.queued),
    el("td", {}, m.oldest_wait_seconds == null ? "-" : fmtSeconds(m.oldest_wait_seconds)),
    el("td", {}, m.replicas),
    el("td", { class: "msg" + (m.serving.startsWith("no server") ? " status-down" : ""), title: m.serving },
       m.serving))));
}

async function refreshEntityWait() {
  const { entities } = await api("/api/entity-wait");
  const s = v => v == null ? "-" : fmtSeconds(v);
  $("entity-wait").tBodies[0].replaceChildren(...entities.map(e => el("tr", { dataset: { entity: e.entity_id } },
    el("td", {}, e.entity_id), el("td", {}, e.queued), el("td", {}, s(e.oldest_wait_seconds)),
    el("td", {}, s(e.p50_wait_seconds)), el("td", {}, s(e.p95_wait_seconds)))));
}

async function refreshWorkers() {
  const { workers, fresh_seconds } = await api("/api/workers");
  $("workers").tBodies[0].replaceChildren(...workers.map(w => el("tr", { dataset: { role: w.role } },
    el("td", {}, w.worker_id), el("td", {}, w.role), el("td", {}, w.host), el("td", {}, w.pid),
    el("td", {}, new Date(w.started_at).toLocaleTimeString()),
    el("td", { class: w.heartbeat_age_seconds < fresh_seconds ? "status-healthy" : "status-down" },
       fmtSeconds(w.heartbeat_age_seconds) + " ago"))));
}

async function refreshLoads() {
  const { series } = await api("/api/loads-per-minute?minutes=60");
  const W = 600, H = 120, pad = 18;
  const max = Math.max(1, ...series.map(p => Math.max(p.loads + p.failed, p.unloads)));
  const start = Date.now() - 60 * 60000;
  const x = t => pad + (W - pad) * Math.max(0, (new Date(t).getTime() - start) / (60 * 60000));
  const bw = Math.max((W - pad) / 60 - 2, 1);
  const svg = chartSvg(W, H);
  series.forEach(p => {
    const mid = (H - pad) / 2;
    const up = mid * (p.loads + p.failed) / max, down = mid * p.unloads / max;
    const load = ns("rect", { x: x(p.minute), y: mid - up, width: bw, height: up, class: "load" });
    load.append(ns("title", {}, `${new Date(p.minute).toLocaleTimeString()}: ${p.loads} load(s), ${p.failed} failed`));
    const evict = ns("rect", { x: x(p.minute), y: mid, width: bw, height: down, class: "evict" });
    evict.append(ns("title", {}, `${new Date(p.minute).toLocaleTimeString()}: ${p.unloads} unload(s)/eviction(s)`));
    svg.append(load, evict);
  });
  svg.append(ns("text", { x: 0, y: 10 }, "loads"), ns("text", { x: 0, y: H - pad }, "evictions"),
             ns("text", { x: pad, y: H - 4 }, "-60 min"), ns("text", { x: W - 30, y: H - 4 }, "now"));
  $("loads-chart").replaceChildren(svg);
  $("loads-chart").dataset.points = String(series.length);
}

// --- live feed -------------------------------------------------------------------------------------

function setConn(kind, text) {
  const c = $("conn");
  c.className = "conn " + kind;
  c.textContent = text;
}

function onFrame(f) {
  const d = f.data || {};
  switch (f.type) {
    case "snapshot":
      state.items = new Map((d.items || []).map(it => [it.id, it]));
      state.stats = d.stats || {};
      if (d.stats && "configVersion" in d.stats) state.configVersion = d.stats.configVersion;
      renderQueue(); renderStats();
      break;
    case "queued":
      if (d.item) { d.item._new = true; state.items.set(d.item.id, d.item); renderQueue(); }
      break;
    case "claimed": {
      const it = state.items.get(d.itemId);
      if (it) { it.state = "running"; it.serverId = d.serverId; it.claimedBy = d.worker; renderQueue(); }
      break;
    }
    case "completed":
      state.items.delete(d.itemId); renderQueue();
      if (!d.success) refreshFailed().catch(() => {});
      break;
    case "deleted":
      state.items.delete(d.itemId); renderQueue();
      break;
    case "stats":
      state.stats = Object.assign({}, d, { configVersion: state.configVersion }); renderStats();
      break;
    case "error":
      say(d.message || "error", true);
      break;
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/ws` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
  setConn("connecting", "CONNECTING");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => { setConn("online", "CONNECTED"); state.retryDelay = 500; };
  ws.onmessage = ev => { try { onFrame(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
  ws.onclose = () => {
    setConn("offline", "OFFLINE");
    setTimeout(connect, state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, 10000);
  };
}

function every(ms, fn) {
  const run = () => fn().catch(e => say(e.message, true));
  run();
  return setInterval(run, ms);
}

async function runTestHook() {
  if (!TEST_RETRY) return;
  // Decide as soon as the job's row has rendered: a row without a button is the answer, so a headless
  // browser's virtual-time budget never runs out first.
  for (let i = 0; i < 50; i++) {
    const row = $("failed").querySelector(`tr[data-job-id="${CSS.escape(TEST_RETRY)}"]`);
    const btn = row && row.querySelector(`button[data-retry="${CSS.escape(TEST_RETRY)}"]`);
    if (row && !btn) break;
    if (btn) {
      // The button's own handler calls retryJob, which reports through the footer: watch it.
      const outcome = new Promise(resolve => {
        const obs = new MutationObserver(() => {
          const m = $("message");
          if (m.textContent.startsWith(`job ${TEST_RETRY} requeued`)) { obs.disconnect(); resolve("ok:" + TEST_RETRY); }
          else if (m.className === "error") { obs.disconnect(); resolve("error:" + m.textContent); }
        });
        obs.observe($("message"), { childList: true, characterData: true, subtree: true, attributes: true });
      });
      btn.click();
      document.body.dataset.testRetry = await outcome;
      return;
    }
    await new Promise(r => setTimeout(r, 100));
  }
  const listed = $("failed").querySelector(`tr[data-job-id="${CSS.escape(TEST_RETRY)}"]`);
  document.body.dataset.testRetry = (listed ? "error:no retry button for job " : "error:not in the failed list: job ") + TEST_RETRY;
}

function start() {
  setInterval(() => { $("clock").textContent = new Date().toLocaleTimeString(); }, 1000);
  $("clear-all").addEventListener("click", clearAll);
  connect();
  every(5000, refreshServers);
  every(5000, refreshModels);
  every(10000, refreshFailed);
  every(15000, refreshChart);
  every(5000, refreshModelQueue);
  every(5000, refreshEntityWait);
  every(5000, refreshWorkers);
  every(15000, refreshLoads);
  runTestHook();
}

start();

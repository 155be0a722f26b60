// The Switchboard console: read-only pages over the gateway's admin feeds (/ui/api/<feed>).
// No framework and nothing from a CDN: the page is served by the gateway with a strict CSP.
"use strict";

const PAGES = ["overview", "spend", "budgets", "targets", "requests", "policy"];
const REFRESH_MS = 10000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

const usd = (v) => (v === null || v === undefined ? "—" : "$" + Number(v).toFixed(Math.abs(v) < 0.01 ? 6 : 4));
const count = (v) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en-US"));
const ms = (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(v < 10 ? 2 : 1) + " ms");
const share = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%");

async function feed(path) {
  // From the origin, not relative to the page: a page opened as http://user:key@host/ui/ has credentials in its
  // URL, which fetch refuses; the browser still sends the ones it was challenged for under /ui/.
  const url = location.origin + location.pathname.replace(/[^/]*$/, "") + "api/" + path;
  const response = await fetch(url, {credentials: "same-origin", headers: {accept: "application/json"}});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(`${path}: ${response.status} ${message}`);
  }
  return body;
}

// A table whose cells keep the raw value in data-value, so what is shown can be checked against the feed.
function table(target, columns, rows, empty) {
  const head = el("tr", {}, ...columns.map((c) => el("th", {}, c.label)));
  const body = rows.length
    ? rows.map((row) => el("tr", row.__attrs || {}, ...columns.map((c) => {
        const raw = c.value ? c.value(row) : row[c.key];
        const shown = c.render ? c.render(raw, row) : c.format ? c.format(raw) : String(raw ?? "—");
        return el("td", {"data-key": c.key, "data-value": raw === null || raw === undefined ? "" : raw,
                         class: [c.num ? "num" : "", c.cls ? c.cls(raw, row) : ""].join(" ").trim() || null},
                  shown);
      })))
    : [el("tr", {}, el("td", {colspan: columns.length}, empty || "Nothing yet."))];
  target.replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
}

// A horizontal bar chart as SVG: one bar per row, scaled to the largest value.
function bars(target, rows, format) {
  const width = 560, rowHeight = 22, labelWidth = 170, valueWidth = 90;
  const height = Math.max(1, rows.length) * rowHeight + 8;
  const top = Math.max(0, ...rows.map((r) => r.value));
  const svg = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, width, height, role: "img"});
  if (!rows.length) svg.append(el("svg:text", {x: 8, y: 18, class: "empty"}, "No spend recorded yet."));
  rows.forEach((row, i) => {
    const y = 4 + i * rowHeight;
    const length = top > 0 ? (row.value / top) * (width - labelWidth - valueWidth - 16) : 0;
    svg.append(el("svg:text", {x: 6, y: y + 15}, row.label.length > 26 ? row.label.slice(0, 25) + "…" : row.label),
               el("svg:rect", {x: labelWidth, y: y + 3, width: Math.max(1, length), height: rowHeight - 8,
                               class: "bar", "data-label": row.label, "data-value": row.value}),
               el("svg:text", {x: labelWidth + length + 6, y: y + 15}, format(row.value)));
  });
  target.replaceChildren(svg);
}

const spendColumns = (group) => [
  {key: group, label: group},
  {key: "requests", label: "requests", num: true, format: count},
  {key: "input_tokens", label: "input tokens", num: true, format: count},
  {key: "output_tokens", label: "output tokens", num: true, format: count},
  {key: "cost_usd", label: "cost", num: true, format: usd},
  {key: "unpriced_requests", label: "unpriced", num: true, format: count},
];

const render = {
  async overview() {
    const [overview, days] = await Promise.all([feed("overview"), feed("spend?by=day")]);
    document.getElementById("rps").textContent = overview.requests_per_s.toFixed(2);
    const errors = document.getElementById("errors");
    errors.textContent = share(overview.error_rate);
    errors.className = "figure " + (overview.error_rate > 0.01 ? "bad" : "ok");
    document.getElementById("overhead").textContent =
      `${ms(overview.overhead_ms.p50)} / ${ms(overview.overhead_ms.p99)}`;
    document.getElementById("cost-today").textContent = usd(overview.cost_today_usd);
    document.getElementById("cost-today").dataset.value = overview.cost_today_usd ?? "";
    document.getElementById("today").textContent = `(${overview.day}, UTC)`;
    document.getElementById("overview-note").textContent =
      `${count(overview.requests)} requests in the last ${overview.window_s / 60} minutes on this gateway process; ` +
      `client errors (4xx): ${share(overview.client_error_rate)}.`;
    const recent = days.slice().sort((a, b) => a.day.localeCompare(b.day)).slice(-14);
    bars(document.getElementById("overview-days"), recent.map((r) => ({label: r.day, value: r.cost_usd})), usd);
  },

  async spend() {
    const [teams, models, days] = await Promise.all(["team", "model", "day"].map((by) => feed("spend?by=" + by)));
    for (const [group, rows] of [["team", teams], ["model", models]]) {
      bars(document.getElementById("chart-" + group), rows.map((r) => ({label: r[group], value: r.cost_usd})), usd);
      table(document.getElementById("spend-" + group), spendColumns(group), rows, "No requests in the ledger yet.");
    }
    const byDay = days.slice().sort((a, b) => a.day.localeCompare(b.day)).slice(-30);
    bars(document.getElementById("chart-day"), byDay.map((r) => ({label: r.day, value: r.cost_usd})), usd);
    table(document.getElementById("spend-day"), spendColumns("day"), byDay.slice().reverse(),
          "No requests in the ledger yet.");
  },

  async budgets() {
    const budgets = (await feed("budgets")).data;
    const amount = (v, row) => (row.unit === "usd" ? usd(v) : count(v) + " tokens");
    table(document.getElementById("budget-table"), [
      {key: "team", label: "team"},
      {key: "scope", label: "scope", value: (r) => `${r.scope} ${r.owner}`},
      {key: "limit_type", label: "period"},
      {key: "used", label: "used", num: true, render: amount},
      {key: "limit", label: "limit", num: true, render: amount},
      {key: "burned", label: "burned", render: (v) => el("span", {}, el("meter", {min: 0, max: 1, low: 0.8, high: 0.95,
                                                                                 optimum: 0, value: Math.min(v, 1)}),
                                                         " " + share(v)),
       cls: (v) => (v >= 1 ? "bad" : v >= 0.8 ? "warn" : "")},
      {key: "remaining", label: "remaining", num: true, render: amount},
      {key: "on_exhaust", label: "when spent"},
      {key: "resets_at", label: "resets"},
    ], budgets, "No team or key in this policy has a budget.");
  },

  async targets() {
    const targets = (await feed("targets")).data;
    table(document.getElementById("target-table"), [
      {key: "models", label: "serves", value: (r) => r.models.join(", ")},
      {key: "provider", label: "provider"},
      {key: "model", label: "upstream model"},
      {key: "state", label: "breaker", cls: (v) => "state-" + v},
      {key: "in_flight", label: "in flight", num: true, format: count},
      {key: "latency_ewma_ms", label: "latency (EWMA)", num: true, format: ms},
      {key: "requests", label: "requests", num: true, format: count},
      {key: "failures", label: "failures", num: true, format: count},
      {key: "last_error", label: "last error"},
    ], targets, "No targets.");
  },

  async requests() {
    const rows = (await feed("requests")).data;
    for (const row of rows) row.__attrs = {"data-request-id": row.request_id};
    table(document.getElementById("request-table"), [
      {key: "at", label: "time (UTC)", format: (v) => String(v).replace("T", " ").replace("+00:00", "")},
      {key: "team", label: "team"},
      {key: "key_id", label: "key"},
      {key: "public_model", label: "model"},
      {key: "provider", label: "provider"},
      {key: "status", label: "status", num: true, cls: (v) => (v >= 500 ? "bad" : v >= 400 ? "warn" : "")},
      {key: "outcome", label: "outcome"},
      {key: "prompt_tokens", label: "in", num: true, format: count},
      {key: "completion_tokens", label: "out", num: true, format: count},
      {key: "cost_usd", label: "cost", num: true, format: usd},
      {key: "duration_ms", label: "duration", num: true, format: ms},
      {key: "trace_url", label: "trace",
       render: (url, row) => (url ? el("a", {href: url, target: "_blank", rel: "noopener"}, row.trace_id.slice(0, 8))
                                  : "—")},
    ], rows, "No requests in the ledger yet.");
  },

  async policy() {
    const policy = await feed("policy");
    const facts = (target, pairs) => target.replaceChildren(
      ...pairs.flatMap(([label, value, id]) => [el("dt", {}, label), el("dd", {id}, value ?? "—")]));
    facts(document.getElementById("policy-facts"), [
      ["fingerprint", policy.fingerprint, "policy-fingerprint"], ["file", policy.source],
      ["providers", policy.providers], ["models", policy.models], ["teams", policy.teams], ["keys", policy.keys],
      ["trace links", policy.trace_url || "off (admin.console.trace_url)"],
    ]);
    const last = policy.last_reload;
    facts(document.getElementById("reload-facts"), [
      ["result", last.result, "reload-result"], ["at (UTC)", last.at], ["serving", last.fingerprint],
    ]);
    document.getElementById("reload-problems").replaceChildren(...last.problems.map((p) => el("li", {}, p)));
  },
};

let showing = null;

async function show(page) {
  showing = page;
  document.body.dataset.ready = "";
  for (const name of PAGES) {
    document.getElementById(name).hidden = name !== page;
    document.querySelector(`nav a[data-page="${name}"]`).classList.toggle("active", name === page);
  }
  const problem = document.getElementById("problem");
  try {
    const [policy] = await Promise.all([feed("policy"), render[page]()]);
    document.getElementById("fingerprint").textContent = policy.fingerprint;
    problem.hidden = true;
  } catch (error) {
    problem.textContent = "Could not load this page: " + error.message;
    problem.hidden = false;
    console.error(error);
  }
  if (showing === page) {
    document.body.dataset.page = page;
    document.body.dataset.ready = "1";
  }
}

function current() {
  const page = location.hash.slice(1);
  return PAGES.includes(page) ? page : "overview";
}

window.addEventListener("hashchange", () => show(current()));
setInterval(() => { if (!document.hidden) show(current()); }, REFRESH_MS);
show(current());

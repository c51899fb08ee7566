// The usage dashboard: the caller's key and quota, tokens and requests per day, per model.
import { ApiError, explain, getJSON } from "./api.js";
import { hideAdmin, initAdmin, loadAdmin } from "./admin.js";
import { barChart, colorFor } from "./chart.js";

const $ = (id) => document.getElementById(id);
const DAY_MS = 86_400_000;
const count = new Intl.NumberFormat("en");

// The last answer, kept so the charts can be redrawn at a new width without a request.
let shown = null;

// Days are the server's UTC calendar days, as "YYYY-MM-DD".
const isoDay = (ms) => new Date(ms).toISOString().slice(0, 10);
const dayMs = (day) => Date.parse(`${day}T00:00:00Z`);

function sinceFor(period) {
  if (period === "all") return null;
  const today = dayMs(isoDay(Date.now()));
  return isoDay(today - (Number(period) - 1) * DAY_MS);
}

// Every day from the start of the period (or the first row) to today, so that quiet days
// show as gaps rather than vanish from the axis.
function dayRange(rows, since) {
  const first = since ?? rows[0]?.day ?? isoDay(Date.now());
  const last = [isoDay(Date.now()), ...rows.map((r) => r.day)].sort().at(-1);
  const days = [];
  for (let t = dayMs(first); t <= dayMs(last) && days.length < 3660; t += DAY_MS) days.push(isoDay(t));
  return days;
}

function seriesOf(rows, days, models, field) {
  const index = new Map(days.map((d, i) => [d, i]));
  return models.map((model) => {
    const values = new Array(days.length).fill(0);
    for (const r of rows) if (r.model === model && index.has(r.day)) values[index.get(r.day)] += r[field] ?? 0;
    return { name: model, color: colorFor(model, models), values };
  });
}

const COLUMNS = [["requests", "Requests"], ["prompt_tokens", "Prompt"], ["cached_tokens", "Cached"],
  ["completion_tokens", "Completion"], ["reasoning_tokens", "Reasoning"], ["total_tokens", "Total tokens"]];
// What the quota is charged, where the server weighs cached prompt tokens less than fresh ones,
// and what the requests cost at the server's price table when they settled.
const CHARGED = ["charged_tokens", "Charged"];
const COST = ["cost", "Cost"];

function columnsFor(rows) {
  const extra = [CHARGED, COST].filter(([f]) => rows.some((r) => f in r));
  return [...COLUMNS, ...extra];
}

// Costs are small sums: a cent's tenths of thousandths still show, in the server's currency.
function formatted(field, value, rows) {
  if (field !== COST[0]) return count.format(value);
  const currency = rows.find((r) => r.currency)?.currency ?? "USD";
  return new Intl.NumberFormat("en", { style: "currency", currency, maximumFractionDigits: 6 }).format(value);
}

function sums(rows, key, columns) {
  const groups = new Map();
  for (const r of rows) {
    const g = groups.get(r[key]) ?? Object.fromEntries(columns.map(([f]) => [f, 0]));
    for (const [f] of columns) g[f] += r[f] ?? 0;
    groups.set(r[key], g);
  }
  return groups;
}

// ---- rendering ----------------------------------------------------------------------------

function cell(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function table(target, firstHeading, groups, columns, models, rows) {
  const head = document.createElement("tr");
  head.append(cell("th", firstHeading, { scope: "col" }), ...columns.map(([, h]) => cell("th", h, { scope: "col" })));
  const body = [...groups].map(([name, g]) => {
    const row = document.createElement("tr");
    const label = cell("th", name, { scope: "row" });
    if (models) label.prepend(swatch(colorFor(name, models)));
    row.append(label, ...columns.map(([f]) => cell("td", formatted(f, g[f], rows))));
    return row;
  });
  const thead = document.createElement("thead");
  const tbody = document.createElement("tbody");
  thead.append(head);
  tbody.append(...body);
  $(target).replaceChildren(thead, tbody);
}

function swatch(color) {
  const s = document.createElement("span");
  s.className = "swatch";
  s.style.background = color;
  s.setAttribute("aria-hidden", "true");
  return s;
}

function renderKey(key) {
  const box = $("quota");
  box.replaceChildren();
  if (!key) {
    box.append(cell("p", "No API key in use: the server runs open, so this is all of its usage."));
    return;
  }
  box.append(cell("p", `${key.name ?? "unnamed key"} (${key.id})`, { class: "key-name" }));
  const used = key.used_tokens ?? 0;
  if (key.quota_tokens == null) {
    box.append(cell("p", `${count.format(used)} tokens used · quota: unlimited`));
  } else {
    const quota = key.quota_tokens;
    const remaining = key.remaining_tokens ?? Math.max(quota - used, 0);
    const fraction = quota > 0 ? Math.min(used / quota, 1) : 1;
    const bar = cell("div", "", {
      class: "quota-bar", role: "progressbar", "aria-label": "Quota used", "aria-valuemin": "0",
      "aria-valuemax": String(quota), "aria-valuenow": String(Math.min(used, quota)),
      "aria-valuetext": `${count.format(used)} of ${count.format(quota)} tokens used`,
    });
    const fill = cell("div", "", { class: "quota-fill" + (fraction > 0.9 ? " low" : "") });
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    bar.append(fill);
    box.append(cell("p", `${count.format(remaining)} of ${count.format(quota)} tokens remaining`), bar);
  }
  const limit = (v, unit) => (v == null ? `no ${unit} limit` : `${count.format(v)} ${unit}`);
  box.append(cell("p", `Rate limits: ${limit(key.rpm, "requests/min")}, ${limit(key.tpm, "tokens/min")}`, { class: "hint" }));
}

function renderTotals(rows) {
  const total = (f) => rows.reduce((s, r) => s + (r[f] ?? 0), 0);
  $("totals").replaceChildren(...columnsFor(rows).map(([f, heading]) => {
    const pair = document.createElement("div");
    pair.append(cell("dt", heading), cell("dd", formatted(f, total(f), rows)));
    return pair;
  }));
}

function renderCharts() {
  const { rows, since } = shown;
  const models = [...new Set(rows.map((r) => r.model))].sort();
  const days = dayRange(rows, since);
  barChart($("tokens-chart"), { days, series: seriesOf(rows, days, models, "total_tokens"), what: "tokens" });
  barChart($("requests-chart"), { days, series: seriesOf(rows, days, models, "requests"), what: "requests" });
  $("legend").replaceChildren(...models.map((m) => {
    const item = cell("li", m);
    item.prepend(swatch(colorFor(m, models)));
    return item;
  }));
  const columns = columnsFor(rows);
  const byModel = new Map([...sums(rows, "model", columns)].sort(([a], [b]) => a.localeCompare(b)));
  table("model-table", "Model", byModel, columns, models, rows);
  table("day-table", "Day", sums(rows, "day", columns), columns, null, rows);
}

function render(answer, since) {
  const rows = [...(answer.data ?? [])].sort((a, b) => (a.day + a.model).localeCompare(b.day + b.model));
  shown = { rows, since };
  renderKey(answer.key);
  renderTotals(rows);
  renderCharts();
  $("usage-body").hidden = false;
  $("usage-status").textContent = rows.length ? "" : "No requests in this period yet.";
  if (answer.key?.is_admin) loadAdmin(since);
  else hideAdmin();
}

// ---- loading ------------------------------------------------------------------------------

export async function loadUsage() {
  const since = sinceFor($("usage-period").value);
  $("usage-status").textContent = "Loading usage…";
  try {
    const answer = await getJSON(since ? `/v1/usage?since=${since}` : "/v1/usage");
    render(answer, since);
  } catch (err) {
    $("usage-body").hidden = true;
    $("usage-status").textContent = err instanceof ApiError && err.status === 404
      ? "Usage is not available on this server: it keeps no usage ledger (GET /v1/usage answered 404)."
      : explain(err);
  }
}

export function initUsage() {
  initAdmin(() => sinceFor($("usage-period").value));
  $("usage-period").addEventListener("change", loadUsage);
  $("usage-refresh").addEventListener("click", loadUsage);
  // Charts are drawn at their real width so their text stays readable; redraw on resize.
  let width = 0;
  new ResizeObserver(() => {
    const now = $("tokens-chart").clientWidth;
    if (shown && now && now !== width) {
      width = now;
      renderCharts();
    }
  }).observe($("tokens-chart"));
}

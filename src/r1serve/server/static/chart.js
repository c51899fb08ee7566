// A stacked bar chart in SVG, one bar per day and one stack segment per model.
// Drawn at the container's pixel width (not scaled by a viewBox) so labels keep their size.

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 200;
const MARGIN = { top: 10, right: 8, bottom: 24, left: 46 };
const LABEL_WIDTH = 56; // room for "Nov 29" at 11px
// Distinguishable in light and dark themes, and for the common colour-vision deficiencies
// (Okabe and Ito's palette).
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"];
const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
const full = new Intl.NumberFormat("en");

export function colorFor(model, models) {
  return PALETTE[models.indexOf(model) % PALETTE.length];
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Axis ticks at 1, 2 or 5 times a power of ten, about four of them, the last >= max.
// Whole numbers only: both charts count things.
function ticks(max) {
  const raw = Math.max(max, 1) / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(1, [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw));
  const values = [];
  for (let v = 0; v < max + step; v += step) values.push(v);
  return values.length > 1 ? values : [0, step];
}

function dayLabel(day) {
  return new Date(`${day}T00:00:00Z`).toLocaleDateString("en", { month: "short", day: "numeric", timeZone: "UTC" });
}

function axis(plot, scale, width) {
  const g = svg("g", { class: "axis", "aria-hidden": "true" });
  for (const v of scale.values) {
    const y = scale.y(v);
    g.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y, class: "grid" }));
    g.append(svg("text", { x: MARGIN.left - 6, y: y + 4, "text-anchor": "end" }, compact.format(v)));
  }
  plot.append(g);
}

// Labels count back from the newest day, which is always labelled; one that would run off
// the right edge is aligned to it instead.
function dayLabels(plot, days, x, step, width) {
  const g = svg("g", { class: "axis", "aria-hidden": "true" });
  const every = Math.ceil(LABEL_WIDTH / step);
  days.forEach((day, i) => {
    if ((days.length - 1 - i) % every !== 0) return;
    const centre = x(i) + step / 2;
    const clipped = centre + LABEL_WIDTH / 2 > width;
    g.append(svg("text", { x: clipped ? width - 2 : centre, y: HEIGHT - 6, "text-anchor": clipped ? "end" : "middle" },
      dayLabel(day)));
  });
  plot.append(g);
}

function bars(plot, { days, series, what }, x, step, scale) {
  const width = Math.max(1, Math.min(step * 0.72, 48));
  const g = svg("g", { class: "bars" });
  days.forEach((day, i) => {
    let base = 0;
    for (const s of series) {
      const v = s.values[i];
      if (!v) continue;
      const rect = svg("rect", {
        x: x(i) + (step - width) / 2, y: scale.y(base + v), width, height: scale.y(base) - scale.y(base + v),
        fill: s.color, class: "bar",
      });
      rect.append(svg("title", {}, `${day} · ${s.name}: ${full.format(v)} ${what}`));
      g.append(rect);
      base += v;
    }
  });
  plot.append(g);
}

export function barChart(container, { days, series, what }) {
  const width = Math.max(container.clientWidth, 240);
  const totals = days.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const values = ticks(Math.max(0, ...totals));
  const top = values.at(-1);
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const scale = { values, y: (v) => MARGIN.top + (1 - v / top) * plotHeight };
  const step = (width - MARGIN.left - MARGIN.right) / Math.max(days.length, 1);
  const x = (i) => MARGIN.left + i * step;
  const sum = totals.reduce((a, b) => a + b, 0);
  const plot = svg("svg", {
    width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: "img", class: "bar-chart",
    "aria-label": `${full.format(sum)} ${what} from ${days[0]} to ${days.at(-1)}; the tables below have the numbers`,
  });
  axis(plot, scale, width);
  bars(plot, { days, series, what }, x, step, scale);
  dayLabels(plot, days, x, step, width);
  container.replaceChildren(plot);
}

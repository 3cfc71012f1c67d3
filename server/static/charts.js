// Small inline-SVG charts, drawn at the real pixel width of their box (crisp on a phone too).
import { h, svg } from './dom.js';

const MARGIN = { top: 12, right: 12, bottom: 26, left: 48 };
const HEIGHT = 190;
const MAX_BAR_WIDTH = 28;
const DAY_LABEL = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', timeZone: 'UTC' });

/**
 * A <figure> whose SVG is redrawn whenever its width changes. draw(width) returns the <svg>.
 * series: [{key, label}] for the legend.
 */
export function chartFigure({ title, testid, series, draw, signal }) {
  const holder = h('div', { class: 'chart-box' });
  const figure = h('figure', { class: 'chart', testid },
    h('figcaption', {}, title), holder,
    h('ul', { class: 'legend' }, series.map((s) => h('li', {}, h('span', { class: `swatch s-${s.key}`, 'aria-hidden': 'true' }), s.label))));
  let drawnWidth = 0;
  const observer = new ResizeObserver(([entry]) => {
    const width = Math.floor(entry.contentRect.width);
    if (width > 0 && width !== drawnWidth) {
      drawnWidth = width;
      holder.replaceChildren(draw(width));
    }
  });
  observer.observe(holder);
  signal?.addEventListener('abort', () => observer.disconnect(), { once: true });
  return figure;
}

/** Bars per day; grouped side by side, or stacked. rows: [{day, [key]: number}]. */
export function barChart({ rows, series, width, stacked = false, label, format = String, emptyText = 'None in this period' }) {
  const max = Math.max(0, ...rows.map((row) => (stacked
    ? series.reduce((sum, s) => sum + (row[s.key] ?? 0), 0)
    : Math.max(0, ...series.map((s) => row[s.key] ?? 0)))));
  const frame = chartFrame({ rows, width, max, label, format, emptyText });
  const band = frame.plotWidth / rows.length;
  const barWidth = Math.min(MAX_BAR_WIDTH, stacked ? band * 0.7 : (band * 0.8) / series.length);
  const groupWidth = stacked ? barWidth : barWidth * series.length;
  rows.forEach((row, i) => {
    let base = 0;
    const groupStart = MARGIN.left + i * band + (band - groupWidth) / 2;
    series.forEach((s, j) => {
      const value = row[s.key] ?? 0;
      if (value <= 0) return;
      const x = groupStart + (stacked ? 0 : j * barWidth);
      const top = frame.y(base + value);
      const height = frame.y(base) - top;
      frame.plot.append(svg('rect', { class: `bar s-${s.key}`, x: x.toFixed(1), y: top.toFixed(1), width: Math.max(1, barWidth - 1).toFixed(1), height: Math.max(1, height).toFixed(1) },
        svg('title', {}, `${row.day} · ${s.label}: ${format(value)}`)));
      if (stacked) base += value;
    });
  });
  return frame.root;
}

/** Lines per day with a dot per known value; null values leave a gap. */
export function lineChart({ rows, series, width, label, format = String, emptyText = 'No data in this period' }) {
  const values = rows.flatMap((row) => series.map((s) => row[s.key])).filter((v) => v !== null && v !== undefined);
  const frame = chartFrame({ rows, width, max: Math.max(0, ...values), label, format, emptyText: values.length ? null : emptyText });
  const band = frame.plotWidth / rows.length;
  const x = (i) => MARGIN.left + band * (i + 0.5);
  for (const s of series) {
    const points = rows.map((row, i) => (row[s.key] == null ? null : [x(i), frame.y(row[s.key]), row]));
    frame.plot.append(svg('path', { class: `line s-${s.key}`, d: linePath(points), fill: 'none' }));
    for (const point of points.filter(Boolean)) {
      frame.plot.append(svg('circle', { class: `dot s-${s.key}`, cx: point[0].toFixed(1), cy: point[1].toFixed(1), r: 3 },
        svg('title', {}, `${point[2].day} · ${s.label}: ${format(point[2][s.key])}`)));
    }
  }
  return frame.root;
}

function linePath(points) {
  let d = '';
  let drawing = false;
  for (const point of points) {
    if (!point) { drawing = false; continue; }
    d += `${drawing ? 'L' : 'M'}${point[0].toFixed(1)},${point[1].toFixed(1)} `;
    drawing = true;
  }
  return d.trim();
}

/** Axes, grid and day labels; returns the y scale and the group to draw the data in. */
function chartFrame({ rows, width, max, label, format, emptyText }) {
  const plotWidth = Math.max(10, width - MARGIN.left - MARGIN.right);
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const { top, step } = niceScale(max);
  const y = (value) => MARGIN.top + plotHeight - (value / top) * plotHeight;
  const root = svg('svg', { width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: 'img', 'aria-label': label });
  const grid = svg('g', { class: 'grid' });
  for (let value = 0; value <= top + step / 2; value += step) {
    grid.append(svg('line', { x1: MARGIN.left, x2: MARGIN.left + plotWidth, y1: y(value), y2: y(value) }),
      svg('text', { x: MARGIN.left - 6, y: y(value) + 4, 'text-anchor': 'end' }, format(value)));
  }
  root.append(grid, dayLabels(rows, plotWidth));
  const plot = svg('g', { class: 'plot' });
  root.append(plot);
  if (emptyText && !(max > 0)) {
    root.append(svg('text', { class: 'empty-note', x: MARGIN.left + plotWidth / 2, y: MARGIN.top + plotHeight / 2, 'text-anchor': 'middle' }, emptyText));
  }
  return { root, plot, y, plotWidth };
}

function dayLabels(rows, plotWidth) {
  const group = svg('g', { class: 'axis' });
  const band = plotWidth / rows.length;
  const every = Math.max(1, Math.ceil(rows.length / Math.max(1, Math.floor(plotWidth / 64))));
  rows.forEach((row, i) => {
    if (i % every !== 0 && i !== rows.length - 1) return;
    if (i === rows.length - 1 && i % every !== 0 && (i % every) < every / 2) return;
    group.append(svg('text', { x: MARGIN.left + band * (i + 0.5), y: HEIGHT - 8, 'text-anchor': 'middle' }, dayLabel(row.day)));
  });
  return group;
}

export function dayLabel(day) {
  const date = new Date(`${day}T00:00:00Z`);
  return Number.isNaN(date.getTime()) ? day : DAY_LABEL.format(date);
}

/** A round top and step for an axis from 0 to max (at most ~4 steps, integer steps for counts). */
export function niceScale(max) {
  if (!(max > 0)) return { top: 1, step: 1 };
  const rough = max / 4;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = Math.max(1, [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough));
  return { top: step * Math.ceil(max / step), step };
}

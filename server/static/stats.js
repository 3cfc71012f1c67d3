// Stats (#/stats?days=&trigger_id=): per trigger, per day charts and the exact numbers.
import { childController, emptyState, errorState, field, h, loadingState, swapContent, throttle } from './dom.js';
import { barChart, chartFigure, dayLabel, lineChart } from './charts.js';
import { formatCount, formatMs, href } from './format.js';

const DAY_CHOICES = [1, 7, 30];
const COUNT_FIELDS = [
  ['received', 'Received'], ['duplicates', 'Duplicates'], ['duplicates_body_mismatch', 'Duplicates, other body'],
  ['filtered', 'Filtered'], ['succeeded', 'Succeeded'], ['failed_transient', 'Failed, transient'],
  ['failed_permanent', 'Failed, permanent'], ['dead_lettered', 'Dead-lettered'], ['replays', 'Replays'],
];
const LATENCY_FIELDS = [['latency_p50_ms', 'p50'], ['latency_p95_ms', 'p95'], ['latency_p99_ms', 'p99']];

export function mountStats(ctx) {
  const days = DAY_CHOICES.includes(Number(ctx.query.get('days'))) ? Number(ctx.query.get('days')) : 7;
  const triggerId = ctx.query.get('trigger_id') ?? '';
  ctx.setTitle('Stats');
  const body = h('div', { class: 'stack' }, loadingState('Loading stats…'));
  ctx.root.append(h('section', { class: 'view', testid: 'view-stats' },
    h('div', { class: 'view-head' }, h('h1', { tabindex: '-1' }, 'Stats'), controls(ctx, days, triggerId)),
    h('p', { class: 'muted' }, 'Per trigger and per day (days in UTC). Latency is the dispatch time of successful attempts.'),
    body));
  let current = null;
  const reload = () => {
    current?.abort(); // drops the previous charts' resize observers with their fetch
    current = childController(ctx.signal);
    load({ ...ctx, signal: current.signal }, body, days, triggerId);
  };
  reload();
  const reloadSoon = throttle(reload, 5000, 1000);
  ctx.signal.addEventListener('abort', () => reloadSoon.cancel(), { once: true });
  ctx.app.live.subscribe((event) => { if (/^(webhook|execution)\./.test(event.type)) reloadSoon(); }, ctx.signal);
}

function controls(ctx, days, triggerId) {
  const go = (next) => ctx.app.navigate(href.stats({ days: next.days === 7 ? '' : next.days, trigger_id: next.triggerId }));
  const select = h('select', { testid: 'stats-trigger', on: { change: () => go({ days, triggerId: select.value }) } }, h('option', { value: '' }, 'All triggers'));
  fillTriggers(ctx, select, triggerId);
  return h('div', { class: 'stats-controls' },
    h('div', { class: 'toggle-group', role: 'group', 'aria-label': 'Period' }, DAY_CHOICES.map((n) =>
      h('button', { type: 'button', testid: `stats-days-${n}`, 'aria-pressed': String(n === days), on: { click: () => go({ days: n, triggerId }) } },
        n === 1 ? 'Today' : `${n} days`))),
    field('Trigger', select));
}

async function fillTriggers(ctx, select, current) {
  const ids = new Set(current ? [current] : []);
  try {
    const { triggers } = await ctx.app.api.get('/api/triggers', { signal: ctx.signal });
    for (const trigger of triggers) ids.add(trigger.id);
  } catch { /* keep the current value only */ }
  for (const id of [...ids].sort()) select.append(h('option', { value: id }, id));
  select.value = current;
}

async function load(ctx, body, days, triggerId) {
  try {
    const answer = await ctx.app.api.get('/api/stats', { signal: ctx.signal, query: { days, trigger_id: triggerId } });
    if (ctx.signal.aborted) return;
    const byTrigger = groupByTrigger(answer.stats, periodDays(days, answer.until));
    swapContent(body, byTrigger.size
      ? [...byTrigger].map(([id, rows]) => triggerSection(ctx, id, rows))
      : emptyState(`No deliveries in the last ${days === 1 ? 'day' : `${days} days`}${triggerId ? ` for ${triggerId}` : ''}.`));
  } catch (error) {
    if (!ctx.signal.aborted) swapContent(body, errorState(error, () => load(ctx, body, days, triggerId)));
  }
}

/** Rows per trigger, one per day of the period (days without traffic count zero). */
function groupByTrigger(stats, period) {
  const groups = new Map();
  for (const row of [...stats].sort((a, b) => a.trigger_id.localeCompare(b.trigger_id))) {
    if (!groups.has(row.trigger_id)) groups.set(row.trigger_id, new Map(period.map((day) => [day, { day }])));
    groups.get(row.trigger_id).set(row.day, row);
  }
  return new Map([...groups].map(([id, rows]) => [id, [...rows.values()].sort((a, b) => a.day.localeCompare(b.day))]));
}

/** The UTC days of the period, ending on the server's `until` day when it names one. */
function periodDays(days, until) {
  const last = /^\d{4}-\d{2}-\d{2}$/.test(until ?? '') ? Date.parse(`${until}T00:00:00Z`) : Date.now();
  return Array.from({ length: days }, (_, i) => new Date(last - (days - 1 - i) * 86400000).toISOString().slice(0, 10));
}

function triggerSection(ctx, triggerId, rows) {
  return h('section', { class: 'card stats-trigger', testid: 'stats-trigger-section', 'data-trigger-id': triggerId, 'data-key': triggerId },
    h('div', { class: 'section-head' }, h('h2', {}, triggerId),
      h('a', { href: href.executions({ trigger_id: triggerId }) }, 'Executions')),
    totals(rows),
    h('div', { class: 'charts' }, charts(ctx, rows)),
    h('details', { testid: 'stats-numbers' }, h('summary', { testid: 'stats-table-toggle' }, 'Numbers per day'), numbersTable(rows)));
}

function totals(rows) {
  const sum = (key) => rows.reduce((total, row) => total + (row[key] ?? 0), 0);
  return h('dl', { class: 'totals' }, COUNT_FIELDS.map(([key, label]) =>
    h('div', { class: 'total' }, h('dt', {}, label), h('dd', { testid: `stats-total-${key}`, 'data-value': sum(key) }, formatCount(sum(key))))));
}

function charts(ctx, rows) {
  const count = (value) => formatCount(value);
  const chart = (title, testid, series, draw) => chartFigure({ title, testid, series, signal: ctx.signal, draw: (width) => draw(width, series) });
  return [
    chart('Received and duplicates', 'chart-received', [{ key: 'received', label: 'received' }, { key: 'duplicates', label: 'duplicates' }],
      (width, series) => barChart({ rows, series, width, label: 'Received and duplicate deliveries per day', format: count, emptyText: 'Nothing received in this period' })),
    chart('Failures and dead letters', 'chart-failures',
      [{ key: 'failed_transient', label: 'failed, transient' }, { key: 'failed_permanent', label: 'failed, permanent' }, { key: 'dead_lettered', label: 'dead-lettered' }],
      (width, series) => barChart({ rows, series, width, label: 'Failed attempts by category, and dead letters, per day', format: count, emptyText: 'No failures in this period' })),
    chart('Dispatch latency', 'chart-latency', [{ key: 'latency_p50_ms', label: 'p50' }, { key: 'latency_p95_ms', label: 'p95' }],
      (width, series) => lineChart({ rows, series, width, label: 'Dispatch latency p50 and p95 per day', format: formatMs, emptyText: 'No successful dispatch in this period' })),
  ];
}

function numbersTable(rows) {
  const columns = [...COUNT_FIELDS, ...LATENCY_FIELDS];
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data numbers', testid: 'stats-table' },
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Day (UTC)'), columns.map(([, label]) => h('th', { scope: 'col' }, label)))),
    h('tbody', {}, rows.map((row) => h('tr', { 'data-day': row.day },
      h('th', { scope: 'row' }, dayLabel(row.day)),
      columns.map(([key]) => h('td', { 'data-field': key, 'data-value': row[key] ?? (key.startsWith('latency') ? '' : 0) },
        key.startsWith('latency') ? formatMs(row[key]) : formatCount(row[key] ?? 0))))))));
}

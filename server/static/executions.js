// Executions (#/executions?…): filters in the URL, cursor paging, sort by time, live rows.
import { enc } from './api.js';
import { describeError, emptyState, errorState, field, h, loadingState, throttle } from './dom.js';
import {
  STATUSES, categoryBadge, columnClass, formatCount, href, isoToLocalInput, localInputToIso, statusBadge, timeEl,
} from './format.js';
import { executionIdOf, fetchCaughtUp } from './live.js';
import { openBulkReplay } from './replay.js';

const PAGE_SIZE = 50;
const FILTER_NAMES = ['trigger_id', 'status', 'error_category', 'key', 'since', 'until', 'order'];
// Past this many executions changed in one burst, one page request beats one request each.
const BURST_SIZE = 10;

export function mountExecutions(ctx) {
  const filters = readFilters(ctx.query);
  ctx.setTitle('Executions');
  const list = executionList(ctx, filters);
  ctx.root.append(h('section', { class: 'view', testid: 'view-executions' },
    h('div', { class: 'view-head' },
      h('h1', { tabindex: '-1' }, 'Executions'),
      filters.trigger_id && h('button', { type: 'button', testid: 'executions-bulk-replay', on: { click: () => openBulkReplay(ctx.app, filters.trigger_id) } },
        `Replay dead letters of ${filters.trigger_id}…`)),
    filterForm(ctx, filters),
    list.el));
  list.loadMore();
  followLive(ctx, filters, list);
}

function readFilters(query) {
  const filters = Object.fromEntries(FILTER_NAMES.map((name) => [name, query.get(name) ?? '']));
  filters.order = filters.order === 'asc' ? 'asc' : 'desc';
  return filters;
}

function navigateWith(ctx, filters) {
  const query = { ...filters };
  if (query.order === 'desc') delete query.order;
  ctx.app.navigate(href.executions(query));
}

function filterForm(ctx, filters) {
  const trigger = h('select', { name: 'trigger_id', testid: 'filter-trigger' }, h('option', { value: '' }, 'All triggers'));
  fillTriggerOptions(ctx, trigger, filters.trigger_id);
  const status = h('select', { name: 'status', testid: 'filter-status', value: filters.status },
    h('option', { value: '' }, 'Any status'), STATUSES.map((s) => h('option', { value: s }, s.replace('_', ' '))));
  const category = h('select', { name: 'error_category', testid: 'filter-error-category', value: filters.error_category },
    h('option', { value: '' }, 'Any'), h('option', { value: 'transient' }, 'transient'), h('option', { value: 'permanent' }, 'permanent'));
  const key = h('input', { type: 'search', name: 'key', testid: 'filter-key', value: filters.key, placeholder: 'part of a key', autocomplete: 'off' });
  const since = h('input', { type: 'datetime-local', testid: 'filter-since', value: isoToLocalInput(filters.since) });
  const until = h('input', { type: 'datetime-local', testid: 'filter-until', value: isoToLocalInput(filters.until) });

  const submit = (event) => {
    event.preventDefault();
    navigateWith(ctx, {
      trigger_id: trigger.value, status: status.value, error_category: category.value, key: key.value.trim(),
      since: localInputToIso(since.value), until: localInputToIso(until.value), order: filters.order,
    });
  };
  return h('form', { class: 'filters card', testid: 'executions-filters', role: 'search', on: { submit } },
    field('Trigger', trigger), field('Status', status), field('Error category', category),
    field('Idempotency key', key), field('Received from', since), field('Received before', until),
    h('div', { class: 'filter-actions' },
      h('button', { type: 'submit', class: 'primary', testid: 'filter-apply' }, 'Apply'),
      h('a', { href: href.executions(), class: 'button', testid: 'filter-reset' }, 'Reset'),
      h('small', { class: 'hint' }, 'Times are in your local zone.')));
}

async function fillTriggerOptions(ctx, select, current) {
  const ids = new Set(current ? [current] : []);
  try {
    const { triggers } = await ctx.app.api.get('/api/triggers', { signal: ctx.signal });
    for (const trigger of triggers) ids.add(trigger.id);
  } catch { /* the select still offers the current value; the table shows any real error */ }
  for (const id of [...ids].sort()) select.append(h('option', { value: id }, id));
  select.value = current;
}

/** The table, its empty state and its footer; loadMore() fetches the next page. */
function executionList(ctx, filters) {
  const rows = new Map();
  const tbody = h('tbody', {});
  const table = h('div', { class: 'table-wrap' }, h('table', { class: 'data responsive executions', testid: 'executions-table' },
    h('caption', { class: 'visually-hidden' }, 'Executions'), tableHead(ctx, filters), tbody));
  const empty = emptyState('No executions match these filters.', h('a', { href: href.executions() }, 'Clear the filters'));
  empty.hidden = true;
  const count = h('p', { class: 'muted', role: 'status', testid: 'executions-count' });
  const more = h('button', { type: 'button', hidden: true, testid: 'executions-load-more', on: { click: () => loadMore() } }, 'Load more');
  const status = h('div', { class: 'stack' }, loadingState('Loading executions…'));
  const state = { cursor: null, done: false, failed: false, fresh: 0 };

  async function loadMore() {
    more.disabled = true;
    try {
      const page = await ctx.app.api.get('/api/executions', { signal: ctx.signal, query: pageQuery(filters, state.cursor) });
      if (ctx.signal.aborted) return;
      for (const row of page.executions) put(row, { position: 'end' });
      state.cursor = page.next_cursor;
      state.done = !page.next_cursor;
      state.failed = false;
      status.replaceChildren();
    } catch (error) {
      if (ctx.signal.aborted) return;
      state.failed = true;
      status.replaceChildren(errorState(error, () => { status.replaceChildren(loadingState()); loadMore(); }));
    }
    sync();
  }

  /** Insert or replace a row; position 'start'|'end' for new ones. */
  function put(row, { position, fresh = false }) {
    const next = executionRow(row);
    if (fresh) next.classList.add('fresh');
    const old = rows.get(row.execution_id);
    rows.set(row.execution_id, next);
    if (old) replaceRow(old, next);
    else if (position === 'start') tbody.prepend(next);
    else tbody.append(next);
  }

  function sync() {
    table.hidden = rows.size === 0 && state.done;
    empty.hidden = rows.size > 0 || !state.done;
    more.hidden = state.done || state.failed;
    more.disabled = false;
    const freshText = state.fresh ? ` · ${state.fresh} new since this page opened` : '';
    count.textContent = rows.size ? `${rows.size} execution${rows.size === 1 ? '' : 's'} shown${state.done ? ' (all)' : ''}${freshText}` : '';
  }

  /** A row from the live feed: update it if shown, add it if new and within the filters. */
  function merge(row) {
    if (rows.has(row.execution_id)) { put(row, { fresh: true }); return; }
    if (!matchesFilters(row, filters)) return;
    if (filters.order === 'asc' && !state.done) return; // it belongs on a page not loaded yet
    put(row, { position: filters.order === 'asc' ? 'end' : 'start', fresh: true });
    state.fresh += 1;
    sync();
  }

  const el = h('div', { class: 'list stack' }, table, status, empty, h('div', { class: 'list-foot' }, count, more));
  return { el, loadMore, merge, has: (id) => rows.has(id) };
}

function pageQuery(filters, cursor) {
  const query = { ...filters, limit: PAGE_SIZE };
  if (cursor) query.cursor = cursor;
  return query;
}

function replaceRow(old, next) {
  const active = document.activeElement;
  const testid = old.contains(active) ? active.getAttribute('data-testid') : null;
  old.replaceWith(next);
  if (testid) next.querySelector(`[data-testid="${CSS.escape(testid)}"]`)?.focus();
}

function tableHead(ctx, filters) {
  const ascending = filters.order === 'asc';
  const sort = h('button', {
    type: 'button', class: 'sort', testid: 'sort-received',
    title: ascending ? 'Oldest first: show newest first' : 'Newest first: show oldest first',
    on: { click: () => navigateWith(ctx, { ...filters, order: ascending ? 'desc' : 'asc' }) },
  }, 'Received ', h('span', { 'aria-hidden': 'true' }, ascending ? '▲' : '▼'));
  const columns = [['Trigger'], ['Key', 'Idempotency key'], ['Status'], ['Attempts'], ['Error', 'Error category and last error'],
    ['Last code', 'Last status code from the destination'], ['Dups', 'Duplicate deliveries'], ['Replays'], ['Last replay']];
  return h('thead', {}, h('tr', {},
    h('th', { scope: 'col', 'aria-sort': ascending ? 'ascending' : 'descending' }, sort),
    columns.map(([name, title]) => h('th', { scope: 'col', title }, name))));
}

function executionRow(row) {
  const cell = (label, testid, ...content) => h('td', { 'data-label': label, class: columnClass(label), testid }, h('div', { class: 'cell' }, ...content));
  return h('tr', { testid: 'execution-row', 'data-key': row.execution_id, 'data-execution-id': row.execution_id, 'data-status': row.status },
    cell('Received', 'execution-received-at',
      h('a', { href: href.execution(row.execution_id), testid: 'execution-link', title: `Open execution ${row.execution_id}` }, timeEl(row.received_at, null, { compact: true }))),
    cell('Trigger', 'execution-trigger', row.trigger_id),
    cell('Key', 'execution-key', row.idempotency_key ? h('code', { class: 'truncate', title: row.idempotency_key }, row.idempotency_key) : h('span', { class: 'muted' }, '—')),
    cell('Status', null, statusBadge(row.status, 'execution-status')),
    cell('Attempts', 'execution-attempts', formatCount(row.attempts)),
    cell('Error', null, categoryBadge(row.error_category, 'execution-error-category'),
      row.last_error && h('small', { class: 'truncate error-text', title: row.last_error }, row.last_error)),
    cell('Last code', 'execution-status-code', row.last_status_code ? String(row.last_status_code) : '—'),
    cell('Duplicates', 'execution-duplicates', formatCount(row.duplicate_count)),
    cell('Replays', 'execution-replays', formatCount(row.replay_count)),
    cell('Last replay', 'execution-last-replay', timeEl(row.last_replay_at, null, { compact: true })));
}

export function matchesFilters(row, filters) {
  if (filters.trigger_id && row.trigger_id !== filters.trigger_id) return false;
  if (filters.status && row.status !== filters.status) return false;
  if (filters.error_category && row.error_category !== filters.error_category) return false;
  // As the server: key is a substring match, since inclusive, until exclusive.
  if (filters.key && !String(row.idempotency_key ?? '').includes(filters.key)) return false;
  const received = Date.parse(row.received_at);
  if (filters.since && received < Date.parse(filters.since)) return false;
  if (filters.until && received >= Date.parse(filters.until)) return false;
  return true;
}

/** Live: collect the executions the feed touches, then refresh them in one go. */
function followLive(ctx, filters, list) {
  const touched = new Map();
  const flush = throttle(() => refreshTouched(ctx, filters, list, takeAll(touched)), 500, 150);
  ctx.signal.addEventListener('abort', () => flush.cancel(), { once: true });
  ctx.app.live.subscribe((event) => {
    const id = executionIdOf(event);
    if (!id) return;
    if (filters.trigger_id && event.trigger_id && event.trigger_id !== filters.trigger_id) return;
    touched.set(id, Math.max(touched.get(id) ?? 0, Number(event.seq) || 0));
    flush();
  }, ctx.signal);
}

function takeAll(map) {
  const copy = new Map(map);
  map.clear();
  return copy;
}

async function refreshTouched(ctx, filters, list, touched) {
  try {
    let oneByOne = touched;
    if (touched.size > BURST_SIZE) {
      const page = await ctx.app.api.get('/api/executions', { signal: ctx.signal, query: pageQuery({ ...filters, order: 'desc' }, null) });
      for (const row of page.executions) { list.merge(row); touched.delete(row.execution_id); }
      // Rows on screen but beyond the newest page still get their update, within reason.
      oneByOne = new Map([...touched].filter(([id]) => list.has(id)).slice(0, BURST_SIZE));
    }
    await Promise.all([...oneByOne].map(([id, seq]) => refreshOne(ctx, list, id, seq)));
  } catch (error) {
    if (error.name !== 'AbortError') console.warn('live refresh failed:', describeError(error));
  }
}

async function refreshOne(ctx, list, id, seq) {
  const row = await fetchCaughtUp(() => ctx.app.api.get(`/api/executions/${enc(id)}`, { signal: ctx.signal }), seq, ctx.signal);
  if (row && !ctx.signal.aborted) list.merge(stripEvents(row));
}

function stripEvents(detail) {
  const { events: _events, ...row } = detail;
  return row;
}

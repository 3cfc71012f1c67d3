// How values are shown: times (local, with UTC on hover), sizes, durations, statuses.
import { h } from './dom.js';

export const STATUSES = ['recorded', 'filtered', 'pending', 'running', 'succeeded', 'retrying', 'dead_lettered'];
// As the server (server/replays.py): only a finished execution can be replayed.
export const REPLAYABLE = new Set(['succeeded', 'dead_lettered']);
export const SOURCES = ['github', 'stripe', 'linear', 'standard', 'slack', 'telegram', 'discord', 'evolution', 'generic'];

/** Why a replay is refused, by the status that refuses it. */
export const NOT_REPLAYABLE_REASON = {
  pending: 'It is already waiting to be dispatched; a replay would add nothing.',
  running: 'An attempt is in progress right now. Wait until it finishes.',
  retrying: 'It is still being dispatched: its next attempt is scheduled (see Next attempt).',
  filtered: "The trigger's filter did not match this delivery, so it is never dispatched.",
  recorded: 'The trigger has no destination: there is nowhere to send it.',
};

const TIME_PARTS = { month: 'short', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' };
const LOCAL_TIME = new Intl.DateTimeFormat(undefined, { year: 'numeric', ...TIME_PARTS });
const LOCAL_TIME_THIS_YEAR = new Intl.DateTimeFormat(undefined, TIME_PARTS);

/**
 * A <time> element in the viewer's zone; the exact UTC instant is in the title.
 * compact: leave the year out when it is this year (for table cells).
 */
export function timeEl(iso, testid, { compact = false } = {}) {
  if (!iso) return h('span', { class: 'muted', testid }, '—');
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return h('span', { testid }, iso);
  const thisYear = date.getFullYear() === new Date().getFullYear();
  const format = compact && thisYear ? LOCAL_TIME_THIS_YEAR : LOCAL_TIME;
  return h('time', { datetime: iso, title: utcLabel(date), testid }, format.format(date));
}

export function utcLabel(date) {
  return `${date.toISOString().replace('T', ' ').replace('Z', '')} UTC`;
}

/** A datetime-local input's value (local wall time) → ISO UTC, or '' when empty/invalid. */
export function localInputToIso(value) {
  if (!value) return '';
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? '' : date.toISOString();
}

/** ISO UTC → the value a datetime-local input shows, in local wall time. */
export function isoToLocalInput(iso) {
  const date = iso ? new Date(iso) : null;
  if (!date || Number.isNaN(date.getTime())) return '';
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 16);
}

export function statusBadge(status, testid) {
  return h('span', { class: `badge status status-${status}`, testid, 'data-status': status }, labelOf(status));
}

export function categoryBadge(category, testid) {
  if (!category) return h('span', { class: 'muted', testid }, '—');
  return h('span', { class: `badge category-${category}`, testid }, category);
}

export function labelOf(value) {
  return String(value ?? '').replaceAll('_', ' ');
}

export function formatCount(value) {
  return value === null || value === undefined ? '—' : Number(value).toLocaleString();
}

export function formatMs(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms >= 10000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return `${Math.round(ms)} ms`;
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(2)} MiB`;
}

export function byteLength(text) {
  return new TextEncoder().encode(text ?? '').length;
}

/** 'Last code' → 'col-last-code': a class for a table column. */
export function columnClass(label) {
  return `col-${label.toLowerCase().replace(/[^a-z0-9]+/g, '-')}`;
}

export function shortId(id) {
  return id ? String(id).slice(0, 8) : '—';
}

/** Hash routes, built from encoded parts only. */
export const href = {
  triggers: () => '#/triggers',
  executions: (query = {}) => withQuery('#/executions', query),
  execution: (id) => `#/executions/${encodeURIComponent(id)}`,
  event: (seq) => `#/events/${encodeURIComponent(seq)}`,
  stats: (query = {}) => withQuery('#/stats', query),
};

function withQuery(path, query) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) if (value !== '' && value != null) params.set(name, value);
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

export function webhookUrl(triggerId) {
  return new URL(`webhooks/${encodeURIComponent(triggerId)}`, document.baseURI).href;
}

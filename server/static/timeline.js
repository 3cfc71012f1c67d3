// One event of the log, told as a step of an execution's story: used by the execution
// timeline and by the raw event view.
import { h } from './dom.js';
import { categoryBadge, formatMs, href, labelOf, timeEl } from './format.js';
import { bodyViewer, jsonBlock } from './json.js';

/** An ordered timeline; returns {el, add(event)} which keeps events sorted by seq, once each. */
export function timeline(events) {
  const list = h('ol', { class: 'timeline', testid: 'timeline' });
  const seen = new Set();
  function add(event, { fresh = false } = {}) {
    if (seen.has(event.seq)) return;
    seen.add(event.seq);
    const item = timelineItem(event);
    if (fresh) item.classList.add('fresh');
    const after = [...list.children].find((child) => Number(child.dataset.seq) > event.seq);
    list.insertBefore(item, after ?? null);
  }
  for (const event of events) add(event);
  return { el: list, add };
}

export function timelineItem(event) {
  const { title, badges = [], details = [] } = describe(event);
  return h('li', { class: `tl-item tl-${event.type.replace('.', '-')}`, testid: 'timeline-event', 'data-type': event.type, 'data-seq': event.seq },
    h('div', { class: 'tl-head' },
      h('span', { class: 'tl-title', testid: 'timeline-event-title' }, title),
      badges,
      h('span', { class: 'spacer' }),
      timeEl(event.recorded_at, 'timeline-event-time'),
      h('a', { href: href.event(event.seq), class: 'seq', testid: 'event-raw-link', title: 'Open the raw event' }, `#${event.seq}`)),
    details.length ? h('div', { class: 'tl-body' }, details) : null);
}

function describe(event) {
  const data = event.data ?? {};
  switch (event.type) {
    case 'webhook.received': return describeReceived(data);
    case 'webhook.duplicate': return describeDuplicate(data);
    case 'execution.started':
      return {
        title: `Attempt ${data.attempt ?? '?'} started`,
        details: [kv([['Lease until', timeEl(data.lease_until)], data.worker && ['Worker', h('code', {}, data.worker)]].filter(Boolean))],
      };
    case 'execution.succeeded':
      return {
        title: `Attempt ${data.attempt ?? '?'} succeeded`,
        badges: [codeBadge(data.status_code), h('span', { class: 'badge', testid: 'attempt-duration' }, formatMs(data.duration_ms))],
      };
    case 'execution.failed': return describeFailed(data);
    case 'execution.dead_lettered':
      return {
        title: 'Dead-lettered',
        badges: [h('span', { class: 'badge status-dead_lettered', testid: 'dead-letter-reason' }, data.reason ?? 'no reason given'),
          data.error_category && categoryBadge(data.error_category)],
      };
    case 'execution.replay_requested': return describeReplay(data);
    default:
      return { title: labelOf(event.type), details: [jsonBlock(JSON.stringify(data, null, 2), 'event-data')] };
  }
}

function describeReceived(data) {
  return {
    title: 'Received',
    badges: [
      h('span', { class: 'badge' }, data.content_type || 'no content type'),
      data.initial_status && h('span', { class: 'badge', title: 'The status the execution started with', testid: 'received-initial-status' }, `at receipt: ${labelOf(data.initial_status)}`),
    ],
    details: [
      h('details', { class: 'headers', open: true },
        h('summary', {}, `Headers (${headerEntries(data.headers).length})`), headersTable(data.headers)),
      bodyViewer({ body: data.body, contentType: data.content_type, sha256: data.body_sha256, encoding: data.body_encoding }),
    ],
  };
}

function describeDuplicate(data) {
  const matches = data.body_matches !== false;
  const details = [kv([
    ['Original event', data.original_event_id ? h('code', {}, data.original_event_id) : '—'],
    ['Body sha256', data.body_sha256 ? h('code', { class: 'hash' }, data.body_sha256) : '—'],
  ])];
  if (data.headers) {
    details.push(h('details', { class: 'headers' }, h('summary', {}, `Headers of the repeat (${headerEntries(data.headers).length})`), headersTable(data.headers)));
  }
  if (!matches && data.body != null) {
    details.push(h('details', {},
      h('summary', {}, 'The different body that came with this key'),
      bodyViewer({ body: data.body, contentType: data.content_type, sha256: data.body_sha256, encoding: data.body_encoding, testid: 'duplicate-body-viewer' })));
  }
  return {
    title: 'Duplicate delivery (not dispatched)',
    badges: [h('span', { class: `badge ${matches ? 'ok' : 'warn'}`, testid: 'duplicate-body-matches', 'data-matches': String(matches) },
      matches ? 'same body' : 'different body')],
    details,
  };
}

function describeFailed(data) {
  return {
    title: `Attempt ${data.attempt ?? '?'} failed`,
    badges: [categoryBadge(data.error_category, 'failure-category'), codeBadge(data.status_code),
      data.duration_ms != null && h('span', { class: 'badge', testid: 'attempt-duration' }, formatMs(data.duration_ms))],
    details: [kv([
      ['Error', h('span', { class: 'error-text', testid: 'failure-error' }, data.error ?? '—')],
      ['Next try', data.retry_at ? timeEl(data.retry_at) : h('span', {}, 'none')],
    ])],
  };
}

function describeReplay(data) {
  return {
    title: `Replay requested by ${data.requested_by ?? 'unknown'}`,
    badges: data.bulk_id ? [h('span', { class: 'badge', title: `bulk ${data.bulk_id}` }, 'bulk replay')] : [],
    details: data.bulk_id ? [kv([['Bulk id', h('code', {}, data.bulk_id)]])] : [],
  };
}

function codeBadge(code) {
  return h('span', { class: `badge ${code >= 200 && code < 300 ? 'ok' : code ? 'warn' : ''}`, testid: 'attempt-status-code' },
    code ? `HTTP ${code}` : 'no response');
}

export function headersTable(headers) {
  const entries = headerEntries(headers);
  if (!entries.length) return h('p', { class: 'muted' }, 'No headers kept.');
  return h('table', { class: 'kv-table', testid: 'event-headers' },
    h('tbody', {}, entries.map(([name, value]) =>
      h('tr', {}, h('th', { scope: 'row' }, name), h('td', {}, Array.isArray(value) ? value.join(', ') : String(value))))));
}

/** Headers may come as an object or as [name, value] pairs (names can repeat). */
function headerEntries(headers) {
  if (Array.isArray(headers)) return headers;
  return Object.entries(headers ?? {});
}

/** A definition list from [label, value] pairs. */
export function kv(pairs, testid) {
  return h('dl', { class: 'kv', testid }, pairs.map(([label, value]) => [h('dt', {}, label), h('dd', {}, value ?? '—')]));
}

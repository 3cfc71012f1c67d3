// The raw event view (#/events/<seq>): one event of the log, as a story step and as JSON.
import { enc } from './api.js';
import { copyButton, errorState, h, loadingState, swapContent } from './dom.js';
import { href, timeEl } from './format.js';
import { jsonBlock } from './json.js';
import { executionIdOf } from './live.js';
import { kv, timelineItem } from './timeline.js';

export function mountEvent(ctx) {
  const seq = Number(ctx.params[0]);
  ctx.setTitle(`Event #${seq}`);
  const body = h('div', { class: 'stack' }, loadingState('Loading the event…'));
  ctx.root.append(h('section', { class: 'view', testid: 'view-event' },
    h('div', { class: 'view-head' },
      h('h1', { tabindex: '-1' }, `Event #${seq}`),
      h('nav', { class: 'pager', 'aria-label': 'Neighbouring events' },
        seq > 1 && h('a', { href: href.event(seq - 1), testid: 'event-prev', class: 'button small' }, `← #${seq - 1}`),
        h('a', { href: href.event(seq + 1), testid: 'event-next', class: 'button small' }, `#${seq + 1} →`))),
    body));
  load(ctx, seq, body);
}

async function load(ctx, seq, body) {
  try {
    const { text, json } = await ctx.app.api.get(`/api/events/${enc(seq)}`, { signal: ctx.signal, asText: true });
    if (!ctx.signal.aborted) swapContent(body, renderEvent(json, text));
  } catch (error) {
    if (ctx.signal.aborted) return;
    const missing = error.status === 404;
    swapContent(body, missing
      ? h('div', { class: 'state state-empty', testid: 'empty-state' }, `There is no event with seq ${seq} (yet).`)
      : errorState(error, () => { swapContent(body, loadingState()); load(ctx, seq, body); }));
  }
}

function renderEvent(event, text) {
  const executionId = executionIdOf(event);
  return [
    kv([
      ['Type', h('code', { testid: 'event-type' }, event.type)],
      ['Seq', String(event.seq)],
      ['Id', h('code', {}, event.id)],
      ['Stream', h('code', {}, `${event.stream} @ v${event.version}`)],
      ['Trigger', event.trigger_id ? h('a', { href: href.executions({ trigger_id: event.trigger_id }) }, event.trigger_id) : '—'],
      ['Idempotency key', event.idempotency_key ? h('code', {}, event.idempotency_key) : '—'],
      ['Execution', executionId ? h('a', { href: href.execution(executionId), testid: 'event-execution-link' }, executionId) : '—'],
      ['Recorded', timeEl(event.recorded_at)],
      ['Hash', h('code', { class: 'hash wrap' }, event.hash ?? '—')],
    ], 'event-summary'),
    h('h2', {}, 'As a step'),
    h('ol', { class: 'timeline' }, timelineItem(event)),
    h('div', { class: 'section-head' }, h('h2', {}, 'Raw JSON'), copyButton(text, { label: 'Copy JSON', testid: 'event-json-copy' })),
    jsonBlock(text, 'event-json'),
  ];
}

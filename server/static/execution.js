// Execution detail (#/executions/<id>): the row, the replay button and the whole timeline,
// kept true live from the event feed.
import { enc } from './api.js';
import { errorState, h, loadingState, swapContent, throttle } from './dom.js';
import { categoryBadge, formatCount, href, shortId, statusBadge, timeEl } from './format.js';
import { executionIdOf, fetchCaughtUp } from './live.js';
import { replayPanel } from './replay.js';
import { kv, timeline } from './timeline.js';

export function mountExecution(ctx) {
  const id = ctx.params[0];
  ctx.setTitle(`Execution ${shortId(id)}`);
  const body = h('div', { class: 'stack' }, loadingState('Loading the execution…'));
  ctx.root.append(h('section', { class: 'view', testid: 'view-execution', 'data-execution-id': id },
    h('div', { class: 'view-head' },
      h('div', {},
        h('a', { href: href.executions(), class: 'back', testid: 'back-to-executions' }, '← Executions'),
        h('h1', { tabindex: '-1' }, 'Execution ', h('code', { class: 'h-code', testid: 'execution-id' }, id)))),
    body));
  load(ctx, id, body);
}

async function load(ctx, id, body) {
  try {
    const execution = await ctx.app.api.get(`/api/executions/${enc(id)}`, { signal: ctx.signal });
    const trigger = await loadTrigger(ctx, execution.trigger_id);
    if (!ctx.signal.aborted) render(ctx, body, execution, trigger);
  } catch (error) {
    if (ctx.signal.aborted) return;
    swapContent(body, error.status === 404
      ? h('div', { class: 'state state-empty', testid: 'empty-state' }, `No execution with id ${id}.`)
      : errorState(error, () => { swapContent(body, loadingState()); load(ctx, id, body); }));
  }
}

/** The trigger's configuration (for "sent to where"); the view still works without it. */
async function loadTrigger(ctx, triggerId) {
  try {
    return await ctx.app.api.get(`/api/triggers/${enc(triggerId)}`, { signal: ctx.signal });
  } catch (error) {
    if (error.name === 'AbortError' || error.status === 401) throw error;
    return null;
  }
}

function render(ctx, body, execution, trigger) {
  const summaryBox = h('div', { class: 'card' }, summary(execution));
  const events = timeline(execution.events ?? []);
  const follow = followLive(ctx, execution, { summaryBox, events });
  const replay = replayPanel(ctx, execution, trigger, follow.refresh);
  follow.onRow((row) => replay.update(row));
  swapContent(body,
    summaryBox,
    replay.el,
    h('div', { class: 'section-head' }, h('h2', {}, 'Timeline'), h('span', { class: 'muted' }, 'From the log, oldest first. New steps appear live.')),
    events.el);
}

function summary(row) {
  return kv([
    ['Status', statusBadge(row.status, 'execution-detail-status')],
    ['Trigger', h('a', { href: href.executions({ trigger_id: row.trigger_id }), testid: 'execution-detail-trigger' }, row.trigger_id)],
    ['Idempotency key', row.idempotency_key ? h('code', { class: 'wrap', testid: 'execution-detail-key' }, row.idempotency_key) : h('span', { class: 'muted' }, 'none (every delivery is new)')],
    ['Attempts', h('span', { testid: 'execution-detail-attempts' }, formatCount(row.attempts))],
    ['Error category', categoryBadge(row.error_category, 'execution-detail-error-category')],
    ['Last error', row.last_error ? h('span', { class: 'error-text', testid: 'execution-detail-last-error' }, row.last_error) : '—'],
    ['Last status code', row.last_status_code ? String(row.last_status_code) : '—'],
    ['Next attempt', timeEl(row.next_attempt_at)],
    ['Duplicates', [h('span', { testid: 'execution-detail-duplicates' }, formatCount(row.duplicate_count)), row.last_duplicate_at && [' · last ', timeEl(row.last_duplicate_at)]]],
    ['Replays', [h('span', { testid: 'execution-detail-replays' }, formatCount(row.replay_count)), row.last_replay_at && [' · last ', timeEl(row.last_replay_at)]]],
    ['Received', timeEl(row.received_at, 'execution-detail-received-at')],
    ['Completed', timeEl(row.completed_at)],
    ['Received event', row.received_event_id ? h('code', {}, row.received_event_id) : '—'],
  ], 'execution-summary');
}

/** Follow the feed for this execution: add steps at once, then refresh the row once caught up. */
function followLive(ctx, execution, { summaryBox, events }) {
  const id = execution.execution_id;
  const rowListeners = [];
  let wantSeq = Number(execution.last_seq) || null;

  const refresh = throttle(async () => {
    try {
      const fresh = await fetchCaughtUp(() => ctx.app.api.get(`/api/executions/${enc(id)}`, { signal: ctx.signal }), wantSeq, ctx.signal);
      if (!fresh || ctx.signal.aborted) return;
      swapContent(summaryBox, summary(fresh));
      for (const event of fresh.events ?? []) events.add(event, { fresh: true });
      for (const listener of rowListeners) listener(fresh);
    } catch (error) {
      if (error.name !== 'AbortError') console.warn('execution refresh failed', error);
    }
  }, 500, 100);
  ctx.signal.addEventListener('abort', () => refresh.cancel(), { once: true });

  ctx.app.live.subscribe((event) => {
    if (executionIdOf(event) !== id) return;
    events.add(event, { fresh: true });
    wantSeq = Math.max(wantSeq ?? 0, Number(event.seq) || 0);
    refresh();
  }, ctx.signal);

  return { refresh, onRow: (listener) => rowListeners.push(listener) };
}

// Replays: one execution (confirm what is re-sent and where; 409 and 429 explained) and the
// bulk replay of a trigger's dead letters (dry-run count first).
import { enc } from './api.js';
import { confirmDialog, describeError, field, h, openDialog, toast } from './dom.js';
import {
  NOT_REPLAYABLE_REASON, REPLAYABLE, href, localInputToIso, statusBadge,
} from './format.js';
import { bodyViewer } from './json.js';
import { kv } from './timeline.js';

/**
 * The replay button and its message line; update(row) re-evaluates it as the row changes,
 * refresh() asks the view for a fresh row (after a refusal the one shown may be stale).
 */
export function replayPanel(ctx, execution, trigger, refresh) {
  const { app, signal } = ctx;
  let row = execution;
  const button = h('button', { type: 'button', class: 'primary', testid: 'replay-button', on: { click: () => ask() } }, 'Replay…');
  const note = h('span', { class: 'muted', testid: 'replay-unavailable' });
  const message = h('p', { class: 'replay-message', role: 'status', 'aria-live': 'polite', testid: 'replay-message' });
  const timer = setInterval(render, 1000);
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });

  function render() {
    const left = cooldownLeft(app, row.execution_id);
    const allowed = REPLAYABLE.has(row.status);
    button.disabled = left > 0 || !allowed;
    button.textContent = left > 0 ? `Replay again in ${left} s` : 'Replay…';
    button.dataset.cooldown = String(left);
    note.textContent = allowed || left > 0 ? '' : `Not replayable now: ${NOT_REPLAYABLE_REASON[row.status] ?? row.status}`;
    // The button ticks; the live region speaks only when the wait starts and ends.
    if (message.dataset.kind === 'rate_limited' && left === 0) setMessage('You can replay again now.', 'info');
  }

  function setMessage(text, kind, ...extra) {
    message.dataset.kind = kind;
    message.replaceChildren(text, ...extra);
  }

  async function ask() {
    const confirmed = await confirmDialog({
      title: 'Replay this execution?', testid: 'replay-dialog', confirmLabel: 'Replay now',
      content: replaySummary(row, execution, trigger),
    });
    if (confirmed) await send();
  }

  async function send() {
    button.disabled = true;
    try {
      const result = await app.api.post(`/api/executions/${enc(row.execution_id)}/replay`, {}, { signal });
      message.dataset.kind = 'progress'; // from now on the line follows the replay's status
      update({ ...row, status: result.status ?? 'pending' });
      toast('Replay requested.', 'success');
    } catch (error) {
      if (error.name !== 'AbortError') explain(error);
    }
    render();
  }

  function explain(error) {
    if (error.status === 429) {
      const seconds = error.retryAfter ?? 60;
      app.cooldowns.set(row.execution_id, Date.now() + seconds * 1000);
      setMessage(`Rate limited: this execution was replayed moments ago. Replay again in ${seconds} s (the button counts down).`, 'rate_limited');
    } else if (error.status === 409) {
      const why = NOT_REPLAYABLE_REASON[row.status];
      setMessage(`Replay refused: ${error.message}${why ? ` ${why}` : ''}`, 'refused');
      refresh();
    } else {
      setMessage(`Replay failed: ${describeError(error)}`, 'error');
    }
  }

  /** Called with every fresh copy of the row (live updates). The line follows the status only
   * while it shows a replay's progress: a late update never hides a refusal or the wait's end. */
  function update(next) {
    row = next;
    if (message.dataset.kind === 'progress') setMessage('Replay requested. Status now: ', 'progress', statusBadge(row.status, 'replay-progress-status'));
    render();
  }

  render();
  return { el: h('div', { class: 'replay-panel' }, h('div', { class: 'row' }, button, note), message), update };
}

function cooldownLeft(app, executionId) {
  const deadline = app.cooldowns.get(executionId);
  if (!deadline) return 0;
  const left = Math.ceil((deadline - Date.now()) / 1000);
  if (left <= 0) app.cooldowns.delete(executionId);
  return Math.max(0, left);
}

/** What a replay will re-send, and where. */
function replaySummary(row, execution, trigger) {
  const received = (execution.events ?? []).find((event) => event.type === 'webhook.received');
  const body = received?.data?.body ?? '';
  const destination = trigger?.destination;
  return [
    kv([
      ['Trigger', row.trigger_id],
      ['Sent to', h('code', { class: 'wrap', testid: 'replay-destination' },
        destination ? `POST ${destination.url}` : trigger ? 'no destination configured' : 'unknown: the trigger could not be loaded (deleted?)')],
      ['Timeout', destination?.timeout_s ? `${destination.timeout_s} s` : '—'],
      ['Idempotency key', row.idempotency_key ? h('code', {}, row.idempotency_key) : 'none'],
      ['Body', `${received?.data?.content_type ?? 'unknown type'}, the exact bytes received (below)`],
    ], 'replay-summary'),
    trigger?.paused && h('p', { class: 'callout warn' }, 'This trigger is paused: the replay waits until it is resumed.'),
    row.idempotency_key && h('p', { class: 'muted' },
      'The destination receives the same idempotency key; if it deduplicates by key it may treat this as already processed.'),
    received ? bodyViewer({ body, contentType: received.data.content_type, sha256: received.data.body_sha256, encoding: received.data.body_encoding, testid: 'replay-body' })
      : h('p', { class: 'muted' }, 'The received event is not in this timeline.'),
  ];
}

/** Bulk replay of a trigger's dead letters: count with a dry run, then confirm. */
export function openBulkReplay(app, triggerId) {
  const since = h('input', { type: 'datetime-local', testid: 'bulk-replay-since' });
  const until = h('input', { type: 'datetime-local', testid: 'bulk-replay-until' });
  const limit = h('input', { type: 'number', min: '1', step: '1', placeholder: 'all', testid: 'bulk-replay-limit' });
  const result = h('div', { class: 'bulk-result', role: 'status', 'aria-live': 'polite', testid: 'bulk-replay-count' });
  const countButton = h('button', { type: 'button', testid: 'bulk-replay-dry-run', on: { click: () => count() } }, 'Count again');
  const confirm = h('button', { type: 'button', class: 'danger', disabled: true, testid: 'bulk-replay-confirm', on: { click: () => run() } }, 'Replay');
  const close = h('button', { type: 'button', autofocus: true, testid: 'bulk-replay-close', on: { click: () => dialog.close() } }, 'Close');
  for (const input of [since, until, limit]) input.addEventListener('input', () => { confirm.disabled = true; result.textContent = 'Filters changed: count again.'; });

  const request = (dryRun) => ({
    trigger_id: triggerId, status: 'dead_lettered',
    since: localInputToIso(since.value) || undefined, until: localInputToIso(until.value) || undefined,
    limit: limit.value ? Number(limit.value) : undefined, ...(dryRun ? { dry_run: true } : {}),
  });

  async function count() {
    confirm.disabled = true;
    result.textContent = 'Counting dead letters…';
    try {
      const { would_replay: n } = await app.api.post('/api/replays', request(true));
      result.replaceChildren(h('strong', { testid: 'bulk-replay-would' }, String(n)),
        ` dead-lettered execution${n === 1 ? '' : 's'} of ${triggerId} would be replayed.`);
      confirm.textContent = `Replay ${n}`;
      confirm.disabled = n === 0;
    } catch (error) {
      result.textContent = `Could not count: ${describeError(error)}`;
    }
  }

  async function run() {
    confirm.disabled = true;
    try {
      const { replayed, bulk_id: bulkId } = await app.api.post('/api/replays', request(false));
      result.replaceChildren(h('span', { testid: 'bulk-replay-result' }, `Replayed ${replayed} execution${replayed === 1 ? '' : 's'} (bulk ${bulkId}). `),
        h('a', { href: href.executions({ trigger_id: triggerId }), on: { click: () => dialog.close() } }, 'Follow them in Executions'));
      toast(`Bulk replay of ${triggerId}: ${replayed} replayed.`, 'success');
    } catch (error) {
      result.textContent = `Bulk replay failed: ${describeError(error)}`;
    }
  }

  const dialog = openDialog({
    title: `Replay dead letters of ${triggerId}`, testid: 'bulk-replay-dialog', wide: true,
    content: [
      h('p', {}, 'Every dead-lettered execution of this trigger in the range is sent again to its destination.'),
      h('div', { class: 'grid-3' }, field('Received since', since), field('Received until', until), field('At most', limit)),
      result,
    ],
    actions: [close, countButton, confirm],
  });
  count();
  return dialog;
}

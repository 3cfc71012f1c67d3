// Triggers (#/triggers): list, create (secret shown once), pause/resume, delete, copy URL.
import { enc } from './api.js';
import {
  confirmDialog, copyButton, describeError, emptyState, errorState, h, loadingState, swapContent, throttle, toast,
} from './dom.js';
import { columnClass, formatCount, href, timeEl, webhookUrl } from './format.js';
import { openBulkReplay } from './replay.js';
import { openCreateTrigger } from './trigger-form.js';

const LIVE_TYPES = /^(trigger\.|webhook\.|execution\.dead_lettered)/;

export function mountTriggers(ctx) {
  ctx.setTitle('Triggers');
  const body = h('div', { class: 'stack' }, loadingState('Loading triggers…'));
  const reload = () => load(ctx, body);
  ctx.root.append(h('section', { class: 'view', testid: 'view-triggers' },
    h('div', { class: 'view-head' },
      h('h1', { tabindex: '-1' }, 'Triggers'),
      h('button', { type: 'button', class: 'primary', testid: 'trigger-create', on: { click: () => openCreateTrigger(ctx.app, reload) } }, 'New trigger')),
    body));
  reload();
  const reloadSoon = throttle(reload, 2000, 300);
  ctx.signal.addEventListener('abort', () => reloadSoon.cancel(), { once: true });
  ctx.app.live.subscribe((event) => { if (LIVE_TYPES.test(event.type)) reloadSoon(); }, ctx.signal);
}

async function load(ctx, body) {
  try {
    const { triggers } = await ctx.app.api.get('/api/triggers', { signal: ctx.signal });
    if (!ctx.signal.aborted) swapContent(body, triggers.length ? triggersTable(ctx, triggers, () => load(ctx, body)) : noTriggers(ctx, body));
  } catch (error) {
    if (!ctx.signal.aborted) swapContent(body, errorState(error, () => { swapContent(body, loadingState()); load(ctx, body); }));
  }
}

function noTriggers(ctx, body) {
  return emptyState('No triggers yet. A trigger is one webhook URL that a sender posts to.',
    h('button', { type: 'button', class: 'primary', testid: 'trigger-create-empty', on: { click: () => openCreateTrigger(ctx.app, () => load(ctx, body)) } }, 'Create the first trigger'));
}

function triggersTable(ctx, triggers, reload) {
  const sorted = [...triggers].sort((a, b) => a.id.localeCompare(b.id));
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data responsive triggers', testid: 'triggers-table' },
    h('caption', { class: 'visually-hidden' }, 'Triggers'),
    h('thead', {}, h('tr', {}, ['Trigger', 'Source', 'Destination', 'State', 'Received', 'Duplicates', 'Dead letters', 'Actions']
      .map((name) => h('th', { scope: 'col' }, name)))),
    h('tbody', {}, sorted.map((trigger) => triggerRow(ctx, trigger, reload)))));
}

function triggerRow(ctx, trigger, reload) {
  const counts = trigger.counts ?? {};
  const cell = (label, testid, ...content) => h('td', { 'data-label': label, class: columnClass(label), testid }, h('div', { class: 'cell' }, ...content));
  return h('tr', { testid: 'trigger-row', 'data-key': trigger.id, 'data-trigger-id': trigger.id, 'data-paused': String(Boolean(trigger.paused)) },
    cell('Trigger', null, h('strong', { testid: 'trigger-id' }, trigger.id),
      h('div', { class: 'url-line' }, h('code', { class: 'wrap', testid: 'trigger-webhook-url' }, webhookUrl(trigger.id)),
        copyButton(() => webhookUrl(trigger.id), { label: 'Copy URL', testid: 'trigger-copy-url' })),
      triggerConfig(trigger)),
    cell('Source', 'trigger-source', trigger.source, ' ',
      trigger.has_secret ? h('span', { class: 'badge ok', title: 'Deliveries must be signed' }, 'signed')
        : h('span', { class: 'badge warn', title: 'Anyone who knows the URL can post' }, 'unsigned')),
    cell('Destination', 'trigger-destination', destinationText(trigger.destination)),
    cell('State', null, h('span', { class: `badge ${trigger.paused ? 'warn' : 'ok'}`, testid: 'trigger-state' }, trigger.paused ? 'paused' : 'active')),
    cell('Received', null, h('a', { href: href.executions({ trigger_id: trigger.id }), testid: 'trigger-count-received' }, formatCount(counts.received))),
    cell('Duplicates', 'trigger-count-duplicates', formatCount(counts.duplicates)),
    cell('Dead letters', null, h('a', { href: href.executions({ trigger_id: trigger.id, status: 'dead_lettered' }), testid: 'trigger-count-dead-lettered' }, formatCount(counts.dead_lettered))),
    cell('Actions', null, h('div', { class: 'actions' }, rowActions(ctx, trigger, reload))));
}

function destinationText(destination) {
  if (!destination) return h('span', { class: 'muted' }, 'none: deliveries are recorded only');
  return [h('code', { class: 'wrap' }, destination.url),
    h('small', { class: 'muted block' }, `timeout ${destination.timeout_s ?? '—'} s · ${destination.has_secret ? 'signed' : 'unsigned'}`)];
}

function triggerConfig(trigger) {
  const retry = trigger.retry ?? {};
  return h('details', { class: 'config', testid: 'trigger-config' }, h('summary', {}, 'Configuration'),
    h('dl', { class: 'kv compact' },
      h('dt', {}, 'Key path'), h('dd', {}, trigger.idempotency_key_path || 'default rules'),
      h('dt', {}, 'Filter'), h('dd', {}, trigger.filter ? h('code', { class: 'wrap' }, JSON.stringify(trigger.filter)) : 'none'),
      h('dt', {}, 'Retry'), h('dd', {}, trigger.retry
        ? `${retry.max_attempts ?? 'default'} attempts, ${retry.base_s ?? 'default'} s base, ${retry.cap_s ?? 'default'} s cap`
        : 'server default'),
      h('dt', {}, 'Created'), h('dd', {}, timeEl(trigger.created_at)),
      h('dt', {}, 'Updated'), h('dd', {}, timeEl(trigger.updated_at))));
}

function rowActions(ctx, trigger, reload) {
  const pauseLabel = trigger.paused ? 'Resume' : 'Pause';
  return [
    h('button', { type: 'button', class: 'small', testid: trigger.paused ? 'trigger-resume' : 'trigger-pause', on: { click: () => togglePause(ctx, trigger, reload) } }, pauseLabel),
    h('button', { type: 'button', class: 'small', testid: 'trigger-bulk-replay', on: { click: () => openBulkReplay(ctx.app, trigger.id) } }, 'Replay dead letters…'),
    h('a', { href: href.stats({ trigger_id: trigger.id }), class: 'button small', testid: 'trigger-stats-link' }, 'Stats'),
    h('button', { type: 'button', class: 'small danger', testid: 'trigger-delete', on: { click: () => deleteTrigger(ctx, trigger, reload) } }, 'Delete…'),
  ];
}

async function togglePause(ctx, trigger, reload) {
  const action = trigger.paused ? 'resume' : 'pause';
  try {
    await ctx.app.api.post(`/api/triggers/${enc(trigger.id)}/${action}`);
    toast(`${trigger.id} ${action === 'pause' ? 'paused: deliveries are still recorded, dispatch waits' : 'resumed'}.`, 'success');
  } catch (error) {
    toast(`Could not ${action} ${trigger.id}: ${describeError(error)}`, 'error');
  }
  reload();
}

async function deleteTrigger(ctx, trigger, reload) {
  const confirmed = await confirmDialog({
    title: `Delete trigger ${trigger.id}?`, testid: 'delete-dialog', confirmLabel: `Delete ${trigger.id}`, danger: true,
    content: [
      h('p', {}, 'Deliveries to its webhook URL will be refused (404) from now on.'),
      h('p', {}, 'Its executions still waiting for dispatch are dead-lettered with reason trigger_deleted. Everything already recorded stays in the log.'),
    ],
  });
  if (!confirmed) return;
  try {
    await ctx.app.api.delete(`/api/triggers/${enc(trigger.id)}`);
    toast(`Trigger ${trigger.id} deleted.`, 'success');
  } catch (error) {
    toast(`Could not delete ${trigger.id}: ${describeError(error)}`, 'error');
  }
  reload();
}

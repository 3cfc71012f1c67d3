// The "new trigger" dialog; on success it shows the secret once, with a copy button.
import { copyButton, field, h, openDialog } from './dom.js';
import { SOURCES, webhookUrl } from './format.js';

const ID_PATTERN = '^[a-z0-9][a-z0-9_\\-]{0,63}$';

/** Where each sender's secret comes from decides the default: generated here, or pasted from the sender. */
const SECRET_HINTS = {
  github: ['generate', 'Paste the same secret into the GitHub webhook settings.'],
  stripe: ['enter', "Stripe creates the signing secret (whsec_…): paste it from the endpoint's page."],
  linear: ['enter', 'Linear shows the signing secret when you create the webhook: paste it.'],
  standard: ['enter', 'The sender’s whsec_… secret (Standard Webhooks / Svix).'],
  slack: ['enter', "Your Slack app's signing secret."],
  telegram: ['generate', 'Pass it to setWebhook as secret_token.'],
  discord: ['enter', "Your application's public key (Ed25519, hex)."],
  evolution: ['generate', 'Set it as the apikey the Evolution API sends.'],
  generic: ['generate', 'The sender signs with X-Signature-256: sha256=HMAC(body).'],
};

export function openCreateTrigger(app, onCreated) {
  const controls = createControls();
  const error = h('p', { class: 'form-error', role: 'alert', testid: 'create-trigger-error' });
  const submit = h('button', { type: 'submit', class: 'primary', form: 'create-trigger-form', testid: 'create-trigger-submit' }, 'Create trigger');
  const cancel = h('button', { type: 'button', testid: 'create-trigger-cancel', on: { click: () => dialog.close() } }, 'Cancel');
  const form = h('form', { id: 'create-trigger-form', testid: 'create-trigger-form', novalidate: true, on: { submit: (event) => { event.preventDefault(); send(); } } },
    formLayout(controls), error);
  syncSecretControls(controls);

  async function send() {
    error.textContent = '';
    let payload;
    try { payload = buildPayload(controls); } catch (problem) { error.textContent = problem.message; return; }
    submit.disabled = true;
    try {
      const created = await app.api.post('/api/triggers', payload);
      showCreated(dialog, created);
      onCreated();
    } catch (problem) {
      error.textContent = problem.code === 'trigger_exists' ? `A trigger named ${payload.id} already exists.` : `${problem.message} (${problem.code ?? 'error'})`;
      (problem.code === 'trigger_exists' ? controls.id : submit).focus();
    } finally {
      submit.disabled = false;
    }
  }

  const dialog = openDialog({ title: 'New trigger', testid: 'create-trigger-dialog', content: form, actions: [cancel, submit], wide: true });
  controls.id.focus();
  return dialog;
}

function createControls() {
  const c = {
    id: h('input', { required: true, pattern: ID_PATTERN, maxlength: '64', autocomplete: 'off', spellcheck: 'false', testid: 'create-trigger-id', placeholder: 'github-main' }),
    source: h('select', { testid: 'create-trigger-source' }, SOURCES.map((s) => h('option', { value: s }, s))),
    secretMode: h('select', { testid: 'create-trigger-secret-mode' },
      h('option', { value: 'generate' }, 'Generate one for me'), h('option', { value: 'enter' }, 'I have one: paste it'), h('option', { value: 'none' }, 'No secret (unsigned: anyone with the URL can post)')),
    secret: h('input', { type: 'password', autocomplete: 'off', testid: 'create-trigger-secret' }),
    secretHint: h('small', { class: 'hint' }),
    url: h('input', { type: 'url', placeholder: 'https://app.example.com/hooks', testid: 'create-trigger-destination-url' }),
    timeout: h('input', { type: 'number', min: '1', step: 'any', placeholder: 'server default', testid: 'create-trigger-destination-timeout' }),
    destinationSecret: h('input', { type: 'password', autocomplete: 'off', placeholder: 'optional', testid: 'create-trigger-destination-secret' }),
    keyPath: h('input', { autocomplete: 'off', placeholder: 'e.g. X-Request-Id or data.key.id', testid: 'create-trigger-key-path' }),
    filter: h('textarea', { rows: '3', placeholder: '{"action": "opened"}', spellcheck: 'false', testid: 'create-trigger-filter' }),
    maxAttempts: h('input', { type: 'number', min: '1', step: '1', placeholder: 'default', testid: 'create-trigger-retry-max-attempts' }),
    baseS: h('input', { type: 'number', min: '0', step: 'any', placeholder: 'default', testid: 'create-trigger-retry-base' }),
    capS: h('input', { type: 'number', min: '0', step: 'any', placeholder: 'default', testid: 'create-trigger-retry-cap' }),
  };
  const syncSecret = () => syncSecretControls(c);
  c.source.addEventListener('change', () => { c.secretMode.value = SECRET_HINTS[c.source.value][0]; syncSecret(); });
  c.secretMode.addEventListener('change', syncSecret);
  return c;
}

function syncSecretControls(c) {
  const canGenerate = c.source.value !== 'discord';
  c.secretMode.querySelector('option[value="generate"]').disabled = !canGenerate;
  if (!canGenerate && c.secretMode.value === 'generate') c.secretMode.value = 'enter';
  c.secret.closest('.field')?.toggleAttribute('hidden', c.secretMode.value !== 'enter');
  c.secretHint.textContent = SECRET_HINTS[c.source.value][1];
}

function formLayout(c) {
  return [
    h('div', { class: 'grid-2' },
      field('Id', c.id, 'Lower-case letters, digits, - and _; it becomes the URL path.'),
      field('Source', c.source)),
    h('fieldset', {}, h('legend', {}, 'Signature secret'),
      h('div', { class: 'grid-2' }, field('Secret', c.secretMode), field('Paste the secret', c.secret)), c.secretHint),
    h('fieldset', {}, h('legend', {}, 'Destination (leave empty to only record)'),
      field('URL', c.url),
      h('div', { class: 'grid-2' }, field('Timeout (s)', c.timeout), field('Signing secret for the destination', c.destinationSecret))),
    h('details', {}, h('summary', {}, 'Idempotency key, filter and retries'),
      field('Idempotency key path', c.keyPath, 'A header name or a dotted body path; empty uses the default rules.'),
      field('Filter (JSON object)', c.filter, 'Deliveries whose body does not match are recorded as filtered, never sent.'),
      h('div', { class: 'grid-3' }, field('Max attempts', c.maxAttempts), field('Base delay (s)', c.baseS), field('Delay cap (s)', c.capS))),
  ];
}

/** The POST /api/triggers body, or an Error saying what to fix. */
export function buildPayload(c) {
  const id = c.id.value.trim();
  if (!new RegExp(ID_PATTERN).test(id)) throw new Error('The id must start with a lower-case letter or digit and use only a–z, 0–9, - and _ (at most 64).');
  const payload = { id, source: c.source.value };
  if (c.secretMode.value === 'generate') payload.generate_secret = true;
  if (c.secretMode.value === 'enter') {
    if (!c.secret.value) throw new Error('Paste the secret, or choose another secret option.');
    payload.secret = c.secret.value;
  }
  const destination = buildDestination(c);
  if (destination) payload.destination = destination;
  if (c.keyPath.value.trim()) payload.idempotency_key_path = c.keyPath.value.trim();
  const filter = buildFilter(c.filter.value);
  if (filter) payload.filter = filter;
  const retry = buildRetry(c);
  if (retry) payload.retry = retry;
  return payload;
}

function buildDestination(c) {
  const url = c.url.value.trim();
  if (!url) {
    if (c.timeout.value || c.destinationSecret.value) throw new Error('A destination timeout or secret needs a destination URL.');
    return null;
  }
  const destination = { url };
  if (c.timeout.value) destination.timeout_s = Number(c.timeout.value);
  if (c.destinationSecret.value) destination.secret = c.destinationSecret.value;
  return destination;
}

function buildFilter(text) {
  if (!text.trim()) return null;
  let filter;
  try { filter = JSON.parse(text); } catch { throw new Error('The filter is not valid JSON.'); }
  if (!filter || typeof filter !== 'object' || Array.isArray(filter)) throw new Error('The filter must be a JSON object, e.g. {"action": "opened"}.');
  return filter;
}

function buildRetry(c) {
  const retry = {};
  if (c.maxAttempts.value) retry.max_attempts = Number(c.maxAttempts.value);
  if (c.baseS.value) retry.base_s = Number(c.baseS.value);
  if (c.capS.value) retry.cap_s = Number(c.capS.value);
  return Object.keys(retry).length ? retry : null;
}

/** After a 201: the webhook URL, and the secret once (it is never shown again). */
function showCreated(dialog, created) {
  const url = webhookUrl(created.id);
  const done = h('button', { type: 'button', class: 'primary', testid: 'create-trigger-done', on: { click: () => dialog.close() } },
    created.secret ? 'I have copied the secret' : 'Done');
  // Esc must not throw the only copy of the secret away: only the button closes this step.
  if (created.secret) dialog.addEventListener('cancel', (event) => event.preventDefault());
  dialog.querySelector('h2').textContent = `Trigger ${created.id} created`;
  dialog.querySelector('.dialog-body').replaceChildren(
    h('p', {}, 'Point the sender at this URL:'),
    h('div', { class: 'url-line' }, h('code', { class: 'wrap', testid: 'created-webhook-url' }, url), copyButton(url, { label: 'Copy URL', testid: 'created-webhook-url-copy' })),
    created.secret ? secretOnce(created.secret) : h('p', { class: 'muted' }, created.has_secret ? 'The secret you entered is stored encrypted.' : 'This trigger has no secret: deliveries are not authenticated.'));
  dialog.querySelector('.dialog-actions').replaceChildren(done);
  done.focus();
}

function secretOnce(secret) {
  const input = h('input', { readonly: true, class: 'secret', testid: 'created-secret', 'aria-label': 'The secret', on: { focus: (e) => e.target.select() } });
  input.value = secret;
  return h('div', { class: 'callout warn', role: 'alert', testid: 'created-secret-warning' },
    h('p', {}, h('strong', {}, 'Copy the secret now. '), 'hookledger stores it encrypted and will never show it again.'),
    h('div', { class: 'url-line' }, input, copyButton(secret, { label: 'Copy secret', testid: 'created-secret-copy' })));
}

// Safe DOM building and the small widgets every view shares.
// Data only ever enters the page as text (textContent / attributes), never as markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Build an HTML element: h('a', {href, testid, on: {click}}, 'text', childNode, …). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** Build an SVG element, same calling convention as h(). */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs ?? {})) setAttr(el, name, value);
  append(el, children);
  // A <select>'s value can only be set once its options exist.
  if (attrs && 'value' in attrs && attrs.value !== undefined) el.value = attrs.value;
  return el;
}

function setAttr(el, name, value) {
  if (value === null || value === undefined || value === false || name === 'value') return;
  if (name === 'on') {
    for (const [type, handler] of Object.entries(value)) el.addEventListener(type, handler);
  } else if (name === 'testid') {
    el.setAttribute('data-testid', value);
  } else {
    el.setAttribute(name, value === true ? '' : String(value));
  }
}

/** Append children: strings and numbers become text nodes; null/false/undefined are skipped. */
export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/**
 * Replace a container's content, keeping keyboard focus on the "same" control and the same
 * <details> open, when they survive (matched by the row's data-key and the data-testid).
 */
export function swapContent(container, ...children) {
  const focusKey = focusSignature(container);
  const opened = [...container.querySelectorAll('details[open][data-testid]')].map(signatureOf);
  container.replaceChildren();
  append(container, children);
  for (const signature of opened) findBySignature(container, signature)?.setAttribute('open', '');
  if (focusKey) findBySignature(container, focusKey)?.focus();
}

function signatureOf(el) {
  return { key: el.closest('[data-key]')?.getAttribute('data-key') ?? null, testid: el.getAttribute('data-testid') };
}

function findBySignature(container, { key, testid }) {
  if (!testid) return null;
  const scope = key ? container.querySelector(`[data-key="${CSS.escape(key)}"]`) : container;
  return scope?.querySelector(`[data-testid="${CSS.escape(testid)}"]`) ?? null;
}

function focusSignature(container) {
  const active = document.activeElement;
  return active && container.contains(active) ? signatureOf(active) : null;
}

export function loadingState(text = 'Loading…') {
  return h('div', { class: 'state state-loading', role: 'status', testid: 'loading' },
    h('span', { class: 'spinner', 'aria-hidden': 'true' }), text);
}

export function errorState(error, retry) {
  return h('div', { class: 'state state-error', role: 'alert', testid: 'error-state' },
    h('strong', {}, 'Could not load this. '),
    h('span', { testid: 'error-message' }, describeError(error)),
    retry && h('button', { type: 'button', testid: 'retry-button', on: { click: retry } }, 'Try again'));
}

export function emptyState(text, ...extra) {
  return h('div', { class: 'state state-empty', testid: 'empty-state' }, h('p', {}, text), ...extra);
}

export function describeError(error) {
  if (!error) return 'Unknown error.';
  if (error.status === 0) return 'The server cannot be reached. Check that hookledger is running.';
  const code = error.code ? ` (${error.code})` : '';
  return `${error.message || String(error)}${code}`;
}

/** Toast messages in a polite live region; errors use role=alert. */
export function toast(message, kind = 'info') {
  const region = document.getElementById('toasts');
  const close = () => item.remove();
  const item = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status', testid: 'toast' },
    h('span', {}, message),
    h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss', on: { click: close } }, '×'));
  region.append(item);
  setTimeout(close, kind === 'error' ? 10000 : 5000);
}

/**
 * A modal <dialog> (native focus trap, Esc closes). Returns the element; it removes itself
 * from the page when closed.
 */
export function openDialog({ title, testid, content, actions = [], wide = false }) {
  const dialog = h('dialog', { class: wide ? 'dialog dialog-wide' : 'dialog', testid, 'aria-labelledby': `${testid}-title` },
    h('h2', { id: `${testid}-title` }, title),
    h('div', { class: 'dialog-body' }, content),
    h('div', { class: 'dialog-actions' }, actions));
  dialog.addEventListener('close', () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

/** Ask a yes/no question in a dialog; resolves true only on the confirm button. */
export function confirmDialog({ title, content, confirmLabel = 'Confirm', danger = false, testid = 'confirm-dialog' }) {
  return new Promise((resolve) => {
    const finish = (answer) => { resolve(answer); dialog.close(); };
    const cancel = h('button', { type: 'button', testid: 'confirm-cancel', autofocus: danger, on: { click: () => finish(false) } }, 'Cancel');
    const ok = h('button', { type: 'button', class: danger ? 'danger' : 'primary', testid: 'confirm-ok', on: { click: () => finish(true) } }, confirmLabel);
    const dialog = openDialog({ title, testid, content, actions: [cancel, ok] });
    dialog.addEventListener('cancel', () => resolve(false));
  });
}

/** A button that copies text to the clipboard, with a fallback for non-secure (plain http) origins. */
export function copyButton(getText, { label = 'Copy', testid = 'copy', title } = {}) {
  const button = h('button', { type: 'button', class: 'small', testid, title, on: { click: () => copy() } }, label);
  async function copy() {
    const done = await copyText(typeof getText === 'function' ? getText() : getText);
    button.textContent = done ? 'Copied' : 'Copy failed';
    if (!done) toast('The browser refused to copy: select the text and copy it by hand.', 'error');
    setTimeout(() => { button.textContent = label; }, 1500);
  }
  return button;
}

export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch { /* fall through to the legacy path */ }
  return legacyCopy(text);
}

function legacyCopy(text) {
  const area = h('textarea', { readonly: true, class: 'offscreen', 'aria-hidden': 'true' });
  area.value = text;
  const previous = document.activeElement;
  document.body.append(area);
  area.select();
  let copied = false;
  try { copied = document.execCommand('copy'); } catch { copied = false; }
  area.remove();
  previous?.focus?.();
  return copied;
}

/** A labelled form field: label + control (+ optional hint), wired with ids. */
export function field(label, control, hint) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  const hintEl = hint && h('small', { id: `${id}-hint`, class: 'hint' }, hint);
  if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: id }, label), control, hintEl);
}

/**
 * Coalesce calls: fn runs `delay` ms after the first call of a burst, then at most once every
 * `every` ms while calls keep coming (a steady stream of events never starves it, as a
 * debounce would).
 */
export function throttle(fn, every, delay = 0) {
  let timer = null;
  let lastRun = 0;
  const run = () => { timer = null; lastRun = Date.now(); fn(); };
  const wrapped = () => {
    if (timer) return;
    timer = setTimeout(run, Math.max(delay, lastRun + every - Date.now()));
  };
  wrapped.cancel = () => { clearTimeout(timer); timer = null; };
  return wrapped;
}

/** setTimeout that resolves early (rejecting nothing) when the signal aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/** A signal that aborts with its parent, or earlier through the returned controller. */
export function childController(parent) {
  const controller = new AbortController();
  if (parent.aborted) controller.abort();
  else parent.addEventListener('abort', () => controller.abort(), { once: true });
  return controller;
}

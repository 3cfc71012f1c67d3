// JSON shown as it was received: re-indented token by token, never parsed and re-serialised
// (JSON.parse would round 12345678901234567890 and drop duplicate keys: the viewer must not lie).
import { h, copyButton } from './dom.js';
import { byteLength, formatBytes } from './format.js';

const HIGHLIGHT_LIMIT = 256 * 1024; // above this, plain text: tens of thousands of spans get slow

/** Tokens of a JSON text: {kind: 'key'|'string'|'number'|'literal'|'punct'|'space', text}. */
export function jsonTokens(text, indent = '  ') {
  JSON.parse(text); // validity only; the tokens below keep every literal byte for byte
  const tokens = [];
  let depth = 0;
  const newline = () => tokens.push({ kind: 'space', text: `\n${indent.repeat(depth)}` });
  for (let i = 0; i < text.length;) {
    const c = text[i];
    if (c === '"') {
      const end = stringEnd(text, i);
      const isKey = text[skipSpace(text, end)] === ':';
      tokens.push({ kind: isKey ? 'key' : 'string', text: text.slice(i, end) });
      i = end;
    } else if (c === '{' || c === '[') {
      const next = skipSpace(text, i + 1);
      if (text[next] === (c === '{' ? '}' : ']')) {
        tokens.push({ kind: 'punct', text: c + text[next] });
        i = next + 1;
      } else {
        tokens.push({ kind: 'punct', text: c });
        depth += 1;
        newline();
        i += 1;
      }
    } else if (c === '}' || c === ']') {
      depth -= 1;
      newline();
      tokens.push({ kind: 'punct', text: c });
      i += 1;
    } else if (c === ',') {
      tokens.push({ kind: 'punct', text: ',' });
      newline();
      i += 1;
    } else if (c === ':') {
      tokens.push({ kind: 'punct', text: ': ' });
      i += 1;
    } else if (isSpace(c)) {
      i += 1;
    } else {
      const end = literalEnd(text, i);
      tokens.push({ kind: /^[-\d]/.test(c) ? 'number' : 'literal', text: text.slice(i, end) });
      i = end;
    }
  }
  return tokens;
}

/** Pretty-printed JSON text, or null when the text is not JSON. */
export function prettyJson(text) {
  try {
    return jsonTokens(text).map((token) => token.text).join('');
  } catch {
    return null;
  }
}

function stringEnd(text, start) {
  let i = start + 1;
  while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
  return i + 1;
}

function skipSpace(text, i) {
  while (i < text.length && isSpace(text[i])) i += 1;
  return i;
}

function literalEnd(text, i) {
  while (i < text.length && !isSpace(text[i]) && !',:]}'.includes(text[i])) i += 1;
  return i;
}

function isSpace(c) {
  return c === ' ' || c === '\n' || c === '\r' || c === '\t';
}

/** A <pre> with highlighted JSON (plain when large). */
export function jsonBlock(text, testid = 'json') {
  const code = h('code', {});
  fillJson(code, text);
  return h('pre', { class: 'code', testid, tabindex: '0' }, code);
}

function fillJson(code, text) {
  let tokens;
  try { tokens = jsonTokens(text); } catch { code.textContent = text; return; }
  if (text.length > HIGHLIGHT_LIMIT) { code.textContent = tokens.map((t) => t.text).join(''); return; }
  const fragment = document.createDocumentFragment();
  for (const token of tokens) {
    const plain = token.kind === 'space' || token.kind === 'punct';
    fragment.append(plain ? document.createTextNode(token.text) : h('span', { class: `j-${token.kind}` }, token.text));
  }
  code.replaceChildren(fragment);
}

/** Form bodies (GitHub's payload=, Slack) read better as name = value lines. */
function prettyForm(text) {
  const lines = [];
  for (const [name, value] of new URLSearchParams(text)) {
    lines.push(`${name} = ${prettyJson(value) ?? value}`);
  }
  return lines.join('\n');
}

function prettyVersion(body, contentType) {
  const type = String(contentType ?? '').toLowerCase();
  if (type.includes('x-www-form-urlencoded')) return { kind: 'form', text: prettyForm(body) };
  // jsonBlock() re-indents the exact text itself.
  return prettyJson(body) === null ? null : { kind: 'json', text: body };
}

/**
 * The body viewer: pretty (JSON re-indented, or form fields) and raw (exact text received),
 * size, sha256, copy.
 */
export function bodyViewer({ body, contentType, sha256, testid = 'body-viewer' }) {
  const text = body ?? '';
  const pretty = prettyVersion(text, contentType);
  const view = h('div', { class: 'body-view', testid: 'body-content' });
  const rawButton = h('button', { type: 'button', class: 'small', testid: 'body-raw-toggle', on: { click: () => show('raw') } }, 'Raw');
  const prettyButton = pretty && h('button', { type: 'button', class: 'small', testid: 'body-pretty-toggle', on: { click: () => show('pretty') } }, 'Pretty');

  function show(mode) {
    const usePretty = mode === 'pretty' && pretty;
    view.replaceChildren(usePretty && pretty.kind === 'json'
      ? jsonBlock(pretty.text, 'body-pretty')
      : h('pre', { class: 'code', tabindex: '0', testid: usePretty ? 'body-pretty' : 'body-raw' }, usePretty ? pretty.text : text));
    rawButton.setAttribute('aria-pressed', String(!usePretty));
    prettyButton?.setAttribute('aria-pressed', String(Boolean(usePretty)));
  }

  show(pretty ? 'pretty' : 'raw');
  return h('div', { class: 'body-viewer', testid },
    h('div', { class: 'body-meta' },
      h('span', {}, contentType || 'no content type'),
      h('span', {}, formatBytes(byteLength(text))),
      sha256 && h('code', { class: 'hash', title: `sha256 ${sha256}` }, `sha256 ${sha256.slice(0, 12)}…`),
      h('span', { class: 'spacer' }),
      h('span', { class: 'toggle-group', role: 'group', 'aria-label': 'Body format' }, prettyButton, rawButton),
      copyButton(() => text, { label: 'Copy body', testid: 'body-copy' })),
    view);
}

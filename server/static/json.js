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

/**
 * The body viewer: pretty (JSON re-indented, or form fields) and raw (the exact text received);
 * a body stored as base64 that is not UTF-8 is shown as hex and base64. Size, sha256, copy.
 */
export function bodyViewer({ body, contentType, sha256, encoding, testid = 'body-viewer' }) {
  const stored = body ?? '';
  const decoded = decodeBody(stored, encoding);
  const modes = bodyModes(decoded, contentType);
  const view = h('div', { class: 'body-view', testid: 'body-content' });
  const buttons = modes.map((mode) => h('button', { type: 'button', class: 'small', testid: `body-${mode.id}-toggle`, on: { click: () => show(mode) } }, mode.label));

  function show(mode) {
    view.replaceChildren(mode.render());
    modes.forEach((m, i) => buttons[i].setAttribute('aria-pressed', String(m === mode)));
  }

  show(modes[0]);
  return h('div', { class: 'body-viewer', testid },
    h('div', { class: 'body-meta' },
      h('span', {}, contentType || 'no content type'),
      h('span', { testid: 'body-size' }, formatBytes(decoded.size)),
      encoding === 'base64' && h('span', { class: 'badge' }, decoded.text === null ? 'binary' : 'stored as base64'),
      sha256 && h('code', { class: 'hash', title: `sha256 ${sha256}` }, `sha256 ${sha256.slice(0, 12)}…`),
      h('span', { class: 'spacer' }),
      h('span', { class: 'toggle-group', role: 'group', 'aria-label': 'Body format' }, buttons),
      copyButton(() => decoded.text ?? stored, { label: 'Copy body', testid: 'body-copy' })),
    view);
}

function bodyModes(decoded, contentType) {
  const plain = (id, text) => () => h('pre', { class: 'code', tabindex: '0', testid: `body-${id}` }, text);
  if (decoded.text === null) {
    return [{ id: 'hex', label: 'Hex', render: plain('hex', hexDump(decoded.bytes)) },
      { id: 'base64', label: 'Base64', render: plain('base64', decoded.base64) }];
  }
  const raw = { id: 'raw', label: 'Raw', render: plain('raw', decoded.text) };
  const type = String(contentType ?? '').toLowerCase();
  if (type.includes('x-www-form-urlencoded')) return [{ id: 'pretty', label: 'Pretty', render: plain('pretty', prettyForm(decoded.text)) }, raw];
  // jsonBlock() re-indents the exact text itself.
  if (prettyJson(decoded.text) !== null) return [{ id: 'pretty', label: 'Pretty', render: () => jsonBlock(decoded.text, 'body-pretty') }, raw];
  return [raw];
}

/** {text (null when not UTF-8), size in bytes, bytes, base64} of a stored body. */
function decodeBody(stored, encoding) {
  if (encoding !== 'base64') return { text: stored, size: byteLength(stored) };
  let bytes;
  try { bytes = Uint8Array.from(atob(stored), (c) => c.charCodeAt(0)); } catch { return { text: stored, size: byteLength(stored) }; }
  let text = null;
  try { text = new TextDecoder('utf-8', { fatal: true }).decode(bytes); } catch { text = null; }
  return { text, size: bytes.length, bytes, base64: stored };
}

const HEX_LIMIT = 64 * 1024;

function hexDump(bytes) {
  const lines = [];
  for (let offset = 0; offset < Math.min(bytes.length, HEX_LIMIT); offset += 16) {
    const chunk = [...bytes.subarray(offset, offset + 16)];
    const hex = chunk.map((b) => b.toString(16).padStart(2, '0')).join(' ').padEnd(47);
    const ascii = chunk.map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${offset.toString(16).padStart(8, '0')}  ${hex}  ${ascii}`);
  }
  if (bytes.length > HEX_LIMIT) lines.push(`… ${bytes.length - HEX_LIMIT} more bytes (copy the body to see them all)`);
  return lines.join('\n');
}

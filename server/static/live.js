// The live feed: GET /api/events/stream read with fetch() (EventSource cannot send the
// Authorization header), parsed as Server-Sent Events, resumed with ?after=<last seq>.
import { relative, toError } from './api.js';
import { sleep } from './dom.js';

const MIN_DELAY_MS = 1000;
const MAX_DELAY_MS = 15000;
// With no byte for this long the connection is presumed dead (proxies drop idle streams
// silently); resuming from the last seq loses nothing.
const IDLE_TIMEOUT_MS = 60000;

/**
 * onState(state) is told 'connecting' | 'live' | 'reconnecting' | 'stopped';
 * onUnauthorized(error) on a 401.
 */
export function createLive({ getToken, onState, onUnauthorized }) {
  const listeners = new Set();
  let lastSeq = null;
  let controller = null;
  let retryMs = MIN_DELAY_MS;

  function start() {
    if (controller) return;
    controller = new AbortController();
    run(controller.signal);
  }

  function stop() {
    controller?.abort();
    controller = null;
    onState('stopped');
  }

  /** Call fn(event) for every event until signal aborts. */
  function subscribe(fn, signal) {
    listeners.add(fn);
    signal?.addEventListener('abort', () => listeners.delete(fn), { once: true });
  }

  async function run(signal) {
    let delay = MIN_DELAY_MS;
    while (!signal.aborted) {
      onState(lastSeq === null ? 'connecting' : 'reconnecting');
      try {
        await streamOnce(signal, () => { delay = MIN_DELAY_MS; });
      } catch (error) {
        if (signal.aborted) return;
        if (error.status === 401) { onUnauthorized(error); return; }
      }
      if (signal.aborted) return;
      onState('reconnecting');
      await sleep(Math.max(delay, retryMs), signal);
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
  }

  async function streamOnce(signal, onOpen) {
    const attempt = new AbortController();
    const stopAttempt = () => attempt.abort();
    signal.addEventListener('abort', stopAttempt, { once: true });
    try {
      const response = await fetch(streamUrl(), {
        headers: { Authorization: `Bearer ${getToken()}`, Accept: 'text/event-stream' },
        cache: 'no-store', signal: attempt.signal,
      });
      if (!response.ok) throw await toError(response);
      onOpen();
      onState('live');
      await readStream(response.body, attempt);
    } finally {
      signal.removeEventListener('abort', stopAttempt);
      attempt.abort();
    }
  }

  async function readStream(body, attempt) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = createSseParser(dispatch);
    let watchdog = setTimeout(() => attempt.abort(), IDLE_TIMEOUT_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => attempt.abort(), IDLE_TIMEOUT_MS);
        parser.push(value);
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  function streamUrl() {
    // With no ?after the server starts at the head of the log: only what happens from now on.
    return relative(lastSeq === null ? '/api/events/stream' : `/api/events/stream?after=${lastSeq}`);
  }

  function dispatch({ id, data, retry }) {
    if (retry !== null) retryMs = retry;
    const seq = id !== null && /^\d+$/.test(id) ? Number(id) : null;
    // An id with no event (a greeting naming the head of the log) still moves the resume point.
    if (seq !== null && (lastSeq === null || seq > lastSeq)) lastSeq = seq;
    else if (seq !== null) return; // already seen before a reconnect
    let event;
    try { event = data ? JSON.parse(data) : null; } catch { return; }
    if (!event || typeof event.type !== 'string' || event.seq == null) return;
    for (const listener of [...listeners]) {
      try { listener(event); } catch (error) { console.error('live listener failed', error); }
    }
  }

  return { start, stop, subscribe, get lastSeq() { return lastSeq; } };
}

/**
 * A Server-Sent Events parser fed with decoded text chunks (WHATWG rules: CR, LF or CRLF line
 * ends, ':' comments, one optional space after the colon, blank line dispatches).
 */
export function createSseParser(onMessage) {
  let buffer = '';
  let message = blankMessage();

  function push(chunk) {
    buffer += chunk;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(buffer);
      // A lone CR at the very end may be the first half of a CRLF split across chunks.
      if (!match || (match[0] === '\r' && match.index === buffer.length - 1)) return;
      const line = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      takeLine(line);
    }
  }

  function takeLine(line) {
    if (line === '') { flush(); return; }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    takeField(name, value);
  }

  function takeField(name, value) {
    if (name === 'data') message.data.push(value);
    else if (name === 'event') message.event = value;
    else if (name === 'id' && !value.includes('\0')) message.id = value;
    else if (name === 'retry' && /^\d+$/.test(value)) message.retry = Number(value);
  }

  function flush() {
    const { id, event, data, retry } = message;
    message = blankMessage();
    onMessage({ id, event, data: data.length ? data.join('\n') : null, retry });
  }

  return { push };
}

function blankMessage() {
  return { id: null, event: 'message', data: [], retry: null };
}

/** The execution an event belongs to, if any. */
export function executionIdOf(event) {
  const fromData = event?.data?.execution_id ?? event?.meta?.execution_id;
  if (fromData) return String(fromData);
  const stream = String(event?.stream ?? '');
  const match = /^execution[-:/](.+)$/.exec(stream);
  return match ? match[1] : null;
}

/**
 * Fetch a projection row until it has caught up with the log (row.last_seq >= seq): the live
 * feed can announce an event a moment before the projector has applied it. Returns the last
 * row fetched (possibly still behind after a few tries) or null when it does not exist yet.
 */
export async function fetchCaughtUp(fetchRow, seq, signal, tries = 6) {
  let row = null;
  for (let attempt = 1; attempt <= tries && !signal?.aborted; attempt += 1) {
    try {
      row = await fetchRow();
    } catch (error) {
      if (error.status !== 404) throw error;
      row = null;
    }
    if (row && (seq == null || Number(row.last_seq) >= seq)) return row;
    await sleep(200 * attempt, signal);
  }
  return row;
}

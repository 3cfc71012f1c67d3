// The admin API client: bearer token, JSON in and out, one error type.

export class ApiError extends Error {
  constructor({ status, code, message, retryAfter = null }) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/**
 * getToken() gives the current token; onUnauthorized(error) is told about every 401 so the
 * app can go back to the token prompt.
 */
export function createApi({ getToken, onUnauthorized }) {
  async function request(method, path, { query, body, signal, asText = false, quiet401 = false } = {}) {
    const response = await send(method, withQuery(path, query), body, signal, getToken());
    if (response.status === 401 && !quiet401) onUnauthorized(await toError(response));
    if (!response.ok) throw await toError(response);
    if (response.status === 204) return null;
    const text = await response.text();
    if (asText) return { text, json: text ? JSON.parse(text) : null };
    return text ? JSON.parse(text) : null;
  }
  return {
    get: (path, options) => request('GET', path, options),
    post: (path, body, options = {}) => request('POST', path, { ...options, body: body ?? {} }),
    delete: (path, options) => request('DELETE', path, options),
    request,
  };
}

async function send(method, url, body, signal, token) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  try {
    return await fetch(relative(url), {
      method, headers, signal, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (cause) {
    if (cause.name === 'AbortError') throw cause;
    throw new ApiError({ status: 0, code: 'network_error', message: 'The server cannot be reached.' });
  }
}

/** Turn a non-2xx response into an ApiError, whatever its body looks like. */
export async function toError(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const payload = JSON.parse(await response.clone().text());
    code = payload?.error?.code ?? code;
    message = payload?.error?.message ?? message;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError({ status: response.status, code, message, retryAfter: retryAfterSeconds(response) });
}

/** Retry-After is either delta-seconds or an HTTP date. */
export function retryAfterSeconds(response) {
  const value = response.headers.get('Retry-After');
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== '') params.set(name, value);
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

export const enc = encodeURIComponent;

/**
 * '/api/x' → 'api/x', resolved against the page: the dashboard is served at the server's root,
 * and this keeps it working behind a reverse proxy that mounts it under a path prefix.
 */
export function relative(path) {
  return path.replace(/^\//, '');
}

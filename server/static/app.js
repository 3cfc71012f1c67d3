// hookledger dashboard: the token, the shell, the hash router. Views live in their own modules;
// the one global is window.hookledger (the app object), for debugging and browser tests.
import { createApi } from './api.js';
import { h } from './dom.js';
import { mountEvent } from './events.js';
import { mountExecution } from './execution.js';
import { mountExecutions } from './executions.js';
import { createLive } from './live.js';
import { mountStats } from './stats.js';
import { mountTriggers } from './triggers.js';

const TOKEN_KEY = 'hookledger.token';
const TOKEN_FRAGMENT = '#token=';
const DEFAULT_ROUTE = '#/triggers';

const ROUTES = [
  [/^\/triggers$/, mountTriggers],
  [/^\/executions$/, mountExecutions],
  [/^\/executions\/([^/]+)$/, mountExecution],
  [/^\/events\/(\d+)$/, mountEvent],
  [/^\/stats$/, mountStats],
];

const LIVE_LABELS = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', stopped: 'offline' };

const app = {
  api: null,
  live: null,
  /** execution id → time (ms) before which the server refuses another replay (429). */
  cooldowns: new Map(),
  navigate(target) {
    if (location.hash === target) render();
    else location.hash = target;
  },
  refresh: () => render(),
  signOut: (message) => signOut(message),
};

let currentView = null; // AbortController of the mounted view
let mountedPath = null;

// ---- the token -------------------------------------------------------------

const getToken = () => sessionStorage.getItem(TOKEN_KEY);

/** Take the token from `#token=…` (the link `hookledger serve` prints), then drop it from the URL. */
function adoptTokenFromFragment() {
  if (!location.hash.startsWith(TOKEN_FRAGMENT)) return false;
  const raw = location.hash.slice(TOKEN_FRAGMENT.length).split('&')[0];
  let token = '';
  try { token = decodeURIComponent(raw); } catch { token = raw; }
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  history.replaceState(null, '', `${location.pathname}${location.search}${DEFAULT_ROUTE}`);
  return true;
}

function onUnauthorized() {
  if (document.body.classList.contains('logged-out')) return;
  signOut('The server refused the token. It may have changed: paste the current one, or open the link hookledger serve printed.');
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  app.live.stop();
  showLogin(message);
}

function showLogin(message = '') {
  unmountView();
  document.body.classList.add('logged-out');
  document.title = 'Sign in · hookledger';
  const input = h('input', { type: 'password', id: 'token', autocomplete: 'off', spellcheck: 'false', required: true, testid: 'login-token' });
  const note = h('p', { class: 'form-error', role: 'alert', testid: 'login-message' }, message);
  const submit = h('button', { type: 'submit', class: 'primary', testid: 'login-submit' }, 'Open the dashboard');
  const form = h('form', { class: 'card login', testid: 'login-form', on: { submit: (e) => { e.preventDefault(); tryToken(input.value.trim(), note, submit); } } },
    h('h1', {}, 'hookledger'),
    h('p', {}, 'Paste the admin token. ', h('span', { class: 'muted' }, 'hookledger serve prints a link that carries it; the token is also in the file beside the database, or in HOOKLEDGER_ADMIN_TOKEN.')),
    h('label', { for: 'token' }, 'Admin token'), input, note, submit);
  main().replaceChildren(h('section', { class: 'view', testid: 'view-login' }, form));
  input.focus();
}

async function tryToken(token, note, submit) {
  if (!token) { note.textContent = 'The token is empty.'; return; }
  submit.disabled = true;
  note.textContent = '';
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await app.api.get('/api/triggers', { quiet401: true });
    start();
    // The prompt that had the focus is gone: keyboard and screen-reader users start at the heading.
    main().querySelector('h1')?.focus();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    note.textContent = error.status === 401 ? 'This token was refused.' : `Cannot check the token: ${error.message}`;
    submit.disabled = false;
  }
}

// ---- the router ---------------------------------------------------------------

function parseHash(hash) {
  const raw = hash.replace(/^#/, '');
  const cut = raw.indexOf('?');
  const path = cut === -1 ? raw : raw.slice(0, cut);
  return { path, query: new URLSearchParams(cut === -1 ? '' : raw.slice(cut + 1)) };
}

function matchRoute(path) {
  for (const [pattern, mount] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    try {
      return { mount, params: match.slice(1).map(decodeURIComponent) };
    } catch {
      break; // a malformed %-escape: no such page
    }
  }
  return { mount: mountNotFound, params: [] };
}

function render() {
  if (!getToken()) { showLogin(); return; }
  const { path, query } = parseHash(location.hash);
  if (path === '' || path === '/') {
    history.replaceState(null, '', DEFAULT_ROUTE);
    render();
    return;
  }
  const keepFocus = path === mountedPath ? document.activeElement?.getAttribute('data-testid') : null;
  const firstMount = mountedPath === null;
  unmountView();
  mountedPath = path;
  currentView = new AbortController();
  markNav(path);
  const root = main();
  const { mount, params } = matchRoute(path);
  mount({ app, root, params, query, signal: currentView.signal, setTitle: (title) => { document.title = `${title} · hookledger`; } });
  moveFocus(root, keepFocus, firstMount);
}

function unmountView() {
  currentView?.abort();
  currentView = null;
  mountedPath = null;
  main().replaceChildren();
}

/** After navigation: back on the control that caused it (same view), else on the heading. */
function moveFocus(root, testid, firstMount) {
  if (testid) root.querySelector(`[data-testid="${CSS.escape(testid)}"]`)?.focus();
  if (firstMount || root.contains(document.activeElement)) return;
  root.querySelector('h1')?.focus();
}

function markNav(path) {
  for (const link of document.querySelectorAll('.nav a')) {
    const section = link.getAttribute('href').slice(1);
    if (path === section || path.startsWith(`${section}/`)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function mountNotFound(ctx) {
  ctx.setTitle('Not found');
  ctx.root.append(h('section', { class: 'view', testid: 'view-not-found' },
    h('h1', { tabindex: '-1' }, 'Nothing here'),
    h('p', {}, 'This address is not a page of the dashboard. ', h('a', { href: DEFAULT_ROUTE }, 'Go to the triggers.'))));
}

// ---- the shell -------------------------------------------------------------------

const main = () => document.getElementById('main');

function showLiveState(state) {
  const badge = document.getElementById('live-status');
  badge.dataset.state = state;
  badge.textContent = LIVE_LABELS[state] ?? state;
  badge.title = state === 'live' ? 'New events appear as they are recorded' : 'The live feed is not connected; it retries by itself';
}

function start() {
  document.body.classList.remove('logged-out');
  app.live.start();
  render();
}

function onHashChange() {
  if (adoptTokenFromFragment()) { app.live.stop(); start(); return; }
  if (!document.body.classList.contains('logged-out')) render();
}

function boot() {
  adoptTokenFromFragment();
  app.api = createApi({ getToken, onUnauthorized });
  app.live = createLive({ getToken, onState: showLiveState, onUnauthorized });
  document.getElementById('logout').addEventListener('click', () => signOut('Signed out.'));
  document.getElementById('skip').addEventListener('click', () => (main().querySelector('h1') ?? main()).focus());
  window.addEventListener('hashchange', onHashChange);
  window.hookledger = app;
  if (getToken()) start();
  else showLogin();
}

boot();

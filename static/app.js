// kpay dashboard: wires the panels to live updates and periodic refreshes.
// Plain ES modules, no build step; uPlot is loaded as a classic script.

import { getToken, setToken } from './js/api.js';
import { createAccounts } from './js/accounts.js';
import { createCluster } from './js/cluster.js';
import { $, setText } from './js/format.js';
import { startLive } from './js/live.js';
import { createOperations } from './js/operations.js';
import { createOverview } from './js/overview.js';
import { createPayments } from './js/payments.js';
import { createScreening } from './js/screening.js';
import { every } from './js/tasks.js';

const LISTS_MS = 3000;
const ACCOUNTS_MS = 5000;
const CLUSTER_MS = 5000;

// ---- bearer token ------------------------------------------------------------

function setupToken() {
  const input = $('token-input');
  const state = $('token-state');
  const show = () => setText(state, getToken() ? 'token set' : '');
  input.value = getToken();
  show();
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    show();
    refreshAll();
  });
  $('token-clear').addEventListener('click', () => {
    input.value = '';
    setToken('');
    show();
    refreshAll();
  });
}

// ---- connection indicator ----------------------------------------------------

const MODE_TITLES = {
  live: 'Live: updates stream from the server every second',
  polling: 'Polling: the live stream is unavailable; asking every second and retrying the stream',
  disconnected: 'Disconnected: the server does not answer; retrying',
};

function showMode(mode) {
  const el = $('conn-status');
  el.className = `conn conn-${mode}`;
  el.title = MODE_TITLES[mode] || '';
  setText(el.querySelector('.conn-text'), mode);
  // What is shown may be stale while the server does not answer.
  document.body.classList.toggle('is-disconnected', mode === 'disconnected');
}

// ---- start -------------------------------------------------------------------

let lists;
let accountsTask;
let live;

function refreshAll() {
  lists?.run();
  accountsTask?.run();
  live?.refresh();
}

/** After any action: lists, accounts and (when polling) the metrics now. */
function afterAction() {
  refreshAll();
}

setupToken();
const overview = createOverview({ onAction: afterAction });
const payments = createPayments({ onAction: afterAction });
const accounts = createAccounts({ onPaymentClick: (id) => payments.lookup(id) });
const operations = createOperations({ onAction: afterAction });
const screening = createScreening({ onAction: afterAction });

live = startLive({
  onSnapshot: (snapshot, source, errors) => overview.apply(snapshot, source, errors),
  onMode: showMode,
});
lists = every(LISTS_MS, () => Promise.all([
  operations.refresh(), payments.refreshRecent(), screening.refresh(),
]));
accountsTask = every(ACCOUNTS_MS, () => accounts.refresh());
const cluster = createCluster();
every(CLUSTER_MS, () => cluster.refresh());

// The accounts panel: a paged table (cursor `after`), search by exact id or
// id prefix, refreshed in place every few seconds.

import { ApiError, describe, get, query, seg } from './api.js';
import { $, h, money, setText, showError, time } from './format.js';
import { debounce } from './tasks.js';

const PAGE_SIZE = 15;

export function createAccounts({ onPaymentClick }) {
  const table = $('accounts-table');
  const tbody = table.tBodies[0];
  const search = $('accounts-search');
  // cursors[i] is the `after` of page i; the search text decides page 0's.
  let term = '';
  let cursors = [null];
  let page = 0;
  let next = null;
  let sequence = 0;
  let renderedKey = '';

  async function load() {
    const mine = ++sequence;
    const q = term;
    const after = cursors[page];
    let items;
    let nextCursor;
    try {
      if (q === '') {
        const data = await get(`/api/v1/accounts${query({ limit: PAGE_SIZE, after })}`);
        items = data.items || [];
        nextCursor = data.next || null;
      } else {
        const [exact, list] = await Promise.all([
          page === 0 ? get(`/api/v1/accounts/${seg(q)}`).catch((error) => {
            // Not an account (or not even a valid id): only the prefix search counts.
            if (error instanceof ApiError && (error.status === 404 || error.status === 400)) return null;
            throw error;
          }) : null,
          get(`/api/v1/accounts${query({ limit: PAGE_SIZE, after })}`),
        ]);
        const listed = list.items || [];
        const matching = listed.filter((a) => a.id.startsWith(q) && a.id !== q);
        items = exact ? [exact, ...matching] : matching;
        const last = listed[listed.length - 1];
        nextCursor = list.next && last && last.id.startsWith(q) ? list.next : null;
      }
    } catch (error) {
      if (mine !== sequence) return;
      showError($('accounts-error'), `Accounts unavailable: ${describe(error)}`);
      return;
    }
    if (mine !== sequence) return; // a newer request has been made
    showError($('accounts-error'), '');
    next = nextCursor;
    render(items, q);
  }

  function render(items, q) {
    const key = JSON.stringify([items, q, page, next]);
    if (key === renderedKey) return;
    renderedKey = key;
    tbody.replaceChildren(...items.map(row));
    const empty = $('accounts-empty');
    if (items.length === 0) {
      empty.textContent = q
        ? `No account has the id “${q}” or an id starting with it.`
        : page > 0 ? 'No more accounts.' : 'No accounts yet. Open one with POST /api/v1/accounts.';
      empty.hidden = false;
    } else {
      empty.hidden = true;
    }
    $('accounts-prev').disabled = page === 0;
    $('accounts-next').disabled = !next;
    setText($('accounts-page'), `page ${page + 1}`);
    setText($('accounts-page-info'), items.length
      ? `${q ? 'matching' : 'showing'} ${items[0].id} … ${items[items.length - 1].id}`
      : '');
  }

  function row(account) {
    const last = account.last_payment_id;
    const closed = account.closed_at
      ? `, closed ${time(account.closed_at)}${account.emptied_by ? ` (emptied by ${account.emptied_by})` : ''}`
      : '';
    const closing = account.closing ? `, closing: its balance moves to ${account.closing.transfer_to}` : '';
    return h('tr', { dataset: { id: account.id }, title: `opened ${time(account.opened_at)}, updated ${time(account.updated_at)}${closed}${closing}` },
      h('td', { class: 'mono id-cell' }, account.id),
      h('td', { class: 'r num' }, money(account.balance)),
      h('td', null, h('span', { class: `pill pill-${account.status}` }, account.status)),
      h('td', { class: 'mono ellipsis fill' }, last
        ? h('a', { href: `#payment=${encodeURIComponent(last)}`, class: 'payment-link', title: last, dataset: { paymentId: last } }, last)
        : h('span', { class: 'muted' }, '–')));
  }

  tbody.addEventListener('click', (event) => {
    const link = event.target.closest('a.payment-link');
    if (!link) return;
    event.preventDefault();
    onPaymentClick(link.dataset.paymentId);
  });

  function restart() {
    term = search.value.trim();
    cursors = [term === '' ? null : term];
    page = 0;
    next = null;
    load();
  }

  const restartSoon = debounce(restart, 250);
  search.addEventListener('input', restartSoon);
  $('accounts-form').addEventListener('submit', (event) => {
    event.preventDefault();
    restart();
  });
  $('accounts-prev').addEventListener('click', () => {
    if (page === 0) return;
    page -= 1;
    load();
  });
  $('accounts-next').addEventListener('click', () => {
    if (!next) return;
    cursors[page + 1] = next;
    cursors.length = page + 2;
    page += 1;
    load();
  });

  // Shown here so the page reads sensibly before the first answer.
  $('accounts-prev').disabled = true;
  $('accounts-next').disabled = true;

  return { refresh: load };
}

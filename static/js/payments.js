// The payments panel: look up a payment (followed until terminal), its
// lineage as a timeline, the submit form, and the recent payments list.

import {
  ApiError, describe, get, newIdempotencyKey, post, query, seg,
} from './api.js';
import {
  $, dateTime, duration, h, money, parseAmount, preciseTime, setText, showError, time,
} from './format.js';
import { sleep } from './tasks.js';

const TERMINAL = new Set(['confirmed', 'rejected', 'reversed']);
const FOLLOW_MS = 10_000;
const FOLLOW_EVERY_MS = 300;
const ID_PATTERN = /^[A-Za-z0-9_.:-]{1,64}$/;

export function createPayments({ onAction }) {
  let generation = 0;
  let renderedKey = '';
  let recentKey = '';

  // ---- lookup ----------------------------------------------------------------

  function clearView() {
    renderedKey = '';
    $('payment-summary').hidden = true;
    $('payment-lineage').replaceChildren();
    setText($('payment-status'), '');
    $('payment-status').className = 'status';
  }

  function renderPayment(p) {
    const key = JSON.stringify(p);
    $('payment-empty').hidden = true;
    showError($('payment-error'), '');
    if (key === renderedKey) return;
    renderedKey = key;
    $('payment-summary').hidden = false;
    const status = $('payment-status');
    setText(status, p.status);
    status.className = `status status-${p.status}`;
    setText($('payment-reason'), p.reason ? p.reason.replace(/_/g, ' ') : '');
    setText($('payment-view-id'), p.id);
    setText($('payment-view-route'), `${p.from} → ${p.to}`);
    setText($('payment-view-amount'), money(p.amount));
    setText($('payment-view-accepted'), dateTime(p.accepted_at));
    setText($('payment-view-completed'), p.completed_at
      ? `${dateTime(p.completed_at)} (${duration(p.completed_at - p.accepted_at)} after acceptance)`
      : 'not yet');
    setText($('payment-view-submitter'), p.submitted_by
      ? `${p.submitted_by.principal} from ${p.submitted_by.source}`
      : 'not recorded (written to the topic by another producer)');

    const hops = p.lineage || [];
    $('payment-lineage').replaceChildren(...hops.map((hop, index) => {
      const spent = hop.processed_at - hop.received_at;
      const sinceAccepted = hop.processed_at - p.accepted_at;
      return h('li', { class: `hop hop-${hop.stage}`, dataset: { stage: hop.stage } },
        h('div', { class: 'hop-marker', 'aria-hidden': 'true' }, String(index + 1)),
        h('div', { class: 'hop-body' },
          h('div', { class: 'hop-head' },
            h('span', { class: 'hop-stage' }, hop.stage),
            h('span', { class: 'hop-processor' }, `by ${hop.processor}`),
            h('span', { class: 'hop-spent num', title: 'time spent: out − in' }, duration(spent))),
          h('div', { class: 'hop-where mono' }, `${hop.topic}:${hop.partition}@${hop.offset}`),
          h('div', { class: 'hop-times small muted' },
            `in ${preciseTime(hop.received_at)} → out ${preciseTime(hop.processed_at)}`,
            h('span', { class: 'hop-since' }, ` · +${duration(sinceAccepted)} since accepted`))));
    }));
    if (hops.length === 0) {
      $('payment-lineage').replaceChildren(h('li', { class: 'empty' }, 'No hops yet: the payment waits to be admitted.'));
    }
  }

  /**
   * Shows payment `id`, polling until it is terminal (at most FOLLOW_MS).
   * `fresh`: just submitted, so a 404 means "not visible yet", not "missing".
   */
  async function lookup(id, { fresh = false } = {}) {
    const mine = ++generation;
    id = String(id || '').trim();
    $('payment-id-input').value = id;
    if (!id) {
      showError($('payment-error'), 'Enter a payment id.');
      return;
    }
    if (location.hash !== `#payment=${encodeURIComponent(id)}`) {
      history.replaceState(null, '', `#payment=${encodeURIComponent(id)}`);
    }
    clearView();
    $('payment-empty').hidden = true;
    showError($('payment-error'), '');
    const deadline = Date.now() + FOLLOW_MS;
    const following = $('payment-polling');
    setText(following, 'loading…');
    for (;;) {
      let payment = null;
      let failure = null;
      try {
        payment = await get(`/api/v1/payments/${seg(id)}`);
      } catch (error) {
        failure = error;
      }
      if (mine !== generation) return; // another lookup took over
      const timeLeft = Date.now() < deadline;
      if (payment) {
        renderPayment(payment);
        if (TERMINAL.has(payment.status)) {
          setText(following, '');
          return;
        }
        if (!timeLeft) {
          setText(following, `still ${payment.status} after ${FOLLOW_MS / 1000} s; look it up again later`);
          return;
        }
        setText(following, 'following…');
      } else {
        const notFound = failure instanceof ApiError && failure.status === 404;
        if (!(fresh && notFound && timeLeft) && !(failure?.status === 0 && timeLeft)) {
          clearView();
          setText(following, '');
          showError($('payment-error'), notFound ? `No payment with id “${id}”.` : `Lookup failed: ${describe(failure)}`);
          return;
        }
      }
      await sleep(FOLLOW_EVERY_MS);
      if (mine !== generation) return;
    }
  }

  $('lookup-form').addEventListener('submit', (event) => {
    event.preventDefault();
    lookup($('payment-id-input').value);
  });

  // ---- submit ----------------------------------------------------------------

  function fail(field, message) {
    if (field) field.setAttribute('aria-invalid', 'true');
    const result = $('pay-result');
    result.className = 'result result-error';
    result.replaceChildren(message);
    field?.focus();
  }

  // One key per payment typed: kept until the form is edited, so that
  // submitting it again (a double click, a retry after a timeout) is the
  // same payment, answered as it was the first time.
  let payKey = null;
  $('pay-form').addEventListener('input', () => { payKey = null; });

  $('pay-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const fields = ['pay-from', 'pay-to', 'pay-amount', 'pay-id'].map($);
    fields.forEach((f) => f.removeAttribute('aria-invalid'));
    const [fromEl, toEl, amountEl, idEl] = fields;
    const from = fromEl.value.trim();
    const to = toEl.value.trim();
    const id = idEl.value.trim();
    if (!from) return fail(fromEl, 'Enter the account to pay from.');
    if (!ID_PATTERN.test(from)) return fail(fromEl, 'From: an account id is 1–64 letters, digits or _ . : -');
    if (!to) return fail(toEl, 'Enter the account to pay to.');
    if (!ID_PATTERN.test(to)) return fail(toEl, 'To: an account id is 1–64 letters, digits or _ . : -');
    if (from === to) return fail(toEl, 'From and to are the same account.');
    const amount = parseAmount(amountEl.value);
    if (amount.error) return fail(amountEl, amount.error);
    if (id && !ID_PATTERN.test(id)) return fail(idEl, 'Id: 1–64 letters, digits or _ . : - (or leave it empty).');

    const body = { from, to, amount: amount.cents };
    if (id) body.id = id;
    const button = $('btn-pay-submit');
    const result = $('pay-result');
    button.disabled = true;
    result.className = 'result';
    result.replaceChildren('Submitting…');
    try {
      payKey = payKey || newIdempotencyKey();
      const accepted = await post('/api/v1/payments', body, { 'Idempotency-Key': payKey });
      const link = h('a', { href: `#payment=${encodeURIComponent(accepted.id)}`, class: 'payment-link mono', dataset: { paymentId: accepted.id } }, accepted.id);
      result.className = 'result result-ok';
      result.replaceChildren(
        accepted.status === 'accepted' ? `Accepted ${money(amount.cents)}: ` : `Already submitted (${accepted.status}): `,
        link);
      onAction();
      lookup(accepted.id, { fresh: true });
    } catch (error) {
      fail(null, error instanceof ApiError && error.status >= 400 && error.status < 500
        ? `Refused (${error.status}): ${error.message}`
        : `Not submitted: ${describe(error)}`);
    } finally {
      button.disabled = false;
    }
  });

  // ---- recent ------------------------------------------------------------------

  async function refreshRecent() {
    const box = $('recent-payments');
    let data;
    try {
      data = await get(`/api/v1/payments${query({ limit: 20 })}`);
    } catch (error) {
      setText($('recent-error'), `— unavailable: ${describe(error)}`);
      $('recent-error').className = 'small error-text';
      return;
    }
    setText($('recent-error'), '');
    const items = data.items || [];
    const key = JSON.stringify(items.map((p) => [p.id, p.status, p.reason]));
    if (key === recentKey) return;
    recentKey = key;
    if (items.length === 0) {
      box.replaceChildren(h('p', { class: 'empty' }, 'No payments since the server started. Submit one above.'));
      return;
    }
    box.replaceChildren(h('table', { class: 'data compact' },
      h('thead', null, h('tr', null,
        h('th', null, 'Id'), h('th', null, 'From → to'), h('th', { class: 'r' }, 'Amount'),
        h('th', null, 'Status'), h('th', null, 'Accepted'))),
      h('tbody', null, items.map((p) => h('tr', { dataset: { id: p.id } },
        h('td', { class: 'mono ellipsis' },
          h('a', { href: `#payment=${encodeURIComponent(p.id)}`, class: 'payment-link', title: p.id, dataset: { paymentId: p.id } }, p.id)),
        h('td', { class: 'mono nowrap' }, `${p.from} → ${p.to}`),
        h('td', { class: 'r num' }, money(p.amount)),
        h('td', null, h('span', { class: `pill status-${p.status}`, title: p.reason ? p.reason.replace(/_/g, ' ') : null }, p.status)),
        h('td', { class: 'nowrap' }, time(p.accepted_at)))))));
  }

  $('recent-payments').addEventListener('click', (event) => {
    const link = event.target.closest('a.payment-link');
    if (!link) return;
    event.preventDefault();
    lookup(link.dataset.paymentId);
  });
  $('pay-result').addEventListener('click', (event) => {
    const link = event.target.closest('a.payment-link');
    if (!link) return;
    event.preventDefault();
    lookup(link.dataset.paymentId);
  });

  // A link such as /#payment=order-1001 opens that payment.
  const fromHash = () => {
    const match = /^#payment=(.+)$/.exec(location.hash);
    if (!match) return;
    let id;
    try {
      id = decodeURIComponent(match[1]);
    } catch {
      return; // a malformed link: nothing to open
    }
    lookup(id);
  };
  window.addEventListener('hashchange', fromHash);
  fromHash();

  return {
    lookup(id) {
      lookup(id);
      $('payment-detail').scrollIntoView({ block: 'nearest', behavior: 'smooth' });
    },
    refreshRecent,
  };
}

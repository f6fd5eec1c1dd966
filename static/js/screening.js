// The screening panel: the rules in force (edited and applied as one
// command) and the payments held for review, each with Approve and Decline.

import { describe, get, post, put, seg } from './api.js';
import {
  $, centsToDecimalString, h, money, parseAmount, setText, showError,
} from './format.js';

const HELD_SHOWN = 50;

export function createScreening({ onAction }) {
  let editing = false;
  let heldKey = '';

  function amountField(input, name) {
    const text = input.value.trim();
    if (text === '') return { value: null };
    const parsed = parseAmount(text);
    return parsed.error ? { error: `${name}: ${parsed.error}` } : { value: parsed.cents };
  }

  function readForm() {
    const max = amountField($('scr-max'), 'Reject above');
    const review = amountField($('scr-review'), 'Review above');
    const error = max.error || review.error;
    if (error) return { error };
    const count = $('scr-velocity').value.trim();
    const velocity = count === '' ? null : {
      max_payments: Number(count),
      window_seconds: Number($('scr-window').value || 60),
    };
    const blocked = $('scr-blocked').value.split(/[\s,]+/).filter(Boolean);
    return {
      rules: {
        max_amount: max.value,
        review_above: review.value,
        velocity,
        blocked_accounts: blocked.length ? blocked : null,
        single_inflight_debit: $('scr-single').checked,
      },
    };
  }

  function showRules(view) {
    const r = view.rules || {};
    setText($('screening-source'), view.version == null ? 'all off'
      : `set by ${view.set_by ?? 'unknown'}${view.in_force ? '' : ' · not yet on every partition'}`);
    if (editing) return;
    $('scr-max').value = r.max_amount == null ? '' : centsToDecimalString(r.max_amount);
    $('scr-review').value = r.review_above == null ? '' : centsToDecimalString(r.review_above);
    $('scr-velocity').value = r.velocity ? String(r.velocity.max_payments) : '';
    if (r.velocity) $('scr-window').value = String(r.velocity.window_seconds);
    $('scr-blocked').value = (r.blocked_accounts || []).join(', ');
    $('scr-single').checked = r.single_inflight_debit === true;
  }

  async function decide(id, verdict, button) {
    button.disabled = true;
    try {
      await post(`/api/v1/payments/${seg(id)}/${verdict}`);
      showError($('screening-error'), '');
      onAction?.();
    } catch (error) {
      showError($('screening-error'), `${verdict} ${id}: ${describe(error)}`);
      button.disabled = false;
    }
  }

  // Rows are kept by id, so a row (and its buttons) outlives a redraw.
  const rows = new Map();

  function heldRow(p) {
    const approve = h('button', { type: 'button', class: 'btn btn-primary', dataset: { verdict: 'approve' } }, 'Approve');
    const decline = h('button', { type: 'button', class: 'btn', dataset: { verdict: 'decline' } }, 'Decline');
    approve.addEventListener('click', () => decide(p.id, 'approve', approve));
    decline.addEventListener('click', () => decide(p.id, 'decline', decline));
    return h('li', { dataset: { id: p.id } },
      h('span', { class: 'held-what' },
        h('strong', {}, p.id), ` ${p.from} → ${p.to} `, h('span', { class: 'num' }, money(p.amount))),
      h('span', { class: 'btn-group' }, approve, decline));
  }

  function showHeld(items) {
    const key = JSON.stringify(items.map((p) => p.id));
    setText($('held-count'), items.length ? `(${items.length}${items.length === HELD_SHOWN ? '+' : ''})` : '');
    $('held-empty').hidden = items.length > 0;
    if (key === heldKey) return;
    heldKey = key;
    const shown = new Set(items.map((p) => p.id));
    for (const id of rows.keys()) if (!shown.has(id)) rows.delete(id);
    for (const p of items) if (!rows.has(p.id)) rows.set(p.id, heldRow(p));
    $('held-list').replaceChildren(...items.map((p) => rows.get(p.id)));
  }

  let asked = 0;

  async function refresh() {
    const turn = ++asked;
    try {
      const [view, held] = await Promise.all([
        get('/api/v1/screening/rules'),
        get(`/api/v1/payments?status=held&limit=${HELD_SHOWN}`),
      ]);
      // An answer to an older question must not draw over a newer one.
      if (turn !== asked) return;
      showRules(view);
      showHeld(held.items || []);
    } catch (error) {
      showError($('screening-error'), `Screening: ${describe(error)}`);
    }
  }

  const form = $('screening-form');
  form.addEventListener('focusin', () => { editing = true; });
  form.addEventListener('focusout', () => { editing = form.contains(document.activeElement); });
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const { rules, error } = readForm();
    if (error) {
      showError($('screening-error'), error);
      return;
    }
    $('btn-screening').disabled = true;
    try {
      const view = await put('/api/v1/screening/rules', rules);
      showError($('screening-error'), '');
      editing = false;
      showRules(view);
      onAction?.();
    } catch (err) {
      showError($('screening-error'), `Rules not applied: ${describe(err)}`);
    } finally {
      $('btn-screening').disabled = false;
    }
  });

  return { refresh };
}

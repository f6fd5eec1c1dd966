// The operations panel: the dead letter queue with replay (and replay with a
// corrected value), the recent errors and the audit trail.

import { ApiError, describe, get, post, query, seg } from './api.js';
import { $, count, dateTime, h, setText, showError, time } from './format.js';

const DLQ_LIMIT = 50;
const LOG_LIMIT = 20;

export function createOperations({ onAction }) {
  let dlqKey = '';
  let errorsKey = '';
  let auditKey = '';
  let letters = new Map();

  // ---- dead letters ----------------------------------------------------------

  async function refreshDlq() {
    let data;
    try {
      data = await get(`/api/v1/dlq${query({ limit: DLQ_LIMIT })}`);
    } catch (error) {
      showError($('dlq-load-error'), `Dead letters unavailable: ${describe(error)}`);
      return;
    }
    showError($('dlq-load-error'), '');
    const items = data.items || [];
    const waiting = data.waiting ?? items.length;
    setText($('dlq-count'), count(waiting));
    $('dlq-count').classList.toggle('count-bad', waiting > 0);
    letters = new Map(items.map((l) => [l.id, l]));
    const key = JSON.stringify([items.map((l) => [l.id, l.status, l.reason]), waiting]);
    if (key === dlqKey) return;
    dlqKey = key;
    const tbody = $('dlq-table').tBodies[0];
    tbody.replaceChildren(...items.map(dlqRow));
    if (items.length < waiting) {
      tbody.append(h('tr', { class: 'more' }, h('td', { colspan: 6, class: 'muted small' },
        `Showing the first ${count(items.length)} of ${count(waiting)} waiting dead letters.`)));
    }
    $('dlq-table').hidden = items.length === 0;
    $('dlq-empty').hidden = items.length !== 0;
  }

  function dlqRow(letter) {
    const where = `${letter.source_topic}:${letter.source_partition}@${letter.source_offset}`;
    const value = letter.value_text != null ? `value: ${letter.value_text}` : `value (hex): ${letter.value_hex}`;
    return h('tr', { dataset: { id: letter.id } },
      h('td', { class: 'mono ellipsis', title: `${letter.id}\nprocessor: ${letter.processor}\nkey: ${letter.key}` }, letter.id),
      h('td', null, h('span', { class: `pill pill-${letter.class}` }, letter.class)),
      h('td', { class: 'wrap', title: value }, letter.reason),
      h('td', { class: 'mono nowrap' }, where),
      h('td', { class: 'nowrap', title: dateTime(letter.at_ms) }, time(letter.at_ms)),
      h('td', { class: 'r' }, h('button', { type: 'button', class: 'btn btn-small btn-replay', dataset: { id: letter.id } }, 'Replay')));
  }

  function replayed(result, corrected) {
    const letter = result.dead_letter || {};
    const replay = letter.replay;
    const where = replay ? ` to ${replay.topic}:${replay.partition}${replay.offset != null ? `@${replay.offset}` : ''}` : '';
    const note = $('dlq-note');
    note.textContent = result.already_replayed
      ? `${letter.id} had been replayed already${where}; nothing new was appended.`
      : `Replayed ${letter.id}${corrected ? ' with the corrected value' : ''}${where}.`;
    note.hidden = false;
  }

  function offerFix(id) {
    const letter = letters.get(id);
    $('dlq-fix').hidden = false;
    $('dlq-fix').dataset.id = id;
    setText($('dlq-fix-id'), id);
    const hasText = letter && letter.value_text != null;
    $('dlq-fix-hex').checked = !hasText && !!letter;
    $('dlq-fix-value').value = letter ? (hasText ? letter.value_text : letter.value_hex) : '';
  }

  function closeFix() {
    $('dlq-fix').hidden = true;
    delete $('dlq-fix').dataset.id;
  }

  async function replay(id, body, button) {
    const corrected = body !== undefined;
    if (button) {
      button.disabled = true;
      button.textContent = 'Replaying…';
    }
    $('dlq-note').hidden = true;
    try {
      const result = await post(`/api/v1/dlq/${seg(id)}/replay`, body);
      showError($('dlq-error'), '');
      closeFix();
      replayed(result, corrected);
      onAction();
    } catch (error) {
      // An expected answer, shown to the operator (not a console error).
      showError($('dlq-error'), `Replay of ${id} refused: ${describe(error)}`);
      if (error instanceof ApiError && error.status === 422) {
        if (!corrected) offerFix(id);
        $('dlq-fix-value').focus();
      }
    } finally {
      if (button && button.isConnected) {
        button.disabled = false;
        button.textContent = 'Replay';
      }
    }
  }

  $('dlq-table').addEventListener('click', (event) => {
    const button = event.target.closest('button.btn-replay');
    if (!button) return;
    replay(button.dataset.id, undefined, button);
  });

  $('dlq-fix').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('dlq-fix').dataset.id;
    if (!id) return;
    const text = $('dlq-fix-value').value;
    if ($('dlq-fix-hex').checked) {
      const hex = text.replace(/\s+/g, '');
      if (!/^([0-9a-fA-F]{2})+$/.test(hex)) {
        showError($('dlq-error'), 'Hex bytes are pairs of 0-9 a-f, e.g. 02000b6f.');
        return;
      }
      replay(id, { value_hex: hex }, $('btn-dlq-fix'));
    } else {
      if (text === '') {
        showError($('dlq-error'), 'Enter the corrected value.');
        return;
      }
      replay(id, { value: text }, $('btn-dlq-fix'));
    }
  });
  $('btn-dlq-fix-cancel').addEventListener('click', () => {
    closeFix();
    showError($('dlq-error'), '');
  });

  // ---- errors and audit ------------------------------------------------------

  async function refreshErrors() {
    let data;
    try {
      data = await get(`/api/v1/logs/errors${query({ limit: LOG_LIMIT })}`);
    } catch (error) {
      showError($('errors-error'), `Error log unavailable: ${describe(error)}`);
      return;
    }
    showError($('errors-error'), '');
    const items = data.items || [];
    const key = JSON.stringify(items.map((e) => e.seq));
    if (key === errorsKey) return;
    errorsKey = key;
    const box = $('errors-list');
    if (items.length === 0) {
      box.replaceChildren(h('p', { class: 'empty' }, 'No warnings or errors logged.'));
      return;
    }
    box.replaceChildren(h('table', { class: 'data compact' },
      h('thead', null, h('tr', null, h('th', null, 'Time'), h('th', null, 'Level'), h('th', null, 'Message and fields'))),
      h('tbody', null, items.map((e) => h('tr', { dataset: { seq: e.seq } },
        h('td', { class: 'nowrap', title: dateTime(e.at_ms) }, time(e.at_ms)),
        h('td', null, h('span', { class: `pill level-${String(e.level).toLowerCase()}` }, e.level)),
        h('td', { class: 'wrap fields' },
          h('div', { class: 'log-message', title: e.target }, e.message),
          h('div', null, Object.entries(e.fields || {}).map(([k, v]) =>
            h('span', { class: 'field' }, h('span', { class: 'field-key' }, k), '=', v)))))))));
  }

  // The audit panel's filters as the API takes them, and the page shown:
  // `before` is absent on the newest page, else the seq the page starts below.
  let auditFilters = { class: 'admin' };
  let auditBefore = null;
  let auditNext = null;

  function epochMs(id) {
    const value = $(id).value;
    return value ? String(new Date(value).getTime()) : '';
  }

  $('audit-filter').addEventListener('submit', (event) => {
    event.preventDefault();
    auditFilters = {
      class: $('audit-class').value,
      action: $('audit-action').value.trim(),
      principal: $('audit-principal').value.trim(),
      role: $('audit-role').value,
      outcome: $('audit-outcome').value,
      since: epochMs('audit-since'),
      until: epochMs('audit-until'),
    };
    auditBefore = null;
    refreshAudit();
  });
  $('btn-audit-newest').addEventListener('click', () => {
    auditBefore = null;
    refreshAudit();
  });
  $('btn-audit-older').addEventListener('click', () => {
    if (auditNext === null) return;
    auditBefore = auditNext;
    refreshAudit();
  });

  async function refreshAudit() {
    let data;
    const asked = [auditFilters, auditBefore];
    try {
      const params = { ...auditFilters, limit: LOG_LIMIT, before: auditBefore ?? '' };
      data = await get(`/api/v1/logs/audit${query(params)}`);
    } catch (error) {
      showError($('audit-error'), `Audit log unavailable: ${describe(error)}`);
      return;
    }
    // A page asked for before the filters or the page changed is stale.
    if (asked[0] !== auditFilters || asked[1] !== auditBefore) return;
    showError($('audit-error'), '');
    const items = data.items || [];
    auditNext = data.next_before ?? null;
    $('btn-audit-older').disabled = auditNext === null;
    const key = JSON.stringify([auditFilters, items.map((e) => e.seq)]);
    if (key === auditKey) return;
    auditKey = key;
    const box = $('audit-list');
    if (items.length === 0) {
      const filtered = Object.entries(auditFilters).some(([k, v]) => k !== 'class' && v);
      box.replaceChildren(h('p', { class: 'empty' },
        filtered || auditBefore !== null ? 'No entries match.' : 'No changes recorded yet.'));
      return;
    }
    box.replaceChildren(h('table', { class: 'data compact' },
      h('thead', null, h('tr', null, h('th', null, 'Time'), h('th', null, 'Principal'), h('th', null, 'Action'), h('th', { class: 'r' }, 'Status'))),
      h('tbody', null, items.map((e) => h('tr', { dataset: { seq: e.seq } },
        h('td', { class: 'nowrap', title: dateTime(e.at_ms) }, time(e.at_ms)),
        h('td', { class: 'nowrap', title: `role ${e.role} · from ${e.source}` }, e.principal),
        h('td', { class: 'mono nowrap', title: e.parameters }, e.action),
        h('td', { class: 'r nowrap' }, h('span', { class: `pill outcome-${e.outcome}`, title: e.outcome }, String(e.status))))))));
  }

  return {
    async refresh() {
      await Promise.all([refreshDlq(), refreshErrors(), refreshAudit()]);
    },
  };
}

// Business, instrumentation, control and generator panels: fed by snapshots
// (stream or polling), plus the control and generator actions.

import { describe, post, put } from './api.js';
import { createCharts } from './charts.js';
import {
  $, count, decimal, duration, h, money, reasons, setText, showError, time,
} from './format.js';

/**
 * One error line showing either a load error (until the next good load) or
 * an action error (for ACTION_ERROR_MS, or until the next action).
 */
const ACTION_ERROR_MS = 20_000;
function errorSlot(el) {
  let load = '';
  let action = '';
  let actionAt = 0;
  const render = () => {
    const fresh = action && Date.now() - actionAt < ACTION_ERROR_MS;
    showError(el, load || (fresh ? action : ''));
  };
  return {
    load(message) { load = message || ''; render(); },
    action(message) { action = message || ''; actionAt = Date.now(); render(); },
  };
}

export function createOverview({ onAction }) {
  const controlError = errorSlot($('control-error'));
  const generatorError = errorSlot($('gen-error'));
  const charts = createCharts($('chart-throughput'), $('chart-latency'));
  let drainStart = null;
  // After an action its answer is the truth for a moment: a snapshot taken
  // before it may still arrive and must not flip the state back.
  const HOLD_MS = 1200;
  let controlHeldUntil = 0;
  let generatorHeldUntil = 0;
  let rateLimitShown = false;
  let previousTotal = null; // for throughput while polling

  // ---- business --------------------------------------------------------------

  function renderPipeline(p) {
    setText($('m-inflight-count'), count(p.inflight?.count));
    setText($('m-inflight-value'), money(p.inflight?.amount));
    setText($('m-held-count'), count(p.held?.count));
    setText($('m-held-value'), money(p.held?.amount));
    setText($('m-confirmed-count'), count(p.confirmed?.today_count));
    setText($('m-confirmed-value'), money(p.confirmed?.today_amount));
    $('m-confirmed-count').parentElement.title =
      `All time: ${count(p.confirmed?.count)} confirmed, ${money(p.confirmed?.amount)}`;
    setText($('m-rejected-count'), count(p.rejected?.count));
    setText($('m-rejected-reasons'), reasons(p.rejected?.by_reason) || 'none');
    setText($('m-reversed-count'), count(p.reversed?.count));
    setText($('m-reversed-reasons'), reasons(p.reversed?.by_reason) || 'none');
  }

  function terminalTotal(p) {
    return (p.confirmed?.count ?? 0) + (p.rejected?.count ?? 0) + (p.reversed?.count ?? 0);
  }

  // ---- instrumentation -------------------------------------------------------

  function renderSlo(slo) {
    const box = $('slo-status');
    const goals = slo.goals || [];
    const missed = goals.filter((g) => !g.met).length;
    const summary = h('span', { class: `slo-summary ${missed ? 'bad' : 'good'}` },
      goals.length === 0 ? 'No SLO goals configured'
        : missed ? `${missed} of ${goals.length} goals missed` : `All ${goals.length} goals met`);
    const badges = goals.map((g) => h('span', {
      class: `badge ${g.met ? 'badge-good' : 'badge-bad'}`,
      title: `${g.objective} — ${g.met ? 'met' : 'missed'} since ${time(g.since)}; now ${decimal(g.current)}`,
      dataset: { goal: g.name, met: String(g.met) },
    }, h('span', { class: 'badge-icon', 'aria-hidden': 'true' }, g.met ? '✓' : '✗'),
    h('span', { class: 'visually-hidden' }, g.met ? 'met:' : 'missed:'),
    ` ${g.objective} `, h('span', { class: 'badge-value' }, decimal(g.current))));
    const key = JSON.stringify(goals.map((g) => [g.name, g.met, g.current, g.objective]));
    if (box.dataset.key !== key) {
      box.dataset.key = key;
      box.replaceChildren(summary, ...badges);
    }
    box.classList.toggle('slo-missed', missed > 0);
  }

  function renderLag(lag, queued) {
    if (queued !== undefined) setText($('m-queued'), count(queued));
    if (lag) {
      setText($('m-lag'), `lag ${count(lag.records)} records · oldest ${duration(lag.oldest_age_ms)}`);
    }
  }

  // ---- control -----------------------------------------------------------------

  function renderControl(c) {
    const state = c.state;
    const el = $('control-state');
    setText(el, state);
    el.className = `state state-${state}`;
    setText($('control-since'), c.since > 0 ? `${state} since ${time(c.since)}` : '');
    $('btn-pause').disabled = state === 'draining' || state === 'paused';
    $('btn-resume').disabled = state === 'running';

    const inflight = c.inflight?.count ?? 0;
    const box = $('drain-box');
    const bar = $('drain-progress');
    if (state === 'draining') {
      drainStart = Math.max(drainStart ?? 0, inflight);
      const total = Math.max(drainStart, 1);
      bar.max = total;
      bar.value = total - inflight;
      setText($('drain-text'),
        `Draining: ${count(drainStart - inflight)} of ${count(drainStart)} finished · ${count(inflight)} in flight`);
      box.hidden = false;
      box.classList.remove('drain-done');
    } else if (state === 'paused') {
      box.classList.add('drain-done');
      bar.max = 1;
      bar.value = 1;
      const queued = c.queued ? ` · ${count(c.queued)} accepted payments wait for resume` : '';
      setText($('drain-text'), `Drained: nothing in flight${queued}`);
      box.hidden = false;
    } else {
      drainStart = null;
      box.hidden = true;
    }

    const limit = c.rate_limit ?? 0;
    const perSecond = (rate) => (rate > 0 ? `${count(rate)} payments/s` : 'unlimited');
    setText($('rate-current'), `Operator limit: ${perSecond(limit)}`);
    const adaptive = $('rate-adaptive');
    adaptive.hidden = !c.adaptive;
    if (c.adaptive) {
      setText($('rate-adaptive-value'), perSecond(c.rate_in_force ?? 0));
      setText($('rate-adaptive-reason'), c.rate_reason || '');
    }
    const input = $('rate-limit-input');
    if (!rateLimitShown && document.activeElement !== input && input.value === '') {
      input.value = String(limit);
      rateLimitShown = true;
    }
    setText($('m-queued'), count(c.queued));
  }

  async function control(action, request) {
    try {
      const status = await request();
      controlError.action('');
      if (action === 'pause') drainStart = status.inflight?.count ?? 0;
      controlHeldUntil = Date.now() + HOLD_MS;
      renderControl(status);
      onAction();
    } catch (error) {
      controlError.action(`${action} failed: ${describe(error)}`);
    }
  }

  $('btn-pause').addEventListener('click', () =>
    control('pause', () => post('/api/v1/control/pause', {})));
  $('btn-resume').addEventListener('click', () =>
    control('resume', () => post('/api/v1/control/resume', {})));
  $('rate-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('rate-limit-input').value.trim();
    if (!/^\d+$/.test(text)) {
      controlError.action('The rate limit is a whole number of payments per second (0 = unlimited).');
      return;
    }
    const value = Number(text);
    if (!Number.isSafeInteger(value)) {
      controlError.action('That rate limit is too large.');
      return;
    }
    control('rate limit', () => put('/api/v1/control/rate-limit', { payments_per_second: value }));
  });

  // ---- generator -------------------------------------------------------------------

  function renderGenerator(g) {
    const status = $('gen-status');
    if (g === null) {
      setText(status, 'stopped');
      status.className = 'state state-unavailable';
      setText($('gen-detail'), 'The generator is not available on this server (404).');
      return;
    }
    const running = !!g.running;
    setText(status, running ? 'running' : 'stopped');
    status.className = `state ${running ? 'state-running' : 'state-stopped'}`;
    setText($('gen-sent'), count(g.sent));
    setText($('gen-accepted'), count(g.accepted));
    setText($('gen-refused'), count(g.refused));
    const parts = [];
    if (running) {
      parts.push(`${count(g.rate)}/s over ${count(g.accounts)} accounts, skew ${decimal(g.skew)}`);
      if (g.started_at) parts.push(`since ${time(g.started_at)}`);
    } else {
      parts.push(g.sent ? 'Stopped; counts are from the last run.' : 'Synthetic payments between its own accounts gen-00000, …');
    }
    if (g.behind) parts.push(`${count(g.behind)} behind`);
    if (g.last_refusal) parts.push(`last refusal: ${g.last_refusal}`);
    setText($('gen-detail'), parts.join(' · '));
    $('btn-gen-stop').disabled = !running;
  }

  async function generatorAction(body) {
    try {
      const g = await post('/api/v1/generator', body);
      generatorError.action('');
      if (g && typeof g === 'object') {
        generatorHeldUntil = Date.now() + HOLD_MS;
        renderGenerator(g);
      }
      onAction();
    } catch (error) {
      generatorError.action(`${body.action === 'start' ? 'Start' : 'Stop'} failed: ${describe(error)}`);
    }
  }

  $('gen-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const rate = Number($('gen-rate').value);
    const accounts = Number($('gen-accounts').value);
    const skew = Number($('gen-skew').value);
    let problem = '';
    if (!Number.isInteger(rate) || rate < 1) problem = 'Rate is a whole number of payments per second, at least 1.';
    else if (!Number.isInteger(accounts) || accounts < 2) problem = 'Accounts is a whole number, at least 2.';
    else if (!Number.isFinite(skew) || skew < 0 || $('gen-skew').value.trim() === '') problem = 'Skew is a number ≥ 0 (0 = uniform).';
    if (problem) {
      generatorError.action(problem);
      return;
    }
    generatorAction({ action: 'start', rate, accounts, skew });
  });
  $('btn-gen-stop').addEventListener('click', () => generatorAction({ action: 'stop' }));

  // ---- snapshots -----------------------------------------------------------------

  /** Applies a snapshot (all parts optional); `errors` names failed parts. */
  function apply(snapshot, source, errors) {
    if (snapshot.pipeline) {
      renderPipeline(snapshot.pipeline);
      const total = terminalTotal(snapshot.pipeline);
      const now = Date.now();
      if (source === 'poll' && previousTotal && now > previousTotal.at) {
        const rate = Math.max(0, total - previousTotal.total) / ((now - previousTotal.at) / 1000);
        charts.push({ at: now, count: Math.round(rate * 10) / 10, p50_ms: null, p99_ms: null });
      }
      previousTotal = { total, at: now };
      setText($('biz-updated'), `updated ${time(snapshot.at || now)}`);
    }
    showError($('biz-error'), errors.pipeline ? `Metrics unavailable: ${describe(errors.pipeline)}` : '');

    if (source === 'stream' && Array.isArray(snapshot.live)) {
      charts.setLive(snapshot.live);
      setText($('chart-note'), 'last 2 minutes, one point per second');
    } else if (source === 'poll') {
      setText($('chart-note'), 'polling: throughput from counts; per-second latency needs the live stream');
    }

    if (snapshot.slo) renderSlo(snapshot.slo);
    else if (errors.slo) {
      const box = $('slo-status');
      delete box.dataset.key;
      box.replaceChildren(h('span', { class: 'panel-error inline' }, `SLO status unavailable: ${describe(errors.slo)}`));
    }

    if (snapshot.control && Date.now() >= controlHeldUntil) renderControl(snapshot.control);
    controlError.load(errors.control ? `Control status unavailable: ${describe(errors.control)}` : '');

    if (snapshot.generator !== undefined && Date.now() >= generatorHeldUntil) renderGenerator(snapshot.generator);
    generatorError.load(errors.generator ? `Generator status unavailable: ${describe(errors.generator)}` : '');

    if (snapshot.lag || snapshot.control) renderLag(snapshot.lag, snapshot.control?.queued);
    if (source === 'poll') setText($('m-lag'), 'lag: shown when live');
    if (typeof snapshot.dlq_waiting === 'number') {
      setText($('dlq-count'), count(snapshot.dlq_waiting));
      $('dlq-count').classList.toggle('count-bad', snapshot.dlq_waiting > 0);
    }
  }

  return { apply };
}

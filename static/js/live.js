// Live updates: the `/api/v1/stream` Server-Sent Events stream when it is
// there, else polling the REST endpoints once a second while retrying the
// stream every ~10 s. Reports the mode: live, polling or disconnected.

import { ApiError, get } from './api.js';

const STREAM_URL = '/api/v1/stream';
const POLL_MS = 1000;
const STREAM_RETRY_MS = 10_000;
/** A live stream that sends nothing for this long is treated as gone. */
const STALE_MS = 5000;
/** After a 404 the generator endpoint is asked again only this often. */
const GENERATOR_RETRY_MS = 10_000;

/**
 * Starts the updates. `onSnapshot(snapshot, source, errors)` gets each
 * snapshot (`source` is `stream` or `poll`; a polled one may lack parts,
 * `errors` names the parts that failed); `onMode(mode)` gets mode changes.
 */
export function startLive({ onSnapshot, onMode }) {
  let mode = '';
  let source = null;
  let lastEvent = 0;
  let pollTimer = 0;
  let polling = false;
  let retryTimer = 0;
  let generatorMissingUntil = 0;

  function setMode(next) {
    if (next !== mode) {
      mode = next;
      onMode(mode);
    }
  }

  // ---- the stream ----------------------------------------------------------

  function openStream() {
    if (source || typeof EventSource === 'undefined') return;
    let es;
    try {
      es = new EventSource(STREAM_URL);
    } catch {
      scheduleRetry();
      return;
    }
    source = es;
    const handle = (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        return; // not a snapshot; ignore it
      }
      if (!data || typeof data !== 'object') return;
      lastEvent = Date.now();
      if (mode !== 'live') {
        setMode('live');
        stopPolling();
        clearTimeout(retryTimer);
      }
      onSnapshot(data, 'stream', {});
    };
    es.addEventListener('snapshot', handle);
    es.addEventListener('message', handle);
    es.onerror = (event) => {
      // A server-sent `event: error` (a snapshot it could not build) carries
      // data and keeps the stream open; only a broken connection falls back.
      if (event && typeof event.data === 'string') return;
      dropStream();
    };
  }

  function dropStream() {
    if (source) {
      source.close();
      source = null;
    }
    if (mode === 'live' || mode === '') setMode('polling');
    startPolling();
    scheduleRetry();
  }

  function scheduleRetry() {
    clearTimeout(retryTimer);
    retryTimer = setTimeout(openStream, STREAM_RETRY_MS);
  }

  // A stream that is open but silent is as good as gone.
  setInterval(() => {
    if (mode === 'live' && Date.now() - lastEvent > STALE_MS) dropStream();
  }, 1000);

  // ---- polling -------------------------------------------------------------

  async function generator() {
    if (Date.now() < generatorMissingUntil) return undefined;
    try {
      return await get('/api/v1/generator');
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        generatorMissingUntil = Date.now() + GENERATOR_RETRY_MS;
        return null; // this server has no generator
      }
      throw error;
    }
  }

  async function pollOnce() {
    const started = Date.now();
    const [pipeline, control, gen, dlq, slo] = await Promise.allSettled([
      get('/api/v1/metrics/pipeline'),
      get('/api/v1/control/status'),
      generator(),
      get('/api/v1/dlq?limit=1'),
      get('/api/v1/metrics/slo'),
    ]);
    if (mode === 'live') return; // the stream came back meanwhile
    const snapshot = { at: started };
    const errors = {};
    const take = (result, key, map = (v) => v) => {
      if (result.status === 'fulfilled') {
        if (result.value !== undefined) snapshot[key] = map(result.value);
      } else {
        errors[key] = result.reason;
      }
    };
    take(pipeline, 'pipeline');
    take(control, 'control');
    take(gen, 'generator');
    take(dlq, 'dlq_waiting', (v) => v?.waiting);
    take(slo, 'slo');
    const reachable = pipeline.status === 'fulfilled' || control.status === 'fulfilled';
    setMode(reachable ? 'polling' : 'disconnected');
    onSnapshot(snapshot, 'poll', errors);
  }

  function startPolling() {
    if (polling) return;
    polling = true;
    const loop = async () => {
      if (!polling) return;
      const started = Date.now();
      try {
        await pollOnce();
      } catch {
        setMode('disconnected');
      }
      if (!polling) return;
      pollTimer = setTimeout(loop, Math.max(100, POLL_MS - (Date.now() - started)));
    };
    loop();
  }

  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
  }

  // Data at once from polling, and the stream takes over when it answers.
  startPolling();
  openStream();

  return {
    get mode() {
      return mode;
    },
    /** One poll now, e.g. right after an action (only when not live). */
    refresh() {
      if (mode !== 'live') pollOnce().catch(() => setMode('disconnected'));
    },
  };
}

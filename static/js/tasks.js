// Periodic refreshes that never overlap, and can be run at once on demand.

/**
 * Runs `fn` now and then every `ms` after each run finishes. `run()` runs it
 * again at once (or right after the current run, if one is in progress).
 * `fn` must handle its own errors; anything it throws is swallowed here.
 */
export function every(ms, fn) {
  let timer = 0;
  let running = false;
  let again = false;

  async function tick() {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await fn();
    } catch {
      // the task shows its own errors
    }
    running = false;
    if (again) {
      again = false;
      tick();
      return;
    }
    timer = setTimeout(tick, ms);
  }

  tick();
  return { run: tick };
}

/** Delays calls to `fn` until `ms` passed without another call. */
export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

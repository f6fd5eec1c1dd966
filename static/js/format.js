// Formatting and small DOM helpers. Money is integer cents everywhere; it is
// turned into a decimal string with integer arithmetic and only then handed
// to Intl.NumberFormat for display.

const LOCALE = 'en';
const integerFormat = new Intl.NumberFormat(LOCALE, { maximumFractionDigits: 0 });
const moneyFormat = new Intl.NumberFormat(LOCALE, {
  style: 'currency',
  currency: 'EUR',
  minimumFractionDigits: 2,
  maximumFractionDigits: 2,
});
const decimalFormat = new Intl.NumberFormat(LOCALE, { maximumFractionDigits: 1 });
const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit',
  minute: '2-digit',
  second: '2-digit',
});
const preciseTimeFormat = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit',
  minute: '2-digit',
  second: '2-digit',
  fractionalSecondDigits: 3,
});

/** `1234` → `1,234`; anything not a finite number → `–`. */
export function count(value) {
  return Number.isFinite(value) ? integerFormat.format(value) : '–';
}

/** One decimal at most: `12.345` → `12.3`. */
export function decimal(value) {
  return Number.isFinite(value) ? decimalFormat.format(value) : '–';
}

/** Exact decimal text of integer cents: `-123456` → `-1234.56`. */
export function centsToDecimalString(cents) {
  const big = BigInt(Math.trunc(cents));
  const negative = big < 0n;
  const abs = negative ? -big : big;
  const whole = abs / 100n;
  const frac = (abs % 100n).toString().padStart(2, '0');
  return `${negative ? '-' : ''}${whole}.${frac}`;
}

/** Integer cents as currency: `1250` → `€12.50`. */
export function money(cents) {
  if (!Number.isFinite(cents)) return '–';
  // Intl formats decimal strings exactly (no float rounding on large sums).
  return moneyFormat.format(centsToDecimalString(cents));
}

/**
 * Parses an amount typed by a person into integer cents, without floats.
 * Accepts `12`, `12.5`, `12.50`, `1,234.50`, an optional leading `€`.
 * Returns `{cents}` or `{error}` with a message for the person.
 */
export function parseAmount(text) {
  let s = String(text ?? '').trim().replace(/^€\s*/, '').replace(/\s*€$/, '');
  if (s === '') return { error: 'Enter an amount, e.g. 12.50.' };
  if (s.startsWith('-')) return { error: 'The amount must be greater than 0.' };
  if (s.includes(',')) {
    if (!/^\d{1,3}(,\d{3})+(\.\d*)?$/.test(s)) {
      return { error: `"${text}" is not an amount: use a dot for cents, e.g. 12.50.` };
    }
    s = s.replace(/,/g, '');
  }
  const match = /^(\d*)(?:\.(\d*))?$/.exec(s);
  if (!match || (match[1] === '' && (match[2] ?? '') === '')) {
    return { error: `"${text}" is not an amount: use digits and a dot for cents, e.g. 12.50.` };
  }
  const whole = match[1] || '0';
  const frac = match[2] ?? '';
  if (frac.length > 2) return { error: 'An amount has at most 2 decimals (cents).' };
  const cents = BigInt(whole) * 100n + BigInt(frac.padEnd(2, '0') || '0');
  if (cents <= 0n) return { error: 'The amount must be greater than 0.' };
  if (cents > BigInt(Number.MAX_SAFE_INTEGER)) return { error: 'That amount is too large.' };
  return { cents: Number(cents) };
}

/** ms since the epoch → local time of day. */
export function time(ms) {
  if (!Number.isFinite(ms) || ms <= 0) return '–';
  return timeFormat.format(new Date(ms));
}

/** ms since the epoch → local time of day with milliseconds. */
export function preciseTime(ms) {
  if (!Number.isFinite(ms) || ms <= 0) return '–';
  return preciseTimeFormat.format(new Date(ms));
}

/** ms since the epoch → local date and time. */
export function dateTime(ms) {
  if (!Number.isFinite(ms) || ms <= 0) return '–';
  return new Date(ms).toLocaleString();
}

/** A duration in ms: `850 ms`, `2.4 s`, `3 min 5 s`. */
export function duration(ms) {
  if (!Number.isFinite(ms)) return '–';
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  if (ms < 60_000) return `${decimal(ms / 1000)} s`;
  const minutes = Math.floor(ms / 60_000);
  const seconds = Math.round((ms % 60_000) / 1000);
  return `${minutes} min ${seconds} s`;
}

/**
 * Creates an element: `h('td', {class: 'r', title: 'x'}, 'text', child)`.
 * Attributes starting with `on` become listeners; `dataset` takes an object;
 * null/undefined/false attributes and children are skipped.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else if (key === 'dataset') {
        Object.assign(el.dataset, value);
      } else if (key === 'class') {
        el.className = value;
      } else if (value === true) {
        el.setAttribute(key, '');
      } else {
        el.setAttribute(key, String(value));
      }
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Shorthand for `document.getElementById`. */
export function $(id) {
  return document.getElementById(id);
}

/** Sets an element's text only when it changed (keeps selections stable). */
export function setText(el, text) {
  const value = String(text);
  if (el && el.textContent !== value) el.textContent = value;
}

/** Shows `message` in an error element, or hides it when `message` is empty. */
export function showError(el, message) {
  if (!el) return;
  if (message) {
    setText(el, message);
    el.hidden = false;
  } else {
    el.hidden = true;
    el.textContent = '';
  }
}

/** `{a: 2, b: 1}` → `a 2 · b 1` (largest first). */
export function reasons(byReason) {
  const entries = Object.entries(byReason || {}).filter(([, n]) => n > 0);
  entries.sort((x, y) => y[1] - x[1] || x[0].localeCompare(y[0]));
  return entries.map(([reason, n]) => `${reason.replace(/_/g, ' ')} ${count(n)}`).join(' · ');
}

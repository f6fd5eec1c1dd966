// The REST client: JSON in and out, the optional bearer token on every call,
// and the API's error shape `{"error":{"code","message"}}` turned into ApiError.

const TOKEN_KEY = 'kpay.token';
const TIMEOUT_MS = 10_000;

/** A failed call: `status` 0 means the server could not be reached. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

function storage() {
  try {
    return window.localStorage;
  } catch {
    return null; // storage disabled (privacy mode): the token lives only in memory
  }
}

let memoryToken = '';

export function getToken() {
  return storage()?.getItem(TOKEN_KEY) ?? memoryToken;
}

export function setToken(token) {
  memoryToken = token || '';
  const store = storage();
  if (!store) return;
  if (token) store.setItem(TOKEN_KEY, token);
  else store.removeItem(TOKEN_KEY);
}

/**
 * Calls the API. `body` (when given) is sent as JSON. Resolves to the parsed
 * JSON (or null for an empty body); rejects with ApiError.
 */
export async function api(method, path, body, extraHeaders = {}) {
  const headers = { Accept: 'application/json', ...extraHeaders };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  init.signal = controller.signal;
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    const message = error?.name === 'AbortError'
      ? `The server did not answer within ${TIMEOUT_MS / 1000} s.`
      : 'Cannot reach the server.';
    throw new ApiError(0, 'network', message);
  } finally {
    clearTimeout(timer);
  }
  const text = await response.text().catch(() => '');
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const detail = data && data.error;
    const message = detail?.message
      || (response.status === 404 ? `${path.split('?')[0]} was not found` : `HTTP ${response.status} ${response.statusText}`.trim());
    throw new ApiError(response.status, detail?.code || `http_${response.status}`, message);
  }
  return data;
}

export const get = (path) => api('GET', path);
/**
 * POSTs; a call with an `Idempotency-Key` that finds the same key's first
 * call still being answered (409 `idempotency_key_in_use`) waits and asks
 * again, up to 5 s, and gets the first call's answer.
 */
export async function post(path, body, headers) {
  const keyed = Boolean(headers?.['Idempotency-Key']);
  for (let waited = 0; ; waited += 100) {
    try {
      return await api('POST', path, body, headers);
    } catch (error) {
      const inUse = keyed && error instanceof ApiError && error.code === 'idempotency_key_in_use';
      if (!inUse || waited >= 5000) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/**
 * A new `Idempotency-Key`: the same key sent again gets the first answer,
 * so a repeated submission (a double click, a retry after a timeout) does
 * not pay twice.
 */
export function newIdempotencyKey() {
  if (window.crypto?.randomUUID) return window.crypto.randomUUID();
  const bytes = new Uint8Array(16);
  window.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}
export const put = (path, body) => api('PUT', path, body);

/** A path segment, escaped (dead letter ids contain `:` and `.`). */
export const seg = (value) => encodeURIComponent(value);

/** Query string from an object, skipping empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

/** A message for a person, from any error. */
export function describe(error) {
  if (error instanceof ApiError) {
    return error.message;
  }
  return error?.message || String(error);
}

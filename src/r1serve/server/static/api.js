// Talking to the server: the API key, errors in OpenAI's shape, and SSE streams.
// Every request goes through request() so the key and the error handling are in one place.

const KEY_STORAGE = "r1serve.apiKey";

// localStorage throws in some private modes and on file:// pages; the UI still works
// there, it only forgets the key on reload.
export function loadSetting(name, fallback = null) {
  try {
    return localStorage.getItem(name) ?? fallback;
  } catch {
    return fallback;
  }
}

export function saveSetting(name, value) {
  try {
    if (value === null) localStorage.removeItem(name);
    else localStorage.setItem(name, value);
  } catch {
    // not persisted; see loadSetting
  }
}

export const apiKey = () => loadSetting(KEY_STORAGE, "");
export const setApiKey = (key) => saveSetting(KEY_STORAGE, key.trim() || null);

export class ApiError extends Error {
  // status 0: the server could not be reached; null: an error sent inside a stream.
  constructor(status, message, { code = null, param = null, type = null, retryAfter = null } = {}) {
    super(message);
    Object.assign(this, { status, code, param, type, retryAfter });
  }
}

// With no key the header is left out: a server run for local use needs none.
function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// What the server's answers say of the key, for the key field to tell the truth (app.js
// listens): refused (401), or known (any other answer to a route that checks keys: even a
// 402, 403 or 429 means the server knew the key and said no to the request, not to it).
function keyHeard(key, response) {
  if (response.status >= 500 || response.status === 404) return;
  const accepted = response.status !== 401;
  document.dispatchEvent(new CustomEvent("r1serve:key", { detail: { accepted, key } }));
}

export async function request(path, { method = "GET", body, signal } = {}) {
  let response;
  const key = apiKey();
  try {
    response = await fetch(path, {
      method, signal, headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `could not reach the server (${err.message})`);
  }
  keyHeard(key, response);
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path) {
  return (await request(path)).json();
}

async function errorFrom(response) {
  let detail = {};
  try {
    detail = (await response.json()).error ?? {};
  } catch {
    // not JSON: a proxy's error page; the status text is all there is
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return new ApiError(response.status, detail.message || response.statusText || "request failed", {
    code: detail.code ?? null, param: detail.param ?? null, type: detail.type ?? null,
    retryAfter: Number.isFinite(retry) ? retry : null,
  });
}

// /health answers 503 while models load, so it is read without request()'s error handling.
export async function serverStatus() {
  try {
    return (await (await fetch("/health")).json()).status ?? "unknown";
  } catch {
    return "unreachable";
  }
}

// The `data:` payload of each server-sent event. An event ends at a blank line; its data
// lines are joined by "\n" (the SSE rule), though OpenAI-style servers send one per event.
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // a partial line waits for the next read
      for (const line of lines) {
        if (line === "" && data.length) {
          yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
  if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, ""));
  if (data.length) yield data.join("\n");
}

// Chunks of a streamed chat completion. A failure after the response started arrives as
// a `data: {"error": ...}` event, since the 200 status is already sent.
export async function* chatStream(body, signal) {
  const response = await request("/v1/chat/completions", { method: "POST", body, signal });
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(null, chunk.error.message ?? "the server failed the request", chunk.error);
    yield chunk;
  }
}

function isQuotaError(err) {
  return err.status === 402 || /quota/i.test(`${err.code ?? ""} ${err.type ?? ""} ${err.message}`);
}

// One sentence a person can act on, for any error request() or chatStream() throws.
export function explain(err) {
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err.message}`;
  const message = err.message.replace(/\.?$/, ".");
  // The server's own message may already say when to retry.
  const wait = /retry/i.test(message) ? "" : ` Retry ${err.retryAfter ? `in ${err.retryAfter} s` : "in a moment"}.`;
  if (err.status === 0) return `Could not reach the server: ${err.message}. Is it still running?`;
  if (err.status === 401) return `The server refused the API key: ${message} Enter a valid key (sk-…) in the API key field.`;
  if (err.status === 403) return `Not allowed: ${message}`;
  if (isQuotaError(err)) return `Your token quota is used up: ${message} See the Usage tab, or ask the server's operator for more.`;
  if (err.status === 429) return `Too many requests: ${message}${wait}`;
  if (err.status === 503) return `The server is not ready: ${message}${wait}`;
  if (err.status === null) return `The request failed while streaming: ${message}`;
  return `Error ${err.status}: ${message}`;
}

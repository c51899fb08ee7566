// The playground: pick a model, chat with it, watch the answer (and its reasoning) stream in.
import { ApiError, chatStream, explain, getJSON, loadSetting, saveSetting, serverStatus } from "./api.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = "r1serve.playground";
const MODEL_RETRY_MS = 2000;

// What the conversation holds: the messages sent so far (reasoning is not sent back, as
// DeepSeek's API asks) and the request in flight, if any.
const chat = { history: [], controller: null };

// Whether each model reasons is learnt from its replies: /v1/models does not say, and the
// server rejects a reasoning budget for a model without a reasoning parser.
const reasons = new Map();

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- the transcript -------------------------------------------------------------------------

// The transcript scrolls itself on wide screens and the page scrolls on phones; follow the
// newest text only when the reader is already at the bottom.
function scroller() {
  const t = $("transcript");
  return getComputedStyle(t).overflowY === "auto" ? t : document.scrollingElement;
}

function atBottom(s) {
  return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
}

function appendTurn(node) {
  const s = scroller();
  const follow = atBottom(s);
  $("transcript-empty").hidden = true;
  $("transcript").append(node);
  if (follow) s.scrollTop = s.scrollHeight;
}

function addUserTurn(text) {
  const turn = el("article", "turn user");
  turn.setAttribute("aria-label", "You");
  turn.append(el("div", "who", "You"), el("div", "text", text));
  appendTurn(turn);
  return turn;
}

class AssistantTurn {
  constructor(model) {
    this.model = model;
    this.content = "";
    this.reasoning = "";
    this.usage = null;
    this.finishReason = null;
    this.started = performance.now();
    this.firstTokenAt = null;
    this.node = el("article", "turn assistant");
    this.node.setAttribute("aria-label", `Answer from ${model}`);
    this.details = el("details", "reasoning");
    this.details.hidden = true;
    this.summary = el("summary", "", "Reasoning");
    this.reasoningText = el("div", "text reasoning-text");
    this.details.append(this.summary, this.reasoningText);
    this.answer = el("div", "text answer");
    this.meta = el("p", "meta", "waiting for the first token…");
    this.node.append(el("div", "who", model), this.details, this.answer, this.meta);
    appendTurn(this.node);
  }

  add(reasoning, content) {
    const s = scroller();
    const follow = atBottom(s);
    this.firstTokenAt ??= performance.now();
    if (reasoning) {
      this.reasoning += reasoning;
      this.details.hidden = false;
      this.reasoningText.append(reasoning);
      this.summary.textContent = `Reasoning (${this.reasoning.length} chars)`;
    }
    if (content) {
      this.content += content;
      this.answer.append(content);
    }
    this.meta.textContent = "generating…";
    if (follow) s.scrollTop = s.scrollHeight;
  }

  finish(outcome) {
    const seconds = (performance.now() - this.started) / 1000;
    const parts = [`${seconds.toFixed(1)} s`];
    if (this.firstTokenAt !== null) parts.push(`first token ${((this.firstTokenAt - this.started) / 1000).toFixed(2)} s`);
    const u = this.usage;
    if (u) {
      const thought = u.completion_tokens_details?.reasoning_tokens;
      parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens` + (thought ? ` (${thought} reasoning)` : ""));
      if (seconds > 0) parts.push(`${(u.completion_tokens / seconds).toFixed(1)} tok/s`);
    }
    parts.push(outcome ?? `finish: ${this.finishReason ?? "?"}`);
    this.meta.textContent = parts.join(" · ");
    if (!this.content && this.reasoning && this.finishReason === "length") {
      this.answer.append(el("p", "note", "No answer yet: the model spent every token thinking. Raise Max tokens or set a Reasoning budget."));
    }
  }

  fail(message) {
    this.finish("failed");
    const alert = el("p", "error", message);
    alert.setAttribute("role", "alert");
    this.node.append(alert);
  }
}

// ---- the request --------------------------------------------------------------------------

function numberOrNull(input) {
  const v = input.value.trim();
  return v === "" ? null : Number(v);
}

function requestBody(model, messages) {
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
  };
  const maxTokens = numberOrNull($("max-tokens"));
  const budget = numberOrNull($("reasoning-budget"));
  if (maxTokens !== null) body.max_tokens = maxTokens;
  if (budget !== null && reasons.get(model) !== false) body.max_reasoning_tokens = budget;
  return body;
}

async function streamInto(turn, body, signal) {
  for await (const chunk of chatStream(body, signal)) {
    if (chunk.usage) turn.usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      const delta = choice.delta ?? {};
      if (delta.reasoning_content) reasons.set(turn.model, true);
      if (delta.reasoning_content || delta.content) turn.add(delta.reasoning_content, delta.content);
      if (choice.finish_reason) turn.finishReason = choice.finish_reason;
    }
  }
}

// A budget the model cannot use is dropped and the request sent again, rather than making
// the user clear a field that other models need.
async function streamOrRetry(turn, body, signal) {
  try {
    await streamInto(turn, body, signal);
  } catch (err) {
    if (!(err instanceof ApiError && err.param === "max_reasoning_tokens" && "max_reasoning_tokens" in body)) throw err;
    reasons.set(turn.model, false);
    showBudgetState();
    const { max_reasoning_tokens: _, ...rest } = body;
    await streamInto(turn, rest, signal);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("transcript").setAttribute("aria-busy", String(busy));
  $("chat-status").textContent = busy ? "Generating… (Escape or Stop to stop)" : "";
}

async function send() {
  const text = $("message").value.trim();
  const model = $("model").value;
  if (chat.controller || !text) return;
  if (!model) {
    $("chat-status").textContent = "No model to send to yet; see the message next to the model list.";
    return;
  }
  $("message").value = "";
  autoGrow();
  const userTurn = addUserTurn(text);
  // Held here, not read from `chat`: "New chat" during the request starts a new history,
  // and this turn's ending must not land in it.
  const history = chat.history;
  const controller = new AbortController();
  history.push({ role: "user", content: text });
  const turn = new AssistantTurn(model);
  chat.controller = controller;
  setBusy(true);
  try {
    await streamOrRetry(turn, requestBody(model, history), controller.signal);
    turn.finish();
    history.push({ role: "assistant", content: turn.content });
  } catch (err) {
    if (err.name === "AbortError") {
      turn.finish("stopped");
      history.push({ role: "assistant", content: turn.content });
    } else {
      // The failed turn leaves the history, so the next message is not a second user turn
      // in a row; its text goes back in the box to retry.
      history.pop();
      userTurn.classList.add("unsent");
      userTurn.setAttribute("aria-label", "You (not sent)");
      turn.fail(explain(err));
      if (!$("message").value) $("message").value = text;
    }
  } finally {
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
  }
}

function stop() {
  chat.controller?.abort();
}

function newChat() {
  stop();
  chat.history = [];
  $("transcript").replaceChildren($("transcript-empty"));
  $("transcript-empty").hidden = false;
  $("chat-status").textContent = "New chat started.";
  $("message").focus();
}

// ---- models and settings ------------------------------------------------------------------

function showBudgetState() {
  const off = reasons.get($("model").value) === false;
  $("reasoning-budget").disabled = off;
  $("reasoning-budget-hint").textContent = off
    ? `${$("model").value} does not reason, so there is no budget to set.`
    : "Most tokens a reasoning model may think for.";
}

function fillModels(models) {
  const select = $("model");
  const wanted = select.value || loadSetting(`${SETTINGS}.model`);
  select.replaceChildren(...models.map((m) => {
    const option = el("option", "", m.id);
    option.value = m.id;
    option.dataset.maxModelLen = m.max_model_len ?? "";
    return option;
  }));
  if (models.some((m) => m.id === wanted)) select.value = wanted;
  showModelHint();
}

function showModelHint() {
  const option = $("model").selectedOptions[0];
  $("model-hint").textContent = option?.dataset.maxModelLen ? `context ${option.dataset.maxModelLen} tokens` : "";
  showBudgetState();
}

// Models load in the background after the server starts; until all are in, ask again.
export async function loadModels() {
  let models = [];
  try {
    models = (await getJSON("/v1/models")).data ?? [];
  } catch (err) {
    $("model-hint").textContent = explain(err);
    return;
  }
  fillModels(models);
  const status = await serverStatus();
  if (status === "loading") {
    $("model-hint").textContent = models.length ? "more models are loading…" : "models are loading…";
    setTimeout(loadModels, MODEL_RETRY_MS);
  } else if (!models.length) {
    $("model-hint").textContent = `no model is being served (server: ${status})`;
  }
}

const FIELDS = ["temperature", "top-p", "max-tokens", "reasoning-budget"];

function restoreSettings() {
  for (const id of FIELDS) {
    const saved = loadSetting(`${SETTINGS}.${id}`);
    if (saved !== null) $(id).value = saved;
  }
  showRanges();
}

function showRanges() {
  $("temperature-value").value = $("temperature").value;
  $("top-p-value").value = $("top-p").value;
}

function autoGrow() {
  const box = $("message");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, window.innerHeight * 0.4)}px`;
}

function onKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && chat.controller) {
    event.preventDefault();
    stop();
  }
}

export function initPlayground() {
  restoreSettings();
  // Sampling controls start folded on phones, so the conversation gets the screen.
  if (window.matchMedia("(max-width: 720px)").matches) $("sampling").open = false;
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("message").addEventListener("keydown", onKey);
  $("message").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", () => {
    saveSetting(`${SETTINGS}.model`, $("model").value);
    showModelHint();
  });
  for (const id of FIELDS) {
    $(id).addEventListener("input", () => {
      saveSetting(`${SETTINGS}.${id}`, $(id).value);
      showRanges();
    });
  }
  loadModels();
}

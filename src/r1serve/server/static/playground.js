// The playground: pick a model, chat with it, watch the answer (and its reasoning) stream in.
import { ApiError, chatStream, explain, getJSON, loadSetting, saveSetting, serverStatus } from "./api.js";
import { $, AssistantTurn, appendTurn, el } from "./transcript.js";

const SETTINGS = "r1serve.playground";
const MODEL_RETRY_MS = 2000;

// What the conversation holds: the messages sent so far (reasoning is not sent back, as
// DeepSeek's API asks) and the request in flight, if any.
const chat = { id: newId(), history: [], controller: null };
// Earlier conversations, kept in this browser only (localStorage), newest first.
const CHATS = "r1serve.chats";
const KEEP_CHATS = 50;

function newId() {
  return `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

// Whether each model reasons is learnt from its replies: /v1/models does not say, and the
// server rejects a reasoning budget for a model without a reasoning parser.
const reasons = new Map();

// ---- the transcript -------------------------------------------------------------------------

// `at`: the message's index in the history, where Edit cuts the conversation back to.
function addUserTurn(text, at) {
  const turn = el("article", "turn user");
  turn.setAttribute("aria-label", "You");
  const edit = el("button", "edit", "Edit");
  edit.type = "button";
  edit.addEventListener("click", () => editFrom(turn, text, at));
  const actions = el("div", "turn-actions");
  actions.append(edit);
  turn.append(el("div", "who", "You"), el("div", "text", text), actions);
  appendTurn(turn);
  return turn;
}

// Edit and resend: the conversation goes back to before this message, which returns to
// the box to be changed and sent again.
function editFrom(turn, text, at) {
  if (chat.controller) return;
  chat.history.length = at;
  while (turn.nextSibling) turn.nextSibling.remove();
  turn.remove();
  $("transcript-empty").hidden = chat.history.length > 0;
  $("message").value = text;
  autoGrow();
  $("message").focus();
}

// ---- the request --------------------------------------------------------------------------

function numberOrNull(input) {
  const v = input.value.trim();
  return v === "" ? null : Number(v);
}

function requestBody(model, history) {
  const system = $("system-prompt").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
  };
  const maxTokens = numberOrNull($("max-tokens"));
  const budget = numberOrNull($("reasoning-budget"));
  if (maxTokens !== null) body.max_tokens = maxTokens;
  if (budget !== null && reasons.get(model) !== false) body.max_reasoning_tokens = budget;
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
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
  if (chat.controller || !text || !modelChosen()) return;
  $("message").value = "";
  autoGrow();
  const userTurn = addUserTurn(text, chat.history.length);
  chat.history.push({ role: "user", content: text });
  const failed = await answer(chat.history);
  if (failed) {
    // The failed turn leaves the history, so the next message is not a second user turn
    // in a row; its text goes back in the box to retry.
    chat.history.pop();
    userTurn.classList.add("unsent");
    userTurn.setAttribute("aria-label", "You (not sent)");
    if (!$("message").value) $("message").value = text;
  }
}

function modelChosen() {
  if ($("model").value) return true;
  $("chat-status").textContent = "No model to send to yet; see the message next to the model list.";
  return false;
}

// Streams the answer to `history` (which ends with the user's turn) into a new turn;
// returns whether it failed. `history` is held, not read from `chat`: "New chat" during the
// request starts a new history, and this turn's ending must not land in it.
async function answer(history) {
  const model = $("model").value;
  const controller = new AbortController();
  const turn = new AssistantTurn(model);
  chat.controller = controller;
  setBusy(true);
  let failed = false;
  try {
    await streamOrRetry(turn, requestBody(model, history), controller.signal);
    turn.finish();
  } catch (err) {
    if (err.name === "AbortError") {
      turn.finish("stopped");
    } else {
      failed = true;
      turn.fail(explain(err));
    }
  } finally {
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
  }
  if (!failed) {
    history.push({ role: "assistant", content: turn.content });
    offerActions(turn, history);
    saveChat(history, model);
  }
  return failed;
}

// ---- earlier chats ------------------------------------------------------------------------

function savedChats() {
  try {
    return JSON.parse(loadSetting(CHATS, "[]"));
  } catch {
    return [];
  }
}

function saveChat(history, model) {
  if (history !== chat.history) return;  // "New chat" was pressed meanwhile
  const title = (history.find((m) => m.role === "user")?.content ?? "").slice(0, 60);
  const others = savedChats().filter((c) => c.id !== chat.id);
  const saved = { id: chat.id, title, model, history, updated: Date.now() };
  saveSetting(CHATS, JSON.stringify([saved, ...others].slice(0, KEEP_CHATS)));
  showChats();
}

function showChats() {
  const chats = savedChats();
  const first = el("option", "", chats.length ? "Earlier chats…" : "No earlier chats");
  first.value = "";
  const options = chats.map((c) => {
    const option = el("option", "", c.title || "(untitled)");
    option.value = c.id;
    return option;
  });
  $("chats").replaceChildren(first, ...options);
}

function openChat(id) {
  const saved = savedChats().find((c) => c.id === id);
  if (!saved) return;
  newChat();
  chat.id = saved.id;
  chat.history = saved.history;
  saved.history.forEach((m, i) => {
    if (m.role === "user") {
      addUserTurn(m.content, i);
      return;
    }
    const turn = new AssistantTurn(saved.model);
    turn.content = m.content;
    turn.render();
    turn.meta.textContent = "earlier answer";
    offerActions(turn, chat.history);
  });
  $("chat-status").textContent = `Opened "${saved.title}".`;
}

// Copy on every answer; Regenerate on the newest one only (it replaces that answer).
function offerActions(turn, history) {
  for (const old of document.querySelectorAll(".turn .regenerate")) old.remove();
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", async () => {
    await navigator.clipboard.writeText(turn.content);
    $("chat-status").textContent = "Answer copied.";
  });
  const again = el("button", "regenerate", "Regenerate");
  again.type = "button";
  again.addEventListener("click", () => regenerate(turn, history));
  turn.actions.append(copy, again);
}

async function regenerate(turn, history) {
  if (chat.controller || history !== chat.history || !modelChosen()) return;
  history.pop();  // the answer being replaced
  turn.node.remove();
  await answer(history);
}

function stop() {
  chat.controller?.abort();
}

function newChat() {
  stop();
  chat.id = newId();
  chat.history = [];
  showChats();
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
    // Never an empty box: it says why there is nothing to pick.
    const none = el("option", "", err.status === 401 ? "— needs a valid API key —" : "— no models —");
    none.value = "";
    $("model").replaceChildren(none);
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

const FIELDS = ["temperature", "top-p", "max-tokens", "reasoning-budget", "system-prompt"];

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
  $("chats").addEventListener("change", () => openChat($("chats").value));
  showChats();
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
  $("json-mode").checked = loadSetting(`${SETTINGS}.json-mode`) === "true";
  $("json-mode").addEventListener("change", () => saveSetting(`${SETTINGS}.json-mode`, String($("json-mode").checked)));
  loadModels();
}

// The playground's transcript: how a turn is added and followed, and an answer's turn as it
// streams in (reasoning folded once the answer starts, markdown rendered once a frame).
import { renderMarkdown } from "./markdown.js";

export const $ = (id) => document.getElementById(id);

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The transcript scrolls itself on wide screens and the page scrolls on phones; follow the
// newest text only when the reader is already at the bottom.
function scroller() {
  const t = $("transcript");
  return getComputedStyle(t).overflowY === "auto" ? t : document.scrollingElement;
}

function atBottom(s) {
  return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
}

export function appendTurn(node) {
  const s = scroller();
  const follow = atBottom(s);
  $("transcript-empty").hidden = true;
  $("transcript").append(node);
  if (follow) s.scrollTop = s.scrollHeight;
}

export class AssistantTurn {
  constructor(model) {
    this.model = model;
    this.content = "";
    this.reasoning = "";
    this.usage = null;
    this.notes = [];  // said under the answer; kept through every re-render of it
    this.finishReason = null;
    this.started = performance.now();
    this.firstTokenAt = null;
    this.thoughtUntil = null;
    this.rendering = false;
    this.node = el("article", "turn assistant");
    this.node.setAttribute("aria-label", `Answer from ${model}`);
    this.details = el("details", "reasoning");
    this.details.hidden = true;
    this.summary = el("summary", "", "Thinking…");
    this.reasoningText = el("div", "text reasoning-text");
    this.details.append(this.summary, this.reasoningText);
    this.answer = el("div", "text answer markdown");
    this.meta = el("p", "meta", "waiting for the first token…");
    this.actions = el("div", "turn-actions");
    this.node.append(el("div", "who", model), this.details, this.answer, this.meta, this.actions);
    appendTurn(this.node);
  }

  add(reasoning, content) {
    const s = scroller();
    const follow = atBottom(s);
    this.firstTokenAt ??= performance.now();
    if (reasoning) {
      this.reasoning += reasoning;
      if (this.details.hidden) {  // shown live while it thinks, folded once it answers
        this.details.hidden = false;
        this.details.open = true;
      }
      this.reasoningText.append(reasoning);
    }
    if (content) {
      if (this.reasoning) this.foldReasoning();
      this.content += content;
      this.scheduleRender();
    }
    this.meta.textContent = "generating…";
    if (follow) s.scrollTop = s.scrollHeight;
  }

  foldReasoning() {
    if (this.thoughtUntil !== null) return;
    this.thoughtUntil = performance.now();
    this.details.open = false;
    this.summary.textContent = `Thought for ${((this.thoughtUntil - this.started) / 1000).toFixed(1)} s`;
  }

  // Markdown is rendered once per frame, however many tokens arrived in it.
  scheduleRender() {
    if (this.rendering) return;
    this.rendering = true;
    requestAnimationFrame(() => this.render());
  }

  render() {
    this.rendering = false;
    this.answer.replaceChildren(renderMarkdown(this.content), ...this.notes.map((text) => el("p", "note", text)));
  }

  finish(outcome) {
    if (this.reasoning) this.foldReasoning();
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
      this.notes.push("No answer yet: the model spent every token thinking. Raise Max tokens or set a Reasoning budget.");
    } else if (u?.completion_tokens_details?.reasoning_truncated) {
      // The server ended the thinking (a budget, or the room kept for the answer).
      this.notes.push("Thinking was cut short to leave room for the answer. Raise Max tokens to let it think longer.");
    }
    this.render();  // now, and again if a frame's render is still pending: the notes stay
  }

  fail(message) {
    this.finish("failed");
    const alert = el("p", "error", message);
    alert.setAttribute("role", "alert");
    this.node.append(alert);
  }
}

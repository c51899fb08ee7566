"""`r1serve chat`: a conversation in the terminal, as Ollama's `run` holds one.

A reasoning model's thinking (R1 and its distills: </think> is one token of theirs) is shown
apart, under "Thinking…", dimmed on a terminal, then the answer; only the answer goes back
into the history, as the DeepSeek API requires.
"""
from __future__ import annotations

import sys
from dataclasses import replace

from r1serve.errors import R1ServeError
from r1serve.sampling_params import ReasoningSpec, SamplingParams
from r1serve.server.reasoning import END, START, Delta, ReasoningSplitter

LEAVE = ("/bye", "/exit", "/quit")  # /bye: what Ollama users type
DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def reasons(tokenizer) -> bool:
    return tokenizer.token_to_id(END) is not None


def reasoning_spec(tokenizer, prompt_text: str, max_tokens: int | None) -> ReasoningSpec | None:
    """How this model marks its thinking, or None for a model that does not think."""
    if not reasons(tokenizer):
        return None
    return ReasoningSpec(tuple(tokenizer.encode(START, add_special_tokens=False)),
                         tuple(tokenizer.encode(END, add_special_tokens=False)),
                         open_at_start=prompt_text.rstrip().endswith(START), max_tokens=max_tokens)


class ThinkingPrinter:
    """Writes text deltas as they come: thinking apart from the answer; returns the answer."""

    def __init__(self, out, open_at_start: bool) -> None:
        self.out, self.splitter = out, ReasoningSplitter(open_at_start)
        self.dim = out.isatty() if hasattr(out, "isatty") else False
        self.thinking = False

    def feed(self, text: str) -> str:
        return self._write(self.splitter.feed(text))

    def finish(self) -> str:
        answer = self._write(self.splitter.flush())
        if self.thinking:  # cut while thinking (max_tokens)
            self._end_thinking()
        return answer

    def _write(self, delta: Delta) -> str:
        if delta.reasoning:
            if not self.thinking:
                self.thinking = True
                self.out.write(f"{DIM if self.dim else ''}Thinking…\n")
            self.out.write(delta.reasoning)
        if delta.content:
            if self.thinking:
                self._end_thinking()
            self.out.write(delta.content)
        self.out.flush()
        return delta.content

    def _end_thinking(self) -> None:
        self.thinking = False
        self.out.write(f"\n…done thinking.{PLAIN if self.dim else ''}\n\n")


def stream_reply(llm, prompt: dict, params: SamplingParams, out) -> str:
    """One reply, printed as it streams; returns its answer (the thinking left out)."""
    printer = ThinkingPrinter(out, params.reasoning.open_at_start) if params.reasoning else None
    answer, shown = "", ""
    for o in llm.stream(prompt, params):
        text = o.outputs[0].text
        new, shown = text[len(shown):], text
        if printer is None:
            out.write(new)
            out.flush()
            answer += new
        else:
            answer += printer.feed(new)
    if printer is not None:
        answer += printer.finish()
    out.write("\n")
    return answer


def run_chat(llm, params: SamplingParams, model: str, system: str | None, max_reasoning_tokens: int | None) -> None:
    if max_reasoning_tokens is not None and not reasons(llm.get_tokenizer()):
        raise R1ServeError("--max-reasoning-tokens needs a reasoning model (one with a </think> token)")
    history = [{"role": "system", "content": system}] if system else []
    print(f"r1serve chat with {model}. Type /bye, /exit or Ctrl-D to leave, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in LEAVE:
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.chat_prompt(history)
        spec = reasoning_spec(llm.get_tokenizer(), prompt["prompt"], max_reasoning_tokens)
        try:
            # Looked up per call, not bound at import: redirect_stdout and test capture replace it.
            reply = stream_reply(llm, prompt, replace(params, reasoning=spec), sys.stdout)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})

"""R1's reasoning split: text between <think> and </think> is `reasoning_content`, the rest `content`.

Works on streamed text deltas, so it must cope with everything R1 does in the wild:

- the prompt already ends in "<think>\\n" (R1's templates put it there): the output opens
  in reasoning and has no opening tag;
- the output opens with "<think>" itself (older templates);
- a tag split across deltas ("</th" + "ink>"): the possible start of a tag is held back
  until the next delta decides it;
- output that never closes the tag (cut by max_tokens): all of it is reasoning;
- a model that does not think at all: all of it is content.

The newlines R1 writes right after "</think>" are dropped, as the DeepSeek API drops them.
"""
from __future__ import annotations

from dataclasses import dataclass

from r1serve.tool_calls.formats import partial_suffix

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "none")


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ReasoningSplitter:
    def __init__(self, open_at_start: bool) -> None:
        # "start": not yet known whether the output thinks; "reasoning"; "answer_start":
        # just closed, newlines still to drop; "answer".
        self.phase = "reasoning" if open_at_start else "start"
        self._held = ""

    def feed(self, text: str) -> Delta:
        buf, self._held = self._held + text, ""
        delta = Delta()
        while buf:
            buf = getattr(self, f"_{self.phase}")(buf, delta)
        return delta

    def flush(self) -> Delta:
        """At the end of the output: what was held back is what it looked like."""
        held, self._held = self._held, ""
        if self.phase in ("reasoning",) or (self.phase == "start" and held.lstrip().startswith(START)):
            return Delta(reasoning=held.lstrip().removeprefix(START) if self.phase == "start" else held)
        return Delta(content=held.lstrip("\n") if self.phase == "answer_start" else held)

    # Each phase consumes some of `buf` into `delta` and returns the rest (held text is kept
    # in self._held and "" returned).

    def _start(self, buf: str, delta: Delta) -> str:
        stripped = buf.lstrip()
        if stripped.startswith(START):
            self.phase = "reasoning"
            return stripped[len(START):]
        if START.startswith(stripped):  # could still become "<think>"
            self._held = buf
            return ""
        self.phase = "answer"
        return buf

    def _reasoning(self, buf: str, delta: Delta) -> str:
        at = buf.find(END)
        if at >= 0:
            delta.reasoning += buf[:at]
            self.phase = "answer_start"
            return buf[at + len(END):]
        keep = partial_suffix(buf, END)
        delta.reasoning += buf[:len(buf) - keep]
        self._held = buf[len(buf) - keep:]
        return ""

    def _answer_start(self, buf: str, delta: Delta) -> str:
        rest = buf.lstrip("\n")
        if rest:
            self.phase = "answer"
        return rest

    def _answer(self, buf: str, delta: Delta) -> str:
        delta.content += buf
        return ""


def split_reasoning(text: str, open_at_start: bool) -> Delta:
    """The whole output at once (non-streaming responses)."""
    splitter = ReasoningSplitter(open_at_start)
    first, last = splitter.feed(text), splitter.flush()
    return Delta(first.reasoning + last.reasoning, first.content + last.content)

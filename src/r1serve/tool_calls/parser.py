"""Tool calls out of a model's streamed text, for any ToolCallFormat.

The text arrives in arbitrary pieces (a marker can be split anywhere), so the parser holds
back whatever might still turn out to be markup and hands out only what is decided:

    text ──▶ TEXT ──open marker──▶ HEADER ──name known──▶ ARGS ──call end──▶ BETWEEN ─┐
               ▲                                                                     │
               └──────────────────── block end / plain text ◀────────────────────────┘

- TEXT: content, up to an opening marker (a possible partial marker at the end is held);
- HEADER: the call's name (and, for DeepSeek, an optional ```json fence) is read whole;
- ARGS: argument text streams out as it comes, except a tail that might be the start of
  the call's ending (a closing fence, a closing brace, the end marker), held until decided;
- BETWEEN: whitespace between calls is dropped; the next call or the block's end follows.

The same parser serves whole outputs (feed once, then finish), so a streamed reply and a
non-streamed one always agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from r1serve.tool_calls.formats import ToolCallFormat, partial_suffix


@dataclass
class CallDelta:
    index: int
    name: str | None = None  # set on the call's first delta only
    arguments: str = ""


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class ParsedCall:
    name: str
    arguments: str


class ToolCallParser:
    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.state = "text"
        self.calls: list[ParsedCall] = []
        self._held = ""
        self._after_call = False  # no content since the last call ended

    def feed(self, text: str, last: bool = False) -> ToolDelta:
        """The next piece of the output; last: it ends the output (held text is then let out)."""
        buf, self._held = self._held + text, ""
        delta = ToolDelta()
        while buf:
            rest = getattr(self, f"_{self.state}")(buf, delta)
            if rest is None:  # the phase holds buf back until more text comes
                break
            buf = rest
        if last:
            self._flush(delta)
        return _merged(delta)

    def finish(self) -> ToolDelta:
        return self.feed("", last=True)

    def _flush(self, delta: ToolDelta) -> None:
        """The end of the output: held text is what it looked like."""
        held, self._held = self._held, ""
        if self.state == "args":  # a call_end cut short by the output's end ("}\n</tool") is still its end
            held = held[:len(held) - partial_suffix(held, self.fmt.call_end)]
            self._emit_args(self.fmt.strip_args_end(held), delta)
        elif self.state == "header" and self.fmt.call_end in held:
            self._whole_call(held, delta)
        elif self.state in ("text", "header"):  # cut off before a call was readable: plain text
            delta.content += held if self.state == "text" else self.fmt.call_begin + held

    # Each phase takes buf, writes what is decided into delta and returns the rest to go on
    # with, or holds the rest (self._held) and returns None.

    def _text(self, buf: str, delta: ToolDelta) -> str | None:
        at, marker = self.fmt.find_opening(buf)
        if at < 0:
            keep = self.fmt.partial_opening(buf)
            self._content(buf[:len(buf) - keep], delta)
            return self._hold(buf[len(buf) - keep:])
        self._content(buf[:at], delta)
        self.state = "header" if marker == self.fmt.call_begin else "between"
        return buf[at + len(marker):]

    def _between(self, buf: str, delta: ToolDelta) -> str | None:
        stripped = buf.lstrip()
        if not stripped:
            return None
        for marker, state in ((self.fmt.call_begin, "header"), (self.fmt.block_end, "text")):
            if marker and stripped.startswith(marker):
                self.state = state
                return stripped[len(marker):]
            if marker and marker.startswith(stripped):
                return self._hold(buf)
        self.state = "text"  # not markup after all: the block ended without its end marker
        return stripped

    def _header(self, buf: str, delta: ToolDelta) -> str | None:
        read = self.fmt.read_header(buf)
        if read is None:
            if self.fmt.call_end in buf:  # a call whose header this reader cannot follow
                at = buf.index(self.fmt.call_end)
                self._whole_call(buf[:at + len(self.fmt.call_end)], delta)
                return self._call_ended(buf[at + len(self.fmt.call_end):])
            return self._hold(buf)
        name, used = read
        self.calls.append(ParsedCall(name, ""))
        delta.calls.append(CallDelta(len(self.calls) - 1, name))
        self.state = "args"
        return buf[used:]

    def _args(self, buf: str, delta: ToolDelta) -> str | None:
        at = buf.find(self.fmt.call_end)
        if at >= 0:
            self._emit_args(self.fmt.strip_args_end(buf[:at]), delta)
            return self._call_ended(buf[at + len(self.fmt.call_end):])
        keep = next((len(buf) - p for p in range(len(buf)) if self.fmt.may_end_args(buf[p:])), 0)
        self._emit_args(buf[:len(buf) - keep], delta)
        return self._hold(buf[len(buf) - keep:]) if keep else None

    # ---- helpers --------------------------------------------------------------------------

    def _call_ended(self, rest: str) -> str:
        self.state = "between" if self.fmt.block_end else "text"
        self._after_call = True
        return rest

    def _hold(self, text: str) -> None:
        self._held = text
        return None

    def _content(self, text: str, delta: ToolDelta) -> None:
        if self._after_call:  # what a model writes between and after its calls is mostly newlines
            text = text.lstrip()
            self._after_call = not text
        delta.content += text

    def _emit_args(self, text: str, delta: ToolDelta) -> None:
        call = self.calls[-1]
        if not call.arguments:
            text = text.lstrip()
        if not text:
            return
        call.arguments += text
        delta.calls.append(CallDelta(len(self.calls) - 1, None, text))

    def _whole_call(self, text: str, delta: ToolDelta) -> None:
        parsed = self.fmt.read_whole_call(text.removesuffix(self.fmt.call_end))
        if parsed is None:  # not a call this format can read: leave it as the model wrote it
            delta.content += self.fmt.call_begin + text
            return
        self.calls.append(ParsedCall(*parsed))
        delta.calls.append(CallDelta(len(self.calls) - 1, parsed[0], parsed[1]))


def _merged(delta: ToolDelta) -> ToolDelta:
    """One CallDelta per call and delta: name first, then the argument text joined."""
    merged: list[CallDelta] = []
    for c in delta.calls:
        if merged and merged[-1].index == c.index:
            merged[-1].arguments += c.arguments
        else:
            merged.append(CallDelta(c.index, c.name, c.arguments))
    delta.calls = merged
    return delta


def parse_tool_calls(fmt: ToolCallFormat, text: str) -> tuple[str, list[ParsedCall]]:
    """A whole output: (content, tool calls)."""
    parser = ToolCallParser(fmt)
    return parser.feed(text, last=True).content, parser.calls

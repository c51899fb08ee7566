"""How a model family writes tool calls: the markers, how a call's header reads, how its
arguments end, and the grammar that makes a model write exactly that (tool_choice
"required" or a named function).

DeepSeek-V3 / R1 (and R1-0528), one block of calls, the arguments a fenced JSON block:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(DeepSeek-V3.1 drops the type and the fence: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>;
the reader takes both.) Hermes, as Qwen2.5 and many Llama fine-tunes write it, one element per call:

    <tool_call>
    {"name": "NAME", "arguments": {"city": "Paris"}}
    </tool_call>
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from r1serve.sampling_params import JSON_OPTIONS

# A marker's id where it is one token of the vocabulary, else None. A grammar names such a
# marker by id: the grammar library reads every added token (special or not) as a token
# that no text matches, and the model was trained to write the one token anyway.
MarkerId = Callable[[str], "int | None"]


@dataclass(frozen=True)
class ToolSpec:
    """One function a request offers (OpenAI's tools[i].function)."""
    name: str
    parameters: dict

    @classmethod
    def from_openai(cls, tool: dict) -> ToolSpec:
        fn = tool["function"]
        return cls(fn["name"], fn.get("parameters") or {"type": "object", "properties": {}})


class ToolCallFormat(ABC):
    name: str
    block_begin = ""  # opens all of a reply's calls (DeepSeek), or "" (each call stands alone)
    block_end = ""
    call_begin: str
    call_end: str

    def find_opening(self, text: str) -> tuple[int, str]:
        """The first opening marker in text: (where, which), or (-1, "")."""
        hits = [(text.find(m), m) for m in (self.block_begin, self.call_begin) if m and m in text]
        return min(hits) if hits else (-1, "")

    def partial_opening(self, text: str) -> int:
        """Length of the longest tail of text that could begin an opening marker."""
        return max(partial_suffix(text, m) for m in (self.block_begin, self.call_begin) if m)

    @abstractmethod
    def read_header(self, text: str) -> tuple[str, int] | None:
        """(name, length of the header) once the header after call_begin is whole, else None."""

    @abstractmethod
    def may_end_args(self, tail: str) -> bool:
        """Whether tail (the end of the argument text so far) could be the start of the
        call's ending, so it must be held back."""

    @abstractmethod
    def strip_args_end(self, args: str) -> str:
        """The argument text without what the format writes between it and call_end."""

    def read_whole_call(self, body: str) -> tuple[str, str] | None:
        """A call read at once, for headers read_header does not follow: (name, arguments)."""
        return None

    @abstractmethod
    def grammar(self, tools: list[ToolSpec], parallel: bool, marker_id: MarkerId, opened: bool = False) -> str:
        """A Lark grammar (llguidance's dialect) for one or more calls of these tools; opened:
        from just after the marker that opens them (its first rule is `start`)."""

    def lazy_grammar(self, tools: list[ToolSpec], parallel: bool, marker_id: MarkerId) -> str:
        """Free text, or free text then calls held to the grammar (tool_choice "auto", strict):
        the text cannot spell the marker that opens calls, so writing it is the model's choice
        of a call, and from there the call parses.

        Where the marker is one token no text spells it, and the calls' grammar follows the
        text as it is. Where it is text, a greedy text lexeme would swallow it, so the text
        that ends in the marker is a lazy lexeme (it ends at the marker's first appearance)
        followed by the grammar from just after the marker."""
        marker = self.block_begin or self.call_begin
        if marker_id(marker) is not None:
            head, _, rules = self.grammar(tools, parallel, marker_id).partition("\n")
            return f"start: TEXT? | TEXT? ({head.removeprefix('start: ')})\n{rules}\nTEXT: /(?s:.+)/"
        head, _, rules = self.grammar(tools, parallel, marker_id, opened=True).partition("\n")
        m = _regex_literal(marker)
        return (f"start: TEXT? | opening ({head.removeprefix('start: ')})\n{rules}\n"
                f"TEXT: /(?s:.+)/ & ~/(?s:.*{m}.*)/\nopening[lazy]: /(?s:.*){m}/")


class DeepSeekV3Format(ToolCallFormat):
    name = "deepseek_v3"
    block_begin, block_end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
    sep = "<｜tool▁sep｜>"
    fences = ("```json\n", "```\n")

    def read_header(self, text: str) -> tuple[str, int] | None:
        at = text.find(self.sep)
        if at < 0:
            return None
        kind, start = text[:at].strip(), at + len(self.sep)
        if kind != "function":  # V3.1: the name comes before the separator
            return kind, start
        newline = text.find("\n", start)
        if newline < 0:
            return None
        name, after = text[start:newline].strip(), text[newline + 1:]
        for fence in self.fences:
            if after.startswith(fence):
                return name, newline + 1 + len(fence)
        if any(fence.startswith(after) for fence in self.fences):
            return None  # "```js" so far: wait, the fence must not leak into the arguments
        return name, newline + 1

    def may_end_args(self, tail: str) -> bool:
        rest = tail.lstrip()
        if rest.startswith("```"):
            rest = rest[3:].lstrip()
        elif "```".startswith(rest):
            return True
        return self.call_end.startswith(rest)

    def strip_args_end(self, args: str) -> str:
        return args.rstrip().removesuffix("```").rstrip()

    def grammar(self, tools: list[ToolSpec], parallel: bool, marker_id: MarkerId, opened: bool = False) -> str:
        m = {k: _lark_text(v, marker_id) for k, v in (("bb", self.block_begin), ("be", self.block_end),
                                                          ("cb", self.call_begin), ("ce", self.call_end),
                                                          ("sep", self.sep))}
        calls = "call" + (' ("\\n" call)*' if parallel else "")
        rules = [f"start: {'' if opened else m['bb']} {calls} {m['be']}", "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            header = _lark_string(f"{tool.name}\n```json\n")
            rules.append(f'call_{i}: {m["cb"]} "function" {m["sep"]} {header} {_json(tool.parameters)} '
                         f'"\\n```" {m["ce"]}')
        return "\n".join(rules)


class HermesFormat(ToolCallFormat):
    name = "hermes"
    call_begin, call_end = "<tool_call>", "</tool_call>"
    _header = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def read_header(self, text: str) -> tuple[str, int] | None:
        found = self._header.match(text)
        if found is None or found.end() == len(text):  # the whitespace may go on
            return None
        return json.loads(f'"{found.group(1)}"'), found.end()

    def may_end_args(self, tail: str) -> bool:
        rest = tail.lstrip()
        if not rest.startswith("}"):
            return False
        return self.call_end.startswith(rest[1:].lstrip())

    def strip_args_end(self, args: str) -> str:
        return args.rstrip().removesuffix("}").rstrip()

    def read_whole_call(self, body: str) -> tuple[str, str] | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        return call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)

    def grammar(self, tools: list[ToolSpec], parallel: bool, marker_id: MarkerId, opened: bool = False) -> str:
        cb, ce = _lark_text(self.call_begin, marker_id), _lark_text(self.call_end, marker_id)
        first = "called" if opened else "call"
        rules = [f"start: {first}" + (' ("\\n" call)*' if parallel else ""), f"call: {cb} called",
                 f'called: "\\n" ({" | ".join(f"call_{i}" for i in range(len(tools)))}) "\\n" {ce}']
        for i, tool in enumerate(tools):
            head = _lark_string('{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "arguments": ')
            rules.append(f'call_{i}: {head} {_json(tool.parameters)} "}}"')
        return "\n".join(rules)


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (DeepSeekV3Format(), HermesFormat())}
PARSERS = ("auto", *FORMATS, "none")


def detect_format(chat_template: str | None) -> ToolCallFormat | None:
    """The format a chat template writes assistant tool calls in, or None."""
    if not chat_template:
        return None
    for fmt in FORMATS.values():
        if fmt.call_begin in chat_template:
            return fmt
    return None


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker (what a stream
    must hold back until the next piece says whether the marker follows)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_text(marker: str, marker_id: MarkerId) -> str:
    token = marker_id(marker)
    return f"<[{token}]>" if token is not None else _lark_string(marker)


def _regex_literal(text: str) -> str:
    """text as a literal inside a /regex/ of the grammar (Rust's regex syntax)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**closed_schema(schema), "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def closed_schema(schema):
    """The schema with every object that lists its properties closed to others, as OpenAI's
    strict mode requires and xgrammar's strict mode assumes: an enforced call writes the
    declared arguments, not ones it made up (a schema that says additionalProperties keeps it)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: closed_schema(v) if k not in ("enum", "const", "default", "examples") else v
              for k, v in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed

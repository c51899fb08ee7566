"""Tool calls for models whose chat template has none (SmolLM2, base models, many fine-tunes).

As llama-server does for templates without tools, r1serve tells the model of the tools in a
system message and has it write calls in a format it names there: Hermes's, the one most
open models were tuned on (`<tool_call>{"name": …, "arguments": …}</tool_call>`). Earlier
calls and their results are written into the conversation in the same format, since the
template would drop them. tool_choice "required" or a named function then holds the output
to the call's grammar like any format, and "auto" holds a call the model opens to it (a lazy
grammar that takes over at the spelled-out marker).
"""
from __future__ import annotations

import json

from r1serve.server.protocol import Tool
from r1serve.tool_calls import FORMATS

GENERIC_FORMAT = FORMATS["hermes"]

INSTRUCTIONS = ("You can call functions to help answer. They are described in JSON Schema:\n<tools>\n{tools}\n"
                "</tools>\nTo call one, answer with nothing but\n<tool_call>\n"
                '{{"name": "FUNCTION_NAME", "arguments": {{ARGUMENTS_AS_JSON}}}}\n</tool_call>\n'
                "(one such block per call). The results come back inside <tool_response></tool_response>.")


def tools_prompt(tools: list[Tool]) -> str:
    described = "\n".join(json.dumps(t.model_dump(exclude_none=True)["function"], ensure_ascii=False) for t in tools)
    return INSTRUCTIONS.format(tools=described)


def with_generic_tools(conv: list[dict], tools: list[Tool] | None) -> list[dict]:
    """The conversation as a template without tools can show it: the tools (when offered) in
    the system message, calls in the assistant's text, results as user turns."""
    out = [_as_text(m) for m in conv]
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = out[0] | {"content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _as_text(message: dict) -> dict:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    written = "\n".join(_call_text(c) for c in calls)
    content = f"{message['content']}\n{written}" if message.get("content") else written
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def _call_text(call: dict) -> str:
    fn = call["function"]
    try:
        arguments = json.loads(str(fn["arguments"]))
    except ValueError:
        arguments = str(fn["arguments"])
    body = json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{GENERIC_FORMAT.call_begin}\n{body}\n{GENERIC_FORMAT.call_end}"

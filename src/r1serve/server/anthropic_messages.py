"""POST /v1/messages (and /anthropic/v1/messages): Anthropic's Messages API over the chat path.

A Messages request is translated into a chat completion request (system, turns, tool_use
and tool_result blocks, thinking blocks), runs exactly as one (template, sampling, quota,
ledger), and its outputs are written back as Anthropic content blocks: a `thinking` block
(R1's reasoning, signed), `text`, and `tool_use` blocks, streamed with Anthropic's event
sequence. The DeepSeek platform serves this format at its `/anthropic` base URL, which is how
Claude Code and the Anthropic SDKs reach it.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.server.errors import anthropic_error_body, bad_request, status_of
from r1serve.server.anthropic_protocol import (AnyChoice, AssistantTurn, AutoChoice, CountTokensRequest,
                                               MessagesRequest, NamedChoice, NoChoice, TextBlock, ThinkingBlock,
                                               ToolResultBlock, ToolUseBlock, UserTurn, PromptedRequest)
from r1serve.server.protocol import ChatCompletionRequest
from r1serve.server.served_model import ServedModel
from r1serve.server.serving_chat import ChoiceDelta, PartStreamJob, chat_prompt, translated_request
from r1serve.server.thinking_signer import ThinkingSigner

# ---- Anthropic -> chat -------------------------------------------------------------------------------


def chat_request(req: MessagesRequest | CountTokensRequest, model: ServedModel, signer: ThinkingSigner,
                 stream: bool = False) -> ChatCompletionRequest:
    """The chat completion request this Messages request is."""
    messages = [{"role": "system", "content": _system_text(req.system)}] if req.system else []
    for i, m in enumerate(req.messages):
        messages += _user_turn(m) if isinstance(m, UserTurn) else [_assistant_turn(m, i, signer)]
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": stream}
    if isinstance(req, MessagesRequest):
        body |= {"max_tokens": req.max_tokens, "stop": req.stop_sequences, "temperature": req.temperature,
                 "top_p": req.top_p, "top_k": req.top_k, "reasoning_reserve": req.reasoning_reserve}
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                            "parameters": t.input_schema}} for t in req.tools]
    body |= _tool_choice(req.tool_choice, bool(req.tools))
    body |= _thinking(req, model)
    return translated_request(body)


def _thinking(req: PromptedRequest, model: ServedModel) -> dict:
    """The switch ("adaptive": the model's own behaviour), effort, and budget_tokens as the
    thinking budget (for a model served with a reasoning parser: others do not think)."""
    out: dict[str, Any] = {}
    if req.thinking is not None and req.thinking.type != "adaptive":
        out["thinking"] = {"type": req.thinking.type}
        if req.thinking.type == "enabled" and req.thinking.budget_tokens is not None and model.reasoning:
            out["max_reasoning_tokens"] = req.thinking.budget_tokens
    if req.output_config is not None and req.output_config.effort is not None:
        out["reasoning_effort"] = req.output_config.effort
    return out


def _system_text(system: str | list[TextBlock]) -> str:
    return system if isinstance(system, str) else "\n".join(b.text for b in system)


def _user_turn(m: UserTurn) -> list[dict]:
    """A user turn: its tool results first (each a tool message, as chat templates take them),
    then its text."""
    if isinstance(m.content, str):
        return [{"role": "user", "content": m.content}]
    out, text = [], []
    for block in m.content:
        if isinstance(block, ToolResultBlock):
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block)})
        else:
            text.append(block.text)
    if text or not out:
        out.append({"role": "user", "content": "\n".join(text)})
    return out


def _result_text(block: ToolResultBlock) -> str:
    if isinstance(block.content, list):
        text = "\n".join(part.text for part in block.content)
    else:
        text = block.content or ""
    return f"Error: {text}" if block.is_error else text


def _assistant_turn(m: AssistantTurn, i: int, signer: ThinkingSigner) -> dict:
    if isinstance(m.content, str):
        return {"role": "assistant", "content": m.content}
    text, thinking, calls = [], [], []
    for j, block in enumerate(m.content):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ThinkingBlock):
            if block.signature is not None and not signer.verify(block.thinking, block.signature):
                raise bad_request(f"{where}.signature: this thinking block was not written by this server, or was "
                                  "changed since; send it back as it came, or without its signature",
                                  param="messages")
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input)}})
        # redacted_thinking: r1serve writes none, so there is nothing of its own to read back
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if thinking:
        turn["reasoning_content"] = "".join(thinking)
    if calls:
        turn["tool_calls"] = calls
    return turn


def _tool_choice(choice: AutoChoice | AnyChoice | NamedChoice | NoChoice | None, has_tools: bool) -> dict:
    if choice is None or (choice.type == "auto" and not has_tools):
        return {}
    out: dict[str, Any] = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)}
    if isinstance(choice, NamedChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    if getattr(choice, "disable_parallel_tool_use", None):
        out["parallel_tool_calls"] = False
    return out


# ---- chat outputs -> Anthropic --------------------------------------------------------------------


def event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def stop_reason(finish_reason: str | None, matched: int | str | None,
                thinking_cut: bool = False) -> tuple[str, str | None]:
    """Anthropic's stop_reason (and stop_sequence) for a chat finish_reason. An answer that
    ended on its own after thinking was cut (by its budget or the answer reserve) ends with
    r1serve's own "thinking_truncated": the turn is whole, its reasoning is not. tool_use,
    max_tokens and stop_sequence keep their meaning, since clients act on them."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    return ("thinking_truncated" if thinking_cut else "end_turn"), None


class MessageJob(PartStreamJob):
    """A chat job whose outputs are written as Anthropic's message (one choice)."""

    call_id_prefix = "toolu_"

    @staticmethod
    def new_request_id() -> str:
        return f"msg_{uuid.uuid4().hex[:24]}"

    def __init__(self, *args, signer: ThinkingSigner) -> None:
        super().__init__(*args)
        self.signer = signer
        self.block: str | None = None  # the type of the content block open in the stream
        self.blocks = -1  # index of the last block opened
        self.thinking = ""  # the open thinking block's text, signed when it closes
        self.matched: int | str | None = None  # the stop sequence that ended the output

    # -- whole responses

    def response_body(self, choices: list[dict]) -> dict:
        (choice,) = choices
        message, content = choice["message"], []
        if message.get("reasoning_content"):
            thinking = message["reasoning_content"]
            content.append({"type": "thinking", "thinking": thinking, "signature": self.signer.sign(thinking)})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": _arguments(call["function"]["arguments"])})
        reason, sequence = stop_reason(choice["finish_reason"], self.matched, any(self.reasoning_cut))
        return self._message(content, reason, sequence) | {"usage": self.anthropic_usage()}

    def choices(self, finals: list[RequestOutput]) -> list[dict]:
        self.matched = finals[0].outputs[0].stop_reason
        return super().choices(finals)

    def _message(self, content: list[dict], reason: str | None, sequence: str | None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model.name, "content": content,
                "stop_reason": reason, "stop_sequence": sequence}

    def anthropic_usage(self) -> dict:
        prompt, cached, completion, _ = self.counts()
        return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached, "output_tokens": completion,
                "reasoning_truncated": any(self.reasoning_cut)}

    # -- streams

    def first_events(self) -> list[bytes]:
        start = self._message([], None, None) | {"usage": self.anthropic_usage() | {"output_tokens": 0}}
        return [event("message_start", {"type": "message_start", "message": start}),
                event("ping", {"type": "ping"})]

    def on_finish(self, c: CompletionOutput, d: ChoiceDelta) -> list[bytes]:
        self.matched = c.stop_reason
        return self._close_block()

    def part_events(self, d: ChoiceDelta) -> list[bytes]:
        events = []
        if d.reasoning:
            events += self._open("thinking", {"type": "thinking", "thinking": ""})
            self.thinking += d.reasoning
            events.append(self._delta_event({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            events += self._open("text", {"type": "text", "text": ""})
            events.append(self._delta_event({"type": "text_delta", "text": d.content}))
        for call in d.calls:
            if "id" in call:  # a call's first delta opens its block
                events += self._open("tool_use", {"type": "tool_use", "id": call["id"],
                                                  "name": call["function"]["name"], "input": {}}, always=True)
            if call["function"]["arguments"]:
                events.append(self._delta_event({"type": "input_json_delta",
                                                 "partial_json": call["function"]["arguments"]}))
        return events

    def _open(self, kind: str, block: dict, always: bool = False) -> list[bytes]:
        if self.block == kind and not always:
            return []
        events = self._close_block()
        self.block, self.blocks = kind, self.blocks + 1
        return events + [event("content_block_start", {"type": "content_block_start", "index": self.blocks,
                                                       "content_block": block})]

    def _close_block(self) -> list[bytes]:
        if self.block is None:
            return []
        events = []
        if self.block == "thinking":
            events.append(self._delta_event({"type": "signature_delta", "signature": self.signer.sign(self.thinking)}))
            self.thinking = ""
        self.block = None
        return events + [event("content_block_stop", {"type": "content_block_stop", "index": self.blocks})]

    def _delta_event(self, delta: dict) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.blocks, "delta": delta})

    def closing_events(self) -> bytes:
        reason, sequence = stop_reason(self.finish_reasons[0], self.matched, any(self.reasoning_cut))
        return (event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                        "usage": self.anthropic_usage()})
                + event("message_stop", {"type": "message_stop"}))

    def error_events(self, body: dict) -> bytes:
        return event("error", anthropic_error_body(status_of(body), body["error"]["message"]))


def _arguments(text: str) -> dict:
    """A call's arguments as the object Anthropic's tool_use.input is (text that is not an
    object, from an unconstrained model, is kept under one key rather than lost)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"_raw_arguments": text}
    return value if isinstance(value, dict) else {"_raw_arguments": text}


async def count_tokens(model: ServedModel, req: CountTokensRequest, signer: ThinkingSigner) -> dict:
    prompt = chat_prompt(model, chat_request(req, model, signer))
    return {"input_tokens": len(prompt.token_ids)}

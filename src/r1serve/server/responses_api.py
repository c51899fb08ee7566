"""POST /v1/responses: OpenAI's Responses API over the chat path.

A Responses request (input text or items, instructions, tools, text.format, reasoning
effort) is translated into the chat completion request it is and runs as one; its outputs
come back as Responses output items (a `reasoning` item with R1's thinking, a `message`
item, `function_call` items), streamed as the Responses events. With `store` (the default,
as OpenAI has it) the response and the conversation it ends are kept in the platform
database for `previous_response_id` and GET/DELETE /v1/responses/{id}, per key.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from r1serve.outputs import CompletionOutput
from r1serve.server.errors import APIError, bad_request
from r1serve.server.protocol import ChatCompletionRequest
from r1serve.accounts.response_store import ResponseStore
from r1serve.server.responses_protocol import (FunctionCallItem, FunctionCallOutputItem, MessageItem, NamedFunction,
                                               ReasoningItem, ResponsesRequest)
from r1serve.server.serving_chat import ChoiceDelta, PartStreamJob, translated_request


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- Responses -> chat -----------------------------------------------------------------------------------


def conversation_of(req: ResponsesRequest) -> list[dict]:
    """The request's items as chat messages (without its instructions, which are not kept)."""
    messages: list[dict] = []
    reasoning = ""  # a reasoning item goes with the assistant turn that follows it
    for item in req.items():
        if isinstance(item, ReasoningItem):
            reasoning += item.text()
        elif isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
            if item.role == "assistant" and reasoning:
                messages[-1]["reasoning_content"], reasoning = reasoning, ""
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # calls of one turn come as one item each
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if reasoning:
                    messages[-1]["reasoning_content"], reasoning = reasoning, ""
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def chat_request(req: ResponsesRequest, earlier: list[dict]) -> ChatCompletionRequest:
    """The chat completion request a Responses request is, after the `earlier` conversation."""
    now = conversation_of(req)
    if not now:
        raise bad_request("input holds no message, function call or function call output to answer (reasoning "
                          "items alone are the thinking of a turn that is not there)", param="input")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + earlier
    body: dict[str, Any] = {"model": req.model, "messages": messages + now,
                            "max_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
                            "stream": bool(req.stream), "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = ({"type": "function", "function": {"name": req.tool_choice.name}}
                               if isinstance(req.tool_choice, NamedFunction) else req.tool_choice)
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    if req.reasoning and req.reasoning.effort:
        body["reasoning_effort"] = req.reasoning.effort
    return translated_request(body)


def earlier_conversation(store: ResponseStore, req: ResponsesRequest, key_id: str | None) -> list[dict]:
    if req.previous_response_id is None:
        return []
    found = store.load(req.previous_response_id, key_id)
    if found is None:
        raise APIError(404, f"no stored response {req.previous_response_id!r} for this key (a response is kept only "
                            "with store true)", param="previous_response_id", code="response_not_found")
    return found[1]


# ---- chat outputs -> Responses ---------------------------------------------------------------------------


def event(data: dict) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ResponsesJob(PartStreamJob):
    """A chat job whose outputs are written as a Responses API response (one choice)."""

    @staticmethod
    def new_request_id() -> str:
        return _id("resp")

    def __init__(self, *args, responses: ResponsesRequest, earlier: list[dict], store: ResponseStore,
                 key_id: str | None) -> None:
        super().__init__(*args)
        self.responses, self.earlier, self.store, self.key_id = responses, earlier, store, key_id
        self.sequence = 0
        self.items: list[dict] = []  # the output items so far (a stream's account of them)
        self.open: dict | None = None  # the item being streamed
        self.finish_reason: str | None = None

    # -- the response object

    def _response(self, output: list[dict], status: str) -> dict:
        r = self.responses
        incomplete = {"reason": "max_output_tokens"} if self.finish_reason == "length" else None
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else {"type": "text"}
        choice = r.tool_choice.model_dump() if isinstance(r.tool_choice, NamedFunction) else (r.tool_choice or "auto")
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model.name,
                "status": "incomplete" if status == "completed" and incomplete else status,
                "incomplete_details": incomplete if status == "completed" else None, "error": None,
                "instructions": r.instructions, "output": output,
                "tools": [t.model_dump(exclude_none=True) for t in r.tools or ()], "tool_choice": choice,
                "parallel_tool_calls": r.parallel_tool_calls is not False, "temperature": r.temperature,
                "top_p": r.top_p, "max_output_tokens": r.max_output_tokens, "previous_response_id":
                r.previous_response_id, "reasoning": {"effort": r.reasoning.effort if r.reasoning else None},
                "text": {"format": fmt}, "store": r.store is not False, "metadata": {},
                "usage": self.responses_usage() if status != "in_progress" else None}

    def responses_usage(self) -> dict:
        prompt, cached, completion, reasoning = self.counts()
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": prompt + completion}

    def response_body(self, choices: list[dict]) -> dict:
        (choice,) = choices
        message, self.finish_reason = choice["message"], choice["finish_reason"]
        if message.get("reasoning_content"):
            self.items.append(_reasoning_item(message["reasoning_content"]))
        if message.get("content"):
            self.items.append(_message_item(message["content"]))
        for call in message.get("tool_calls") or ():
            self.items.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        return self._response(self.items, "completed")

    async def finished(self, body: dict | None) -> None:
        body = body or self._response(self.items, "completed")
        if self.responses.store is not False:
            conversation = self.earlier + conversation_of(self.responses) + _as_chat(self.items)
            await asyncio.to_thread(self.store.save, body, conversation, self.key_id)

    # -- streams

    def _event(self, kind: str, **fields) -> bytes:
        self.sequence += 1
        return event({"type": kind, "sequence_number": self.sequence - 1, **fields})

    def first_events(self) -> list[bytes]:
        start = self._response([], "in_progress")
        return [self._event("response.created", response=start), self._event("response.in_progress", response=start)]

    def on_finish(self, c: CompletionOutput, d: ChoiceDelta) -> list[bytes]:
        self.finish_reason = d.finish_reason
        return self._close()

    def part_events(self, d: ChoiceDelta) -> list[bytes]:
        events = []
        if d.reasoning:
            events += self._begin("reasoning", lambda: _reasoning_item(""))
            self.open["content"][0]["text"] += d.reasoning
            events.append(self._event("response.reasoning_text.delta", **self._where(), delta=d.reasoning))
        if d.content:
            events += self._begin("message", lambda: _message_item(""))
            self.open["content"][0]["text"] += d.content
            events.append(self._event("response.output_text.delta", **self._where(), delta=d.content, logprobs=[]))
        for call in d.calls:
            if "id" in call:
                events += self._begin("function_call", lambda: _call_item(call["id"], call["function"]["name"], ""),
                                      always=True)
            if call["function"]["arguments"]:
                self.open["arguments"] += call["function"]["arguments"]
                events.append(self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                          output_index=len(self.items), delta=call["function"]["arguments"]))
        return events

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}

    def _begin(self, kind: str, make, always: bool = False) -> list[bytes]:
        if self.open is not None and self.open["type"] == kind and not always:
            return []
        events = self._close()
        self.open = make()
        shown = self.open | {"status": "in_progress"}
        if kind == "message":
            shown["content"] = []
        events.append(self._event("response.output_item.added", output_index=len(self.items), item=shown))
        if kind == "message":
            events.append(self._event("response.content_part.added", **self._where(),
                                      part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"item_id": item["id"], "output_index": len(self.items)}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[]),
                       self._event("response.content_part.done", **at, content_index=0, part=part)]
        elif item["type"] == "reasoning":
            events.append(self._event("response.reasoning_text.done", **at, content_index=0,
                                      text=item["content"][0]["text"]))
        else:
            events.append(self._event("response.function_call_arguments.done", **at, arguments=item["arguments"]))
        self.items.append(item)
        return events + [self._event("response.output_item.done", output_index=at["output_index"], item=item)]

    def closing_events(self) -> bytes:
        return self._event("response.completed", response=self._response(self.items, "completed"))

    def error_events(self, body: dict) -> bytes:
        failed = self._response(self.items, "failed") | {"error": {"code": "server_error",
                                                                   "message": body["error"]["message"]}}
        return self._event("response.failed", response=failed)


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def _message_item(text: str) -> dict:
    return {"type": "message", "id": _id("msg"), "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str) -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed"}


def _as_chat(items: list[dict]) -> list[dict]:
    """The output items as the chat messages a later request continues from."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "reasoning":
            turn["reasoning_content"] = item["content"][0]["text"]
        elif item["type"] == "message":
            turn["content"] += item["content"][0]["text"]
        else:
            turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return [turn]

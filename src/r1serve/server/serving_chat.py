"""POST /v1/chat/completions: messages -> prompt -> engine -> OpenAI/DeepSeek chat response."""
from __future__ import annotations

import uuid
from abc import abstractmethod
from dataclasses import dataclass, replace

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.sampling_params import ReasoningSpec
from r1serve.accounts.accounts import Accounts, Meter, Principal
from r1serve.server.errors import APIError
from r1serve.server.engine_request import PromptInput, capped, check_context, sampling_params
from r1serve.server.engine_streams import start_requests, until_disconnect
from r1serve.server.logprobs import chat_logprobs
from r1serve.server.sse import sse
from r1serve.server.protocol import ChatCompletionRequest, ChatMessage, new_id, usage_body
from r1serve.server.reasoning import END, START, Delta, ReasoningSplitter, split_reasoning
from r1serve.server.request_log import JOB
from r1serve.server.response_job import EventStreamResponse, ResponseJob
from r1serve.server.served_model import ServedModel
from r1serve.server.structured_outputs import banned_markers, structured_outputs
from r1serve.server.generic_tools import with_generic_tools
from r1serve.server.thinking import reserve_answer, switch_kwargs, template_switches, without_thinking
from r1serve.tokenizer.chat_template import ToolArguments
from r1serve.tool_calls import ToolCallParser


def translated_request(body: dict) -> ChatCompletionRequest:
    """The chat request another API format's request was turned into (Anthropic's, the
    Responses API's); what it cannot be is a 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        raise APIError(400, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """Messages as templates expect them. An assistant turn's reasoning (sent as
    reasoning_content, or left inline before </think>) goes back to the template only inside
    the tool loop of the current question: a turn after the last user message that made tool
    calls, whose thinking the next step continues. Earlier turns lose it, as the DeepSeek API
    documents (thinking is not fed back between questions). Templates that render no
    reasoning ignore it."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    conv = []
    for i, m in enumerate(messages):
        content, reasoning = m.text(), m.reasoning_content
        if m.role == "assistant" and END in content:
            inline, _, content = content.rpartition(END)
            content = content.lstrip("\n")
            reasoning = reasoning or inline.removeprefix(START).strip("\n")
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": content} | ({"name": m.name} if m.name else {})
        if m.tool_calls:
            message["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            if i > last_user and reasoning:
                message["reasoning_content"] = reasoning
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        conv.append(message)
    return conv


def _template_call(call) -> dict:
    # Templates differ in what they expect of arguments: DeepSeek's concatenate them as text,
    # Qwen's pass them through tojson (chat_template.ToolArguments is both).
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": ToolArguments.of(call.function.arguments)}}


def _render(tok, conv: list[dict], req: ChatCompletionRequest) -> str:
    kwargs = dict(req.chat_template_kwargs or {})
    if req.thinking_asked.enabled is not None:  # the switch, for templates that read one; the request's kwargs win
        kwargs = switch_kwargs(req.thinking_asked, template_switches(tok.chat_template)) | kwargs
    if req.tools and req.tool_mode != "none":  # with "none" the model is not told of tools it may not call
        kwargs.setdefault("tools", [t.model_dump(exclude_none=True) for t in req.tools])
    try:
        return tok.apply_chat_template(conv, add_generation_prompt=req.add_generation_prompt, **kwargs)
    except (TypeError, AttributeError, LookupError, ArithmeticError) as exc:
        # A template is code and chat_template_kwargs are its variables: a number where it
        # adds strings, or a value under a name it calls (namespace), fails inside it.
        if not kwargs:
            raise
        raise APIError(400, f"the chat template failed with these chat_template_kwargs ({type(exc).__name__}: "
                            f"{exc})", param="chat_template_kwargs") from exc


# Marks where the final message's content ends when the reply continues it: private-use
# characters, in no real message and left alone by templates.
CONTINUE_MARK = "\ue000r1serve:continue\ue000"


def chat_prompt(model: ServedModel, req: ChatCompletionRequest) -> PromptInput:
    tok = model.engine.tokenizer
    conv = conversation(req.messages)
    if model.tool_format is None:  # the template shows no tools: r1serve writes them in
        conv = with_generic_tools(conv, req.tools if req.tool_mode != "none" else None)
    if req.continue_final_message:
        # The reply continues the last (assistant) message: cut what the template wrote after
        # it. A mark rather than a search for its text, which may be empty or said before.
        conv[-1] = conv[-1] | {"content": conv[-1]["content"] + CONTINUE_MARK}
    text = _render(tok, conv, req)
    if req.continue_final_message:
        at = text.find(CONTINUE_MARK)
        if at < 0:
            raise APIError(400, "continue_final_message: the chat template does not reproduce the final "
                                "message's content, so it cannot be continued", param="messages")
        text = text[:at]
    elif req.thinking_asked.enabled is False:  # R1's templates open thinking whatever they are told
        text = without_thinking(text)
    # The template writes BOS where the model wants it: no second one from the encoder.
    return PromptInput(text, tok.encode(text, add_special_tokens=False))


def reasoning_spec(model: ServedModel, req: ChatCompletionRequest, prompt: PromptInput) -> ReasoningSpec | None:
    """How the output's thinking is read and bounded (None: a model served without a reasoning
    parser; an effort asked of it is moot, as of any model that does not think)."""
    if not model.reasoning:
        if req.max_reasoning_tokens is not None:
            raise APIError(400, f"max_reasoning_tokens needs a reasoning model; {model.name} is served without "
                                "a reasoning parser (start the server with --reasoning-parser deepseek_r1)",
                           param="max_reasoning_tokens")
        return None
    tok = model.engine.tokenizer
    budget = req.max_reasoning_tokens if req.max_reasoning_tokens is not None else req.thinking_asked.budget
    return ReasoningSpec(tuple(tok.encode(START, add_special_tokens=False)),
                         tuple(tok.encode(END, add_special_tokens=False)),
                         open_at_start=prompt.text.rstrip().endswith(START), max_tokens=budget)


async def create_chat_completion(model: ServedModel, req: ChatCompletionRequest, raw: HTTPRequest,
                                 accounts: Accounts, principal: Principal, job: type[ChatJob] | None = None,
                                 **job_args):
    """`job` (with `job_args`): the response's format (default: OpenAI's chat completion)."""
    job = job or ChatJob
    engine = model.engine
    prompt = chat_prompt(model, req)
    max_tokens = check_context(len(prompt.token_ids), req.completion_limit, engine.max_model_len, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    spec = reasoning_spec(model, req, prompt)
    params = sampling_params(req, max_tokens, k, spec)
    banned = banned_markers(model, req)
    params = replace(params, structured_outputs=structured_outputs(model, req),
                     logit_bias=(params.logit_bias or {}) | banned if banned else params.logit_bias)
    request_id = job.new_request_id()
    meter = accounts.meter(principal, model.name, request_id)
    granted = await meter.hold(len(prompt.token_ids), req.n, max_tokens)  # the worst case, held against the quota
    params = reserve_answer(capped(params, granted), req.reasoning_reserve)
    chat = job(model, req, request_id, prompt, spec, meter, **job_args)
    setattr(raw.state, JOB, chat)  # its tokens go in the request's log line
    streams = await start_requests(engine, [chat.id], [prompt], params, meter)
    if req.stream:
        return EventStreamResponse(chat, streams)
    return JSONResponse(await until_disconnect(raw, chat.full(streams)))


@dataclass(frozen=True)
class ChoiceDelta:
    reasoning: str
    content: str
    calls: list[dict]  # OpenAI tool_calls entries: id, type and name on a call's first, argument text on each
    finish_reason: str | None


class ChatJob(ResponseJob):
    """A chat request's outputs as OpenAI's chat completion (other formats subclass it)."""

    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    call_id_prefix = "call_"

    @staticmethod
    def new_request_id() -> str:
        return new_id("chatcmpl")

    def __init__(self, model: ServedModel, req: ChatCompletionRequest, request_id: str, prompt: PromptInput,
                 spec: ReasoningSpec | None, meter: Meter) -> None:
        super().__init__(model, req, request_id, req.n, meter)
        self.prompt, self.spec = prompt, spec
        self.splitters = [ReasoningSplitter(spec.open_at_start) for _ in range(req.n)] if spec else None
        self.completion_tokens = [0] * req.n
        self.reasoning_tokens = [0] * req.n
        self.reasoning_cut = [False] * req.n
        self.cached = 0
        # Tool calls are read out of the answer (never out of the reasoning), one parser per choice.
        fmt = model.call_format if req.tools and req.tool_mode != "none" else None
        self.tool_parsers = [ToolCallParser(fmt) for _ in range(req.n)] if fmt else None
        self.call_ids: list[list[str]] = [[] for _ in range(req.n)]
        model.metrics.count_request(model.name, req)

    def choices(self, finals: list[RequestOutput]) -> list[dict]:
        (final,) = finals
        self.cached = final.num_cached_tokens
        return [self._choice(c) for c in final.outputs]

    def _choice(self, c: CompletionOutput) -> dict:
        self._count(c)
        message = {"role": "assistant", "content": c.text}
        reasoned = False
        if self.spec is not None:
            parts = split_reasoning(c.text, self.spec.open_at_start)
            message = {"role": "assistant", "content": parts.content, "reasoning_content": parts.reasoning or None}
            reasoned = bool(parts.reasoning)
        if not reasoned:  # with no reasoning (parser or not) the answer starts at the first token
            self.timer.answer_is_first_token()
        finish_reason = c.finish_reason
        if self.tool_parsers is not None:
            delta = self.tool_parsers[c.index].feed(message["content"], last=True)
            calls = self._tool_calls(c.index, delta.calls)
            if calls:
                message |= {"content": delta.content or None, "tool_calls": calls}
                finish_reason = _with_calls(finish_reason)
        self.finish_reasons[c.index] = finish_reason
        return {"index": c.index, "message": message, "logprobs": self._logprobs(c), "finish_reason": finish_reason}

    def _tool_calls(self, i: int, deltas) -> list[dict]:
        """OpenAI's tool_calls entries for a choice's call deltas: id, type and name on a call's
        first delta, argument text on every one. Without parallel_tool_calls only the first call."""
        out = []
        for d in deltas:
            if d.index > 0 and self.req.parallel_tool_calls is False:
                continue
            entry: dict = {"index": d.index}
            if d.name is not None:
                self.call_ids[i].append(f"{self.call_id_prefix}{uuid.uuid4().hex[:24]}")
                entry |= {"id": self.call_ids[i][d.index], "type": "function",
                          "function": {"name": d.name, "arguments": d.arguments}}
            else:
                entry["function"] = {"arguments": d.arguments}
            out.append(entry)
        if not self.req.stream:
            out = _whole_calls(out)
        return out

    def _logprobs(self, c: CompletionOutput) -> dict | None:
        if not c.logprobs:
            return None
        return {"content": chat_logprobs(c.token_ids, c.logprobs, self.req.top_logprobs or 0,
                                         self.model.engine.tokenizer)}

    def first_events(self) -> list[bytes]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def on_output(self, index: int, out: RequestOutput) -> list[bytes]:
        self.cached = out.num_cached_tokens
        return [event for c in out.outputs for event in self._choice_events(c)]

    def _choice_events(self, c: CompletionOutput) -> list[bytes]:
        d = self._delta(c)
        body: dict = {}
        if d.reasoning:
            body["reasoning_content"] = d.reasoning
        if d.content:
            body["content"] = d.content
        if d.calls:
            body["tool_calls"] = d.calls
        logprobs = self._logprobs(c)
        if not body and logprobs is None and not c.finished:
            return []
        return [self._chunk(c.index, body, logprobs, d.finish_reason)]

    def _delta(self, c: CompletionOutput) -> ChoiceDelta:
        """What one streamed output adds to its choice: thinking, answer text, call deltas."""
        i = c.index
        self._count(c, delta=True)
        delta = Delta(content=c.text)
        if self.splitters is not None:
            delta = self.splitters[i].feed(c.text)
            if c.finished:
                tail = self.splitters[i].flush()
                delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
        content, calls = delta.content, []
        if self.tool_parsers is not None:
            parsed = self.tool_parsers[i].feed(content, last=c.finished)
            content, calls = parsed.content, self._tool_calls(i, parsed.calls)
        if content or calls:
            self.timer.on_answer()
        finish_reason = c.finish_reason
        if c.finished:
            if self.call_ids[i]:
                finish_reason = _with_calls(finish_reason)
            self.finish_reasons[i] = finish_reason
        return ChoiceDelta(delta.reasoning, content, calls, finish_reason)

    def _chunk(self, i: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> bytes:
        return sse(self.envelope([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]))

    def _count(self, c: CompletionOutput, delta: bool = False) -> None:
        i = c.index
        self.completion_tokens[i] = self.completion_tokens[i] + len(c.token_ids) if delta else len(c.token_ids)
        # The engine counts thinking in tokens (0 when the output did not open with <think>).
        self.reasoning_tokens[i] = c.num_reasoning_tokens
        self.reasoning_cut[i] = c.reasoning_cut

    def usage(self) -> dict:
        return usage_body(len(self.prompt.token_ids), sum(self.completion_tokens), self.cached,
                          sum(self.reasoning_tokens), any(self.reasoning_cut))

    def counts(self) -> tuple[int, int, int, int]:
        return len(self.prompt.token_ids), self.cached, sum(self.completion_tokens), sum(self.reasoning_tokens)


class PartStreamJob(ChatJob):
    """A chat job streamed in another API's events, part by part: thinking, text, each call
    (Anthropic's content blocks, the Responses API's output items). One choice."""

    def on_output(self, index: int, out: RequestOutput) -> list[bytes]:
        self.cached = out.num_cached_tokens
        events: list[bytes] = []
        for c in out.outputs:
            d = self._delta(c)
            events += self.part_events(d)
            if c.finished:
                events += self.on_finish(c, d)
        return events

    @abstractmethod
    def part_events(self, d: ChoiceDelta) -> list[bytes]:
        """The events for what one output added."""

    @abstractmethod
    def on_finish(self, c: CompletionOutput, d: ChoiceDelta) -> list[bytes]:
        """The events that close the last part, once the output ended."""


def _whole_calls(entries: list[dict]) -> list[dict]:
    """Deltas of whole outputs folded into one entry per call (a non-streamed message)."""
    calls: list[dict] = []
    for e in entries:
        if "id" in e:
            calls.append({"id": e["id"], "type": "function", "function": dict(e["function"])})
        elif calls:
            calls[-1]["function"]["arguments"] += e["function"]["arguments"]
    return calls


def _with_calls(finish_reason: str | None) -> str | None:
    # A reply that ends in its calls is waiting for their results; one cut by max_tokens says so.
    return "tool_calls" if finish_reason == "stop" else finish_reason

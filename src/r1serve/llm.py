"""The offline Python API, shaped as vLLM's `LLM`."""
from __future__ import annotations

import itertools
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from tqdm import tqdm

from r1serve.config import EngineConfig
from r1serve.engine.core_messages import Prompt
from r1serve.engine.data_parallel import DataParallelEngine
from r1serve.engine.engine_stats import EngineStats
from r1serve.engine.llm_engine import LLMEngine
from r1serve.errors import InvalidRequestError
from r1serve.models.catalog import default_cache_dir, resolve_model
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.tool_calls import ToolCallFormat, detect_format


ENGINE_OPTIONS = frozenset(f.name for f in fields(EngineConfig)) - {"model", "cache_dir", "dtype"}


class OfflineEngine(Protocol):
    """What LLM drives: LLMEngine in this process, or DataParallelEngine over replicas' processes."""

    tokenizer: Any
    dtype: Any  # torch.dtype

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> list[int]: ...

    def abort_request(self, request_id: str) -> Any: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


class LLM:
    """Load a model (catalog name, .gguf file or HF directory) and generate from it.

    >>> llm = LLM(model="smollm2-135m")
    >>> llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32))
    """

    def __init__(self, model: str, dtype: str = "auto", *, cache_dir: str | Path | None = None,
                 **engine_options) -> None:
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        unknown = sorted(set(engine_options) - ENGINE_OPTIONS)
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s) {unknown}; accepted: {sorted(ENGINE_OPTIONS)}")
        config = EngineConfig(model=model, cache_dir=cache_dir, dtype=dtype, **engine_options)
        path = resolve_model(model, cache_dir)
        # Data-parallel replicas run in engine processes of their own, driven from here.
        self.engine: OfflineEngine = (DataParallelEngine(config, path) if config.data_parallel_size > 1
                                      else LLMEngine(config, path))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other ranks and replicas of a parallel engine (they also stop when this process ends)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dtype(self):
        """The activations' torch dtype."""
        return self.engine.dtype

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(prompts)} prompts; "
                                      "give one, or one per prompt")
        # Only finished outputs are returned: a cumulative one built every step would cost the
        # whole text so far each time (as vLLM's LLM.generate, outputs are final-only).
        params = [replace(p, output_kind="final_only") if p.output_kind == "cumulative" else p for p in params]
        ids = self._add_all(prompts, params)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """tools (OpenAI's shape) are rendered by the chat template; read the calls out of the
        text with r1serve.tool_calls.parse_tool_calls(self.tool_format, text), or enforce one
        with SamplingParams(structured_outputs=...) and the format's grammar."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = dict(chat_template_kwargs or {}) | ({"tools": tools} if tools else {})
        prompts = [self.chat_prompt(conv, add_generation_prompt, **kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    @property
    def tool_format(self) -> ToolCallFormat | None:
        """The format the model's chat template writes tool calls in (None: it has none)."""
        return detect_format(self.get_tokenizer().chat_template)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it (text is cumulative)."""
        rid = self._add_all([prompt], [sampling_params or SamplingParams()])[0]
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:  # the consumer stopped early (Ctrl-C, break): free the blocks
                self.engine.abort_request(rid)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> dict:
        """The chat template applied to one conversation, as a prompt for generate/stream."""
        tok = self.get_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        # The template already holds BOS where the model wants it: encode without adding more.
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def _add_all(self, prompts, params) -> list[str]:
        # Either every prompt is accepted or none: a bad one later in the list must not
        # leave earlier ones running.
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]

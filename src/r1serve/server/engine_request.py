"""What an API request becomes for the engine, whatever its format: its prompt, the room its
context leaves, its SamplingParams (and those capped by what a key's quota left it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from r1serve.sampling_params import ReasoningSpec, SamplingParams
from r1serve.server.errors import bad_request
from r1serve.server.protocol import SamplingFields


@dataclass(frozen=True)
class PromptInput:
    text: str | None
    token_ids: list[int]

    def engine_prompt(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


def check_context(prompt_len: int, limit: int | None, max_model_len: int, what: str = "messages") -> int:
    """The max_tokens to use: the request's, or all the room left; 400 if it cannot fit."""
    room = max_model_len - prompt_len
    if room <= 0 or (limit is not None and limit > room):
        asked = prompt_len + (limit or 0)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{asked} tokens ({prompt_len} in the {what}, {limit or 0} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens" if room > 0 else what, code="context_length_exceeded")
    return limit if limit is not None else room


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                    reasoning: ReasoningSpec | None = None) -> SamplingParams:
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        # The engine's per-request generator takes a 64-bit seed; OpenAI seeds may be negative.
        seed=None if req.seed is None else req.seed % 2**63,
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens, max_tokens),
        stop=req.stop or (),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logit_bias={int(t): b for t, b in req.logit_bias.items()} if req.logit_bias else None,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        output_kind="delta" if req.stream else "final_only",
        reasoning=reasoning,
    )


def capped(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """`params` with at most `max_tokens` per output (what a key's quota left the request)."""
    if max_tokens >= params.max_tokens:
        return params
    return replace(params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens))

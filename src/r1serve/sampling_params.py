"""Per-request sampling settings, validated once when the request is made."""
from __future__ import annotations

from dataclasses import dataclass, field

from r1serve.errors import InvalidRequestError


_GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass(frozen=True)
class ReasoningSpec:
    """How a reasoning model marks its thinking, in token ids, so the engine can count and cap it.

    The output is in reasoning from its start when `open_at_start` (the prompt ended in the
    start marker, as R1's templates do) or when the output begins with `start_ids`; it is in
    reasoning until `end_ids` appear. With `max_tokens`, the engine ends thinking after that
    many reasoning tokens by emitting `end_ids` itself.
    """

    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    open_at_start: bool = False
    max_tokens: int | None = None


# How constrained JSON is written (llguidance's JSON options): compact and deterministic,
# since a small model given free whitespace can write newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match, enforced token by token by constrained decoding
    (engine/grammar.py). Exactly one of:

    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object;
    regex: a regular expression the whole output matches; choice: one of these strings;
    grammar: a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's).

    For reasoning models the constraint starts after the reasoning ends (the thinking stays free).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = self.kinds()
        _check(len(given) == 1, "structured_outputs", self, "give exactly one of json, regex, choice, grammar "
                                                            f"or json_object=True (got {given or 'none'})")
        _check(self.choice is None or (bool(self.choice) and all(isinstance(c, str) for c in self.choice)),
               "choice", self.choice, "must be a non-empty list of strings")

    def kinds(self) -> list[str]:
        named = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        return named + (["json_object"] if self.json_object else [])

    @property
    def kind(self) -> str:
        return self.kinds()[0]


def _is_int(value: object) -> bool:
    # Counts must be integers: a float n or max_tokens would pass a range check, then fail deep
    # in the engine (range(), list slicing) with a TypeError instead of this message.
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{name}={value!r} is invalid: {allowed}.")


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop, as vLLM's SamplingParams names them.

    temperature 0 means greedy. logprobs=k returns, per generated token, the chosen
    token and the k most likely (k=0: the chosen token only).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # "cumulative": each output holds everything so far; "delta": only what is new since the
    # last output (servers streaming to clients); "final_only": one output when it finishes.
    output_kind: str = "cumulative"
    reasoning: ReasoningSpec | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # token id -> added to its logit before sampling (OpenAI's logit_bias; -100 bans the token).
    logit_bias: dict[int, float] | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Accept a bare string or list for stop, as the OpenAI API does.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs))
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 1, or 0 / -1 to disable")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0 (1 disables it)")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens", self.max_tokens,
               "must be an integer >= 1 (or None: up to the context length)")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be an integer >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs", self.logprobs,
               "must be an integer >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "token ids must be integers >= 0")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        _check(self.output_kind in OUTPUT_KINDS, "output_kind", self.output_kind, f"must be one of {OUTPUT_KINDS}")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams (or its fields as a dict)")
        _check(self.logit_bias is None or all(_is_int(t) and t >= 0 and -100 <= b <= 100
                                              for t, b in self.logit_bias.items()),
               "logit_bias", self.logit_bias, "maps token ids (>= 0) to biases in [-100, 100]")
        r = self.reasoning
        _check(r is None or bool(r.end_ids), "reasoning", r, "end_ids must not be empty")
        _check(r is None or r.max_tokens is None or (_is_int(r.max_tokens) and r.max_tokens >= 0),
               "max_reasoning_tokens", r and r.max_tokens, "must be an integer >= 0")

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is greedy anyway, and dividing logits by a denormal
        # one gives inf - inf = NaN in the softmax, which would sample token 0.
        return self.temperature < _GREEDY_BELOW

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

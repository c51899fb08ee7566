"""Constrained decoding: a request's StructuredOutputsParams as a per-step token mask.

llguidance (a Rust library with a CPU wheel and no dependencies) turns JSON schemas, regexes,
choices and Lark/GBNF grammars into a matcher over the model's vocabulary; each step every
constrained request gets a bitmask of the tokens that keep its output in the language, one
bit per token:

    bitmask (B, ceil(V / 32)) int32     bit t % 32 of word t // 32 set: token t allowed

The masks are computed on a background thread while the model runs the step's forward pass
(they depend only on the tokens sampled so far), so the grammar costs the step only what the
forward pass did not hide. Rows of unconstrained requests are never touched.

A request's matcher follows its output token by token (Request.append_token). For reasoning
models it starts when the reasoning ends: while thinking the output is free, and a request
that may still open its reasoning may also write the start marker (engine/request.py).
"""
from __future__ import annotations

import functools
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance import LLMatcher

from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import JSON_OPTIONS, StructuredOutputsParams

if TYPE_CHECKING:  # the server validates grammars without torch; the masks are the engine's
    import torch


def grammar_source(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for a spec (no tokenizer needed)."""
    kind = spec.kind
    if kind == "json":
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(ascii_digits(spec.regex))
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark


def ascii_digits(regex: str) -> str:
    """Digits as [0-9], as JSON Schema patterns and Python's re.ASCII read them: the grammar's
    own regex engine takes any Unicode digit, and a small model will write some of those."""
    out, in_class, i = [], False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(c + nxt)
            i += 2
            continue
        in_class = (in_class and c != "]") or (not in_class and c == "[")
        out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _checked(kind: str, text: str) -> str:
    # text: the spec's value as text (a schema or choice list as canonical JSON), for the cache.
    value = json.loads(text) if kind == "choice" else text
    spec = StructuredOutputsParams(**({"json_object": True} if kind == "json_object" else {kind: value}))
    try:
        source = grammar_source(spec)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"structured_outputs.{kind} does not compile: {exc}") from exc
    error = LLMatcher.validate_grammar(source)
    if error:
        raise InvalidRequestError(f"structured_outputs.{kind} does not compile: {error.strip()}")
    return source


def check_grammar(spec: StructuredOutputsParams) -> str:
    """The spec's grammar, or InvalidRequestError saying why it does not compile (cached: a
    server sees the same schema on every request of an agent)."""
    kind, value = spec.kind, getattr(spec, spec.kind)
    if kind == "json":
        try:
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"structured_outputs.json is not a JSON schema: {exc}") from exc
    elif kind == "choice":
        value = json.dumps(list(value))
    elif kind == "json_object":
        value = ""
    return _checked(kind, value)


class GrammarCompiler:
    """The model's vocabulary as llguidance sees it, built once per engine (~0.2 s for 50k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids) -> None:
        # n_vocab: the logits' width, which may exceed the tokenizer's (padded embeddings);
        # ids past the tokenizer are never allowed.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids) or None)

    def matcher(self, spec: StructuredOutputsParams) -> LLMatcher:
        matcher = LLMatcher(self.tokenizer, check_grammar(spec), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"structured_outputs.{spec.kind} does not compile for this model's "
                                      f"vocabulary: {matcher.get_error()}")
        return matcher


class RequestGrammar:
    """One request's matcher; Request decides which of its tokens it is fed (after any reasoning)."""

    def __init__(self, matcher: LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a token of the output; False if the grammar cannot take it."""
        return self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        # The output is complete: nothing but the end can follow.
        return self.matcher.is_stopped()


class MaskFiller:
    """Computes a step's bitmasks on one background thread, while the forward pass runs."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1serve-grammar")
        self._executor = llguidance.LLExecutor(num_threads=1)
        self.seconds = 0.0  # time the steps waited for masks or spent applying them

    def start(self, rows: list[tuple[int, LLMatcher, int | None, tuple[int, ...]]]) -> Future | None:
        """rows: (first logits row, matcher, an extra allowed token id or None, drafted tokens).
        A request with drafts owns 1 + len(drafts) rows: the mask now, then after each draft.
        Returns a future of (row indices, bitmask (R, W) int32), or None with no rows."""
        if not rows:
            return None
        return self._thread.submit(self._fill, rows)

    def _fill(self, rows) -> tuple[list[int], torch.Tensor]:
        import torch

        n = sum(1 + len(d) for *_, d in rows)
        bitmask = torch.full((n, self.words), -1, dtype=torch.int32)
        at, targets = [], []
        for first, _, _, drafts in rows:
            at.append(len(targets))
            targets += range(first, first + 1 + len(drafts))
        # llguidance writes mask i at bitmask.data_ptr() + i * one_mask_bytes, without the GIL;
        # with drafts it advances each matcher through them, one mask per prefix, and rolls back.
        if any(d for *_, d in rows):
            self._executor.unsafe_compute_mask_ptr_with_draft_token(
                [(m, i, list(d)) for i, (_, m, _, d) in zip(at, rows)], bitmask.data_ptr(), self.words * 4, n)
        else:
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, (_, m, _, _) in zip(at, rows)],
                                                   bitmask.data_ptr(), self.words * 4, n)
        for i, (_, _, extra, _) in zip(at, rows):
            if extra is not None:
                allow(bitmask[i], extra)
        return targets, bitmask

    def apply(self, pending: Future, logits: torch.Tensor) -> None:
        """Wait for the step's masks and apply them to its logits (B, V), in place."""
        start = time.perf_counter()
        apply_token_bitmask(logits, *pending.result())
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def allow(mask_row: torch.Tensor, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = int(mask_row[word]) & 0xFFFFFFFF | (1 << bit)
    mask_row[word] = value - (1 << 32) if value >= 1 << 31 else value  # back to int32


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """logits (B, V) float; rows: which of them bitmask (R, W) constrains. Disallowed -> -inf, in place.

    The bits are unpacked by numpy (little-endian bytes: token t is bit t % 8 of byte t // 8)
    and turned into an additive mask, 0 or -inf: on the CPU torch's boolean masking costs
    five times as much (32 rows of a 49k vocabulary: 0.7 ms against 3.7)."""
    import torch

    vocab = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # (R, V) 0/1
    # (bit - 1) * inf: 0 * inf is NaN for allowed tokens (-> 0), -inf for the others.
    add = torch.from_numpy(bits).to(logits.device, logits.dtype).sub_(1).mul_(float("inf"))
    add = add.nan_to_num_(0.0, float("-inf"), float("-inf"))
    if rows == list(range(logits.shape[0])):
        logits.add_(add)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), add)

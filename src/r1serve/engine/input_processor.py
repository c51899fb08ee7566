"""Requests in: a prompt (text, token ids, or a dict of either) and its SamplingParams
become a ParentRequest of n engine Requests, each with its seed's generator, its grammar
matcher and its detokenizer; what cannot run is refused here, before any work."""
from __future__ import annotations

import numbers
import random
from dataclasses import replace

import torch

from r1serve.engine.core_messages import Prompt
from r1serve.engine.detokenizer import IncrementalDetokenizer
from r1serve.engine.grammar import GrammarCompiler, MaskFiller, RequestGrammar
from r1serve.engine.output_processor import ParentRequest
from r1serve.engine.request import Request
from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: frozenset[int],
                 device: torch.device, seed: int) -> None:
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.eos_token_ids, self.device = eos_token_ids, device
        self._seeds = random.Random(seed)  # seeds for requests that bring none: reproducible runs
        # Constrained decoding, set up by the first request that needs it (engine/grammar.py).
        self._grammars: GrammarCompiler | None = None
        self.masks: MaskFiller | None = None

    def process(self, request_id: str, prompt: Prompt, params: SamplingParams) -> ParentRequest:
        text, ids = self._tokenize(prompt)
        self._validate_prompt(ids)
        self._validate_params(params)
        matcher = self._matcher(params)
        parent = ParentRequest(request_id, text, ids, [], [])
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            seed = params.seed + i if params.seed is not None else self._seeds.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            child = Request(child_id, ids, replace(params, n=1), self.eos_token_ids, self.max_model_len, gen)
            if matcher is not None:
                child.grammar = RequestGrammar(matcher.deep_copy())
            parent.children.append(child)
            parent.detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params))
            parent.sent.append([0, 0])
        return parent

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError(f"a dict prompt needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_list(prompt)
        raise InvalidRequestError(f"prompt of type {type(prompt).__name__} is not supported; "
                                  "give a string, a list of token ids or {'prompt_token_ids': [...]}")

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.vocab_size
        bad = [t for t in ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; "
                                      f"shorten it to at most {self.max_model_len - 1} tokens")

    def _validate_params(self, params: SamplingParams) -> None:
        vocab = self.vocab_size
        bad = sorted(t for t in params.logit_bias or () if t >= vocab)
        if bad:
            raise InvalidRequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _matcher(self, params: SamplingParams):
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            self.masks = MaskFiller(self.vocab_size)
        return self._grammars.matcher(params.structured_outputs)


def _token_list(ids) -> list[int]:
    # numpy and torch integers are accepted as ids; anything else is left for validation to name.
    return [int(t) if isinstance(t, numbers.Integral) else t for t in ids]

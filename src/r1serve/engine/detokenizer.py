"""Incremental, UTF-8 safe detokenization with stop strings.

Decoding one token at a time breaks characters that span tokens (a byte-level BPE token
can end in the middle of a UTF-8 sequence). Instead a small window of tokens is decoded
twice, with and without the newest tokens, and only the text the new tokens add is kept;
while the window ends in a partial character (U+FFFD) nothing is emitted.
"""
from __future__ import annotations

from r1serve.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context, so the first output token decodes as it would
# in the middle of the text (leading-space handling of some tokenizers depends on it).
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop_hit: str | None = None
        self.num_output_tokens = 0

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append new tokens; returns the stop string if one was completed (text then ends before it)."""
        self.ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        prefix, full = self._decode_window()
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return None  # an incomplete character (or nothing visible yet): wait for more tokens
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop(before)

    def flush(self) -> str | None:
        """At the end of a request, emit what is still pending, partial characters included."""
        if self.read_offset >= len(self.ids) or self.stop_hit is not None:
            return None
        prefix, full = self._decode_window()
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._check_stop(before)

    def _decode_window(self) -> tuple[str, str]:
        """The window's text without and with the tokens not yet emitted."""
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=skip)
        return prefix, self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=skip)

    def _check_stop(self, before: int) -> str | None:
        # min_tokens holds back every stop, stop strings included (as vLLM's stop checker does).
        if not self.params.stop or self.num_output_tokens < self.params.min_tokens:
            return None
        # A stop string may straddle the old and new text: search from just before the join.
        start = max(0, before - self.params.max_stop_len + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        idx, stop = min(hits)
        self.text = self.text[:idx + len(stop)] if self.params.include_stop_str_in_output else self.text[:idx]
        self.stop_hit = stop
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back a tail that might begin a stop string."""
        if finished or self.stop_hit is not None or not self.params.stop:
            return self.text
        hold = self.params.max_stop_len - 1
        # max(0, ...): a text shorter than the hold shows nothing (a negative end would
        # slice from the back, show a stop-string prefix, then take it back).
        return self.text[:max(0, len(self.text) - hold)]

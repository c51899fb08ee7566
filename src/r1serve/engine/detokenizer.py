"""Incremental, UTF-8 safe detokenization with stop strings.

Decoding one token at a time breaks characters that span tokens (a byte-level BPE token
can end in the middle of a UTF-8 sequence). Instead a small window of tokens is decoded
twice, with and without the newest tokens, and only the text the new tokens add is kept;
while the window ends in a partial character (U+FFFD), the text up to it is emitted and the
last tokens, those of the unfinished character (a character is at most 4 bytes), wait. A
replacement character that outlives MAX_PENDING_TOKENS tokens stands for bytes that are not
UTF-8 and never will be (a model can sample any byte token): it is emitted as such, since
waiting longer would grow the window, and each token's decode, with the output.
"""
from __future__ import annotations

from r1serve.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context, so the first output token decodes as it would
# in the middle of the text (leading-space handling of some tokenizers depends on it).
CONTEXT_TOKENS = 5
MAX_PENDING_TOKENS = 8


class TextBuffer:
    """A growing text read mostly at its end: appending, reading a tail and cutting the end
    cost the size of the tail, not of the text (an R1 answer runs to 32k tokens; `str +=`
    on an attribute copies the whole text every token)."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._len = 0
        self._joined: str | None = ""  # the whole text, while no piece came since it was joined

    def __len__(self) -> int:
        return self._len

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._len += len(piece)
            self._joined = None

    def tail(self, start: int, end: int | None = None) -> str:
        """text[start:end] for 0 <= start <= end <= len: the pieces from the back."""
        end = self._len if end is None else end
        if start >= end:
            return ""
        parts, pos = [], self._len
        for piece in reversed(self._pieces):
            if pos <= start:
                break
            lo = pos - len(piece)
            if lo < end:
                parts.append(piece[max(0, start - lo):end - lo])
            pos = lo
        return "".join(reversed(parts))

    def truncate(self, length: int) -> None:
        while self._pieces and self._len - len(self._pieces[-1]) >= length:
            self._len -= len(self._pieces.pop())
        if self._len > length:
            self._pieces[-1] = self._pieces[-1][:len(self._pieces[-1]) - (self._len - length)]
            self._len = length
        self._joined = None

    def __str__(self) -> str:
        if self._joined is None:
            self._joined = "".join(self._pieces)
            self._pieces = [self._joined] if self._joined else []
        return self._joined


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.buffer = TextBuffer()
        self.stop_hit: str | None = None
        self.num_output_tokens = 0

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append new tokens; returns the stop string if one was completed (text then ends before it)."""
        self.ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        prefix, full = self._decode_window()
        end = len(self.ids)
        if full.endswith(REPLACEMENT) and end - self.read_offset < MAX_PENDING_TOKENS:
            end, full = self._complete_part(prefix)
        if len(full) <= len(prefix):
            return None  # an incomplete character (or nothing visible yet): wait for more tokens
        before = len(self.buffer)
        self.buffer.append(full[len(prefix):])
        self.prefix_offset, self.read_offset = self.read_offset, end
        return self._check_stop(before)

    def _complete_part(self, prefix: str) -> tuple[int, str]:
        """The window without the 1 to 3 tokens of an unfinished last character: (its end, its text)."""
        skip = self.params.skip_special_tokens
        for k in (1, 2, 3):
            end = len(self.ids) - k
            if end <= self.read_offset:
                break
            text = self.tokenizer.decode(self.ids[self.prefix_offset:end], skip_special_tokens=skip)
            if not text.endswith(REPLACEMENT):
                return end, text
        return self.read_offset, prefix  # nothing complete yet: emit nothing

    def flush(self) -> str | None:
        """At the end of a request, emit what is still pending, partial characters included."""
        if self.read_offset >= len(self.ids) or self.stop_hit is not None:
            return None
        prefix, full = self._decode_window()
        before = len(self.buffer)
        self.buffer.append(full[len(prefix):])
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
        window = self.buffer.tail(start)
        hits = [(window.find(s), s) for s in self.params.stop]
        hits = [(start + i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        idx, stop = min(hits)
        self.buffer.truncate(idx + len(stop) if self.params.include_stop_str_in_output else idx)
        self.stop_hit = stop
        return stop

    @property
    def text(self) -> str:
        return str(self.buffer)

    def visible_length(self, finished: bool) -> int:
        """How much of the text is safe to show now: while running, a tail that might begin a
        stop string is held back."""
        if finished or self.stop_hit is not None or not self.params.stop:
            return len(self.buffer)
        # max(0, ...): a text shorter than the hold shows nothing (a stop-string prefix shown
        # now could not be taken back).
        return max(0, len(self.buffer) - (self.params.max_stop_len - 1))

    def visible_text(self, finished: bool, start: int = 0) -> str:
        """The text safe to show now, from `start` (a delta reads only what is new)."""
        end = self.visible_length(finished)
        return self.text[start:end] if start == 0 else self.buffer.tail(min(start, end), end)

"""Fill in the middle: a completion's `prompt` and `suffix` as the prompt a code model was
trained to complete between them (DeepSeek's /beta/completions, llama-server's /infill).

Each family marks the prefix, the suffix and where the middle goes with its own tokens, in
prefix-suffix-middle order; r1serve finds the family by its tokens in the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FimFormat:
    family: str
    prefix: str  # the tokens, as text
    suffix: str
    middle: str

    def prompt(self, before: str, after: str) -> str:
        return f"{self.prefix}{before}{self.suffix}{after}{self.middle}"


FORMATS = (
    FimFormat("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-V3/R1, DeepSeek-Coder
    FimFormat("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5(-Coder), the R1 distills
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM (v1)
)


def fim_format(tokenizer) -> FimFormat | None:
    """The FIM format whose three tokens are all single tokens of this vocabulary."""
    for f in FORMATS:
        if all(tokenizer.token_to_id(t) is not None for t in (f.prefix, f.suffix, f.middle)):
            return f
    return None

"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json. llama.cpp's converter stores the vocabulary (`tokenizer.ggml.tokens`,
normal tokens in GPT-2's byte-to-unicode spelling, added tokens as their raw text), the merges, a
type per token and the *name* of the pre-tokenizer (`tokenizer.ggml.pre`). We map that name to
the split rules llama.cpp applies for it (which are the ones the model's own tokenizer.json uses),
and mark control tokens special so that `<|im_start|>` in text stays one token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from r1serve.errors import ModelLoadError

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's rule differs from Llama-3's only in splitting every digit apart.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's: 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # StarCoder-family vocabularies (SmolLM among them) cut every digit loose before GPT-2's rule.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges). Llama-3 vocabularies look whole
# words up before merging (llama.cpp and the HF tokenizer.json both do).
_PRE_TOKENIZERS = {
    "default": (_gpt2, False),
    "gpt-2": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "refact": (_digits_then_gpt2, False),
    "llama3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama-v3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "smaug-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
}

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)


@dataclass(frozen=True)
class GGUFTokenizerSpec:
    backend: Backend
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    extra_eos_token_ids: frozenset[int]  # end-of-turn / end-of-message ids besides eos
    chat_template: str | None


def read_gguf_tokenizer(metadata: Mapping[str, Any]) -> GGUFTokenizerSpec:
    meta = _Metadata(metadata)
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported; supported: {list(SUPPORTED_TOKENIZER_MODELS)} "
            "(byte-level BPE, as Llama-3, Qwen2 and SmolLM files use)."
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges", []), meta.get("tokenizer.ggml.pre", "default"))
    _add_typed_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type", []))
    id_keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    named = {name: _token(tokens, meta.get(f"tokenizer.ggml.{key}_token_id")) for name, key in id_keys.items()}
    _mark_special(backend, named.values())
    backend.post_processor = _bos_eos_processor(
        named["bos"] if meta.get("tokenizer.ggml.add_bos_token", False) else None,
        named["eos"] if meta.get("tokenizer.ggml.add_eos_token", False) else None,
        backend,
    )
    extra = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")} - {None}
    return GGUFTokenizerSpec(
        backend=backend,
        bos_token=named["bos"],
        eos_token=named["eos"],
        unk_token=named["unk"],
        pad_token=named["pad"],
        extra_eos_token_ids=frozenset(int(i) for i in extra),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _bos_eos_processor(bos: str | None, eos: str | None, backend: Backend) -> processors.PostProcessor | None:
    # What encode(add_special_tokens=True) adds around a text: `bos $A eos`, either side optional.
    if bos is None and eos is None:
        return None
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair = f"{single} " + " ".join(p for p in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class _Metadata:
    def __init__(self, metadata: Mapping[str, Any]):
        self._fields = metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ModelLoadError(f"GGUF file has no {key!r} metadata; it carries no usable tokenizer.")
        return self.get(key)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {sorted(_PRE_TOKENIZERS)}."
        )
    make_pre_tokenizer, ignore_merges = _PRE_TOKENIZERS[pre]
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_typed_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    # Added tokens match whole in raw text before any splitting. Control tokens (<|im_end|>) are
    # special: skipped by decode(skip_special_tokens=True). User-defined ones (<think>) are not.
    # Each is already in the vocabulary, so adding it keeps its id.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _mark_special(backend: Backend, named: Iterable[str | None]) -> None:
    # bos/eos/unk/pad are special even when the file types them as normal (transformers agrees).
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = dict.fromkeys(t for t in named if t is not None and t not in added)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _token(tokens: list[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

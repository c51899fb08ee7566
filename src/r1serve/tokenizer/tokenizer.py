"""Text <-> token ids for one model, plus its chat template.

Wraps a Hugging Face `tokenizers.Tokenizer` (Rust) built either from a model directory
(tokenizer.json and friends) or from a GGUF file's embedded vocabulary. transformers is not
needed at run time; the tests check that both paths agree with it token for token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from r1serve.errors import InvalidRequestError, ModelLoadError
from r1serve.tokenizer.chat_template import ChatTemplate
from r1serve.tokenizer.gguf_tokenizer import read_gguf_tokenizer
from r1serve.tokenizer.r1_chat_format import builtin_template_for


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        # What transformers passes to templates as special_tokens_map: the named tokens that exist.
        self._template_tokens = {key: token for key, token in named.items() if token is not None}
        if chat_template is None:  # R1's own format for R1 checkpoints that ship no template
            chat_template = builtin_template_for(lambda token: backend.token_to_id(token) is not None)
        self.chat_template = chat_template
        self._chat_template = ChatTemplate(chat_template) if chat_template is not None else None
        self.bos_token_id = self._id_of(bos_token)
        extra = tuple(extra_eos_token_ids)
        eos_id = self._id_of(eos_token)
        self.eos_token_id = eos_id if eos_id is not None else (extra[0] if extra else None)
        self.eos_token_ids = frozenset(extra) | ({self.eos_token_id} - {None})

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face model directory: tokenizer.json, tokenizer_config.json, and optionally
        chat_template.jinja, generation_config.json and config.json (for end-of-generation ids)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{str(path)!r} has no tokenizer.json; r1serve needs the 'fast' tokenizer file that "
                "Hugging Face model repositories ship."
            )
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"{str(tokenizer_file)!r} is not a valid tokenizer.json ({exc}).") from exc
        config = _read_json(path / "tokenizer_config.json")
        named = {name: _token_text(config.get(f"{name}_token")) for name in ("bos", "eos", "unk", "pad")}
        _add_declared_tokens(backend, config.get("added_tokens_decoder", {}), named.values())
        # Whether encode() adds BOS/EOS is tokenizer.json's post-processor alone; transformers
        # (>= 5) also ignores tokenizer_config's add_bos_token when tokenizer.json exists.
        return cls(
            backend,
            bos_token=named["bos"],
            eos_token=named["eos"],
            unk_token=named["unk"],
            pad_token=named["pad"],
            chat_template=_dir_chat_template(path, config),
            extra_eos_token_ids=_generation_eos_ids(path),
        )

    @classmethod
    def from_gguf(cls, source: Mapping[str, Any] | GGUFReader | str | os.PathLike | Any) -> Tokenizer:
        """From a GGUF's metadata, a GGUFFile or GGUFReader, a GGUFCheckpoint, or a path."""
        spec = read_gguf_tokenizer(_gguf_metadata(source))
        return cls(
            spec.backend,
            bos_token=spec.bos_token,
            eos_token=spec.eos_token,
            unk_token=spec.unk_token,
            pad_token=spec.pad_token,
            chat_template=spec.chat_template,
            extra_eos_token_ids=spec.extra_eos_token_ids,
        )

    # ---- text <-> ids ---------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included. The model's embedding table may
        be larger (padded); it is never smaller."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of tokens marked special: the ones decode(skip_special_tokens=True) drops."""
        return sorted(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (what grammar libraries read)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---- chat -----------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        if self._chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template, so chat messages cannot be turned into a prompt; "
                "send a plain text prompt (completions API) instead."
            )
        if not messages:
            raise InvalidRequestError("messages is empty; a chat needs at least one message.")
        return self._chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._template_tokens,
            **template_kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        # The template writes any BOS itself; adding special tokens again would double it.
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _gguf_metadata(source: Any) -> Mapping[str, Any]:
    """A GGUF's metadata from a mapping of it, anything holding one as `.metadata` (a
    GGUFFile) or as `.file.metadata` (a GGUFCheckpoint), gguf-py's GGUFReader, or a path."""
    source = getattr(source, "file", source)
    if isinstance(getattr(source, "metadata", None), Mapping):
        source = source.metadata
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, GGUFReader):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
        try:
            source = GGUFReader(path)
        except Exception as exc:  # the reader fails in many ways on bad bytes
            raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file ({exc}).") from exc
    return {key: field.contents() for key, field in source.fields.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not valid JSON ({exc}).") from exc


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _add_declared_tokens(backend: Backend, declared: Mapping[str, Any], named: Iterable[str | None]) -> None:
    # transformers registers tokenizer_config's added tokens and the named special tokens even
    # when tokenizer.json lacks them as added tokens; without this they would be cut into pieces.
    # Only tokens the vocabulary already has are registered, so no id beyond the model's appears.
    known = {token.content for token in backend.get_added_tokens_decoder().values()}
    for entry in declared.values():
        content = entry.get("content")
        if content not in known and backend.token_to_id(content) is not None:
            token = AddedToken(content, special=bool(entry.get("special")), normalized=bool(entry.get("normalized")))
            backend.add_tokens([token])
            known.add(content)
    missing = [t for t in named if t is not None and t not in known and backend.token_to_id(t) is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])


def _dir_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates; "default" is the chat one
        by_name = {entry.get("name"): entry.get("template") for entry in template}
        template = by_name.get("default")
    return template


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    # generation_config.json lists every id that ends a turn (Llama-3: <|eot_id|> and
    # <|end_of_text|>); config.json's eos is the older place for the same thing.
    config = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)

"""Tokenizer (from a GGUF and from an HF directory) and chat templates, against transformers."""

from __future__ import annotations

import json
import random

import gguf
import pytest
from tokenizers import pre_tokenizers

from r1serve.errors import InvalidRequestError, ModelLoadError
from r1serve.tokenizer import Tokenizer
from r1serve.tokenizer import chat_template as chat_template_module

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, inner    runs, trailing   ",
    "tabs\tand\nnewlines\r\n\n\nand blank lines\n",
    "digits 0 7 42 123456789 3.14159 1e-9 -17 2,048",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "I'm sure they'll say it's fine; don't you think? We've SEEN IT.",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "CJK 你好，世界！日本語のテキスト 한국어",
    "naïve café résumé Ångström Ελληνικά Русский",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>r1serve<file_sep>src/main.py<|endoftext|>",
    "not special: <|im_start |> <im_end> <|foo|>",
    "",
    " ",
    "\n",
    "a" * 300,
]

# SmolLM2 splits every digit off before GPT-2's regex (its tokenizer.json: Digits + ByteLevel;
# llama.cpp's "smollm" pre-tokenizer: \p{N} then GPT-2). transformers' GGUF loader does not know
# "smollm" and uses GPT-2's regex alone, which differs only where whitespace runs into a digit:
# "a  1" is [a][ĠĠ][1] for the model, [a][Ġ][Ġ1->Ġ,1] for transformers. We follow the model.
DIGIT_AFTER_WHITESPACE = ["a  1", "x =   42", "\n\n 7", "   1 22 333", "tab\t\t9"]


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(smollm2_reader):
    return Tokenizer.from_gguf(smollm2_reader)


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def original(theirs):
    """SmolLM2's own tokenizer.json pipeline: transformers' vocabulary and merges, with the
    model's Digits + ByteLevel pre-tokenizer."""
    backend = theirs.backend_tokenizer.__class__.from_str(theirs.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


# ---- GGUF tokenizer: encode / decode ------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, theirs, add_special_tokens):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == theirs.encode(text, add_special_tokens=add_special_tokens), text


def test_encode_matches_smollm2_own_pretokenizer(ours, original):
    for text in TEXTS + DIGIT_AFTER_WHITESPACE:
        assert ours.encode(text) == original.encode(text).ids, text
    assert [ours.id_to_token(i) for i in ours.encode("a  1")] == ["a", "ĠĠ", "1"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours, theirs, skip_special_tokens):
    sequences = [theirs.encode(text) for text in TEXTS]
    rng = random.Random(0)
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(40)] for _ in range(20)]  # incl. broken UTF-8
    sequences += [[1, 9707, 2, 0, 16, 5], list(range(20))]  # special and non-special added tokens
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens) == theirs.decode(ids, skip_special_tokens=skip_special_tokens)


def test_round_trip(ours):
    for text in TEXTS + DIGIT_AFTER_WHITESPACE:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_tokens_of_smollm2(ours, theirs):
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert ours.eos_token_ids == frozenset({2})
    assert ours.vocab_size == len(theirs) == 49152
    # All 17 control tokens of the file are special; transformers lists only the named ones.
    assert set(theirs.all_special_ids) <= set(ours.all_special_ids) == set(range(17))
    assert ours.id_to_token(2) == "<|im_end|>" and ours.id_to_token(10**6) is None
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # the file says add_bos_token false


# ---- chat templates -----------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本 🗾"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write code:\n```py\nprint(1)\n```"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system-multiturn", "code"])
def test_chat_matches_transformers(ours, theirs, conversation, add_generation_prompt):
    text = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = theirs.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == text
    assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt) == ids


def test_chat_default_adds_generation_prompt(ours):
    assert ours.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


# A template using what transformers' environment provides beyond plain Jinja.
FEATURE_TEMPLATE = """
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{%- for m in messages %}
    {%- if m.role == 'bad' %}{{ raise_exception('role bad is not allowed') }}{% endif %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    [{{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ m.content is defined }}|{{ m.reasoning_content }}]
    {%- generation %}{{ m.role }}{% endgeneration %}
{%- endfor %}
{{ ns.count }} {{ tools is none }} {{ documents is none }} {{ eos_token }} {{ unk_token }} {{ pad_token }}
{{ strftime_now('%Y') | length }} {{ extra | default('no-extra') }}
{%- if add_generation_prompt %}<gen>{% endif %}
"""

FEATURE_MESSAGES = [
    {"role": "user", "content": "héllo <b>&'\"</b> 世界"},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
    {"role": "assistant", "content": "ok", "reasoning": "thought first"},
    {"role": "user", "content": "past the break"},
]


@pytest.mark.parametrize("kwargs", [{}, {"extra": "given"}, {"eos_token": "<override>"}])
def test_template_features_match_transformers(ours, theirs, kwargs):
    mine = Tokenizer(ours.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                     pad_token="<|im_end|>", chat_template=FEATURE_TEMPLATE)
    expected = theirs.apply_chat_template(
        FEATURE_MESSAGES, chat_template=FEATURE_TEMPLATE, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert mine.apply_chat_template(FEATURE_MESSAGES, add_generation_prompt=True, **kwargs) == expected


def test_template_raise_exception_is_an_invalid_request(ours):
    mine = Tokenizer(ours.backend, chat_template=FEATURE_TEMPLATE)
    with pytest.raises(InvalidRequestError, match="role bad is not allowed"):
        mine.apply_chat_template([{"role": "bad", "content": "x"}])


def test_template_sandbox_refuses_dunder_namespace_attributes(ours):
    mine = Tokenizer(ours.backend, chat_template="{% set ns = namespace(__class__=1) %}")
    with pytest.raises(Exception, match="underscore"):
        mine.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_chat_template_is_a_clear_error(ours):
    bare = Tokenizer(ours.backend, eos_token="<|im_end|>")
    with pytest.raises(InvalidRequestError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_broken_template_fails_at_load(ours):
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer(ours.backend, chat_template="{% for m in messages %}")


def test_template_compiled_once(ours, monkeypatch):
    compiled = []
    real = chat_template_module._environment
    monkeypatch.setattr(chat_template_module, "_environment", lambda: compiled.append(1) or real())
    mine = Tokenizer(ours.backend, chat_template=ours.chat_template)
    for _ in range(3):
        mine.apply_chat_template(CONVERSATIONS[0])
    assert len(compiled) == 1


# ---- from_dir -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dir(theirs, tmp_path_factory):
    """transformers' save_pretrained: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    path = tmp_path_factory.mktemp("tok")
    theirs.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file()
    return path


def assert_same_as_transformers(ours: Tokenizer, ref) -> None:
    for text in TEXTS + DIGIT_AFTER_WHITESPACE:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    for conversation in CONVERSATIONS:
        for add in (True, False):
            expected = ref.apply_chat_template(conversation, add_generation_prompt=add, return_dict=False)
            assert ours.encode_chat(conversation, add_generation_prompt=add) == expected


def test_from_dir_matches_transformers(saved_dir):
    ours = Tokenizer.from_dir(saved_dir)
    assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(saved_dir))
    assert ours.eos_token_ids == frozenset({2}) and ours.bos_token == "<|im_start|>"


def test_from_dir_post_processor_template_and_generation_eos(saved_dir, tmp_path):
    # BOS comes from tokenizer.json's post-processor (add_bos_token in tokenizer_config.json is
    # ignored when tokenizer.json exists, as in transformers); the template from tokenizer_config
    # when there is no chat_template.jinja; end-of-generation ids from generation_config.json.
    backend = json.loads((saved_dir / "tokenizer.json").read_text())
    backend["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend))
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    template = (saved_dir / "chat_template.jinja").read_text()
    config |= {"add_bos_token": False, "chat_template": template, "bos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_as_transformers(ours, ref)
    assert ours.encode("hi")[0] == ours.bos_token_id == 0
    assert ours.eos_token_ids == frozenset({0, 2}) and ours.eos_token_id == 2


def test_from_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---- other GGUF tokenizers ----------------------------------------------------------------------


def write_vocab_gguf(path, vocab, arch="llama", model="gpt2", pre="smollm", add_bos=None):
    """A GGUF holding only a vocabulary (tokens, merges, token types) under the given settings."""
    tokens, merges, types = vocab
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small_vocab(smollm2_reader):
    """SmolLM2's first 6000 tokens and the merges that stay inside them: a consistent BPE that
    still has every byte, small enough to write and load quickly."""
    size = 6000
    fields = smollm2_reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:size]
    keep = set(tokens)
    merges = [m for m in fields["tokenizer.ggml.merges"].contents() if m.replace(" ", "", 1) in keep]
    return tokens, merges, fields["tokenizer.ggml.token_type"].contents()[:size]


@pytest.mark.parametrize("arch,pre", [("qwen2", "qwen2"), ("llama", "llama-bpe"), ("llama", "smollm")])
def test_other_pretokenizers_and_add_bos_match_transformers(small_vocab, tmp_path, arch, pre):
    path = write_vocab_gguf(tmp_path / "vocab.gguf", small_vocab, arch=arch, pre=pre, add_bos=True)
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # transformers has no "smollm" rule (see DIGIT_AFTER_WHITESPACE); the others it knows.
    texts = TEXTS if pre == "smollm" else TEXTS + DIGIT_AFTER_WHITESPACE
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode("hi")[0] == 1
    assert ours.vocab_size == 6000


# "</s>" typed normal (1) on purpose: as the eos token it must still be special.
TINY_VOCAB = (["<|endoftext|>", "<s>", "</s>", "a", "b", "ab"], ["a b"], [3, 3, 1, 1, 1, 1])


def test_unsupported_tokenizer_model(tmp_path):
    path = write_vocab_gguf(tmp_path / "spm.gguf", TINY_VOCAB, model="llama")
    with pytest.raises(ModelLoadError, match=r"tokenizer model 'llama'.*\['gpt2'\]"):
        Tokenizer.from_gguf(path)


def test_unsupported_pretokenizer(tmp_path):
    path = write_vocab_gguf(tmp_path / "pre.gguf", TINY_VOCAB, pre="made-up")
    with pytest.raises(ModelLoadError, match=r"pre-tokenizer 'made-up'.*smollm"):
        Tokenizer.from_gguf(path)


def test_tiny_vocab_gguf_tokenizer(tmp_path):
    tok = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "tiny.gguf", TINY_VOCAB))
    assert tok.encode("ab a</s>") == [5, 3, 2]  # "ab" merged, " a" has no Ġ token so the space is dropped
    assert tok.decode([5, 3, 2]) == "aba" and tok.decode([5, 3, 2], skip_special_tokens=False) == "aba</s>"
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == ("<s>", "</s>", None)
    assert tok.all_special_ids == [0, 1, 2]

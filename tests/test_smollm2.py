"""The real SmolLM2-135M-Instruct GGUF: r1serve's greedy output against transformers
loading the same file, token for token, one at a time and batched."""
from __future__ import annotations

import pytest
import torch

from r1serve import LLM, SamplingParams

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three prime numbers."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a KV cache is in one paragraph."}],
]
N = 64


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf, llm):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                            dtype=torch.float32).eval()
    expected = []
    for conv in CONVERSATIONS:
        ids = llm.chat_prompt(conv)["prompt_token_ids"]
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=2)
        expected.append(out[0, len(ids):].tolist())
    return expected


def test_greedy_matches_transformers_single(llm, reference):
    sp = SamplingParams(temperature=0, max_tokens=N, min_tokens=N)  # as min_new_tokens: EOS masked
    for conv, expected in zip(CONVERSATIONS, reference):
        out = llm.chat(conv, sp)[0].outputs[0]
        assert out.token_ids == expected


def test_greedy_matches_transformers_batched(llm, reference):
    sp = SamplingParams(temperature=0, max_tokens=N, min_tokens=N)  # as min_new_tokens: EOS masked
    outs = llm.chat(CONVERSATIONS, sp)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def test_answers_and_stops_at_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_chat_prompt_is_the_models_template(llm, smollm2_gguf):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for conv in CONVERSATIONS:
        expected = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert llm.chat_prompt(conv)["prompt_token_ids"] == list(expected)


def test_fast_cpu_path_agrees_with_float32(smollm2_gguf, llm):
    """dtype auto on the CPU: packed bf16 GEMMs, int8 weights for small batches, the C++
    kernels. Not bit-exact with float32, but the same answer and the same first tokens."""
    fast = LLM(str(smollm2_gguf))  # dtype auto
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(temperature=0, max_tokens=16)
    single = fast.chat(conv, sp)[0].outputs[0]
    batched = fast.chat([conv] * 6, sp)[0].outputs[0]  # 6 rows: past the int8 threshold
    exact = llm.chat(conv, sp)[0].outputs[0]
    for out in (single, batched):
        assert "Paris" in out.text
        assert out.token_ids[:6] == exact.token_ids[:6]

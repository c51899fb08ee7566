"""The KV cache's dtype (EngineConfig.kv_cache_dtype): what auto picks, a narrower cache than
the activations on the CPU, and the combinations refused before anything is allocated."""
from __future__ import annotations

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.errors import InvalidRequestError
from tiny_models import make_deepseek_v3

PROMPT = "the quick brown fox jumps over the lazy dog " * 3


def prompt_log_probs(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced next-token log-probabilities over a prompt (one prefill, read from the cache)."""
    engine = llm.engine
    engine.add_request("teacher", tokens, SamplingParams(max_tokens=1))
    logits = engine.runner.compute_logits(engine.scheduler.schedule())
    engine.abort_request("teacher")
    assert engine.kv.pool.num_free == engine.num_kv_blocks
    return torch.log_softmax(logits.float(), -1)


def test_auto_keeps_the_activations_dtype_where_nothing_is_rounded(llm):
    assert llm.engine.kv_dtype == torch.float32  # a float32 checkpoint, dense linears: exact
    assert all(c.dtype == torch.float32 for c in llm.engine.runner.kv_caches)


def test_a_bf16_cache_under_float32_activations(tiny, llm):
    """Half the cache's bytes; prefill reads its keys back from the cache, so the rounding
    shows in every position's logits, and stays at bf16's size."""
    narrow = LLM(str(tiny), dtype="float32", num_kv_blocks=64, block_size=8, kv_cache_dtype="bfloat16")
    e = narrow.engine
    assert e.kv_dtype == torch.bfloat16 and all(c.dtype == torch.bfloat16 for c in e.runner.kv_caches)
    assert e.kv_bytes_per_token * 2 == llm.engine.kv_bytes_per_token
    assert e.numbers().kv_bytes_per_token == e.kv_bytes_per_token
    tokens = llm.get_tokenizer().encode(PROMPT)
    got, want = prompt_log_probs(narrow, tokens), prompt_log_probs(llm, tokens)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    # decode steps read the cache through the decode kernel: the same greedy text here
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert narrow.generate([PROMPT], params)[0].outputs[0].text == llm.generate([PROMPT], params)[0].outputs[0].text


def test_unknown_cache_dtypes_and_mla_are_refused(tmp_path):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype='float16' must be one of"):
        LLM("unused", kv_cache_dtype="float16")
    path = make_deepseek_v3(tmp_path / "dsv3")
    with pytest.raises(ValueError, match="kv_cache_dtype=bfloat16 does not run on cpu under float32"):
        LLM(str(path), dtype="float32", num_kv_blocks=16, kv_cache_dtype="bfloat16")
    assert LLM(str(path), dtype="float32", num_kv_blocks=16).engine.kv_dtype == torch.float32

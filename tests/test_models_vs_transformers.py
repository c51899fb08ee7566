"""r1serve's Llama and Qwen2 against transformers on tiny random checkpoints (float32)."""
from __future__ import annotations

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.engine.llm_engine import LLMEngine

from tiny_models import make_checkpoint

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(40, 77)), [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
CASES = {
    "llama": ("llama", {}),
    "llama-untied-llama3rope": ("llama", dict(tie_word_embeddings=False, rope_theta=50000.0,
                                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied-sharded": ("qwen2", dict(tie_word_embeddings=False, shard_size="100KB")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)
    if "shard_size" in overrides:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def llm_for(path, **kw) -> LLM:
    opts = dict(dtype="float32", num_kv_blocks=64, block_size=8)
    opts.update(kw)
    return LLM(model=str(path), **opts)


def engine_for(path, **kw) -> LLMEngine:
    return llm_for(path, **kw).engine


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_prefill_logits_match(checkpoint, kernel):
    path, ref = checkpoint
    engine = engine_for(path, kernel=kernel)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=1))
    sched = engine.scheduler.schedule()
    assert [c.num_tokens for c in sched.chunks] == [len(p) for p in PROMPTS]  # one batch, all prompts
    logits = engine.runner.compute_logits(sched)
    start = 0
    for p in PROMPTS:
        with torch.no_grad():
            expected = ref(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[start:start + len(p)], expected, atol=1e-4, rtol=1e-4)
        start += len(p)


def hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1) for s in out.raw_logits] if getattr(out, "raw_logits", None) else None
    return tokens, logprobs


@pytest.mark.parametrize("engine_opts", [
    {},
    {"kernel": "reference"},
    {"max_num_batched_tokens": 16},  # prompts split over several steps (chunked prefill)
    {"num_kv_blocks": 12},  # too few blocks for all at once: preemption by recompute
], ids=["default", "reference", "chunked-prefill", "preemption"])
def test_greedy_generation_matches(checkpoint, engine_opts):
    path, ref = checkpoint
    llm = llm_for(path, **engine_opts)
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    for prompt, out in zip(PROMPTS, outs):
        expected, _ = hf_greedy(ref, prompt, 32)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"
    assert engine.kv.pool.num_free == engine.num_kv_blocks  # nothing leaked
    if engine_opts.get("num_kv_blocks") == 12:
        assert sum(o.metrics["num_preemptions"] for o in outs) > 0


def test_decode_logprobs_match(checkpoint):
    """Each decode step's log-probabilities, not only the argmax, match the reference."""
    path, ref = checkpoint
    engine = engine_for(path)
    prompt = PROMPTS[2]
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3))
    engine.add_request("b", PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == "a" and o.finished:
                final = o.outputs[0]
    ids = list(prompt)
    for token, lp in zip(final.token_ids, final.logprobs):
        with torch.no_grad():
            expected = torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1], -1)
        assert lp[token].logprob == pytest.approx(float(expected[token]), abs=1e-4)
        top = expected.topk(3).indices.tolist()
        assert [t for t, v in sorted(lp.items(), key=lambda kv: kv[1].rank)][:3] == top
        ids.append(token)


def test_prefix_cache_hit_gives_same_output(checkpoint):
    path, ref = checkpoint
    llm = llm_for(path)
    engine = llm.engine
    shared = list(range(100, 140))  # 5 full blocks of 8
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": shared + [7]}], sp)[0]
    second = llm.generate([{"prompt_token_ids": shared + [9]}], sp)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40
    assert engine.kv.stats.hits >= 40
    assert second.outputs[0].token_ids == hf_greedy(ref, shared + [9], 16)[0]

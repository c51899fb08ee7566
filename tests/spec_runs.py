"""What the speculative-decoding tests share: prompts, an LLM maker, and the no-leak check."""
from __future__ import annotations

from r1serve import LLM, SamplingParams

REPEAT = [5, 17, 42, 99, 3, 250, 7] * 3
PROMPTS = [REPEAT, [11, 12], list(range(40, 77)), [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] * 2]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make(path, speculative=None, adaptive: bool = False, **kw) -> LLM:
    """A float32 engine; with speculation not adaptive by default: every request drafts all
    it may at every step, so that what a test checks goes through drafts whatever the step
    times measured on a busy machine would make the policy choose."""
    opts = {"dtype": "float32", "num_kv_blocks": 64, "block_size": 8, "speculative": speculative, **kw}
    if speculative == "ngram":
        opts.setdefault("prompt_lookup_min", 1)
    llm = LLM(model=str(path), **opts)
    if speculative is not None:
        llm.engine.speculation.adaptive = adaptive
    return llm


def outputs(llm: LLM, prompts, params=GREEDY):
    return [r.outputs for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def token_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o[0].token_ids for o in outputs(llm, prompts, params)]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.scheduler.has_unfinished()
    assert engine.kv.pool.num_free == engine.num_kv_blocks  # every block back, rejected drafts' too

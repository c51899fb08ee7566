"""Scheduler and KV block manager at their seams, driven by hand-made model outputs."""
from __future__ import annotations

import pytest
import torch

from r1serve.engine.block_pool import BlockPool
from r1serve.engine.kv_cache_manager import KVCacheManager
from r1serve.engine.request import Request
from r1serve.engine.scheduler import Scheduler, SchedulerConfig
from r1serve.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, eos: int = -1) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), frozenset({eos}),
                   max_model_len=1024, generator=torch.Generator())


def make_scheduler(num_blocks=32, max_seqs=8, budget=64, caching=True, chunked=True):
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), kv), kv


def fake_token(req: Request) -> int:
    # A deterministic "model": the next token depends only on the sequence so far.
    return (sum(req.token_ids) * 31 + req.num_tokens) % 1000


def run_to_completion(sched: Scheduler, max_steps=10_000) -> list[list]:
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        out = sched.schedule()
        assert not out.is_empty, "scheduler stalled with work left"
        steps.append(out)
        sched.update(out, {c.request.request_id: [fake_token(c.request)] for c in out.chunks if c.samples})
    raise AssertionError("did not finish")


def test_block_pool_lru_and_refcounts():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.release([b, a])  # tail first: b is evicted before a
    assert pool.num_free == 4 and pool.lookup(b"ha") is a
    pool.touch([a])  # a prefix hit revives a free cached block
    assert a.ref_count == 1 and pool.num_free == 3
    got = pool.allocate(3)  # takes the 2 never-used blocks, then evicts b (LRU), never a
    assert b in got and a not in got
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") is a
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_chunked_prefill_splits_within_budget():
    sched, kv = make_scheduler(budget=8)
    sched.add(make_request("a", list(range(20)), max_tokens=2))
    steps = run_to_completion(sched)
    assert [s.chunks[0].num_tokens for s in steps[:3]] == [8, 8, 4]
    assert not steps[0].chunks[0].samples and steps[2].chunks[0].samples
    assert kv.pool.num_free == kv.pool.num_blocks


def test_decode_and_prefill_share_a_step():
    sched, _ = make_scheduler(budget=10)
    sched.add(make_request("a", [1, 2, 3], max_tokens=5))
    first = sched.schedule()
    sched.update(first, {"a": [7]})
    sched.add(make_request("b", list(range(30)), max_tokens=2))
    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]


def test_prefix_hit_reuses_blocks():
    sched, kv = make_scheduler()
    prefix = list(range(100, 112))  # 3 full blocks
    sched.add(make_request("a", prefix + [1, 2], max_tokens=1))
    run_to_completion(sched)
    b = make_request("b", prefix + [5], max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 12 and out.chunks[0].start == 12 and out.chunks[0].num_tokens == 1
    assert kv.stats.hits == 12
    sched.update(out, {"b": [0]})
    assert kv.pool.num_free == kv.pool.num_blocks


def test_cached_tokens_are_unknown_until_first_admitted_and_then_kept():
    sched, _ = make_scheduler()
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_request("a", prefix + [1, 2], max_tokens=1)
    sched.add(a)
    assert a.num_cached_tokens is None  # waiting: not known yet (0 would say "no cache hit")
    run_to_completion(sched)
    b = make_request("b", prefix + [5], max_tokens=1)
    sched.add(b)
    assert b.num_cached_tokens is None
    sched.schedule()
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 12)


def test_a_readmission_after_preemption_keeps_the_first_cache_count():
    sched, kv = make_scheduler(num_blocks=7)  # one request's worst case is 7 blocks: they preempt
    reqs = [make_request(str(i), [i + 1] * (3 + 2 * i), max_tokens=12) for i in range(6)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched)
    # Preempted requests find their own blocks cached when readmitted; that is no prompt cache hit.
    assert sum(r.num_preemptions for r in reqs) > 0 and kv.stats.hits > 0
    assert [r.num_cached_tokens for r in reqs] == [0] * 6


def test_live_prefix_is_shared_not_copied():
    sched, kv = make_scheduler()
    prefix = list(range(8))
    a = make_request("a", prefix + [1], max_tokens=4)
    sched.add(a)
    sched.update(sched.schedule(), {"a": [3]})
    b = make_request("b", prefix + [2], max_tokens=4)
    sched.add(b)
    sched.schedule()
    assert kv.block_table("a")[:2] == kv.block_table("b")[:2]
    assert all(blk.ref_count == 2 for blk in kv._blocks["b"][:2])


def test_fully_cached_prompt_still_computes_last_token():
    sched, _ = make_scheduler()
    prompt = list(range(8))  # exactly 2 blocks
    sched.add(make_request("a", prompt, max_tokens=1))
    run_to_completion(sched)
    b = make_request("b", prompt, max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert out.chunks[0].start == 4 and out.chunks[0].num_tokens == 4 and out.chunks[0].samples


def outputs_with(num_blocks: int, budget: int = 64):
    sched, kv = make_scheduler(num_blocks=num_blocks, budget=budget)
    reqs = [make_request(str(i), [i + 1] * (3 + 2 * i), max_tokens=12) for i in range(6)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched)
    assert kv.pool.num_free == num_blocks, "blocks leaked"
    return [r.output_token_ids for r in reqs], sum(r.num_preemptions for r in reqs)


def test_preemption_under_tiny_budget_finishes_everything_identically():
    roomy, preempted_roomy = outputs_with(num_blocks=64)
    tight, preempted_tight = outputs_with(num_blocks=7)  # one request's worst case is 7 blocks
    assert preempted_roomy == 0 and preempted_tight > 0
    assert tight == roomy
    assert all(len(o) == 12 for o in tight)


def test_abort_frees_everything():
    sched, kv = make_scheduler()
    for i in range(4):
        sched.add(make_request(str(i), list(range(10 + i)), max_tokens=50))
    out = sched.schedule()
    sched.update(out, {c.request.request_id: [1] for c in out.chunks if c.samples})
    sched.add(make_request("waiting", [1, 2, 3]))
    for rid in ["0", "1", "2", "3", "waiting"]:
        assert sched.finish(rid, "abort").finish_reason == "abort"
    assert not sched.has_unfinished()
    assert kv.pool.num_free == kv.pool.num_blocks
    assert sched.finish("0", "abort") is None  # unknown or already finished: no error


def test_eos_and_max_tokens_finish():
    sched, kv = make_scheduler()
    a = make_request("a", [1, 2], max_tokens=10, eos=99)
    sched.add(a)
    sched.update(sched.schedule(), {"a": [99]})
    assert a.finish_reason == "stop" and kv.pool.num_free == kv.pool.num_blocks

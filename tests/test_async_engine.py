"""The engine as the server drives it: delta outputs, per-request failures, and the asyncio
wrapper (a thread for the model, a queue per request) on a real tiny model."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from r1serve import SamplingParams
from r1serve.engine.async_engine import AsyncEngine, EngineDeadError
from r1serve.errors import InvalidRequestError

from test_bad_input import assert_idle

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [{"prompt_token_ids": [5, 17, 42, 99, 3, 250, 7][: 3 + i]} for i in range(5)]
SAMPLED = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=14, ignore_eos=True, logprobs=2, n=2)


def joined(deltas):
    """Concatenate delta outputs per choice: (text, token_ids, logprobs, finish_reason)."""
    acc: dict[int, list] = {}
    for out in deltas:
        for c in out.outputs:
            a = acc.setdefault(c.index, ["", [], [], None])
            a[0] += c.text
            a[1] += c.token_ids
            a[2] += c.logprobs or []
            a[3] = c.finish_reason
    return [tuple(acc[i]) for i in sorted(acc)]


@pytest.mark.parametrize("stop", [(), ("o", "lazy")])
def test_delta_outputs_add_up_to_the_cumulative_one(llm, stop):
    params = replace(SAMPLED, stop=stop)
    (full,) = llm.generate([PROMPTS[4]], params)
    deltas = list(llm.stream(PROMPTS[4], replace(params, output_kind="delta")))
    assert deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    assert joined(deltas) == [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in full.outputs]
    assert_idle(llm)


def test_final_only_gives_one_output(llm):
    (full,) = llm.generate([PROMPTS[2]], SAMPLED)
    outs = list(llm.stream(PROMPTS[2], replace(SAMPLED, output_kind="final_only")))
    assert len(outs) == 1 and outs[0].finished
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in full.outputs]


def test_a_failing_request_fails_alone(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (expected,) = llm.generate([PROMPTS[1]], params)
    engine = llm.engine
    engine.add_request("bad", PROMPTS[0], params)
    engine.add_request("good", PROMPTS[1], params)

    def explode(_ids):
        raise UnicodeError("detokenizer broke")

    engine.outputs.parents["bad"].detoks[0].add_tokens = explode
    outs: dict = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    bad, good = outs["bad"][-1], outs["good"][-1]
    assert bad.finished and "detokenizer broke" in bad.error and bad.outputs[0].finish_reason == "abort"
    assert good.error is None and good.outputs[0].token_ids == expected.outputs[0].token_ids
    assert_idle(llm)


def test_a_request_aborted_before_it_ran_reports_zero_cached_tokens(llm):
    engine = llm.engine
    engine.add_request("early", PROMPTS[2], SamplingParams(max_tokens=4))
    assert engine.outputs.parents["early"].children[0].num_cached_tokens is None  # not scheduled: not known
    out = engine.abort_request("early")
    assert out.finished and out.num_cached_tokens == 0  # the output's field is always a count
    assert_idle(llm)


# ---- AsyncEngine -------------------------------------------------------------------------------


def run_async(llm, body):
    async def main():
        engine = AsyncEngine.on_thread(llm.engine).start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def collect(engine, rid, prompt, params):
    return [out async for out in engine.generate(rid, prompt, params)]


def test_concurrent_requests_match_the_offline_api(llm):
    expected = llm.generate(PROMPTS, SAMPLED)

    async def body(engine):
        delta = replace(SAMPLED, output_kind="delta")
        return await asyncio.gather(*(collect(engine, f"r{i}", p, delta) for i, p in enumerate(PROMPTS)))

    results = run_async(llm, body)
    for want, got in zip(expected, results):
        assert joined(got) == [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in want.outputs]
    assert_idle(llm)


def test_leaving_a_stream_early_aborts_and_frees_blocks(llm):
    async def body(engine):
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind="delta")
        stream = await engine.add_request("long", PROMPTS[3], params)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        stream.abort()
        for _ in range(100):  # the abort is applied before the next step
            await asyncio.sleep(0.01)
            if engine.stats.num_requests_running == 0:
                break
        return seen, engine.stats

    seen, snap = run_async(llm, body)
    assert seen == 3 and snap.num_requests_running == 0 and snap.kv_cache_usage == 0
    assert_idle(llm)


def test_abort_with_a_reason_wakes_the_reader_with_it(llm):
    """What the server does when a client disconnects while its writer waits on the stream."""

    class Gone(Exception):
        pass

    async def body(engine):
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind="delta")
        stream = await engine.add_request("gone", PROMPTS[2], params)
        first = await stream.__anext__()

        async def read_rest():
            async for _ in stream:
                pass

        reader = asyncio.ensure_future(read_rest())
        await asyncio.sleep(0)
        stream.abort(Gone())
        with pytest.raises(Gone):
            await reader
        stream.abort(Gone())  # a second abort (the writer's cleanup) changes nothing
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.stats.num_requests_running == 0:
                break
        return first, engine.stats

    first, snap = run_async(llm, body)
    assert first.outputs[0].token_ids and snap.num_requests_running == 0 and snap.kv_cache_usage == 0
    assert_idle(llm)


def test_rejected_request_raises_and_leaves_nothing(llm):
    async def body(engine):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await engine.add_request("bad", {"prompt_token_ids": [10**9]}, SamplingParams())
        # The same id is free again, and the engine still serves.
        return await collect(engine, "bad", PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))

    outs = run_async(llm, body)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert_idle(llm)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch):
    runner = llm.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(sched, masks=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real(sched, masks)

    monkeypatch.setattr(runner, "execute", flaky)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def body(engine):
        with pytest.raises(RuntimeError, match="device fell over"):
            await collect(engine, "doomed", PROMPTS[0], params)
        return await collect(engine, "after", PROMPTS[0], params)

    outs = run_async(llm, body)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
    assert_idle(llm)


def test_requests_after_shutdown_are_refused(llm):
    async def main():
        engine = AsyncEngine.on_thread(llm.engine).start()
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", PROMPTS[0], SamplingParams())

    asyncio.run(main())


# ---- the engine in a process of its own (what `r1serve serve` runs) ---------------------------


def test_engine_process_serves_like_the_offline_api_and_survives_bad_requests(llm, tiny):
    from r1serve.config import EngineConfig
    from r1serve.engine.async_engine import load_engine

    expected = llm.generate(PROMPTS, SAMPLED)
    config = EngineConfig(model=str(tiny), cache_dir=tiny.parent, dtype="float32", num_kv_blocks=64, block_size=8,
                          num_threads=1)

    async def main():
        engine = await load_engine(config, tiny, own_process=True)
        try:
            assert engine.max_model_len == llm.engine.max_model_len and engine.vocab_size == llm.engine.loaded.arch.vocab_size
            delta = replace(SAMPLED, output_kind="delta")
            got = await asyncio.gather(*(collect(engine, f"r{i}", p, delta) for i, p in enumerate(PROMPTS)))
            # The engine's own exception type crosses the process boundary.
            with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
                await engine.add_request("bad", {"prompt_token_ids": [10**9]}, SamplingParams())
            # Leaving a stream early frees its blocks in the other process too.
            stream = await engine.add_request("long", PROMPTS[3], SamplingParams(
                temperature=0, max_tokens=200, ignore_eos=True, output_kind="delta"))
            await stream.__anext__()
            stream.abort()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if engine.stats.num_requests_running == 0:
                    break
            return got, engine.stats
        finally:
            await engine.shutdown()

    got, snap = asyncio.run(main())
    for want, deltas in zip(expected, got):
        # The other process batches the requests as they arrive, not as generate() did: the
        # same tokens, with logprobs equal to float rounding (sums over another batch shape).
        outputs = joined(deltas)
        assert [(text, ids, end) for text, ids, _, end in outputs] == [
            (c.text, c.token_ids, c.finish_reason) for c in want.outputs]
        for (_, _, logprobs, _), c in zip(outputs, want.outputs):
            assert [{t: lp.logprob for t, lp in step.items()} for step in logprobs] == [
                pytest.approx({t: lp.logprob for t, lp in step.items()}, abs=1e-4) for step in c.logprobs]
        # The prompt crosses the pipe once; every delta still carries it, as in-process.
        assert all(d.prompt_token_ids == want.prompt_token_ids and d.prompt == want.prompt for d in deltas)
    assert snap.num_requests_running == 0 and snap.kv_cache_usage == 0 and snap.num_free_blocks == snap.num_kv_blocks


def test_a_dead_engine_process_fails_its_streams_and_refuses_new_requests(tiny):
    from r1serve.config import EngineConfig
    from r1serve.engine.async_engine import load_engine

    config = EngineConfig(model=str(tiny), cache_dir=tiny.parent, dtype="float32", num_kv_blocks=64, block_size=8,
                          num_threads=1)

    async def main():
        engine = await load_engine(config, tiny, own_process=True)
        stream = await engine.add_request("long", PROMPTS[3], SamplingParams(
            temperature=0, max_tokens=10_000, ignore_eos=True, output_kind="delta"))
        await stream.__anext__()
        engine.core._proc.kill()  # as the OOM killer would
        with pytest.raises(EngineDeadError, match="exit code"):
            async for _ in stream:
                pass
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", PROMPTS[0], SamplingParams())
        await engine.shutdown()

    asyncio.run(main())


def test_a_model_that_fails_to_load_in_the_engine_process_says_why(tmp_path):
    from r1serve.config import EngineConfig
    from r1serve.engine.async_engine import load_engine
    from r1serve.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="neither a .gguf file nor an HF model directory"):
        asyncio.run(load_engine(EngineConfig(model="x", cache_dir=tmp_path), tmp_path / "missing", own_process=True))

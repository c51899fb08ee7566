"""The CUDA graph runner's bucketing, padding and eager fallbacks, on the CPU.

Capture itself needs a GPU (the gpu-marked test at the end). Everything around it is plain
torch: here a stand-in capture records the forward over the static buffers and "replays" it
into a fixed output tensor, as a graph would, so a whole engine runs through the runner.
"""
from __future__ import annotations

import logging

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.engine.cuda_graph_runner import (PAD_SLOT, CudaGraphRunner, DecodeBuffers, bucket_for,
                                              capture_sizes)
from r1serve.kernels.attention_metadata import AttentionMetadata

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_capture(log: list[int]):
    """Records fn like torch.cuda.graph: one run now, replays rerun it into the same output."""
    def capture(fn):
        out = fn()
        log.append(out.shape[0])

        def replay():
            out.copy_(fn())

        return replay, out

    return capture


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]
    assert capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(4096)[-1] == 512  # graphs stop at MAX_CAPTURE_SIZE; larger batches run eagerly


@pytest.mark.parametrize("n,size", [(1, 1), (3, 4), (5, 8), (8, 8), (9, 16), (64, 64), (65, None)])
def test_a_batch_runs_the_smallest_graph_that_holds_it(n, size):
    assert bucket_for(n, capture_sizes(64)) == size


def test_buffers_copy_the_step_and_pad_the_rest():
    bufs = DecodeBuffers.allocate(8, max_blocks=4, device=torch.device("cpu"))
    bufs.seq_lens.fill_(99)  # stale values from a previous, larger step
    bufs.slot_mapping.fill_(77)
    meta = AttentionMetadata.build([1, 1, 1], [5, 9, 17], torch.tensor([4, 40, 80]),
                                   torch.tensor([[0, 0, 0], [7, 9, 0], [10, 11, 12]]), 4)
    bufs.fill(torch.tensor([11, 12, 13]), torch.tensor([4, 8, 16]), meta, size=4)
    assert bufs.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert bufs.positions[:4].tolist() == [4, 8, 16, 0]
    assert bufs.slot_mapping[:4].tolist() == [4, 40, 80, PAD_SLOT]  # the padded row writes nowhere
    assert bufs.seq_lens[:4].tolist() == [5, 9, 17, 1]  # and reads one position of block 0
    assert bufs.block_tables[:4].tolist() == [[0, 0, 0, 0], [7, 9, 0, 0], [10, 11, 12, 0], [0, 0, 0, 0]]
    assert bufs.seq_lens[4:].tolist() == [99] * 4  # rows past the graph's size are not touched
    meta4 = bufs.metadata(4, block_size=4)
    assert meta4.is_decode_only and meta4.num_seqs == 4 and meta4.seq_lens_tensor.data_ptr() == bufs.seq_lens.data_ptr()


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return LLM(model=str(tiny), dtype="float32", num_kv_blocks=32, block_size=8, kernel="reference", max_num_seqs=6)


def with_graphs(llm: LLM, capture) -> CudaGraphRunner:
    engine = llm.engine
    graphs = CudaGraphRunner(engine.loaded.model, engine.runner.kv_caches, engine.config.block_size,
                             engine.config.max_num_seqs, engine.max_model_len, torch.device("cpu"), capture=capture)
    graphs.capture_all()
    engine.runner.decode_graphs = graphs
    return graphs


PROMPTS = [{"prompt_token_ids": p} for p in ([5, 17, 42, 99, 3], [11, 12], [300, 7, 8, 9, 1, 2, 3, 4, 5], [6])]


def test_decode_steps_replay_padded_graphs_and_generate_as_eager(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS[:3], params)]
    captured: list[int] = []
    graphs = with_graphs(tiny_llm, fake_capture(captured))
    try:
        assert captured == [6, 4, 2, 1]  # largest first: smaller graphs share its memory pool
        replays = {s: 0 for s in graphs.graphs}
        for size, (replay, out) in list(graphs.graphs.items()):
            def counted(replay=replay, size=size):
                replays[size] += 1
                replay()
            graphs.graphs[size] = (counted, out)
        got = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS[:3], params)]
    finally:
        tiny_llm.engine.runner.decode_graphs = None
    assert got == eager
    assert replays[4] == 11  # 3 sequences decode in the 4-row graph: 11 steps after the prefill
    assert sum(replays.values()) == 11  # the prefill step ran eagerly


def test_batches_above_the_largest_graph_and_prefill_run_eagerly(tiny_llm):
    graphs = with_graphs(tiny_llm, fake_capture([]))
    try:
        decode7 = AttentionMetadata.build([1] * 7, [3] * 7, torch.zeros(7, dtype=torch.long),
                                          torch.zeros(7, 1, dtype=torch.long), 8)
        prefill = AttentionMetadata.build([3], [3], torch.zeros(3, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 8)
        decode3 = AttentionMetadata.build([1] * 3, [3] * 3, torch.zeros(3, dtype=torch.long),
                                          torch.zeros(3, 1, dtype=torch.long), 8)
        assert graphs.graph_size(decode7) is None and graphs.graph_size(prefill) is None
        assert graphs.graph_size(decode3) == 4
    finally:
        tiny_llm.engine.runner.decode_graphs = None


def test_a_failed_capture_leaves_the_engine_eager(tiny_llm, caplog):
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="r1serve.engine"):
        graphs = with_graphs(tiny_llm, broken)
    try:
        assert graphs.graphs == {} and "decode steps run eagerly" in caplog.text
        out = tiny_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        tiny_llm.engine.runner.decode_graphs = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_real_cuda_graphs_generate_as_eager(tiny):
    opts = dict(dtype="bfloat16", num_kv_blocks=64, block_size=16, max_num_seqs=8, device="cuda")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = LLM(model=str(tiny), enforce_eager=True, **opts).generate(PROMPTS, params)
    llm = LLM(model=str(tiny), **opts)
    assert llm.engine.runner.decode_graphs is not None and llm.engine.runner.decode_graphs.graphs
    graphed = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]

"""The CPU's whole-layer decode kernel (platforms/cpu/decode_layer.py) against the layer's
own modules: the same compiled kernels in the same order, so the same logprobs bit for
bit, on every ISA this machine runs; and where it does not take a layer or a batch, the
modules run."""
from __future__ import annotations

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.kernels.cpu_extension import cpu_kernels
from tiny_models import make_checkpoint, make_deepseek_v3

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler: the CPU kernels are not built")
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [3], [20, 21]]


def _runnable_isas():
    from r1serve.kernels.cpu_isa import runnable_isas

    return runnable_isas()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_layer")
    return {arch: make_checkpoint(root / arch, arch) for arch in ("llama", "qwen2")}  # qwen2: q/k/v biases


def _layers(llm):
    return list(llm.engine.runner.model.model.layers)


def _greedy(llm):
    # 4 sequences ending at 4, 8, 12 and 16 tokens: decode batches of 4 down to 1 rows
    params = [SamplingParams(max_tokens=4 * (i + 1), temperature=0, ignore_eos=True, logprobs=3)
              for i in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, [{t: v.logprob for t, v in lp.items()} for lp in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("isa", _runnable_isas())
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("opts", [dict(dtype="float32", quantization="int4"),
                                  dict(dtype="float32", quantization="int8"),
                                  dict(dtype="bfloat16", quantization="int4")],
                         ids=["float32-int4", "float32-int8", "bf16-int4"])
def test_whole_layer_kernel_is_the_modules_bit_for_bit(checkpoints, arch, opts, isa):
    if cpu_kernels(isa) is None:
        pytest.skip(f"the {isa} build could not be compiled here")
    llm = LLM(str(checkpoints[arch]), cpu_isa=isa, num_kv_blocks=32, **opts)
    layers = _layers(llm)
    bound = {b.op: b for b in llm.engine.kernels}["decode_layer"]
    assert bound.kernel == f"csrc/{isa}" and bound.modules == len(layers)
    assert all(layer.decode_layer != layer.run_modules for layer in layers)
    fused = _greedy(llm)
    for layer in layers:
        layer.decode_layer = layer.run_modules
    assert _greedy(llm) == fused
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def test_other_layers_keep_their_modules(checkpoints, tmp_path):
    dense = LLM(str(checkpoints["llama"]), dtype="float32", quantization="none", num_kv_blocks=32)
    assert {b.op: b.kernel for b in dense.engine.kernels}["decode_layer"] == "reference"  # dense GEMMs
    mla = LLM(str(make_deepseek_v3(tmp_path / "v3")), dtype="float32", num_kv_blocks=32)
    assert {b.op: b.kernel for b in mla.engine.kernels}["decode_layer"] == "reference"  # MLA + MoE
    assert all(layer.decode_layer == layer.run_modules for layer in _layers(mla))
    assert torch.isfinite(torch.tensor([lp for _, lps in _greedy(mla) for step in lps for lp in step.values()])).all()

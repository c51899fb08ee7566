"""How a model's weights are held once loaded: the CPU platform's plan (platforms/cpu/
weight_plan.py), applied by the loader. A GGUF's quantized matrices are packed from the
file's own blocks, exactly and once; float ones are kept or quantized as they load."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_models import MIXES, write_model
from r1serve import LLM, SamplingParams
from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.quantized_weight import Format, dequantize
from r1serve.layers.embedding import VocabEmbedding
from r1serve.platforms.cpu.linear import CpuLinear

needs_kernel = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler: the CPU kernels are not built")
ENGINE = dict(num_kv_blocks=16, max_model_len=256)


def modules(llm: LLM) -> dict:
    return dict(llm.engine.runner.model.named_modules())


def float_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]


@needs_kernel
@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # llama: q/k rows reordered from ggml's rotary layout
@pytest.mark.parametrize("mix", ["q4_k_m", "legacy", "low_bits"])
def test_every_block_format_serves_the_files_own_weights(tmp_path, arch, mix):
    """Each linear and the embedding hold exactly the weights the file stores (the float path
    dequantizes the same file), fused projections of mixed formats included; no float copy
    of a packed weight exists; the answers agree with the float path's."""
    path = write_model(tmp_path / f"{arch}-{mix}.gguf", arch, mix)
    packed, dense = LLM(str(path), dtype="float32", **ENGINE), LLM(str(path), dtype="float32", quantization="none", **ENGINE)
    ours, theirs = modules(packed), modules(dense)
    linears = {n: m for n, m in ours.items() if isinstance(m, CpuLinear)}
    assert len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; the lm_head
    for name, m in linears.items():
        assert m.quantized is not None and m.weight is None and m.packed is None
        assert torch.equal(dequantize(m.quantized), theirs[name].weight), name
    qkv = linears["model.layers.0.self_attn.qkv_proj"].quantized
    stored = [MIXES[mix][r] for r in ("attn_q", "attn_k", "attn_v")]
    assert [f.name for f in qkv.formats] == [{2: "G4", 3: "G4", 6: "G8", 7: "G8", 8: "G8", 12: "K4"}.get(int(t), "K8")
                                             for t in stored]
    embed = ours["model.embed_tokens"]
    assert isinstance(embed, VocabEmbedding) and embed.weight is None
    ids = torch.arange(0, 320, 7)
    assert torch.equal(embed(ids), theirs["model.embed_tokens"](ids))
    # No float tensor the size of a packed weight: norms, biases and rotary tables only.
    big = [t.shape for t in float_tensors(packed.engine.runner.model) if t.numel() >= 256 * 256]
    assert big == [], big
    # Along the float path's greedy continuation, the next-token distributions agree (the
    # only difference is the activations' rounding to int8 per 32 values). Tokens are not
    # compared: a random model's near-ties may fall either way.
    prompt = [5, 6, 7, 8]
    out = dense.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    seq = prompt + list(out.token_ids)
    got, want = (torch.log_softmax(teacher_logits(llm, seq), -1) for llm in (packed, dense))
    kl = (want.exp() * (want - got)).sum(-1)
    assert kl.max() < 1e-3, kl
    assert packed.engine.kv.pool.num_free == packed.engine.num_kv_blocks


def teacher_logits(llm: LLM, seq: list[int]) -> torch.Tensor:
    engine = llm.engine
    engine.add_request("teacher", seq, SamplingParams(max_tokens=1))
    logits = engine.runner.compute_logits(engine.scheduler.schedule())
    engine.abort_request("teacher")
    return logits


@needs_kernel
def test_bf16_activations_and_a_tied_head(tmp_path):
    """A Q8_0 embedding tied to the LM head: one packed table serves both, under bf16."""
    path = write_model(tmp_path / "tied.gguf", "llama", "legacy", tied=True)
    llm = LLM(str(path), dtype="bfloat16", **ENGINE)
    m = modules(llm)
    assert m["lm_head"].quantized is m["model.embed_tokens"].table and m["lm_head"].quantized.formats == [Format.G8]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


@needs_kernel
def test_float_checkpoints_follow_the_quantization_setting(tmp_path):
    """An F16 file: dtype auto keeps float weights, or int8 groups where it widens to float32
    on a CPU without native bf16; int4/int8 quantize every float linear once loaded."""
    path = write_model(tmp_path / "f16.gguf", "qwen2", "f16")
    for setting, want in [("int4", {Format.G4}), ("int8", {Format.G8})]:
        llm = LLM(str(path), dtype="float32", quantization=setting, **ENGINE)
        linears = [m for m in modules(llm).values() if isinstance(m, CpuLinear)]
        assert {f for m in linears for f in m.quantized.formats} == want
    kept = LLM(str(path), dtype="float32", **ENGINE)
    assert not any(isinstance(m, CpuLinear) for m in modules(kept).values())  # float32 F.linear as it is


def test_a_fused_module_is_packed_only_when_every_part_is_blocks():
    from r1serve.models.arch_config import ArchConfig
    from r1serve.models.llama import LlamaForCausalLM
    from r1serve.platforms.cpu.weight_plan import packed_modules

    cfg = ArchConfig.from_hf(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                                  intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                                  vocab_size=100, tie_word_embeddings=True))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    class Checkpoint:
        def block_types(self):
            names = {f"model.layers.0.self_attn.{p}_proj.weight": int(Q.Q4_K) for p in "qko"}  # v is float
            names |= {f"model.layers.0.mlp.{p}_proj.weight": int(Q.Q6_K) for p in ("gate", "up", "down")}
            return names | {"model.embed_tokens.weight": int(Q.Q8_0)}

    assert packed_modules(model, Checkpoint()) == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj",
                                                   "model.layers.0.mlp.down_proj", "model.embed_tokens", "lm_head"}
    assert packed_modules(model, object()) == frozenset()  # an HF checkpoint: no blocks


def test_linears_are_rewritten_as_their_weights_complete():
    """The loader hands each linear to the plan once its last part is in: a fused qkv after
    v, gate_up after up, a tied lm_head with the embedding; each exactly once."""
    from r1serve.models.arch_config import ArchConfig
    from r1serve.models.llama import LlamaForCausalLM
    from r1serve.models.loader import _rewriting_linears

    cfg = ArchConfig.from_hf(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                                  vocab_size=100, tie_word_embeddings=True))
    model = LlamaForCausalLM(cfg)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(2):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{w}_proj.weight" for w in "qkvo"]
        names += [f"{p}.mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    params = dict(model.named_parameters())

    def shape(name):
        target, idx = model._fused_target(name)
        return params[target].shape if idx is None else model._fused_slice(params[target], idx, name).shape

    loaded: list[str] = []
    calls: list[tuple[str, str]] = []  # (linear rewritten, the last tensor loaded before)

    def weights():
        for name in names:
            loaded.append(name)
            yield name, torch.zeros(shape(name))

    model.check_complete(model.load_weights(_rewriting_linears(weights(), model,
                                                               lambda linear: calls.append((linear, loaded[-1])))))
    assert calls[0] == ("lm_head", "model.embed_tokens.weight")
    after = dict(calls)
    assert len(after) == len(calls) == 1 + 2 * 4  # lm_head, and qkv, o, gate_up, down per layer
    for i in range(2):
        p = f"model.layers.{i}"
        assert after[f"{p}.self_attn.qkv_proj"] == f"{p}.self_attn.v_proj.weight"
        assert after[f"{p}.mlp.gate_up_proj"] == f"{p}.mlp.up_proj.weight"
        assert after[f"{p}.mlp.down_proj"] == f"{p}.mlp.down_proj.weight"


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, loaded after or before the weights
def test_rewriting_as_loaded_gives_the_model_rewritten_at_the_end(tmp_path, monkeypatch, arch):
    from tiny_models import make_checkpoint

    from r1serve.models.llama import LlamaForCausalLM

    path = make_checkpoint(tmp_path / arch, arch)

    def load():
        llm = LLM(str(path), dtype="float32", quantization="int4", num_kv_blocks=8)
        linears = {n: m for n, m in modules(llm).items() if isinstance(m, CpuLinear)}
        out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=8, temperature=0, logprobs=2))
        lps = [{t: v.logprob for t, v in lp.items()} for lp in out[0].outputs[0].logprobs]
        return linears, lps

    as_loaded, lps = load()
    monkeypatch.setattr(LlamaForCausalLM, "rewrite_linears_as_loaded", False)
    at_end, want = load()
    assert as_loaded.keys() == at_end.keys() and len(at_end) > 0
    for n, m in at_end.items():
        assert torch.equal(as_loaded[n].quantized.packed, m.quantized.packed)
        assert (m.bias is None) == (as_loaded[n].bias is None)
        assert m.bias is None or torch.equal(as_loaded[n].bias, m.bias)
    assert any(m.bias is not None for m in at_end.values()) == (arch == "qwen2")
    assert lps == want


@needs_kernel
def test_loading_holds_the_file_once(tmp_path):
    """Loading a 52 MB Q4_K_M file: above what importing r1serve and torch and building its
    kernels cost, the peak stays within the packed weights plus 48 MB (measured: 31; the
    tokenizers library and its tables ~16, a tensor's pages of the mapped file, the engine's
    own buffers), and it is the loaded model's size: nothing of the file or of a float copy
    is left behind. The packed weights are the file's size plus what Q6_K's int8 codes add
    (9.1 bits a weight against the file's 6.6): 61 MB."""
    path = write_model(tmp_path / "q4km.gguf", "qwen2", "q4_k_m", hidden=1024, ffn=2816, layers=6, heads=8,
                       kv_heads=2, vocab=8192)
    code = ("import json, torch, r1serve.llm, r1serve.kernels.cpu_extension as c\n"
            "c.cpu_kernels()\n"
            "kib = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
            "base = kib('VmRSS')\n"
            f"llm = r1serve.llm.LLM({str(path)!r}, dtype='float32', num_kv_blocks=16)\n"
            "print(json.dumps([(kib('VmHWM') - base) // 1024, (kib('VmRSS') - base) // 1024, "
            "llm.engine.loaded.weight_bytes // 2**20]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, loaded, weights = json.loads(out.strip().splitlines()[-1])
    file_mib = path.stat().st_size // 2**20
    assert file_mib <= weights <= 1.25 * file_mib, (file_mib, weights)
    assert peak <= weights + 48 and peak - loaded <= 8, (peak, loaded, weights, file_mib)

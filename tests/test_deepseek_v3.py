"""DeepSeek-V3 / R1 (MLA + MoE + FP8) against transformers on tiny random checkpoints (float32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.errors import ModelLoadError
from r1serve.models.arch_config import ArchConfig
from r1serve.models.deepseek_v3 import DeepseekV3ForCausalLM

from tiny_models import make_deepseek_v3, to_fp8_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(40, 77)), [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
CASES = {
    "qlora-yarn-groups": dict(q_lora_rank=32, n_group=2, topk_group=1, yarn=True),
    "no-qlora-4groups": dict(q_lora_rank=None, n_group=4, topk_group=2, yarn=True),
    "all-moe-no-yarn": dict(q_lora_rank=32, n_group=1, topk_group=1, first_k_dense_replace=0, yarn=False),
}
# R1's real config.json, as r1serve ships it for planning (planner/model_configs).
R1_CONFIG = Path(__file__).parents[1] / "src" / "r1serve" / "planner" / "model_configs" / "deepseek-r1.json"


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    import transformers

    path = make_deepseek_v3(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def llm_for(path, **kw) -> LLM:
    return LLM(model=str(path), **{"dtype": "float32", "num_kv_blocks": 64, "block_size": 8, **kw})


def batch_logits(llm: LLM, prompts) -> tuple[torch.Tensor, object]:
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=1))
    sched = engine.scheduler.schedule()
    assert [c.num_tokens for c in sched.chunks] == [len(p) for p in prompts]
    return engine.runner.compute_logits(sched), sched


def reference_logits(ref, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])


def hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_prefill_logits_match(checkpoint):
    path, ref = checkpoint
    logits, _ = batch_logits(llm_for(path), PROMPTS)
    torch.testing.assert_close(logits, reference_logits(ref, PROMPTS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine_opts", [{}, {"max_num_batched_tokens": 16}], ids=["default", "chunked-prefill"])
def test_greedy_generation_matches(checkpoint, engine_opts):
    path, ref = checkpoint
    llm = llm_for(path, **engine_opts)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, 32)
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def test_prefix_cache_hit_gives_same_output(checkpoint):
    path, ref = checkpoint
    llm = llm_for(path)
    shared = list(range(100, 140))  # 5 full blocks of 8
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate([{"prompt_token_ids": shared + [7]}], sp)
    second = llm.generate([{"prompt_token_ids": shared + [9]}], sp)[0]
    assert second.num_cached_tokens == 40
    assert second.outputs[0].token_ids == hf_greedy(ref, shared + [9], 32)


def set_form(llm: LLM, form: str) -> None:
    for layer in llm.engine.loaded.model.model.layers:
        layer.self_attn.form = form


def test_absorbed_equals_expanded(checkpoint):
    path, _ = checkpoint
    llm = llm_for(path)
    # A mixed step: whole prompts, then decodes over a context that spans several blocks.
    set_form(llm, "expanded")
    expanded, sched = batch_logits(llm, PROMPTS)
    set_form(llm, "absorbed")
    absorbed = llm.engine.runner.compute_logits(sched)  # same latents rewritten to the same slots
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)
    assert not torch.equal(absorbed, expanded)  # two genuinely different computations

    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = {}
    for form in ("expanded", "absorbed"):
        fresh = llm_for(path)
        set_form(fresh, form)
        outs[form] = fresh.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    for e, a in zip(outs["expanded"], outs["absorbed"]):
        assert e.outputs[0].token_ids == a.outputs[0].token_ids
        for le, la in zip(e.outputs[0].logprobs, a.outputs[0].logprobs):
            assert [v.logprob for v in le.values()] == pytest.approx([v.logprob for v in la.values()], abs=1e-5)


def test_kv_cache_holds_one_latent_per_token(checkpoint):
    path, _ = checkpoint
    engine = llm_for(path).engine
    caches = engine.runner.kv_caches
    latent = 16 + 8  # kv_lora_rank + qk_rope_head_dim of the tiny configs
    assert len(caches) == engine.loaded.arch.num_layers
    for cache in caches:  # (1 plane, blocks, block_size, latent): no per-head K or V
        assert cache.shape == (1, engine.num_kv_blocks, 8, latent)
    allocated = sum(c.numel() * c.element_size() for c in caches)
    assert engine.kv_bytes_per_token == allocated // (engine.num_kv_blocks * 8) == len(caches) * latent * 4


def test_r1_planning_numbers():
    """R1's real config.json: 70,272 KV bytes per token in bf16, ~671B parameters, ~37B active."""
    arch = ArchConfig.from_hf(json.loads(R1_CONFIG.read_text()))
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(arch)
    assert model.kv_cache_spec().bytes_per_token(torch.bfloat16) == 70_272
    total = sum(p.numel() for p in model.parameters())
    assert 665e9 < total < 675e9
    assert 36e9 < model.active_parameters(total) < 38e9


def test_fp8_checkpoint_matches_dequantized_reference(tmp_path):
    import transformers
    from safetensors.torch import load_file

    src = make_deepseek_v3(tmp_path / "bf16", mtp=False)
    fp8 = to_fp8_checkpoint(src, tmp_path / "fp8", block=(32, 32))  # 24-row kv_a_proj: a partial block
    stored = load_file(fp8 / "model.safetensors")
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():  # the reference runs the dequantized weights, computed independently here
        sd = {}
        for name, w in stored.items():
            if w.dtype == torch.float8_e4m3fn:
                s = stored[name + "_scale_inv"]
                full = torch.kron(s, torch.ones(32, 32))[:w.shape[0], :w.shape[1]]
                sd[name] = w.float() * full
        reference_state = {**load_file(src / "model.safetensors"), **sd}
        ref.load_state_dict(_to_reference_names(ref, reference_state), strict=False)
    logits, _ = batch_logits(llm_for(fp8), PROMPTS)
    torch.testing.assert_close(logits, reference_logits(ref, PROMPTS), atol=1e-4, rtol=1e-4)
    # And the FP8 rounding is real: the original weights give different logits.
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert not torch.allclose(logits, reference_logits(original, PROMPTS), atol=1e-4)


def _to_reference_names(ref, state: dict) -> dict:
    """transformers stacks experts as experts.gate_up_proj (E, 2I, H) and experts.down_proj (E, H, I)."""
    out = {k: v for k, v in state.items() if ".experts." not in k}
    layers = {int(k.split(".")[2]) for k in state if ".experts." in k}
    for i in layers:
        p = f"model.layers.{i}.mlp.experts"
        n = len({k.split(".")[5] for k in state if k.startswith(p + ".")})
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state[f"{p}.{e}.gate_proj.weight"],
                                                           state[f"{p}.{e}.up_proj.weight"]]) for e in range(n)])
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    missing = set(ref.state_dict()) - set(out)
    assert not {m for m in missing if "rotary" not in m}, missing
    return out


def test_bad_deepseek_checkpoints(tmp_path):
    src = make_deepseek_v3(tmp_path / "ok", mtp=False)
    config = json.loads((src / "config.json").read_text())
    del config["kv_lora_rank"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="kv_lora_rank"):
        llm_for(src)
    config["kv_lora_rank"] = 16
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quantization_config"):
        llm_for(src)


def test_info_from_a_config_alone(capsys):
    from r1serve.cli import main

    assert main(["info", str(R1_CONFIG), "--load"]) == 0  # the planning numbers of a config alone
    info = json.loads(capsys.readouterr().out)
    assert info["kv_bytes_per_token"] == 70_272 and info["weight_bytes"] == 2 * info["parameters"]
    assert info["max_tokens_in_kv_cache"] == 2**30 // 70_272

"""Speculative decoding with DeepSeek-V3/R1's multi-token-prediction layer, on tiny random
checkpoints saved with a real random MTP layer: greedy output identical with drafts
(batched, preemption, chunked prefill, prefix hits, no KV block left), the MTP forward
against a plain-torch twin around transformers' own decoder layer, and clear refusals where
there is no MTP layer."""
from __future__ import annotations

import json

import pytest
import torch

from r1serve import SamplingParams
from r1serve.errors import ModelLoadError

from spec_runs import PROMPTS, assert_idle, make, token_ids
from tiny_models import make_deepseek_v3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    return make_deepseek_v3(tmp_path_factory.mktemp("dsv3-mtp"))


@pytest.mark.parametrize("opts", [{}, dict(num_kv_blocks=14), dict(enable_chunked_prefill=True,
                                                                  max_num_batched_tokens=8)],
                         ids=["batched", "preemption", "chunked-prefill"])
def test_mtp_greedy_is_identical(dsv3, opts):
    prompts = PROMPTS[:3] if opts else PROMPTS
    want = token_ids(make(dsv3, **opts), prompts)
    llm = make(dsv3, "mtp", num_speculative_tokens=2, **opts)
    assert token_ids(llm, prompts) == want
    assert token_ids(llm, prompts) == want  # over prefix-cache hits: the hit's last block recomputed
    assert llm.engine.stats().spec_num_drafts > 0
    assert_idle(llm)


def _mtp_twin(path, tokens: list[int], chain: list[int]) -> list[torch.Tensor]:
    """The MTP layer in plain torch around transformers' own decoder layer, over the whole
    sequence at once: the logits (V,) after the last position, then after each draft of
    `chain` fed back as the next position's token (with the layer's output as its H)."""
    import transformers
    from safetensors.torch import load_file

    main = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    L = main.config.num_hidden_layers
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=L + 1,
                                                             attn_implementation="eager").eval()
    w = load_file(path / "model.safetensors")

    def norm(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + main.config.rms_norm_eps) * \
            w[f"model.layers.{L}.{name}.weight"]

    ids = torch.tensor(tokens)
    logits = []
    with torch.no_grad():
        H = main.model(ids[None, :-1]).last_hidden_state[0]  # (n, hidden) after the final norm, positions 0..n-1
        emb = main.model.embed_tokens(ids[1:]).clone()  # t[p+1]
        emb[0] = 0.0  # position 0 masked
        for i in range(len(chain) + 1):
            x = torch.cat([norm(emb, "enorm"), norm(H, "hnorm")], -1) @ w[f"model.layers.{L}.eh_proj.weight"].T
            n = x.shape[0]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            out = full.model.layers[L](x[None], attention_mask=mask, position_ids=pos,
                                       position_embeddings=full.model.rotary_emb(x[None], pos))
            normed = norm((out[0] if isinstance(out, tuple) else out)[0], "shared_head.norm")
            logits.append(main.lm_head(normed[-1]))
            if i < len(chain):
                emb = torch.cat([emb, main.model.embed_tokens(torch.tensor([chain[i]]))])
                H = torch.cat([H, normed[-1:]])
    return logits


def test_mtp_forward_matches_a_plain_torch_twin(dsv3):
    llm = make(dsv3, "mtp", num_speculative_tokens=3)
    engine, prompt = llm.engine, PROMPTS[2]
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()  # the prefill: samples t_n, then the MTP layer runs over every prompt position
    req = engine.scheduler.running[0]
    drafter = engine.speculation.drafter
    head = drafter.head("r")
    assert head.position == len(prompt) - 1
    with torch.inference_mode():
        got_first = engine.loaded.model.compute_logits(head.hidden[None])[0]
    drafts = drafter.propose([req], [3])[0]
    want = _mtp_twin(dsv3, req.token_ids, drafts[:2])
    torch.testing.assert_close(got_first, want[0], atol=1e-4, rtol=1e-4)
    assert drafts == [int(lg.argmax()) for lg in want]  # the chain, fed its own drafts, agrees to the end
    engine.abort_request("r")
    engine.step()
    assert_idle(llm)


def test_mtp_is_refused_where_there_is_no_mtp_layer(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="multi-token-prediction"):
        make(tiny, "mtp")
    no_mtp = make_deepseek_v3(tmp_path / "no-mtp", mtp=False)
    with pytest.raises(ModelLoadError, match="no multi-token-prediction tensors"):
        make(no_mtp, "mtp")
    config = json.loads((no_mtp / "config.json").read_text())
    (no_mtp / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 0}))
    with pytest.raises(ModelLoadError, match="num_nextn_predict_layers >= 1"):
        make(no_mtp, "mtp")
    with pytest.raises(ValueError, match="DP attention"):
        make(tiny, "mtp", data_parallel_size=2, expert_parallel=True)

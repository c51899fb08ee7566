"""Random-weight checkpoints in HF format (with R1's tensor names), built with transformers:
the models benchmarks and tests run when the real weights are too big for the machine.

    r1serve bench random-model deepseek-v3 DIR      # the DeepSeek-V3 benchmark entry's model
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Small enough for a 2-core CPU, big enough that MLA, routing and the expert GEMMs dominate.
DEEPSEEK_V3_BENCH = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=8, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
                         n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128,
                         qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
DEEPSEEK_V3_TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


R1_SPECIAL = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# Tool-call markers are added tokens that are not special (as in DeepSeek's and Qwen's
# tokenizers): decoding keeps them, so the tool-call parser sees them in the text.
R1_TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                  "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                  "<｜tool▁output▁end｜>"]
HERMES_TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
DEEPSEEK_FIM_TOKENS = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
QWEN_FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
# ChatML with tools, as Qwen2.5's template lays them out: the tools as JSON lines in the
# system turn, calls as <tool_call> elements, results as <tool_response> in a user turn.
HERMES_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}"
    "\n\n# Tools\n\nYou may call one or more functions. The functions:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each call, answer with\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and tools %}"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for call in m['tool_calls'] %}\n<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(path: Path, vocab_size: int = VOCAB, r1_format: bool = False, tools: bool = False,
                    fim: bool = False) -> None:
    """A byte-level BPE trained on a few sentences: any text encodes. With a ChatML template,
    or (r1_format) with R1's special tokens and no template, as R1 checkpoints without one.
    With tools: the format's tool-call markers as tokens, and for ChatML a Hermes template.
    With fim: the family's fill-in-the-middle tokens (DeepSeek's, or Qwen's for ChatML)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # As in R1's tokenizer, <think> and </think> are added tokens that are not special: the
    # reasoning split reads them in the decoded text.
    special = R1_SPECIAL[:4] if r1_format else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    markers = (R1_SPECIAL[4:] if r1_format else []) + ((R1_TOOL_TOKENS if r1_format else HERMES_TOOL_TOKENS)
                                                        if tools else [])
    if fim:
        markers += DEEPSEEK_FIM_TOKENS if r1_format else QWEN_FIM_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(markers), special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello, my name is r1serve.",
              "Paged attention keeps the KV cache in blocks.", "def f(x):\n    return x * 2\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|endoftext|>", "chat_template": HERMES_CHAT_TEMPLATE if tools else CHAT_TEMPLATE}
    if r1_format:
        config = {"bos_token": R1_SPECIAL[1], "eos_token": R1_SPECIAL[0]}
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_deepseek_v3(path: Path, sizes: dict, *, yarn: bool = True, mtp: bool = True, seed: int = 0,
                      r1_tokenizer: bool = False, tool_tokens: bool = False) -> Path:
    """A random DeepseekV3ForCausalLM saved as R1 saves it (per-expert tensors, a non-zero
    e_score_correction_bias, YaRN rope, and one multi-token-prediction layer after the last).

    The MTP layer's decoder block is a real random DeepSeek-V3 layer: the model is built with
    one layer more, whose tensors become `model.layers.{L}.*` beside enorm, hnorm, eh_proj,
    shared_head.norm and the layer's copies of the embedding and head, as R1 stores them."""
    import transformers

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0} if yarn else None
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, num_key_value_heads=sizes["num_attention_heads"], max_position_embeddings=1024,
        rope_parameters=rope, routed_scaling_factor=2.5, norm_topk_prob=True, bos_token_id=None, eos_token_id=0,
        tie_word_embeddings=False, **(sizes | {"num_hidden_layers": sizes["num_hidden_layers"] + mtp}))
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name or "experts" in name:
                p.normal_(0, 0.3)  # the default 0.02 makes every expert nearly the same
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, r1_format=r1_tokenizer, tools=tool_tokens)
    if mtp:
        _add_mtp_tensors(path, sizes["num_hidden_layers"], sizes["hidden_size"])
    return path


def _add_mtp_tensors(path: Path, layer: int, hidden: int) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    p = f"model.layers.{layer}"
    weights[f"{p}.enorm.weight"] = 1 + 0.1 * torch.randn(hidden)
    weights[f"{p}.hnorm.weight"] = 1 + 0.1 * torch.randn(hidden)
    weights[f"{p}.shared_head.norm.weight"] = 1 + 0.1 * torch.randn(hidden)
    weights[f"{p}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden) / (2 * hidden) ** 0.5
    weights[f"{p}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    weights[f"{p}.shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config |= {"num_hidden_layers": layer, "num_nextn_predict_layers": 1}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def write_llama(path: Path, sizes: dict, *, max_position_embeddings: int = 4096, seed: int = 0) -> Path:
    """A random LlamaForCausalLM with the byte-level tokenizer above."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=max_position_embeddings,
                                   bos_token_id=None, eos_token_id=0, tie_word_embeddings=True, **sizes)
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return path


def main(args) -> None:
    sizes = {"deepseek-v3": DEEPSEEK_V3_BENCH, "deepseek-v3-tiny": DEEPSEEK_V3_TINY}[args.kind]
    path = write_deepseek_v3(Path(args.out), sizes)
    print(f"wrote a random {args.kind} checkpoint to {path}")

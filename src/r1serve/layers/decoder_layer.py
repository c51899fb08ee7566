"""The pre-norm decoder layer both Llama and DeepSeek-V3 stack: norm, attention, norm, MLP.

The residual stream is carried separately from the layer output so each RMSNorm can fuse
the residual add (one pass over the hidden state instead of two). Subclasses set
input_layernorm, self_attn, post_attention_layernorm and mlp.
"""
from __future__ import annotations

from torch import nn


class PreNormDecoderLayer(nn.Module):
    def forward(self, rope, x, residual, kv_cache, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

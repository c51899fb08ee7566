"""Rotary position embedding: the rotate-half form Llama and Qwen2 checkpoints expect, and the
interleaved-pairs form of DeepSeek's MLA; default, linear, llama3 and YaRN frequencies."""
from __future__ import annotations

import math

import torch
from torch import nn

from r1serve.errors import ModelLoadError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported for this architecture; "
                         "supported: default, linear, llama3, yarn")


def _yarn_inv_freq(dim: int, theta: float, s: dict) -> torch.Tensor:
    # YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, and ramp
    # linearly between the dims that complete beta_fast and beta_slow turns over the original
    # context. Computed as transformers does (float32, truncated correction range).
    factor, orig = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(turns: float) -> float:
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """YaRN scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for R1)."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the cos/sin tables in float32 on the module's device; the loader calls
        this after materialising a model built on the meta device."""
        device = self.cos.device
        if device.type == "meta":  # shapes only: arithmetic on meta tensors runs through torch's
            # Python decompositions, whose first use costs ~150 MB and seconds at every load
            self.cos = self.sin = torch.empty(self.max_positions, self.head_dim // 2, device=device)
            return
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)  # (P, D/2)
        factor = rope_attention_factor(self.scaling)
        self.cos, self.sin = freqs.cos() * factor, freqs.sin() * factor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for this step's positions, looked up once and shared by every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # (N, 1, D/2)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    # q: (N, H, D); k: (N, Hkv, D); rope: cos, sin (N, 1, D/2)
    cos, sin = rope
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def apply_rotary_interleaved(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # DeepSeek's rope dims come as pairs (x0, x1), (x2, x3), ... each turned by one frequency.
    # The result is laid out evens-then-odds; q and k get the same layout, so q.k is unchanged.
    # x: (N, heads, R); rope: cos, sin (N, 1, R/2)
    cos, sin = rope
    return _rotate(torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1), cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

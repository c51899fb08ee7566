"""Random paged-attention batches for kernel tests: each sequence's blocks scattered across
the pool, as after a while of serving."""
from __future__ import annotations

import torch

from r1serve.kernels.attention_metadata import AttentionMetadata


def random_paged_batch(seq_lens, query_lens, H=6, Hkv=2, D=32, bs=4, num_blocks=64, dtype=torch.float32, seed=0,
                       device="cpu"):
    """(q (N, H, D), k_cache, v_cache (num_blocks, bs, Hkv, D), metadata), on `device`."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g, dtype=torch.float32).to(device, dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g, dtype=torch.float32).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    width = max(-(-s // bs) for s in seq_lens)
    for s, q in zip(seq_lens, query_lens):
        n = -(-s // bs)
        table, perm = perm[:n], perm[n:]
        tables.append(table + [0] * (width - n))
        slots += [table[p // bs] * bs + p % bs for p in range(s - q, s)]
    meta = AttentionMetadata.build(list(query_lens), list(seq_lens), torch.tensor(slots, device=device),
                                   torch.tensor(tables, device=device), bs)
    q = torch.randn(sum(query_lens), H, D, generator=g).to(device, dtype)
    return q, k_cache, v_cache, meta

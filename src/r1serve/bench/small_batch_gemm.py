"""Per-GEMM time of the CPU's small-batch weight paths at a model's shapes, in one process.

    python -m r1serve.bench.small_batch_gemm [--rows 1] [--rounds 10] [--dtype float32] [--cpu-isa avx2]

bf16 activations: torch's int8 per-channel `_weight_int8pack_mm` and oneDNN's packed bf16
GEMM (the path for larger batches) against the group-quantized kernel in int4 and int8
groups (kernels/group_quant_linear.py). float32 activations (CPUs without native bf16):
float32 `F.linear` against the groups. On SmolLM2-135M's shapes by default. Each
round times every path on its own copies of the weights (30 per shape, as a decode step
reads 30 layers' worth, so nothing is served from a warm L2), interleaved; the table gives
medians and the ratio to torch's op.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.cpu_isa import cpu_model
from r1serve.kernels.group_quant_linear import group_quant_linear, to_group_quant
from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import pack_weight, packed_linear

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down, and the tied lm_head (N, K)
SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}


def weights(N: int, K: int, copies: int, dtype: torch.dtype) -> list[tuple]:
    out = []
    for _ in range(copies):
        w = (torch.randn(N, K) * 0.05).bfloat16()
        if dtype == torch.float32:
            out.append((w.float(), to_group_quant(w, 4), to_group_quant(w, 8)))
            continue
        q, scales = quantize_per_channel(w)
        out.append(((q, scales.bfloat16()), to_group_quant(w, 4), to_group_quant(w, 8), pack_weight(w)))
    return out


def time_shape(N: int, K: int, rows: int, rounds: int, dtype: torch.dtype = torch.bfloat16,
               kernels=None) -> dict[str, tuple[float, int]]:
    """path -> (median seconds per GEMM, bytes of weights it reads); the first is the baseline"""
    ws = weights(N, K, 3 if N * K > 10_000_000 else 30, dtype)
    x = torch.randn(rows, K).to(dtype)
    groups = {"int4 groups": (lambda w: group_quant_linear(x, w[1], None, kernels), ws[0][1].packed.numel()),
              "int8 groups": (lambda w: group_quant_linear(x, w[2], None, kernels), ws[0][2].packed.numel())}
    if dtype == torch.float32:
        paths = {"float32 F.linear": (lambda w: F.linear(x, w[0]), 4 * N * K), **groups}
    else:
        paths = {"int8 per-channel (torch)": (lambda w: int8_linear(x, *w[0]), N * K + 2 * N), **groups,
                 "bf16 packed": (lambda w: packed_linear(x, w[3], None), 2 * N * K)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (fn, _) in paths.items():
            t0 = time.perf_counter()
            for w in ws:
                fn(w)
            if r:
                times[name].append((time.perf_counter() - t0) / len(ws))
    return {name: (statistics.median(times[name]), nbytes) for name, (_, nbytes) in paths.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1, help="activation rows (decoded sequences)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the activations'")
    p.add_argument("--cpu-isa", default=None, help="the CPU kernels' build (default: the CPU's best)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype, kernels = getattr(torch, args.dtype), cpu_kernels(args.cpu_isa)
    print(f"{cpu_model()} ({kernels.isa()} kernels, torch {torch.backends.cpu.get_cpu_capability()}); rows={args.rows}, "
          f"threads={torch.get_num_threads()}; us per GEMM, GB/s of weights, x vs the first path")
    for shape, (N, K) in SHAPES.items():
        res = time_shape(N, K, args.rows, args.rounds, dtype, kernels)
        base = next(iter(res.values()))[0]
        cells = [f"{name} {t * 1e6:7.1f} us {b / t / 1e9:5.1f} GB/s {base / t:5.2f}x" for name, (t, b) in res.items()]
        print(f"{shape:13s} {N:5d}x{K:<5d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

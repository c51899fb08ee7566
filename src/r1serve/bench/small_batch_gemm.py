"""Per-GEMM time of the CPU's small-batch weight paths at a model's shapes, in one process.

    python -m r1serve.bench.small_batch_gemm [--rows 1] [--rounds 10]

torch's int8 per-channel `_weight_int8pack_mm` and oneDNN's packed bf16 GEMM (the path for
larger batches) against the group-quantized kernel in int4 and int8 groups
(kernels/group_quant_linear.py), on SmolLM2-135M's shapes by default. Each
round times every path on its own copies of the weights (30 per shape, as a decode step
reads 30 layers' worth, so nothing is served from a warm L2), interleaved; the table gives
medians and the ratio to torch's op.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from r1serve.kernels.group_quant_linear import group_quant_linear, to_group_quant
from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import pack_weight, packed_linear

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down, and the tied lm_head (N, K)
SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}


def weights(N: int, K: int, copies: int) -> list[tuple]:
    out = []
    for _ in range(copies):
        w = (torch.randn(N, K) * 0.05).bfloat16()
        q, scales = quantize_per_channel(w)
        out.append(((q, scales.bfloat16()), to_group_quant(w, 4), to_group_quant(w, 8), pack_weight(w)))
    return out


def time_shape(N: int, K: int, rows: int, rounds: int) -> dict[str, tuple[float, int]]:
    """path -> (median seconds per GEMM, bytes of weights it reads)"""
    ws = weights(N, K, 3 if N * K > 10_000_000 else 30)
    x = torch.randn(rows, K).bfloat16()
    paths = {"int8 per-channel (torch)": (lambda w: int8_linear(x, *w[0]), N * K + 2 * N),
             "int4 groups": (lambda w: group_quant_linear(x, w[1], None), ws[0][1].packed.numel()),
             "int8 groups": (lambda w: group_quant_linear(x, w[2], None), ws[0][2].packed.numel()),
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
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"rows={args.rows}, threads={torch.get_num_threads()}; us per GEMM, GB/s of weights, x vs torch's int8")
    for shape, (N, K) in SHAPES.items():
        res = time_shape(N, K, args.rows, args.rounds)
        base = res["int8 per-channel (torch)"][0]
        cells = [f"{name} {t * 1e6:7.1f} us {b / t / 1e9:5.1f} GB/s {base / t:5.2f}x" for name, (t, b) in res.items()]
        print(f"{shape:13s} {N:5d}x{K:<5d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""Per-GEMM speed of the CPU's quantized GEMM in each packed format, against torch, in one process.

    python -m r1serve.bench.quant_gemm [--model qwen-1.5b] [--rows 1 8 64 512] [--rounds 5] [--cpu-isa avx2]

At an R1 distill's linear shapes (or SmolLM2's), for each number of activation rows: the
quantized GEMM (csrc/quant_gemm.h) over weights in G4 (Q4_0/Q4_1), G8 (Q8_0/Q5_x), K4
(Q4_K) and K8 (Q5_K/Q6_K) form, torch's own weight-only int4 GEMM
(`_weight_int4pack_mm_for_cpu`, groups of 32) and float32 F.linear (MKL), on the same
activations. Each round times every path on its own copies of the weights (enough of them
that they stream from memory, as a decode step does), interleaved; medians, GB/s of weights
for one row, GOPS beyond, and the ratio to float32 F.linear.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model
from r1serve.kernels.quantized_weight import Format, QuantizedWeight, quant_linear

# (N, K) of the linears of one layer (q/k/v fused, o, gate/up fused, down)
SHAPES = {
    "smollm2-135m": {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536)},
    "qwen-1.5b": {"qkv_proj": (2048, 1536), "o_proj": (1536, 1536), "gate_up_proj": (17920, 1536),
                  "down_proj": (1536, 8960)},
    "qwen-7b": {"qkv_proj": (4608, 3584), "o_proj": (3584, 3584), "gate_up_proj": (37888, 3584),
                "down_proj": (3584, 18944)},
}
FORMATS = (Format.G4, Format.G8, Format.K4, Format.K8)


def random_weight(fmt: Format, N: int, K: int, g: torch.Generator) -> QuantizedWeight:
    """Random codes and small scales in `fmt` (bytes below 64 keep every fp16 scale finite)."""
    packed = torch.randint(0, 64, (-(-N // 16) * fmt.block_bytes(K),), dtype=torch.uint8, generator=g)
    return QuantizedWeight.single(packed, fmt, N, K)


def torch_int4(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.rand(K // 32, N, 2, generator=g) * 0.01
    return packed, scales


def time_paths(N: int, K: int, rows: int, rounds: int, kernels) -> dict[str, tuple[float, int]]:
    """path -> (median seconds per GEMM, bytes of weight it reads)"""
    g = torch.Generator().manual_seed(0)
    copies = max(1, min(16, (128 << 20) // (N * K)))
    x = torch.randn(rows, K, generator=g)
    paths = {"float32 F.linear": ([torch.randn(N, K, generator=g) * 0.05 for _ in range(copies)],
                                  lambda w: F.linear(x, w), 4 * N * K)}
    for fmt in FORMATS:
        if fmt.two_level and K % 256:
            continue
        ws = [random_weight(fmt, N, K, g) for _ in range(copies)]
        paths[fmt.name] = (ws, lambda w: quant_linear(x, w, None, kernels), ws[0].nbytes)
    # torch's int4 GEMM ran at 0.5 GB/s in decode and 2 GOPS at 512 rows here (torch 2.13,
    # AVX512): timed at a few rows only, where it takes seconds rather than minutes.
    if K % 32 == 0 and rows <= 8:
        ws = [torch_int4(N, K, g) for _ in range(copies)]
        paths["torch int4pack"] = (ws, lambda w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1]), N * K // 2)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (ws, fn, _) in paths.items():
            t0 = time.perf_counter()
            for w in ws:
                fn(w)
            if r:
                times[name].append((time.perf_counter() - t0) / len(ws))
    return {name: (statistics.median(times[name]), nbytes) for name, (_, _, nbytes) in paths.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen-1.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512], help="activation rows")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu-isa", default=None, help="the CPU kernels' build (default: the CPU's best)")
    args = p.parse_args(argv)
    kernels = cpu_kernels(args.cpu_isa)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "asimd"))))
    print(f"{cpu_model()} [{flags}] ({kernels.isa()} {kernels.isa_extensions()} kernels), "
          f"{torch.get_num_threads()} threads; us per GEMM, GB/s of weight (1 row) or GOPS, x vs float32 F.linear")
    for rows in args.rows:
        for shape, (N, K) in SHAPES[args.model].items():
            res = time_paths(N, K, rows, args.rounds, kernels)
            base = res["float32 F.linear"][0]
            rate = (lambda t, b: f"{b / t / 1e9:5.1f} GB/s") if rows == 1 else \
                (lambda t, b: f"{2 * rows * N * K / t / 1e9:5.0f} GOPS")
            cells = [f"{name} {t * 1e6:8.1f} us {rate(t, b)} {base / t:5.2f}x" for name, (t, b) in res.items()]
            print(f"rows={rows:<4d} {shape:13s} {N:5d}x{K:<5d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""One run, every GPU figure: each Triton kernel against its twin on R1's shapes, a
microbenchmark of each against the card's own measured peaks, and r1serve against
transformers end to end.

    python benchmarks/gpu_check.py --out results/gpu_check.json          # on a CUDA GPU, < 10 min
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/x.json # tiny shapes, CPU, interpreter

Peaks are measured on the spot, not taken from a datasheet: copy bandwidth (a 2 GiB
device-to-device copy, read + write) and matmul rates (bf16 torch.mm, FP8 torch._scaled_mm,
8192^3). Memory-bound kernels (decode attention, MLA decode, cache writes, norms, decode-
sized GEMMs) report GB/s of the bytes they must move and the fraction of copy bandwidth;
compute-bound ones (FP8 GEMM and fused MoE at large batches) TFLOP/s and the fraction of the
matmul rate of their input type. Targets: >= 70% of copy bandwidth for decode attention and
MLA decode at long contexts, >= 60% of the matmul rate for FP8 GEMM and fused MoE at large
batches. Each section writes the JSON as it finishes, so a run cut short keeps what it got.

--smoke runs the same code on tiny shapes (TRITON_INTERPRET=1 on a CPU): it checks the
script, not the kernels' speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# R1 (DeepSeek-V3 architecture) and a Llama-70B-shaped GQA layer.
R1 = dict(heads=128, kv_lora_rank=512, rope=64, nope=128, hidden=7168, expert_width=2048, experts=256, top_k=8)
GQA = dict(heads=64, kv_heads=8, head_dim=128)
SMOKE_R1 = dict(heads=20, kv_lora_rank=64, rope=16, nope=16, hidden=128, expert_width=64, experts=4, top_k=2)
SMOKE_GQA = dict(heads=8, kv_heads=2, head_dim=32)
MEMORY_TARGET, COMPUTE_TARGET = 0.70, 0.60


@dataclass
class Result:
    kernel: str
    shape: str
    max_err: float | None = None  # max |kernel - twin| / max |twin|
    ok: bool | None = None  # within the tolerance of the dtype
    time_us: float | None = None
    achieved: float | None = None
    unit: str = ""  # "GB/s" | "TFLOP/s"
    peak: float | None = None  # the measured peak it is compared with, same unit
    target: float | None = None  # the fraction of peak aimed for, where one is set
    error: str | None = None  # why the check could not run

    @property
    def fraction(self) -> float | None:
        return self.achieved / self.peak if self.achieved and self.peak else None


@dataclass
class Report:
    device: str = ""
    command: str = ""
    peaks: dict = field(default_factory=dict)
    kernels: list[Result] = field(default_factory=list)
    e2e: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**asdict(self), "kernels": [{**asdict(r), "fraction_of_peak": r.fraction} for r in self.kernels]}
        path.write_text(json.dumps(data, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for checking the script (CPU: interpreter)")
    p.add_argument("--sections", default="peaks,kernels,e2e", help="comma-separated: peaks, kernels, e2e")
    p.add_argument("--only", default=None, help="run only kernels whose name contains this")
    p.add_argument("--concurrency", default="1,64", help="end to end: concurrent sequences")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--e2e-models", default="llama,deepseek", help="random checkpoints: llama (SmolLM2-135M shape), "
                                                                  "deepseek (a small DeepSeek-V3: MLA + MoE)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"peaks", "kernels", "e2e"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; use peaks, kernels, e2e")
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu only runs with --smoke (the interpreter is for correctness, not speed)")
    return args


# ---- timing and peaks ----------------------------------------------------------------------------


def bench(fn: Callable[[], object], device: str, min_time: float = 0.2, max_iters: int = 200) -> float:
    """Median seconds per call after a warm-up (compiles, allocator), by CUDA events on a GPU."""
    import torch

    if device != "cuda":  # --smoke on the interpreter: one call says the code runs; its time means nothing
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    iters = max(3, min(max_iters, int(min_time / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure_peaks(device: str, smoke: bool) -> dict:
    import torch

    n_bytes, n = (2 << 20, 256) if smoke else (2 << 30, 8192)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = bench(lambda: dst.copy_(src), device)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    peaks = {"copy_GBps": 2 * n_bytes / copy_s / 1e9,
             "bf16_TFLOPs": 2 * n ** 3 / bench(lambda: torch.mm(a, b), device) / 1e12}
    try:  # FP8 tensor cores: Hopper and newer (and Ada)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        fp8_s = bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
        peaks["fp8_TFLOPs"] = 2 * n ** 3 / fp8_s / 1e12
    except Exception as e:  # no FP8 matmul here: FP8 checks compare with the bf16 rate
        peaks["fp8_error"] = f"{type(e).__name__}: {e}"[:200]
    return peaks


# ---- kernel checks --------------------------------------------------------------------------------


def rel_err(got, want) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6))


def kernel_checks(args, peaks: dict) -> list[Callable[[], Result]]:
    """The checks, each a closure that builds its inputs, compares and times."""
    import torch

    dev, smoke = args.device, args.smoke
    r1, gqa = (SMOKE_R1, SMOKE_GQA) if smoke else (R1, GQA)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's bf16 dot is not faithful
    bw, bf16 = peaks.get("copy_GBps"), peaks.get("bf16_TFLOPs")
    fp8 = peaks.get("fp8_TFLOPs", bf16)
    tol = 2e-2
    long_ctx, batch, tokens = (200, 4, 16) if smoke else (32768, 64, 4096)
    ctx = 160 if smoke else 4096

    def memory(name, shape, got, want, fn, n_bytes, target=None) -> Result:
        err = rel_err(got, want)
        t = bench(fn, dev)
        return Result(name, shape, err, err <= tol, t * 1e6, n_bytes / t / 1e9, "GB/s", bw, target)

    def compute(name, shape, got, want, fn, flops, peak, target=None) -> Result:
        err = rel_err(got, want)
        t = bench(fn, dev)
        return Result(name, shape, err, err <= tol, t * 1e6, flops / t / 1e12, "TFLOP/s", peak, target)

    def gqa_decode(B, L):
        from r1serve.kernels.paged_attention import paged_attention_reference
        from r1serve.kernels.triton.paged_decode_attention import paged_decode_attention_triton

        H, Hkv, D = gqa["heads"], gqa["kv_heads"], gqa["head_dim"]
        meta, num_blocks = decode_meta(B, L, 16, dev)
        kc, vc = (torch.randn(num_blocks, 16, Hkv, D, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(B, H, D, device=dev, dtype=dtype)
        fn = lambda: paged_decode_attention_triton(q, kc, vc, meta, D ** -0.5)  # noqa: E731
        return memory("paged_decode_attention", f"B={B} ctx={L} H={H} Hkv={Hkv} D={D}", fn(),
                      paged_attention_reference(q, kc, vc, meta, D ** -0.5), fn, 2 * B * L * Hkv * D * 2,
                      MEMORY_TARGET if L >= 4096 else None)

    def mla_decode(B, L):
        from r1serve.kernels.mla_attention import mla_absorbed_reference
        from r1serve.kernels.triton.mla_decode_attention import mla_decode_attention_triton

        H, Lr, R = r1["heads"], r1["kv_lora_rank"], r1["rope"]
        meta, num_blocks = decode_meta(B, L, 16, dev)
        cache = torch.randn(1, num_blocks, 16, Lr + R, device=dev, dtype=dtype)
        q_lat, q_pe = torch.randn(B, H, Lr, device=dev, dtype=dtype), torch.randn(B, H, R, device=dev, dtype=dtype)
        scale = (r1["nope"] + R) ** -0.5
        fn = lambda: mla_decode_attention_triton(q_lat, q_pe, cache, meta, Lr, scale)  # noqa: E731
        return memory("mla_decode_attention", f"B={B} ctx={L} H={H} L={Lr} R={R}", fn(),
                      mla_absorbed_reference(q_lat, q_pe, cache, meta, Lr, scale), fn, B * L * (Lr + R) * 2,
                      MEMORY_TARGET if L >= 4096 else None)

    def cache_writes():
        from r1serve.kernels.mla_attention import write_latent
        from r1serve.kernels.triton.kv_cache_write import write_latent_triton

        row = r1["kv_lora_rank"] + r1["rope"]
        cache = torch.zeros(1, tokens // 16 + 1, 16, row, device=dev, dtype=dtype)
        want = cache.clone()
        latent = torch.randn(tokens, row, device=dev, dtype=dtype)
        slots = torch.randperm(cache.shape[1] * 16, device=dev)[:tokens]
        write_latent(want, latent, slots)
        fn = lambda: write_latent_triton(cache, latent, slots)  # noqa: E731
        fn()
        return memory("write_latent", f"N={tokens} row={row}", cache, want, fn, 2 * tokens * row * 2)

    def rotary_kv():
        from r1serve.kernels.rotary_kv_write import rotary_kv_write_reference
        from r1serve.kernels.triton.rotary_kv_write import rotary_kv_write_triton

        H, Hkv, D = gqa["heads"] // 2, gqa["kv_heads"], gqa["head_dim"]
        qkv = torch.randn(tokens, (H + 2 * Hkv) * D, device=dev, dtype=dtype)
        angle = torch.rand(tokens, 1, D // 2, device=dev) * 6
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        cache = torch.zeros(2, tokens // 16 + 1, 16, Hkv, D, device=dev, dtype=dtype)
        slots = torch.randperm(cache.shape[1] * 16, device=dev)[:tokens]
        want = rotary_kv_write_reference(qkv, cos, sin, cache.clone(), slots, H)
        fn = lambda: rotary_kv_write_triton(qkv, cos, sin, cache, slots, H)  # noqa: E731
        return memory("rotary_kv_write", f"N={tokens} H={H} Hkv={Hkv} D={D}", fn(), want, fn,
                      tokens * (H + 2 * Hkv) * D * 2 * 2)

    def rms_norm():
        from r1serve.kernels.rms_norm import add_rms_norm_reference
        from r1serve.kernels.triton.add_rms_norm import add_rms_norm_triton

        D = r1["hidden"]
        x, res = (torch.randn(tokens, D, device=dev, dtype=dtype) for _ in range(2))
        w = torch.randn(D, device=dev, dtype=dtype)
        fn = lambda: add_rms_norm_triton(x, res, w, 1e-6)  # noqa: E731
        return memory("add_rms_norm", f"N={tokens} D={D}", fn()[0], add_rms_norm_reference(x, res, w, 1e-6)[0], fn,
                      4 * tokens * D * 2)

    def act_quant():
        from r1serve.kernels.fp8_gemm import act_dequant, act_quant_reference
        from r1serve.kernels.triton.fp8_act_quant import act_quant_triton

        x = torch.randn(tokens, r1["hidden"], device=dev, dtype=dtype)
        fn = lambda: act_quant_triton(x, 128 if not smoke else 32)  # noqa: E731
        got, want = act_dequant(*fn()), act_dequant(*act_quant_reference(x, 128 if not smoke else 32))
        return memory("fp8_act_quant", f"N={tokens} K={r1['hidden']}", got, want, fn, x.numel() * 3)

    def fp8_gemm(M, N, K):
        from r1serve.kernels.fp8_gemm import act_quant_reference, fp8_block_gemm_reference
        from r1serve.kernels.triton.fp8_gemm import fp8_block_gemm_triton
        from r1serve.kernels.fp8_block import quantize_fp8_block

        block = (32, 32) if smoke else (128, 128)
        x_q, x_s = act_quant_reference(torch.randn(M, K, device=dev, dtype=dtype), block[1])
        w_q, w_s = quantize_fp8_block(torch.randn(N, K, device=dev) / math.sqrt(K), block)
        fn = lambda: fp8_block_gemm_triton(x_q, x_s, w_q, w_s, block, dtype)  # noqa: E731
        want = fp8_block_gemm_reference(x_q, x_s, w_q, w_s, block, dtype)
        shape = f"M={M} N={N} K={K}"
        if M <= 64:  # decode-sized: the weight read dominates
            return memory("fp8_block_gemm", shape, fn(), want, fn, N * K + M * K + 2 * M * N)
        return compute("fp8_block_gemm", shape, fn(), want, fn, 2 * M * N * K, fp8, COMPUTE_TARGET)

    moe_weights: dict = {}

    def moe(N, use_fp8):
        from r1serve.kernels.fused_moe import fused_moe_reference
        from r1serve.kernels.fused_moe_fp8 import fused_moe_fp8_reference
        from r1serve.kernels.triton.fused_moe import fused_moe_fp8_triton, fused_moe_triton

        E, K, Hd, I = r1["experts"], r1["top_k"], r1["hidden"], r1["expert_width"]
        block = (32, 32) if smoke else (128, 128)
        if "bf16" not in moe_weights:
            moe_weights["bf16"] = (torch.randn(E, 2 * I, Hd, device=dev, dtype=dtype) / math.sqrt(Hd),
                                   torch.randn(E, Hd, I, device=dev, dtype=dtype) / math.sqrt(I))
        w13, w2 = moe_weights["bf16"]
        x = torch.randn(N, Hd, device=dev, dtype=dtype)
        ids = torch.rand(N, E, device=dev).topk(K, dim=-1).indices
        weights = torch.rand(N, K, device=dev)
        touched = int(ids.unique().numel())
        if use_fp8:
            if "fp8" not in moe_weights:
                moe_weights["fp8"] = quantize_experts(w13, block) + quantize_experts(w2, block)
            q13, s13, q2, s2 = moe_weights["fp8"]
            fn = lambda: fused_moe_fp8_triton(x, q13, s13, q2, s2, weights, ids, block)  # noqa: E731
            want = fused_moe_fp8_reference(x, q13, s13, q2, s2, weights, ids, block)
            weight_bytes, peak = touched * 3 * I * Hd, fp8
        else:
            fn = lambda: fused_moe_triton(x, w13, w2, weights, ids)  # noqa: E731
            want = fused_moe_reference(x, w13, w2, weights, ids)
            weight_bytes, peak = touched * 3 * I * Hd * 2, bf16
        name, shape = "fused_moe_fp8" if use_fp8 else "fused_moe", f"N={N} E={E} top{K} hidden={Hd} I={I}"
        if N <= 64:
            return memory(name, shape, fn(), want, fn, weight_bytes)
        return compute(name, shape, fn(), want, fn, 2 * N * K * 3 * I * Hd, peak, COMPUTE_TARGET)

    M_big = 72 if smoke else 4096
    gemm_shapes = [(M_big, 96, 64), (4, 96, 64)] if smoke else \
        [(M_big, 24576, 1536), (M_big, 7168, 16384), (64, 7168, 16384)]
    checks = [("paged_decode_attention", lambda: gqa_decode(batch, ctx)),
              ("paged_decode_attention", lambda: gqa_decode(1, long_ctx)),
              ("mla_decode_attention", lambda: mla_decode(batch, ctx)),
              ("mla_decode_attention", lambda: mla_decode(1, long_ctx)),
              ("write_latent", cache_writes), ("rotary_kv_write", rotary_kv), ("add_rms_norm", rms_norm),
              ("fp8_act_quant", act_quant)]
    checks += [("fp8_block_gemm", lambda s=s: fp8_gemm(*s)) for s in gemm_shapes]
    checks += [(name, lambda n=n, f=f: moe(n, f)) for f, name in ((False, "fused_moe"), (True, "fused_moe_fp8"))
               for n in (batch, M_big)]
    return [guarded(name, fn) for name, fn in checks if not args.only or args.only in name]


def guarded(name: str, fn: Callable[[], Result]) -> Callable[[], Result]:
    def run() -> Result:
        try:
            return fn()
        except Exception as e:  # one failing kernel must not cost the other figures
            return Result(name, "", error=f"{type(e).__name__}: {e}"[:300])

    return run


def decode_meta(B: int, L: int, bs: int, device: str):
    """Decode metadata for B sequences of L positions, their blocks scattered over the pool."""
    import torch

    from r1serve.kernels.attention_metadata import AttentionMetadata

    per_seq = -(-L // bs)
    num_blocks = B * per_seq + 1
    tables = torch.randperm(num_blocks, device=device)[:B * per_seq].view(B, per_seq)
    slots = tables[:, (L - 1) // bs] * bs + (L - 1) % bs
    return AttentionMetadata.build([1] * B, [L] * B, slots, tables, bs), num_blocks


def quantize_experts(w, block):
    import torch

    from r1serve.kernels.fp8_block import quantize_fp8_block

    pairs = [quantize_fp8_block(w[e], block) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


# ---- end to end ---------------------------------------------------------------------------------


def e2e_rows(args, workdir: Path) -> list[dict]:
    rows = []
    for kind in args.e2e_models.split(","):
        path = random_checkpoint(kind, workdir / kind, args.smoke)
        for conc in [int(c) for c in args.concurrency.split(",")]:
            tokens, speculative = {}, f"r1serve --speculative {'mtp' if kind == 'deepseek' else 'ngram'}"
            for system in ("r1serve", "r1serve --enforce-eager", speculative, "transformers"):
                row = guarded_e2e(system, path, conc, args)
                tokens[system] = row.pop("tokens", None)
                if system == speculative and "error" not in row:
                    # Lossless: greedy output with drafts (n-gram on Llama, MTP on DeepSeek) is plain's.
                    row["same_tokens"] = tokens[system] == tokens["r1serve"]
                rows.append({"model": kind, "system": system, "concurrency": conc, **row})
                print(f"  {kind} {system} concurrency {conc}: {rows[-1]}", flush=True)
    return rows


def random_checkpoint(kind: str, path: Path, smoke: bool) -> Path:
    """A random model: no downloads on the GPU machine. Vocabulary 384 (the test tokenizer)."""
    import torch
    import transformers

    from r1serve.bench.random_checkpoint import DEEPSEEK_V3_BENCH, DEEPSEEK_V3_TINY, VOCAB, write_deepseek_v3, write_tokenizer

    if kind == "deepseek":
        return write_deepseek_v3(path, DEEPSEEK_V3_TINY if smoke else DEEPSEEK_V3_BENCH)  # with an MTP layer
    if kind != "llama":
        raise ValueError(f"unknown e2e model {kind!r}; use llama or deepseek")
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if smoke else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                                   rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, **dims)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return path


def guarded_e2e(system: str, path: Path, conc: int, args) -> dict:
    try:
        return run_e2e(system, path, conc, args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def run_e2e(system: str, path: Path, conc: int, args) -> dict:
    import torch

    prompt_len, n = 32, (8 if args.smoke else args.output_len)
    g = torch.Generator().manual_seed(conc)
    prompts = torch.randint(1, 384, (conc, prompt_len), generator=g)
    speculative = system.split("--speculative ")[1] if "--speculative" in system else None
    run = transformers_runner(path, args.device) if system == "transformers" else \
        r1serve_runner(path, args.device, conc, enforce_eager="--enforce-eager" in system, speculative=speculative)
    run(prompts[:1], 4)  # warm-up: compiles, graph capture already done at load
    t0 = time.perf_counter()
    produced, tokens = run(prompts, n)
    seconds = time.perf_counter() - t0
    assert produced == conc * n, f"{system} produced {produced} tokens, expected {conc * n}"
    del run
    gc.collect()  # the engine and its KV cache go before the next system loads
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"output_tokens": produced, "seconds": seconds, "tok_s": produced / seconds, "tokens": tokens}


def r1serve_runner(path: Path, device: str, conc: int, enforce_eager: bool, speculative: str | None = None):
    from r1serve import LLM, SamplingParams

    # On the CPU (--smoke) the twins: the point there is the script, not the C++ kernels.
    llm = LLM(model=str(path), dtype="bfloat16", device=device, max_num_seqs=max(conc, 1), kv_cache_memory_gib=4,
              max_model_len=1024, enforce_eager=enforce_eager, kernel="auto" if device == "cuda" else "reference",
              speculative=speculative, num_speculative_tokens=2)

    def run(prompts, n: int) -> tuple[int, list[list[int]]]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params)
        tokens = [o.outputs[0].token_ids for o in outs]
        return sum(map(len, tokens)), tokens

    return run


def transformers_runner(path: Path, device: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()

    def run(prompts, n: int) -> tuple[int, list[list[int]]]:
        with torch.inference_mode():
            out = model.generate(prompts.to(device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, attention_mask=torch.ones_like(prompts, device=device))
        new = out[:, prompts.shape[1]:]
        return new.numel(), new.tolist()

    return run


# ---- report ---------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_kernel_table(results: list[Result]) -> str:
    head = ["kernel", "shape", "err vs twin", "ok", "time us", "achieved", "of peak", "target"]
    rows = [head]
    for r in results:
        if r.error:
            rows.append([r.kernel, r.shape, "-", "ERROR", "-", r.error[:60], "-", "-"])
            continue
        met = "" if r.target is None or r.fraction is None else (" met" if r.fraction >= r.target else " MISSED")
        rows.append([r.kernel, r.shape, _num(r.max_err, ".1e"), "yes" if r.ok else "NO", _num(r.time_us, ".1f"),
                     f"{_num(r.achieved, '.1f')} {r.unit}", _num(r.fraction and 100 * r.fraction, ".0f") + "%",
                     (f"{100 * r.target:.0f}%" + met) if r.target else "-"])
    return _table(rows)


def format_e2e_table(rows: list[dict]) -> str:
    out = [["model", "system", "concurrency", "tok/s", "vs transformers", "same tokens as r1serve"]]
    base = {(r["model"], r["concurrency"]): r.get("tok_s") for r in rows if r["system"] == "transformers"}
    for r in rows:
        ref = base.get((r["model"], r["concurrency"]))
        ratio = f"{r['tok_s'] / ref:.2f}x" if r.get("tok_s") and ref else "-"
        same = {True: "yes", False: "NO"}.get(r.get("same_tokens"), "")
        out.append([r["model"], r["system"], str(r["concurrency"]),
                    _num(r.get("tok_s"), ".1f") if "error" not in r else "ERROR " + r["error"][:50], ratio, same])
    return _table(out)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, " \
               f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, TRITON_INTERPRET=1"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels decorate for the interpreter
    sections = args.sections.split(",")
    report = Report(device=describe_device(args.device), command=" ".join(["python", *sys.argv]))
    print(report.device, flush=True)
    start = time.perf_counter()
    if "peaks" in sections or "kernels" in sections:
        report.peaks = measure_peaks(args.device, args.smoke)
        report.seconds["peaks"] = time.perf_counter() - start
        print(json.dumps(report.peaks), flush=True)
        report.write(args.out)
    if "kernels" in sections:
        for check in kernel_checks(args, report.peaks):
            r = check()
            report.kernels.append(r)
            report.write(args.out)
            print(f"  {r.kernel} {r.shape}: " + (r.error or f"err {r.max_err:.1e}, {r.achieved:.1f} {r.unit}"),
                  flush=True)
        report.seconds["kernels"] = time.perf_counter() - start
        print("\n" + format_kernel_table(report.kernels), flush=True)
    if "e2e" in sections:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report.e2e = e2e_rows(args, Path(tmp))
        report.seconds["e2e"] = time.perf_counter() - start
        report.write(args.out)
        print("\n" + format_e2e_table(report.e2e), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s; JSON in {args.out}")
    failed = [r for r in report.kernels if r.error or r.ok is False] + [r for r in report.e2e if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

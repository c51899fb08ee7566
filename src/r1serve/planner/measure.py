"""`r1serve hw measure`: how close the local engine runs to this device's limits.

The limits are measured on the spot, not looked up: a read of a buffer too big for any
cache (memory bandwidth), a read of a buffer the size of the weights one decode step
reads (the ceiling for that working set, which on a CPU with a large last-level cache may
be the cache's bandwidth, not DRAM's), and a large matmul in the engine's dtype (FLOP/s).
Then the engine prefills a batch of prompts in one step and decodes them together, and
each phase's bytes and FLOPs per step, divided by its measured step time, are set against
those limits. Bytes are the weights each step actually reads (the quantized copy a small
batch uses, not the bf16 master; only the looked-up rows of the embedding) plus the KV
cache; FLOPs are the matmuls and attention of the model's shape.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r1serve.planner.model import shape_from_config

MIB = 2**20


@dataclass(frozen=True)
class Peaks:
    device: str
    dtype: str  # the matmul's, the engine's
    memory_read: float  # bytes/s over a buffer no cache holds
    memory_buffer_bytes: int
    working_set_read: float  # bytes/s over a buffer the size of a decode step's weights
    working_set_bytes: int
    matmul_flops: float


@dataclass(frozen=True)
class PhaseMeasure:
    phase: str
    steps: int
    tokens_per_step: int
    seconds_per_step: float  # median
    bytes_per_step: float
    flops_per_step: float

    @property
    def bandwidth(self) -> float:
        return self.bytes_per_step / self.seconds_per_step

    @property
    def flops(self) -> float:
        return self.flops_per_step / self.seconds_per_step


@dataclass(frozen=True)
class Measurement:
    model: str
    peaks: Peaks
    prefill: PhaseMeasure
    decode: PhaseMeasure

    def fractions(self) -> dict[str, float]:
        p = self.peaks
        return {"decode_bandwidth_fraction": self.decode.bandwidth / p.working_set_read,
                "decode_flops_fraction": self.decode.flops / p.matmul_flops,
                "prefill_bandwidth_fraction": self.prefill.bandwidth / p.working_set_read,
                "prefill_flops_fraction": self.prefill.flops / p.matmul_flops}

    def as_dict(self) -> dict:
        return {"model": self.model, "peaks": dataclasses.asdict(self.peaks),
                "prefill": dataclasses.asdict(self.prefill) | _rates(self.prefill),
                "decode": dataclasses.asdict(self.decode) | _rates(self.decode)} | self.fractions()


def _rates(p: PhaseMeasure) -> dict:
    return {"bytes_per_s": p.bandwidth, "flops_per_s": p.flops}


# ---- microbenchmarks ------------------------------------------------------------------------

def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    buf = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    return buf.numel() * 4 / best_seconds(buf.sum, device, repeats)


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """The faster of x @ w and F.linear (which oneDNN serves from its own layout) at n x n x n."""
    n = n or (8192 if device.type == "cuda" else 1536)
    x = torch.randn(n, n, dtype=dtype, device=device)
    w = torch.randn(n, n, dtype=dtype, device=device)
    seconds = min(best_seconds(lambda: x @ w, device, repeats),
                  best_seconds(lambda: torch.nn.functional.linear(x, w), device, repeats))
    return 2 * n**3 / seconds


def uncached_bytes(device: torch.device) -> int:
    """A buffer 4x the last-level cache (CPU) or 1 GiB (accelerators, whose L2 is far smaller)."""
    if device.type != "cpu":
        return 1024 * MIB
    return max(256 * MIB, min(4 * _llc_bytes(), 2048 * MIB))


def _llc_bytes() -> int:
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    sizes = [_parse_size(p.read_text().strip()) for p in caches]
    return max(sizes, default=64 * MIB)


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


# ---- what a step reads and computes ---------------------------------------------------------

def tensor_bytes(obj) -> int:
    """Bytes of a tensor, or of the tensors in a dataclass (a packed quantized weight)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def weight_bytes_read(model: nn.Module, rows: int) -> int:
    """Weight bytes a forward over `rows` tokens reads: every linear's weight in the form it
    is kept (packed quantized, packed bf16 or dense); for embeddings the rows looked up."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            width = (module.weight.element_size() * module.embedding_dim if module.weight is not None
                     else module.table.nbytes / module.table.out_features)
            total += int(min(rows, module.num_embeddings) * width)
        elif hasattr(module, "quantized"):  # the CPU's linear (platforms/cpu/linear.py)
            weight = module.quantized if module.quantized is not None else \
                module.packed if module.packed is not None else module.weight
            total += tensor_bytes(weight) + tensor_bytes(module.bias)
        else:
            total += sum(tensor_bytes(p) for p in module.parameters(recurse=False))
    return total


def matmul_flops_per_token(shape) -> float:
    """Linear layers without the LM head (it runs only on sampled rows)."""
    m = shape
    return 2 * (m.num_layers * m.attn_params + m.dense_layers * m.dense_mlp_params
                + m.moe_layers * (m.shared_params + m.top_k * m.expert_params))


# ---- the engine run -------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasureConfig:
    batch: int = 4  # sequences, prefilled in one step, then decoded together
    prompt_len: int = 128
    decode_steps: int = 24
    prefill_rounds: int = 2


def measure(model: str, config: MeasureConfig = MeasureConfig(), *, dtype: str = "auto", device: str = "auto",
            cache_dir=None, num_threads: int | None = None, log=None) -> Measurement:
    from r1serve import LLM

    say = log or (lambda _msg: None)
    say(f"loading {model}")
    llm = LLM(model, dtype=dtype, cache_dir=cache_dir, device=device, num_threads=num_threads,
              kv_cache_memory_gib=0.25, enable_prefix_caching=False, max_num_seqs=config.batch,
              max_num_batched_tokens=max(config.batch * config.prompt_len, 16))
    engine = llm.engine
    dev, model_dtype = engine.platform.device, engine.loaded.dtype
    run_prompts(engine, config, "warm-up", steps=2)  # kernels compiled and caches warm before timing
    say("prefill and decode")
    # On a shared machine a step can stall behind other tenants: the best of a few prefills,
    # the median of many decode steps.
    rounds = [run_prompts(engine, config, f"measure-{i}", steps=1) for i in range(config.prefill_rounds - 1)]
    rounds.append(run_prompts(engine, config, "measure-decode", steps=config.decode_steps))
    prefill_s, decode_s = min(r[0] for r in rounds), rounds[-1][1]
    shape = shape_from_config(model, engine.loaded.arch.raw)
    step_weights = weight_bytes_read(engine.loaded.model, config.batch)
    say("microbenchmarks")
    peaks = Peaks(engine.platform.name, str(model_dtype).removeprefix("torch."),
                  read_bandwidth(uncached_bytes(dev), dev), uncached_bytes(dev),
                  read_bandwidth(step_weights, dev), step_weights, matmul_flops(model_dtype, dev))
    return Measurement(model, peaks, prefill_phase(engine, shape, config, prefill_s),
                       decode_phase(engine, shape, config, decode_s, step_weights))


def run_prompts(engine, config: MeasureConfig, tag: str, steps: int) -> tuple[float, list[float]]:
    """Prefill config.batch prompts in one step, then decode them `steps` times; the step times."""
    from r1serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    vocab = engine.loaded.arch.vocab_size
    for i in range(config.batch):  # distinct prompts: nothing shared, nothing cached
        ids = [(7 + 31 * i + 13 * j) % (vocab - 1) + 1 for j in range(config.prompt_len)]
        engine.add_request(f"{tag}-{i}", ids, params)
    try:
        prefill = _timed_step(engine)
        decode = [_timed_step(engine) for _ in range(steps)]
    finally:
        engine.abort_all()
    return prefill, decode


def _timed_step(engine) -> float:
    t = time.perf_counter()
    engine.step()  # returns after sampling, which waits for the device
    return time.perf_counter() - t


def prefill_phase(engine, shape, config: MeasureConfig, seconds: float) -> PhaseMeasure:
    tokens = config.batch * config.prompt_len
    P = config.prompt_len
    attention = config.batch * P * (P + 1) / 2 * shape.prefill_flops_per_ctx * shape.num_layers
    flops = tokens * matmul_flops_per_token(shape) + attention + 2 * config.batch * shape.embed_params
    traffic = weight_bytes_read(engine.loaded.model, tokens) + tokens * engine.kv_bytes_per_token
    return PhaseMeasure("prefill", 1, tokens, seconds, traffic, flops)


def decode_phase(engine, shape, config: MeasureConfig, seconds: list[float], step_weights: int) -> PhaseMeasure:
    B = config.batch
    context = config.prompt_len + 1 + len(seconds) / 2  # mean KV length over the timed steps
    attention = B * context * shape.decode_flops_per_ctx * shape.num_layers
    flops = B * matmul_flops_per_token(shape) + attention + 2 * B * shape.embed_params
    traffic = step_weights + B * context * engine.kv_bytes_per_token
    return PhaseMeasure("decode", len(seconds), B, statistics.median(seconds), traffic, flops)


def measurement_text(m: Measurement) -> str:
    p = m.peaks
    head = [f"{m.model} on {p.device}, {p.dtype}",
            f"peaks measured now: memory read {p.memory_read / 1e9:.1f} GB/s over "
            f"{p.memory_buffer_bytes / MIB:.0f} MiB, {p.working_set_read / 1e9:.1f} GB/s over "
            f"{p.working_set_bytes / MIB:.1f} MiB (what a decode step reads); "
            f"{p.dtype} matmul {p.matmul_flops / 1e12:.3f} TFLOPS"]
    return "\n".join(head + [_phase_line(ph, m.fractions()) for ph in (m.decode, m.prefill)])


def _phase_line(ph: PhaseMeasure, fractions: dict[str, float]) -> str:
    what = f"batch {ph.tokens_per_step}, {ph.steps} steps" if ph.phase == "decode" else f"{ph.tokens_per_step} tokens"
    bw, fl = fractions[ph.phase + "_bandwidth_fraction"], fractions[ph.phase + "_flops_fraction"]
    return (f"{ph.phase:7s} {what}: {ph.seconds_per_step * 1e3:.1f} ms/step, {ph.bytes_per_step / MIB:.1f} MiB and "
            f"{ph.flops_per_step / 1e9:.2f} GFLOP per step -> {ph.bandwidth / 1e9:.1f} GB/s = {100 * bw:.0f}% of "
            f"the read peak, {ph.flops / 1e12:.3f} TFLOPS = {100 * fl:.0f}% of the matmul peak")

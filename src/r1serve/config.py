"""Engine configuration: frozen data, validated once, passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1serve.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("auto", "int4", "int8", "none")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. Built by `LLM(...)` or the CLI."""

    model: str
    cache_dir: Path
    dtype: str = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | a platform plugin's name (platforms/__init__.py)
    max_model_len: int | None = None  # None: the checkpoint's own limit, capped by the KV cache
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0  # KV cache size when num_kv_blocks is not given
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kernel: str = "auto"  # "auto": the platform's kernels; "reference": the plain-torch twins
    # How weights are held (platforms/cpu/weight_plan.py on the CPU). "auto": a GGUF's
    # quantized matrices in their own block form (Q4_K, Q6_K, Q8_0, ...: packed as read,
    # exact, one copy) and float matrices in the model's dtype, except where dtype auto made a
    # 16-bit checkpoint float32 on a CPU without native bf16 (int8 groups then, not float32
    # copies at twice the bytes). "int4" / "int8": float matrices quantized once at load into
    # groups of 32 (a GGUF's quantized ones stay as stored). "none": every weight dense in the
    # model's dtype, dequantized where the file is quantized (the exact path, at float's size).
    quantization: str = "auto"  # "auto" | "int4" | "int8" | "none"
    # The vector ISA of the CPU kernels (kernels/cpu_isa.py): "auto" is the CPU's best;
    # "avx2" or "scalar" on an AVX512 CPU measures what those CPUs would run.
    cpu_isa: str = "auto"  # "auto" | "avx512" | "avx2" | "neon" | "scalar"
    # The paged KV cache's dtype. "auto": the activations', except under float32 activations
    # whose linears already round them to int8 (a quantized checkpoint on a CPU without native
    # bf16), where it is bf16: half the bytes an attention step streams and the cache holds,
    # as llama.cpp keeps a 16-bit cache by default. A narrower cache than the activations is
    # a CPU feature (its kernels widen rows as they read them); elsewhere it must match.
    kv_cache_dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    num_threads: int | None = None
    # CUDA: replay captured graphs for decode batches (engine/cuda_graph_runner.py) unless set.
    enforce_eager: bool = False
    seed: int = 0  # seeds the per-request generators of requests that bring no seed of their own
    # One model over several ranks (distributed/): heads, MLP columns and the vocabulary split
    # across tensor_parallel_size ranks; with expert_parallel, DeepSeekMoE's routed experts
    # split whole across them instead of by columns. "mp": ranks are processes of this node;
    # "ray": actors of a Ray cluster the user runs (distributed/ray_executor.py).
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    # Engine replicas of tensor_parallel_size ranks each, requests balanced across them
    # (engine/data_parallel.py).
    data_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # "mp" | "ray"
    # How long a collective waits for the other ranks before the engine takes one for dead.
    distributed_timeout_s: float = 300.0
    # Speculative decoding (engine/drafter.py): "ngram" drafts from the request's own tokens
    # (prompt lookup), "mtp" from the checkpoint's multi-token-prediction layer (DeepSeek-V3/R1);
    # the target model verifies every draft in the next step, losslessly.
    speculative: str | None = None  # None | "ngram" | "mtp"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4  # n-gram lengths tried, longest first
    prompt_lookup_min: int = 2
    # The most rows a decode step holds, drafts included. Within it, drafts are chosen by the
    # step costs the engine measures (engine/speculation.py): past a few sequences they cost
    # more than they save, and none are made (docs/speculative.md).
    speculative_max_rows: int = 16

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype={self.dtype!r} is not supported; use one of {DTYPES}")
        _require(bool(self.device) and self.device.isidentifier(),
                 f"device={self.device!r} must be auto, cpu, cuda or a platform plugin's name")
        _require(self.block_size in (8, 16, 32, 64, 128), f"block_size={self.block_size} must be one of 8, 16, 32, 64, 128")
        _require(self.max_num_seqs >= 1, f"max_num_seqs={self.max_num_seqs} must be >= 1")
        _require(self.max_num_batched_tokens >= self.block_size,
                 f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= block_size ({self.block_size})")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 2, f"num_kv_blocks={self.num_kv_blocks} must be >= 2")
        _require(self.kv_cache_memory_gib > 0, f"kv_cache_memory_gib={self.kv_cache_memory_gib} must be > 0")
        _require(self.max_model_len is None or self.max_model_len >= 2, f"max_model_len={self.max_model_len} must be >= 2")
        _require(self.kernel in ("auto", "reference"), f"kernel={self.kernel!r} must be 'auto' or 'reference'")
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization={self.quantization!r} must be one of {', '.join(QUANTIZATIONS)}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype={self.kv_cache_dtype!r} must be one of {', '.join(KV_CACHE_DTYPES)}")
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        _require(self.data_parallel_size >= 1, f"data_parallel_size={self.data_parallel_size} must be >= 1")
        _require(not self.expert_parallel or self.tensor_parallel_size > 1 or self.data_parallel_size > 1,
                 "expert_parallel splits the experts across ranks: a replica's tensor-parallel ranks "
                 "(tensor_parallel_size > 1), or the data-parallel replicas themselves (data_parallel_size > 1 "
                 "with tensor_parallel_size 1: DP attention)")
        _require(self.distributed_executor_backend in ("mp", "ray"),
                 f"distributed_executor_backend={self.distributed_executor_backend!r} must be 'mp' or 'ray'")
        _require(self.distributed_timeout_s > 0, f"distributed_timeout_s={self.distributed_timeout_s} must be > 0")
        _require(self.cpu_isa in ("auto", "avx512", "avx2", "neon", "scalar"),
                 f"cpu_isa={self.cpu_isa!r} must be auto, avx512, avx2, neon or scalar")
        _require(self.speculative in (None, "ngram", "mtp"),
                 f"speculative={self.speculative!r} must be None, 'ngram' or 'mtp'")
        _require(self.num_speculative_tokens >= 1,
                 f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        _require(1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
                 f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max={self.prompt_lookup_max} "
                 "need 1 <= min <= max")
        _require(self.speculative != "mtp" or (self.tensor_parallel_size == 1 and self.data_parallel_size == 1),
                 "speculative='mtp' runs on one rank for now (tensor_parallel_size and data_parallel_size 1): the MTP "
                 "layer's MoE would need its own collectives; speculative='ngram' works with any layout")
        _require(self.speculative_max_rows >= 2, f"speculative_max_rows={self.speculative_max_rows} must be >= 2")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)

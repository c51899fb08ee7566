"""Engine configuration: frozen data, validated once, passed explicitly."""
from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from r1serve.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("auto", "int4", "int8", "none")
CPU_ISAS = ("auto", "avx512", "avx2", "neon", "scalar")


def option(default: Any, help: str, *names: str, choices: tuple | None = None) -> Any:
    """A field that is also an engine flag of the CLI (cli/engine_flags.py builds them): its
    help, and its names where they are not --the-field-name. A bool field is a switch that
    turns its default around."""
    return field(default=default, metadata={"help": help, "names": names, "choices": choices})


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. Built by `LLM(...)` or the CLI."""

    model: str
    cache_dir: Path
    dtype: str = option("auto", "activations and float weights (auto: the checkpoint's; a 16-bit one in the "
                                "device's preferred half precision)", choices=DTYPES)
    device: str = option("auto", "auto, cpu, cuda or an installed platform plugin's name")  # platforms/__init__.py
    max_model_len: int | None = option(None, "longest prompt + output per request (default: the model's context, "
                                             "within the KV cache)")
    block_size: int = 16
    kv_cache_memory_gib: float = option(1.0, "GiB for the KV cache (when num_kv_blocks is not given)",
                                        "--kv-cache-memory")
    num_kv_blocks: int | None = None
    max_num_seqs: int = option(64, "requests running at once (one batch)")
    max_num_batched_tokens: int = option(1024, "tokens one step computes: long prompts are prefilled in chunks "
                                               "of this")
    enable_prefix_caching: bool = option(True, "do not reuse the KV of prompt prefixes seen before",
                                         "--no-prefix-caching")
    enable_chunked_prefill: bool = True
    kernel: str = option("auto", "'reference' runs the plain-torch twins of every kernel",
                         choices=("auto", "reference"))
    # On the CPU, platforms/cpu/weight_plan.py. auto keeps a GGUF's quantized matrices packed
    # as read (exact, one copy), except where dtype auto made a 16-bit checkpoint float32 on a
    # CPU without native bf16 (int8 groups then, not float32 copies at twice the bytes).
    quantization: str = option(
        "auto", "how weights are held on the CPU. auto: a GGUF's quantized matrices in their own block form "
                "(Q4_K, Q6_K, Q8_0, ...), float ones in the model's dtype; int4/int8: float matrices quantized "
                "once at load into groups of 32; none: every weight dense (dequantized), the exact path",
        "--quantization", "-q", choices=QUANTIZATIONS)
    cpu_isa: str = option("auto", "vector ISA of the CPU kernels (auto: the CPU's best; a lower one measures what "
                                  "such CPUs run)", choices=CPU_ISAS)
    # A narrower cache than the activations is a CPU feature (its kernels widen rows as they
    # read them), as llama.cpp keeps a 16-bit cache by default; elsewhere it must match.
    kv_cache_dtype: str = option("auto", "the KV cache's dtype (auto: the activations', bf16 under float32 ones "
                                         "that the quantized linears already round, on a CPU without native bf16)",
                                 choices=KV_CACHE_DTYPES)
    num_threads: int | None = option(None, "CPU threads (default: all cores, shared among the ranks)", "--threads")
    enforce_eager: bool = option(False, "CUDA: run decode steps eagerly, no CUDA graphs")  # engine/cuda_graph_runner.py
    seed: int = 0  # seeds the per-request generators of requests that bring no seed of their own
    # One model over several ranks (executor/, parallel/): "mp" ranks are processes of this
    # node (executor/multiproc_executor.py), "ray" actors of a Ray cluster the user runs.
    tensor_parallel_size: int = option(1, "ranks one model is split across (heads, MLP columns, vocabulary)",
                                       "--tensor-parallel-size", "-tp")
    expert_parallel: bool = option(False, "DeepSeekMoE: split the routed experts whole across the tensor-parallel "
                                          "ranks (or, with tensor parallelism 1, the data-parallel replicas)")
    data_parallel_size: int = option(1, "engine replicas, each of --tensor-parallel-size ranks, with requests "
                                        "balanced across them",
                                     "--data-parallel-size", "-dp")
    distributed_executor_backend: str = option(
        "mp", "mp: ranks are processes of this node; ray: actors of the Ray cluster that `ray start` made "
              "(RAY_ADDRESS), across its nodes", choices=("mp", "ray"))
    # How long a collective waits for the other ranks before the engine takes one for dead.
    distributed_timeout_s: float = 300.0
    # The target model verifies every draft in the next step, losslessly (engine/drafter.py).
    speculative: str | None = option(
        None, "speculative decoding: ngram drafts from the prompt and output so far; mtp from the checkpoint's "
              "multi-token-prediction layer (DeepSeek-V3/R1). Lossless either way", choices=("ngram", "mtp"))
    num_speculative_tokens: int = option(4, "draft tokens per step (mtp: 1 or 2 suit R1)")
    prompt_lookup_max: int = option(4, "ngram: longest n-gram matched")
    prompt_lookup_min: int = option(2, "ngram: shortest n-gram matched")
    # Past a few sequences drafts cost more than they save, and the measured step costs
    # (engine/speculation.py) make none (docs/speculative.md).
    speculative_max_rows: int = option(16, "most rows a decode step holds, drafts included (within it drafts "
                                           "follow measured step costs)")

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
        _require(self.cpu_isa in CPU_ISAS, f"cpu_isa={self.cpu_isa!r} must be one of {', '.join(CPU_ISAS)}")
        _require(self.speculative in (None, "ngram", "mtp"),
                 f"speculative={self.speculative!r} must be None, 'ngram' or 'mtp'")
        _require(self.num_speculative_tokens >= 1,
                 f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        _require(1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
                 f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max={self.prompt_lookup_max} "
                 "need 1 <= min <= max")
        dp_attention = self.expert_parallel and self.tensor_parallel_size == 1 and self.data_parallel_size > 1
        _require(self.speculative != "mtp" or not dp_attention,
                 "speculative='mtp' does not run under DP attention yet (expert_parallel over data-parallel replicas "
                 "of one rank): the MTP layer's MoE would need the replicas to draft in lockstep; use "
                 "tensor_parallel_size > 1 with expert_parallel, or speculative='ngram'")
        _require(self.speculative_max_rows >= 2, f"speculative_max_rows={self.speculative_max_rows} must be >= 2")


def flag_fields() -> list[Field]:
    """The EngineConfig fields the CLI offers as engine flags (those made with option)."""
    return [f for f in fields(EngineConfig) if "help" in f.metadata]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)

"""The `r1serve bench` subcommands' flags, kept apart from the code they drive: building
the CLI's parser must import nothing heavy (no torch, no HTTP client, no load generator),
so `r1serve --help` is instant and the first command a user runs cannot fail on them."""
from __future__ import annotations

import argparse


def add_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", default="1,32", help="comma-separated numbers of concurrent sequences")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all cells")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="r1serve's dtype (auto: the engine's choice for this machine)")
    p.add_argument("--peer-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="transformers' dtype (auto: each candidate timed on this machine, the fastest kept)")
    p.add_argument("--systems", default="r1serve,transformers",
                   help="r1serve (offline engine), transformers, http (a real `r1serve serve`, streaming clients), "
                        "llama-server (any running OpenAI-compatible server: --llama-server-url)")
    p.add_argument("--llama-server-url", default=None,
                   help="API root of the llama-server system, e.g. http://127.0.0.1:8080/v1 (llama.cpp's "
                        "`llama-server -m FILE.gguf -np 32 -c 16384`, same GGUF file)")
    p.add_argument("--cpu-isa", default="auto", choices=["auto", "avx512", "avx2", "neon", "scalar"],
                   help="r1serve's CPU kernel ISA (a lower one than the CPU's measures what such CPUs run; "
                        "set ATEN_CPU_CAPABILITY for torch and the transformers peer alike)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="r1serve's ranks (on one node: each gets its share of the cores)")
    p.add_argument("--expert-parallel", action="store_true", help="r1serve: DeepSeekMoE experts split across the ranks")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="r1serve's engine replicas")
    p.add_argument("--speculative", default=None, choices=["ngram", "mtp"],
                   help="r1serve's speculative decoding (its acceptance is reported per cell)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="r1serve's draft tokens per step")
    p.add_argument("--llama-server-pid", type=int, default=None,
                   help="its process id, to read its peak memory from /proc (optional)")
    p.add_argument("--baseline", default="transformers", help="the system ratios are taken against")
    p.add_argument("--out", default="results/bench_offline.json")
    p.add_argument("--interleave", action="store_true",
                   help="load every system once per concurrency and alternate their timed runs (paired "
                        "runs seconds apart); in-process systems then share one process's peak memory")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--speculative", default="ngram", choices=["ngram", "mtp"])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--workloads", default="quote,chat", help="quote (repeat a passage), chat (an essay)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of concurrent requests")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all cells")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--cpu-isa", default="auto", choices=["auto", "avx512", "avx2", "neon", "scalar"])
    p.add_argument("--draft-sweep", default="1,2,4,7,15",
                   help="draft lengths k to time a one-sequence verification step at (against k = 0)")
    p.add_argument("--out", default="results/bench_speculative.json")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API root")
    p.add_argument("--model", default=None, help="the model name the server knows (default: its first, "
                                                  "from GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer (default: none)")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop levels, comma-separated")
    p.add_argument("--request-rate", default=None, help="open-loop Poisson rates in requests/s, comma-separated "
                                                          "(replaces --concurrency)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per level")
    p.add_argument("--input-len", type=int, default=256,
                   help="prompt tokens (random dataset: sent to /v1/completions, exact with --tokenizer)")
    p.add_argument("--same-prompts", action="store_true",
                   help="replay one prompt set at every level (later levels then hit the prefix cache); "
                        "by default each level gets fresh prompts")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds a level may run: no request starts after it (those running finish)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--dataset", default="random", help="random, chat, or a .jsonl file")
    p.add_argument("--tokenizer", default=None, help="for prompt lengths and for counting tokens when the server "
                                                      "gives no usage: a catalog name, .gguf or HF directory")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens (vLLM/r1serve)")
    p.add_argument("--slo-ttft", default=None, help="e.g. 2s or 500ms: goodput counts requests within it")
    p.add_argument("--slo-tpot", default=None, help="e.g. 100ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="directory for bench_serve.json and bench_serve.png")


def add_random_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["deepseek-v3", "deepseek-v3-tiny"])
    p.add_argument("out", help="directory to write")


def add_vs_llama_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf file (both servers load it)")
    p.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each starts both servers afresh")
    p.add_argument("--context", type=int, default=16384, help="KV cache tokens of each server")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                   help="comma-separated concurrent decode streams")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens each decode stream generates")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="about this many tokens in the prefill prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for vs_llama_server.json")
    p.add_argument("--r1serve-args", nargs=argparse.REMAINDER, default=[],
                   help="further `r1serve serve` flags (last on the line), e.g. --r1serve-args --cpu-isa avx2")

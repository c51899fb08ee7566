"""The engine's host-side time per token as the output grows (one stream, a tiny model).

    python -m r1serve.bench.host_overhead [--positions 1024,16384] [--window 256] [--with-model]

Everything a decode step does outside the model (scheduling, block tables, sampling,
detokenizing, reasoning and stop checks, building the output) should cost the same at
output position 16,384 as at 1,024: R1's answers run to 8k-32k tokens, and per-token work
that grows with the output is quadratic over one. One request of random tokens (as
sampling from a random model gives: the detokenizer sees invalid UTF-8 too), ignore_eos,
delta outputs and a stop string, as the server streams them; each step's time minus the
time inside the model is its host time, and the table gives the median over a window of
steps around each position and the ratio to the first.

By default the model is left out: the runner prepares the step's tensors as always, and
then logits come from a seeded generator instead of a forward. With --with-model a random
Llama runs; its attention streams a context that grows to 8 MB, which evicts the host
code's working set from the caches and makes every host function ~2x slower at 16k
(constant-size ones too): a cost of the machine, not of the host code.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from r1serve import LLM, SamplingParams
from r1serve.bench.random_checkpoint import write_llama
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model

FLAGS_SHOWN = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "asimd", "asimddp"}
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class LogitsOnly:
    """Stands in for the model: each sampled row gets random logits (seeded), no forward."""

    def __init__(self, model, seed: int = 0) -> None:
        self.model, self.seconds = model, 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.hidden, self.vocab = model.arch.hidden_size, model.arch.vocab_size

    def __call__(self, input_ids, positions, kv_caches, meta):
        return torch.zeros(input_ids.shape[0], self.hidden)

    def compute_logits(self, hidden):
        return torch.randn(hidden.shape[0], self.vocab, generator=self.generator)

    def __getattr__(self, name):
        return getattr(self.model, name)


class TimedModel:
    """The model as the runner calls it, with the time spent inside added up."""

    def __init__(self, model) -> None:
        self.model, self.seconds = model, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.model(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def compute_logits(self, hidden):
        t0 = time.perf_counter()
        try:
            return self.model.compute_logits(hidden)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.model, name)


def host_times(llm: LLM, tokens: int, with_model: bool = False, request_id: str = "long") -> list[float]:
    """Host seconds of each decode step of one greedy request of `tokens` output tokens."""
    engine = llm.engine
    model = engine.runner.model
    while isinstance(model, (TimedModel, LogitsOnly)):  # a previous round's wrappers
        model = model.model
    model = model if with_model else LogitsOnly(model)
    timed = engine.runner.model = TimedModel(model)
    # delta outputs, as the server streams them; a stop string makes the detokenizer hold text back
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, stop=["\x00never"],
                            output_kind="delta")
    engine.add_request(request_id, {"prompt_token_ids": [5, 17, 42, 99]}, params)
    times = []
    while engine.has_unfinished_requests():
        inside, t0 = timed.seconds, time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0 - (timed.seconds - inside))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", default="1024,16384")
    p.add_argument("--window", type=int, default=256, help="steps around each position")
    p.add_argument("--with-model", action="store_true", help="run a random Llama's forward too")
    p.add_argument("--rounds", type=int, default=3, help="requests one after another; the ratio is their median")
    args = p.parse_args()
    positions = [int(x) for x in args.positions.split(",")]
    tokens = max(positions) + args.window
    with tempfile.TemporaryDirectory() as d:
        path = write_llama(Path(d) / "llama", SIZES, max_position_embeddings=tokens + 64)
        # One thread: OpenMP workers spinning after the attention kernel would slow the host code
        # beside them on a small machine, which is not the host code's own cost.
        llm = LLM(str(path), block_size=16, num_kv_blocks=tokens // 16 + 8, max_model_len=tokens + 64, num_threads=1)
        rounds = [window_medians(host_times(llm, tokens, args.with_model, f"r{r}"), positions, args.window)
                  for r in range(args.rounds)]
    print(f"CPU: {cpu_model()}; flags: {' '.join(sorted(cpu_flags() & FLAGS_SHOWN))}")
    for i, pos in enumerate(positions):
        us = statistics.median(r[i] for r in rounds) * 1e6
        ratio = statistics.median(r[i] / r[0] for r in rounds)
        print(f"output position {pos:6d}: host time per token {us:7.1f} us, x{ratio:.3f} of position {positions[0]} "
              f"(medians over {args.window} steps and {args.rounds} rounds)")


def window_medians(times: list[float], positions: list[int], window: int) -> list[float]:
    return [statistics.median(times[max(0, pos - window // 2):pos + window // 2]) for pos in positions]


if __name__ == "__main__":
    main()

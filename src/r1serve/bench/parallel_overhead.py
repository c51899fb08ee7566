"""What tensor parallelism costs per step: a tiny model (its compute negligible) decoded on one
rank and on two, in interleaved rounds, with rank 0's time in the plan broadcast counted apart.

    python -m r1serve.bench.parallel_overhead [--arch llama|deepseek_v3] [--expert-parallel]
                                              [--concurrency 1,32] [--rounds 5]

On one node the ranks talk over gloo on loopback: each step rank 0 broadcasts the step's
inputs (StepBroadcast: one pickled StepInputs), then every layer all-reduces twice (after
o_proj and down_proj), the embedding once, and the logits gather to rank 0. The difference
between the two step times is that cost, plus the wait for the slower rank; every rank
runs one thread (--threads), so the cores are not what differs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from r1serve import LLM, SamplingParams
from r1serve.bench.host_overhead import FLAGS_SHOWN
from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3, write_llama
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class TimedSend:
    """Rank 0's StepBroadcast.send, with its time added up."""

    def __init__(self, send) -> None:
        self.send, self.seconds, self.calls = send, 0.0, 0

    def __call__(self, inputs) -> None:
        t0 = time.perf_counter()
        self.send(inputs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1


def decode_run(llm: LLM, concurrency: int, steps: int) -> float:
    """Seconds per decode step (the prefill step left out)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = [f"request {i}: the quick brown fox" for i in range(concurrency)]
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    return (time.perf_counter() - t0 - prefill) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama", choices=["llama", "deepseek_v3"])
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--expert-parallel", action="store_true", help="deepseek_v3: two ranks split the experts")
    ap.add_argument("--threads", type=int, default=1, help="per rank")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.arch
        if args.arch == "llama":
            write_llama(path, LLAMA)
        else:
            write_deepseek_v3(path, DEEPSEEK_V3_TINY)
        # One tensor-parallel engine per process (torch.distributed's one default group).
        layouts = {"tp1": {}, "ep2" if args.expert_parallel else "tp2":
                   dict(tensor_parallel_size=2, expert_parallel=args.expert_parallel)}
        common = dict(dtype="float32", max_model_len=512, kv_cache_memory_gib=0.05, num_threads=args.threads)
        llms = {name: LLM(str(path), **common, **kw) for name, kw in layouts.items()}
        sends = {}
        for name, llm in llms.items():
            if llm.engine.runner.ranks is not None:
                sends[name] = llm.engine.runner.ranks.send = TimedSend(llm.engine.runner.ranks.send)
        rows = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            for llm in llms.values():
                decode_run(llm, conc, 4)  # warm-up
            per_round: dict[str, list[float]] = {name: [] for name in llms}
            bcast: dict[str, list[float]] = {name: [] for name in sends}
            for r in range(args.rounds):
                for name in (list(llms) if r % 2 == 0 else list(llms)[::-1]):
                    if name in sends:
                        sends[name].seconds, sends[name].calls = 0.0, 0
                    per_round[name].append(decode_run(llms[name], conc, args.steps))
                    if name in sends:
                        bcast[name].append(sends[name].seconds / sends[name].calls)
            base = statistics.median(per_round["tp1"])
            for name, times in per_round.items():
                step = statistics.median(times)
                extra = statistics.median(t - b for t, b in zip(times, per_round["tp1"]))
                rows.append({"arch": args.arch, "layout": name, "concurrency": conc, "step_ms": step * 1e3,
                             "steps_ms": [t * 1e3 for t in times],
                             "overhead_ms": extra * 1e3, "ratio": step / base,
                             "broadcast_ms": statistics.median(bcast[name]) * 1e3 if name in bcast else 0.0})
        for llm in llms.values():
            llm.close()
    flags = sorted(FLAGS_SHOWN & cpu_flags())
    print(f"CPU: {cpu_model()} ({', '.join(flags)}); {args.threads} thread(s) per rank, gloo on loopback; "
          f"{args.arch}, medians of {args.rounds} interleaved rounds of {args.steps} decode steps")
    print(f"{'layout':8s} {'conc':>5s} {'ms/step':>8s} {'vs tp1':>7s} {'overhead ms':>12s} {'broadcast ms':>13s}")
    for row in rows:
        print(f"{row['layout']:8s} {row['concurrency']:5d} {row['step_ms']:8.2f} {row['ratio']:6.2f}x "
              f"{row['overhead_ms']:12.2f} {row['broadcast_ms']:13.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

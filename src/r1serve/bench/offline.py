"""Offline throughput: r1serve against transformers `generate()` on the same prompts, same run.

Each (system, concurrency) cell runs in its own process so its peak memory is its own.
Within a cell: one warm-up, then `--repeats` timed runs. On a shared machine the load of
other tenants drifts over minutes, so the cells are run in `--rounds` interleaved rounds
(r1serve, transformers, r1serve, ...): each round gives a paired ratio measured under the
same conditions, and the table reports medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["the history of the printing press", "how a paged KV cache works", "why the sky is blue",
          "the rules of chess", "a recipe for bread", "the water cycle", "how compilers optimise loops",
          "the life of a honeybee"]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}, part {i + 1}." for i in range(n)]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", default="1,32", help="comma-separated numbers of concurrent sequences")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all cells")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--systems", default="r1serve,transformers",
                   help="r1serve (offline engine), transformers, http (a real `r1serve serve`, streaming clients)")
    p.add_argument("--baseline", default="transformers", help="the system ratios are taken against")
    p.add_argument("--out", default="results/bench_offline.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def main(args) -> None:
    if args.worker:
        system, conc = args.worker.split(":")
        print(json.dumps(run_cell(args, system, int(conc))))
        return
    rounds: list[list[dict]] = []
    for i in range(args.rounds):
        rounds.append([])
        for conc in [int(c) for c in args.concurrency.split(",")]:
            for system in args.systems.split(","):
                rounds[-1].append(spawn_cell(args, system, conc))
                print(f"  round {i + 1}: {system:12s} concurrency {conc:3d}: "
                      f"{rounds[-1][-1]['output_tok_s']:8.1f} tok/s", file=sys.stderr)
    report(rounds, args)


def spawn_cell(args, system: str, conc: int) -> dict:
    cmd = [sys.executable, "-m", "r1serve.cli"]
    if getattr(args, "cache_dir", None):
        cmd += ["--cache-dir", args.cache_dir]
    cmd += ["bench", "offline", "--model", args.model, "--output-len", str(args.output_len),
            "--repeats", str(args.repeats), "--dtype", args.dtype, "--worker", f"{system}:{conc}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark cell {system}:{conc} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cell(args, system: str, conc: int) -> dict:
    from r1serve.bench.server_runner import HttpRunner

    runner = {"r1serve": R1ServeRunner, "transformers": TransformersRunner, "http": HttpRunner}[system](args)
    ps = prompts(conc)
    runner.generate(ps[:1], 4)  # warm-up: first-call allocations and kernel selection
    ttfts, times = [], []
    for _ in range(args.repeats):
        ttfts.append(runner.ttft(ps[0]))
        t0 = time.perf_counter()
        n_out = runner.generate(ps, args.output_len)
        times.append(time.perf_counter() - t0)
        assert n_out == conc * args.output_len, f"{system} produced {n_out} tokens, expected {conc * args.output_len}"
    med = statistics.median(times)
    peak = runner.close() if hasattr(runner, "close") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "concurrency": conc, "output_len": args.output_len, "dtype": runner.dtype,
            "output_tok_s": conc * args.output_len / med, "median_s": med, "times_s": times,
            "ttft_s": statistics.median(ttfts), "peak_rss_mib": peak}


class R1ServeRunner:
    def __init__(self, args) -> None:
        from r1serve.cli import cache_dir_from
        from r1serve.llm import LLM

        self.llm = LLM(args.model, dtype=args.dtype, cache_dir=cache_dir_from(args))
        self.dtype = str(self.llm.engine.loaded.dtype).removeprefix("torch.")

    def generate(self, ps: list[str], n: int) -> int:
        from r1serve import SamplingParams

        outs = self.llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def ttft(self, prompt: str) -> float:
        t0 = time.perf_counter()
        self.generate([prompt], 1)
        return time.perf_counter() - t0


class TransformersRunner:
    def __init__(self, args) -> None:
        import torch
        import transformers

        from r1serve.cli import cache_dir_from
        from r1serve.models.catalog import resolve_model

        path = resolve_model(args.model, cache_dir_from(args))
        dtype = torch.bfloat16 if args.dtype in ("auto", "bfloat16") else getattr(torch, args.dtype)
        src = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.suffix == ".gguf" \
            else dict(pretrained_model_name_or_path=path)
        self.tok = transformers.AutoTokenizer.from_pretrained(**src)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = transformers.AutoModelForCausalLM.from_pretrained(**src, dtype=dtype).eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.torch = torch

    def generate(self, ps: list[str], n: int) -> int:
        batch = self.tok(ps, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(ps)

    def ttft(self, prompt: str) -> float:
        t0 = time.perf_counter()
        self.generate([prompt], 1)
        return time.perf_counter() - t0


def report(rounds: list[list[dict]], args) -> None:
    cells = [(r["system"], r["concurrency"]) for r in rounds[0]]
    rows = [summarize([rnd[i] for rnd in rounds]) for i in range(len(cells))]
    base = args.baseline
    print(f"\n{'concurrency':>11} {'system':>13} {'dtype':>9} {'tok/s':>8} {'ttft ms':>8} {'peak MiB':>9} "
          f"{'vs ' + base:>16} {'per round':>20}")
    for r in rows:
        ratios = paired_ratios(rounds, r["system"], r["concurrency"], base)
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else ""
        spread = " ".join(f"{x:.2f}" for x in ratios)
        print(f"{r['concurrency']:>11} {r['system']:>13} {r['dtype']:>9} {r['output_tok_s']:8.1f} "
              f"{r['ttft_s'] * 1000:8.1f} {r['peak_rss_mib']:9.0f} {ratio:>16} {spread:>20}")
        if ratios:
            r[f"ratio_vs_{base}"], r["ratios_per_round"] = statistics.median(ratios), ratios
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                               "rows": rows, "rounds": rounds}, indent=2))
    print(f"\nwrote {out}")


def summarize(cells: list[dict]) -> dict:
    """One cell over all rounds: medians of the per-round figures."""
    out = dict(cells[0])
    for key in ("output_tok_s", "ttft_s", "peak_rss_mib", "median_s"):
        out[key] = statistics.median(c[key] for c in cells)
    out["times_s"] = [t for c in cells for t in c["times_s"]]
    return out


def paired_ratios(rounds: list[list[dict]], system: str, conc: int, baseline: str = "transformers") -> list[float]:
    if system == baseline:
        return []
    ratios = []
    for rnd in rounds:
        by = {(c["system"], c["concurrency"]): c for c in rnd}
        if (baseline, conc) in by:
            ratios.append(by[(system, conc)]["output_tok_s"] / by[(baseline, conc)]["output_tok_s"])
    return ratios

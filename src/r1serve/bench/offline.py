"""Offline throughput: r1serve against transformers `generate()` on the same prompts, same run.

Each (system, concurrency) cell runs in its own process so its peak memory is its own.
Within a cell: one warm-up, then `--repeats` timed runs. On a shared machine the load of
other tenants drifts over minutes, so the cells are run in `--rounds` interleaved rounds
(r1serve, transformers, r1serve, ...): each round gives a paired ratio measured under the
same conditions, and the table reports medians over rounds. With `--interleave` all
systems of a concurrency share one worker process (loaded once) and alternate single runs,
so a round's runs are seconds apart.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOPICS = ["the history of the printing press", "how a paged KV cache works", "why the sky is blue",
          "the rules of chess", "a recipe for bread", "the water cycle", "how compilers optimise loops",
          "the life of a honeybee"]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}, part {i + 1}." for i in range(n)]


def main(args, cache_dir: Path) -> None:
    """`cache_dir`: where catalog models live (the CLI's --cache-dir or its default)."""
    if args.worker:
        print(json.dumps(run_worker(args, cache_dir)))
        return
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    systems = args.systems.split(",")
    peers = {conc: peer_dtype(args, conc) for conc in concurrencies} if "transformers" in systems else {}
    rounds: list[list[dict]] = [[] for _ in range(args.rounds)]
    if args.interleave:
        for conc in concurrencies:
            for i, cells in enumerate(spawn_worker(args, args.systems, conc, peers.get(conc))):
                rounds[i] += cells
    else:
        for i in range(args.rounds):
            for conc in concurrencies:
                for system in systems:
                    rounds[i].append(spawn_worker(args, system, conc, peers.get(conc)))
                    print(f"  round {i + 1}: {system:12s} concurrency {conc:3d}: "
                          f"{rounds[i][-1]['output_tok_s']:8.1f} tok/s", file=sys.stderr)
    for cell in (c for rnd in rounds for c in rnd):
        cell["dtype_why"] = peers[cell["concurrency"]].why if cell["system"] == "transformers" \
            else LLAMA_SERVER_DTYPE if cell["system"] == "llama-server" else engine_dtype_why(args.dtype)
    report(rounds, args)


def run_worker(args, cache_dir: Path):
    """One worker process's job, as `--worker SYSTEMS:CONCURRENCY` names it."""
    systems, conc = args.worker.split(":")
    if systems == "calibrate":
        return time_peer_dtypes(args, int(conc), cache_dir)
    if args.interleave:
        return run_interleaved(args, systems.split(","), int(conc), cache_dir)
    return run_cell(args, systems, int(conc), cache_dir)


@dataclass(frozen=True)
class PeerDtype:
    dtype: str
    why: str  # printed under the table, kept in the JSON


def peer_dtype(args, conc: int) -> PeerDtype:
    """The peer runs in its fastest dtype on this machine, found by timing each candidate
    (bf16 is fast where the CPU has it natively and ~4x slower than float32 where it is
    emulated), unless --peer-dtype names one."""
    if args.peer_dtype != "auto":
        return PeerDtype(args.peer_dtype, "as given (--peer-dtype)")
    rates = spawn_worker(args, "calibrate", conc, None)
    return fastest(rates)


def fastest(rates: dict[str, float]) -> PeerDtype:
    best = max(rates, key=rates.get)
    timed = ", ".join(f"{d} {r:.1f} tok/s" for d, r in sorted(rates.items(), key=lambda kv: -kv[1]))
    return PeerDtype(best, f"the fastest here of {timed} (timed before the runs)")


def peer_candidates() -> tuple[str, ...]:
    import torch

    # float16 on a CPU is emulated everywhere torch runs; on a GPU bf16 and fp16 both are native.
    return ("bfloat16", "float16") if torch.cuda.is_available() else ("float32", "bfloat16")


CALIBRATION_TOKENS = 16


def time_peer_dtypes(args, conc: int, cache_dir: Path) -> dict[str, float]:
    """transformers' tok/s in each candidate dtype: one load each, a warm-up, then the best of
    two short runs (a moment of load from other tenants should not decide the dtype)."""
    import gc

    rates, ps = {}, prompts(conc)
    for dtype in peer_candidates():
        runner = TransformersRunner(args.model, dtype, cache_dir)
        runner.generate(ps, 2)
        rates[dtype] = max(_rate(runner, ps) for _ in range(2))
        del runner
        gc.collect()
    return rates


def _rate(runner, ps: list[str]) -> float:
    t0 = time.perf_counter()
    n_out = runner.generate(ps, CALIBRATION_TOKENS)
    return n_out / (time.perf_counter() - t0)


def engine_dtype_why(requested: str) -> str:
    if requested != "auto":
        return "as given (--dtype)"
    import torch

    return ("the engine's --dtype auto: a float32 checkpoint stays float32, a 16-bit one runs in bf16 where the "
            f"device has it natively, else float32 (torch CPU capability {torch.backends.cpu.get_cpu_capability()})")


def spawn_worker(args, systems: str, conc: int, peer: PeerDtype | None):
    cmd = [sys.executable, "-m", "r1serve.cli"]
    if getattr(args, "cache_dir", None):
        cmd += ["--cache-dir", args.cache_dir]
    cmd += ["bench", "offline", "--model", args.model, "--output-len", str(args.output_len),
            "--repeats", str(args.repeats), "--dtype", args.dtype, "--peer-dtype", peer.dtype if peer else "auto",
            "--worker", f"{systems}:{conc}", "--cpu-isa", args.cpu_isa,
            "--tensor-parallel-size", str(args.tensor_parallel_size),
            "--data-parallel-size", str(args.data_parallel_size)]
    if args.expert_parallel:
        cmd += ["--expert-parallel"]
    if args.speculative:
        cmd += ["--speculative", args.speculative, "--num-speculative-tokens", str(args.num_speculative_tokens)]
    if args.llama_server_url:
        cmd += ["--llama-server-url", args.llama_server_url]
    if args.llama_server_pid:
        cmd += ["--llama-server-pid", str(args.llama_server_pid)]
    if args.interleave:
        cmd += ["--interleave", "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.interleave else subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {systems}:{conc} failed:\n{(done.stderr or '')[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cell(args, system: str, conc: int, cache_dir: Path) -> dict:
    runner = open_runner(args, system, cache_dir)
    ps = prompts(conc)
    runs = [timed_run(runner, ps, args.output_len) for _ in range(args.repeats)]
    return cell_row(args, system, conc, runner, runs, close_runner(runner))


def run_interleaved(args, systems: list[str], conc: int, cache_dir: Path) -> list[list[dict]]:
    """Every system loaded once in this process (a server as a child process), then each
    round times each system once, in alternating order: the runs a ratio pairs are seconds
    apart, not a model load apart, which on a machine whose speed drifts within minutes is
    what makes a 10% difference measurable."""
    # A server is started first: a fork of this process after a model is loaded here would
    # count that model in the server's peak memory (ru_maxrss includes the pre-exec image).
    runners = {s: open_runner(args, s, cache_dir) for s in sorted(systems, key=lambda s: s != "http")}
    ps = prompts(conc)
    per_round = []
    for i in range(args.rounds):
        order = systems if i % 2 == 0 else systems[::-1]
        runs = {s: timed_run(runners[s], ps, args.output_len) for s in order}
        per_round.append(runs)
        print(f"  round {i + 1}, concurrency {conc}: " + ", ".join(
            f"{s} {conc * args.output_len / runs[s]['time_s']:.1f} tok/s" for s in systems), file=sys.stderr)
    peaks = {s: close_runner(runners[s]) for s in systems}
    return [[cell_row(args, s, conc, runners[s], [runs[s]], peaks[s]) for s in systems] for runs in per_round]


def open_runner(args, system: str, cache_dir: Path):
    from r1serve.bench.server_runner import EndpointRunner, HttpRunner

    if system == "transformers" and args.peer_dtype == "auto":
        raise ValueError("a transformers cell needs its dtype chosen first (peer_dtype), not 'auto'")
    runner = {"r1serve": lambda: R1ServeRunner(args.model, args.dtype, cache_dir, cpu_isa=args.cpu_isa,
                                               tensor_parallel_size=args.tensor_parallel_size,
                                               expert_parallel=args.expert_parallel,
                                               data_parallel_size=args.data_parallel_size,
                                               speculative=args.speculative,
                                               num_speculative_tokens=args.num_speculative_tokens),
              "transformers": lambda: TransformersRunner(args.model, args.peer_dtype, cache_dir),
              "http": lambda: HttpRunner(args),
              "llama-server": lambda: EndpointRunner(_llama_server_url(args), args.llama_server_pid)}[system]()
    runner.generate(prompts(1), 4)  # warm-up: first-call allocations and kernel selection
    return runner


LLAMA_SERVER_DTYPE = "the server's own: llama.cpp multiplies by the GGUF file's quantized weights"


def _llama_server_url(args) -> str:
    if not args.llama_server_url:
        raise ValueError("the llama-server system needs --llama-server-url (the API root of a running server, "
                         "e.g. http://127.0.0.1:8080/v1)")
    return args.llama_server_url


def timed_run(runner, ps: list[str], output_len: int) -> dict:
    ttft = runner.ttft(ps[0])
    cpu0 = runner.cpu_s() if hasattr(runner, "cpu_s") else {}
    spec0 = runner.spec_stats() if hasattr(runner, "spec_stats") else None
    t0 = time.perf_counter()
    n_out = runner.generate(ps, output_len)
    elapsed = time.perf_counter() - t0
    spec = spec0.since(runner.spec_stats()) if spec0 is not None else None
    assert n_out == len(ps) * output_len, f"{type(runner).__name__} produced {n_out} tokens, " \
                                          f"expected {len(ps) * output_len}"
    cpu = {k: v - cpu0[k] for k, v in runner.cpu_s().items()} if cpu0 else {}
    return {"ttft_s": ttft, "time_s": elapsed, "cpu_s": cpu, "spec": spec}


def close_runner(runner) -> float:
    """Stop the runner; its peak RSS in MiB (a server's own; else this process's)."""
    return runner.close() if hasattr(runner, "close") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cell_row(args, system: str, conc: int, runner, runs: list[dict], peak_mib: float) -> dict:
    times = [r["time_s"] for r in runs]
    med = statistics.median(times)
    row = {"system": system, "concurrency": conc, "output_len": args.output_len, "dtype": runner.dtype,
           "output_tok_s": conc * args.output_len / med, "median_s": med, "times_s": times,
           "ttft_s": statistics.median(r["ttft_s"] for r in runs), "peak_rss_mib": peak_mib}
    for key in runs[0]["cpu_s"]:  # CPU seconds per timed run of the processes around the engine (http)
        row[f"{key}_cpu_s"] = statistics.median(r["cpu_s"][key] for r in runs)
    specs = [r["spec"] for r in runs if r.get("spec") is not None and r["spec"].num_drafts]
    if specs:
        total = sum(specs[1:], specs[0])
        row |= {"spec_acceptance_rate": total.acceptance_rate, "spec_mean_accepted_length": total.mean_accepted_length,
                "spec_num_drafts": total.num_drafts}
    return row


class R1ServeRunner:
    def __init__(self, model: str, dtype: str, cache_dir: Path, **engine_options) -> None:
        from r1serve.llm import LLM

        self.llm = LLM(model, dtype=dtype, cache_dir=cache_dir, **engine_options)
        self.dtype = str(self.llm.dtype).removeprefix("torch.")

    def generate(self, ps: list[str], n: int) -> int:
        from r1serve import SamplingParams

        outs = self.llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def spec_stats(self):
        """The engine's speculative-decoding counters (None for data-parallel replicas, whose
        counters live in their processes)."""
        stats = getattr(self.llm.engine, "stats", None)
        return stats().spec if stats else None

    def close(self) -> float:
        """Stop the other ranks, if any; this process's peak RSS in MiB (rank 0's)."""
        self.llm.close()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def ttft(self, prompt: str) -> float:
        t0 = time.perf_counter()
        self.generate([prompt], 1)
        return time.perf_counter() - t0


class TransformersRunner:
    def __init__(self, model: str, dtype_name: str, cache_dir: Path) -> None:
        import torch
        import transformers

        from r1serve.models.catalog import resolve_model

        path = resolve_model(model, cache_dir)
        dtype = getattr(torch, dtype_name)
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
    for r in rows:
        if "spec_acceptance_rate" in r:
            print(f"{r['system']} at concurrency {r['concurrency']}: speculative decoding accepted "
                  f"{r['spec_acceptance_rate']:.0%} of drafted tokens, {r['spec_mean_accepted_length']:.2f} tokens "
                  f"per verification")
        if "server_cpu_s" in r:
            tokens = r["concurrency"] * r["output_len"]
            print(f"{r['system']} at concurrency {r['concurrency']}: CPU per run (median) {r['server_cpu_s']:.2f} s "
                  f"in the API server process ({r['server_cpu_s'] / tokens * 1e6:.0f} µs per streamed token; the "
                  f"engine process not counted), {r['client_cpu_s']:.2f} s in the load generator")
    print()
    for r in rows:
        print(f"dtype of {r['system']} at concurrency {r['concurrency']}: {r['dtype']}, {r['dtype_why']}")
    cpu = this_machine()
    print(f"machine: {cpu['model']}; {', '.join(cpu['isa']) or 'no vector ISA flags read'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"}, "machine": cpu,
                               "rows": rows, "rounds": rounds}, indent=2))
    print(f"\nwrote {out}")


def this_machine() -> dict:
    """The CPU every figure was measured on: its model and the vector ISA it has."""
    from r1serve.planner.cpu import SHOWN_FLAGS, cpuinfo

    proc = Path("/proc/cpuinfo")
    info = cpuinfo(proc.read_text() if proc.exists() else "")
    import torch

    # torch's dispatch level (ATEN_CPU_CAPABILITY lowers it, to measure what a smaller CPU runs)
    return {"model": info["model"], "isa": sorted(info["flags"] & set(SHOWN_FLAGS)),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def summarize(cells: list[dict]) -> dict:
    """One cell over all rounds: medians of the per-round figures."""
    out = dict(cells[0])
    for key in ("output_tok_s", "ttft_s", "peak_rss_mib", "median_s", "server_cpu_s", "client_cpu_s"):
        if key in out:
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

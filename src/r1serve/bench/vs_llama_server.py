"""r1serve against llama.cpp's llama-server on the same GGUF file, each run as a user runs it.

    r1serve bench vs-llama-server FILE.gguf --llama-server PATH [--rounds 3] [--context 16384]
        [--streams 1,8] [--prompt-tokens 1500] [--decode-tokens 128] [--threads 2] [--out DIR]

Every round starts each server afresh, one after the other (r1serve, llama-server, r1serve,
...: machine drift hits both alike), measures it alone on the machine and stops it:

    start     seconds from launching the server to its first answered request (8 tokens)
    decode    tokens/s after each stream's first token, N streams of --decode-tokens each
              (greedy, ignore_eos, a ~40-token prompt)
    prefill   prompt tokens / time to the first token (the first event carrying text: a
              server's progress events before it do not count), for a --prompt-tokens
              prompt that no cache has seen (each round and server gets its own)
    memory    peak resident MiB of the server's processes (VmHWM), after all of the above

Same requests to both over the completions API (raw text, so each tokenizes with the
file's own tokenizer), both on --threads threads, both with a KV cache of --context tokens
(llama-server `-c CONTEXT -np max(streams)`, r1serve `--kv-cache-memory` sized to it).
Ratios are r1serve / llama-server within a round; the table gives their medians. The CPU
model and its vector flags head the report.
"""
from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from r1serve.bench.server_runner import _free_port, _peak_rss_kib, _process_tree, stream_all
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model

WORDS = ("river stone light garden engine window paper market silver autumn planet signal harbor orchard "
         "lantern compass thunder meadow canyon violet copper glacier whisper falcon ember prairie").split()


@dataclass
class Round:
    system: str
    start_s: float
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # streams -> tokens/s
    prefill_tok_s: float = 0.0
    prompt_tokens: int = 0
    peak_mib: float = 0.0


def kv_bytes_per_token(path: Path) -> int:
    """A 16-bit cache's bytes per token for the file's model (both servers' default)."""
    from r1serve.models.gguf_checkpoint import GGUFCheckpoint

    c = GGUFCheckpoint.open(path).hf_config
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2


def prompt_text(words: int, seed: str) -> str:
    rng = random.Random(seed)
    return f"[{seed}] " + " ".join(rng.choice(WORDS) for _ in range(words))


class Server:
    def __init__(self, system: str, cmd: list[str], port: int) -> None:
        self.system, self.port = system, port
        self.t0 = time.perf_counter()
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one would
        # stall a server that logs every request.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def wait_ready(self, timeout: float = 900) -> float:
        """Seconds from launch to the first answered request."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.system} exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    self.complete(["Hello"], 8)
                    return time.perf_counter() - self.t0
            except (httpx.HTTPError, RuntimeError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.system} did not answer within {timeout} s")

    def complete(self, prompts: list[str], tokens: int):
        bodies = [{"model": "bench", "prompt": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
        responses = stream_all("127.0.0.1", self.port, "/v1/completions", bodies, read_every_s=0.002)
        for r in responses:
            if r.status != 200:
                raise RuntimeError(f"{self.system} answered {r.status}: {r.tail[-500:]!r}")
            if r.first_token_s is None:
                raise RuntimeError(f"{self.system} streamed no text: {r.tail[-500:]!r}")
        return responses

    def stop(self) -> float:
        """Stops the server; its processes' peak resident MiB."""
        peak = sum(_peak_rss_kib(pid) for pid in _process_tree(self.proc.pid)) / 1024
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        return peak


def measure(server: Server, args, tag: str) -> Round:
    result = Round(server.system, server.wait_ready())
    for n in args.streams:
        responses = server.complete([prompt_text(30, f"{tag}-d{n}-{i}") for i in range(n)], args.decode_tokens)
        first = min(r.t0 + r.first_token_s for r in responses)
        last = max(r.t0 + r.last_body_s for r in responses)
        tokens = sum(r.usage()["completion_tokens"] - 1 for r in responses)
        result.decode_tok_s[n] = tokens / (last - first)
    (r,) = server.complete([prompt_text(int(args.prompt_tokens * 0.94), f"{tag}-p")], 1)
    result.prompt_tokens = r.usage()["prompt_tokens"]
    result.prefill_tok_s = result.prompt_tokens / r.first_token_s
    result.peak_mib = server.stop()
    return result


def commands(args, port: int, kv_gib: float) -> dict[str, list[str]]:
    threads = str(args.threads)
    return {
        "r1serve": [sys.executable, "-m", "r1serve.cli", "serve", str(args.model), "--port", str(port),
                    "--served-model-name", "bench", "--threads", threads, "--kv-cache-memory", f"{kv_gib:.4f}",
                    "--max-model-len", str(args.context), "--log-level", "warning", *args.r1serve_args],
        "llama-server": [args.llama_server, "-m", str(args.model), "--port", str(port), "-t", threads, "-tb", threads,
                         "-c", str(args.context), "-np", str(max(args.streams)), "--no-webui"],
    }


def report(rounds: list[Round], args) -> dict:
    by = {s: [r for r in rounds if r.system == s] for s in ("r1serve", "llama-server")}
    pairs = list(zip(by["r1serve"], by["llama-server"]))
    rows = {"start (s)": lambda r: r.start_s, "peak memory (MiB)": lambda r: r.peak_mib,
            **{f"decode, {n} stream{'s' * (n > 1)} (tok/s)": (lambda r, n=n: r.decode_tok_s[n]) for n in args.streams},
            f"prefill, {pairs[0][0].prompt_tokens}-token prompt (tok/s)": lambda r: r.prefill_tok_s}
    table = {}
    for name, get in rows.items():
        ours, theirs = [get(a) for a, _ in pairs], [get(b) for _, b in pairs]
        table[name] = {"r1serve": statistics.median(ours), "llama-server": statistics.median(theirs),
                       "ratio": statistics.median(a / b for a, b in zip(ours, theirs))}
    return table


def main(args) -> None:
    path = Path(args.model).expanduser()
    kv_gib = args.context * kv_bytes_per_token(path) / 2**30
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "asimd", "sve"))))
    header = f"{cpu_model()} [{flags}], {args.threads} threads; {path.name} ({path.stat().st_size / 2**30:.2f} GiB)"
    print(header, flush=True)
    rounds = []
    for i in range(args.rounds):
        for system in ("r1serve", "llama-server"):
            port = _free_port()
            server = Server(system, commands(args, port, kv_gib)[system], port)
            try:
                rounds.append(measure(server, args, f"round{i}-{system}"))
            finally:
                if server.proc.poll() is None:
                    server.stop()
            r = rounds[-1]
            print(f"round {i} {system:12s} start {r.start_s:6.1f} s  decode "
                  + "  ".join(f"{n}x {t:6.1f}" for n, t in r.decode_tok_s.items())
                  + f" tok/s  prefill {r.prefill_tok_s:6.1f} tok/s  peak {r.peak_mib:6.0f} MiB", flush=True)
    table = report(rounds, args)
    print(f"\n{'':44s} {'r1serve':>10s} {'llama-server':>13s} {'r1serve / llama-server':>24s}")
    for name, row in table.items():
        print(f"{name:44s} {row['r1serve']:10.1f} {row['llama-server']:13.1f} {row['ratio']:23.2f}x")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vs_llama_server.json").write_text(json.dumps(
            {"machine": header, "args": {k: v for k, v in vars(args).items() if k != "func"},
             "rounds": [asdict(r) for r in rounds], "table": table}, indent=1, default=str))

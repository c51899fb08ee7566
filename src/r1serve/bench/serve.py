"""`r1serve bench serve`: load any OpenAI-compatible endpoint and report what users feel.

    r1serve bench serve [--base-url http://127.0.0.1:8000/v1] [--model NAME] \\
        --concurrency 1,8,32 --num-prompts 200 --input-len 256 --output-len 128 \\
        [--dataset random|chat|FILE.jsonl] [--slo-ttft 2s --slo-tpot 100ms] [--duration S] [--out results/]

Closed loop (`--concurrency N`: N clients, each sending its next request when the last one
ends) or open loop (`--request-rate R`: Poisson arrivals at R requests/s, whatever the
server's speed). Every request streams; its chunks are timed as they arrive.
"""
from __future__ import annotations

import asyncio
import random
import re
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from r1serve.bench.serve_client import RequestResult, RequestSpec, send
from r1serve.bench.serve_dataset import load_requests
from r1serve.bench.serve_report import LevelReport, summarize, table, write_outputs
from r1serve.bench.server_counters import read_spec_counters
from r1serve.errors import InvalidRequestError


def parse_duration(value: str | None, name: str) -> float | None:
    """'2s', '100ms', '1.5' (seconds) -> seconds."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s)?\s*", value)
    if not m:
        raise InvalidRequestError(f"{name}={value!r}: give a duration like 2s or 100ms")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def _levels(text: str, kind: type, name: str) -> list:
    try:
        levels = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"{name}={text!r}: give comma-separated numbers") from None
    if not levels or any(v <= 0 for v in levels):
        raise InvalidRequestError(f"{name}={text!r}: every level must be > 0")
    return levels


def served_model(base_url: str, headers: dict) -> str:
    """The server's first model, as vLLM's and llama-server's clients take it when none is named."""
    try:
        models = httpx.get(f"{base_url}/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise InvalidRequestError(f"could not list the models at {base_url}/models ({e}); give --model") from None
    if not models:
        raise InvalidRequestError(f"{base_url}/models lists no model; give --model")
    return models[0]["id"]


def load_tokenizer(name: str | None, cache_dir: Path):
    """Our own tokenizer for a catalog name, .gguf or HF directory; None when there is none."""
    if name is None:
        return None
    from r1serve.models.catalog import resolve_model
    from r1serve.models.gguf_file import GGUFFile
    from r1serve.tokenizer import Tokenizer

    path = resolve_model(name, cache_dir)
    return Tokenizer.from_gguf(GGUFFile(path)) if path.suffix == ".gguf" else Tokenizer.from_dir(path)


async def run_level(base_url: str, headers: dict, specs: list[RequestSpec], args, concurrency: int | None,
                    rate: float | None, count_tokens) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=(concurrency or len(specs)) + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=args.timeout, limits=limits) as client:
        bar = tqdm(total=len(specs), desc=f"{'c=' + str(concurrency) if concurrency else f'{rate}/s'}", leave=False,
                   file=sys.stderr)
        async def one(spec: RequestSpec) -> RequestResult:
            result = await send(client, spec, args.model, args.ignore_eos, {}, count_tokens)
            bar.update(1)
            return result

        start = time.perf_counter()
        deadline = start + args.duration if args.duration else float("inf")
        if concurrency:
            results = await _closed_loop(specs, concurrency, one, deadline)
        else:
            results = await _open_loop(specs, rate, one, random.Random(args.seed), deadline)
        duration = time.perf_counter() - start
        bar.close()
    return results, duration


async def _closed_loop(specs, concurrency: int, one, deadline: float) -> list[RequestResult]:
    queue = list(reversed(specs))
    results: list[RequestResult] = []

    async def client_loop():
        while queue and time.perf_counter() < deadline:
            results.append(await one(queue.pop()))

    await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(specs)))))
    return results


async def _open_loop(specs, rate: float, one, rng: random.Random, deadline: float) -> list[RequestResult]:
    tasks = []
    for spec in specs:
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(spec)))
        await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals: exponential gaps
    return list(await asyncio.gather(*tasks))


def main(args, cache_dir: Path) -> list[LevelReport]:
    """`cache_dir`: where catalog models live, for --tokenizer."""
    slo_ttft, slo_tpot = parse_duration(args.slo_ttft, "--slo-ttft"), parse_duration(args.slo_tpot, "--slo-tpot")
    tokenizer = load_tokenizer(args.tokenizer, cache_dir)
    count = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else \
        (lambda text: len(text.split()))  # no usage and no tokenizer: words, said in the report's flag
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    args.model = args.model or served_model(base, headers)
    plan = ([(None, r) for r in _levels(args.request_rate, float, "--request-rate")] if args.request_rate
            else [(c, None) for c in _levels(args.concurrency, int, "--concurrency")])
    levels = []
    for i, (concurrency, rate) in enumerate(plan):
        # Fresh prompts per level: replayed ones would be served from the prefix cache.
        seed = args.seed + (0 if args.same_prompts else i)
        specs = load_requests(args.dataset, args.num_prompts, args.input_len, args.output_len, tokenizer, seed)
        before = read_spec_counters(base, headers)
        results, duration = asyncio.run(run_level(base, headers, specs, args, concurrency, rate, count))
        after = read_spec_counters(base, headers) if before is not None else None
        load = f"concurrency {concurrency}" if concurrency else f"rate {rate:g}/s"
        levels.append(summarize(load, results, duration, slo_ttft, slo_tpot, before.since(after) if after else None))
        print(f"  {load}: {levels[-1].completed} ok, {levels[-1].failed} failed, "
              f"{levels[-1].output_tokens_per_s:.1f} output tok/s", file=sys.stderr)
    print(table(levels))
    if not all(lv.usage_from_server for lv in levels):
        print("note: the server gave no usage for some requests; their tokens were counted by "
              + ("the tokenizer" if tokenizer else "words (no --tokenizer given)"))
    if args.out:
        # The run's settings, never its secret: results files get shared and committed.
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
        for path in write_outputs(Path(args.out), settings | {"api_key_sent": bool(args.api_key)}, levels,
                                  (slo_ttft, slo_tpot)):
            print(f"wrote {path}")
    return levels

"""What constrained decoding costs: tokens/s at N streams with every request held to a JSON
schema, against the same requests unconstrained, in interleaved rounds on one loaded engine.

    python -m r1serve.bench.structured_overhead [--model smollm2-135m] [--streams 32]
                                                [--max-tokens 64] [--rounds 5]

The schema (an array of at least 200 strings) cannot be complete within --max-tokens, so
both runs generate exactly streams x max_tokens tokens and the ratio is of like with like.
The grammar masks are computed on a background thread while the forward pass runs
(engine/grammar.py); the time the steps still waited for them and applied them is reported
as a share of the constrained run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from r1serve import LLM, SamplingParams, StructuredOutputsParams
from r1serve.bench.host_overhead import FLAGS_SHOWN
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 200}
TOPICS = ["fruits", "rivers", "tools", "colours", "birds", "cities", "metals", "games"]


def _prompts(llm: LLM, streams: int) -> list[dict]:
    asks = [f"List {TOPICS[i % len(TOPICS)]} as a JSON array of strings (list {i + 3})." for i in range(streams)]
    return [llm.chat_prompt([{"role": "user", "content": a}]) for a in asks]


def _run(llm: LLM, prompts: list[dict], params: SamplingParams) -> tuple[float, float]:
    """(generated tokens per second, seconds the steps spent on grammar masks)."""
    waited = llm.engine.stats().grammar_wait_seconds
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, llm.engine.stats().grammar_wait_seconds - waited


def measure(model: str, streams: int, max_tokens: int, rounds: int, threads: int | None) -> dict:
    llm = LLM(model=model, **({"num_threads": threads} if threads else {}))
    prompts = _prompts(llm, streams)
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=max_tokens, ignore_eos=True)
    held = SamplingParams(temperature=0.8, seed=0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))
    _run(llm, prompts, free), _run(llm, prompts, held)  # warm-up: caches, the grammar's tokenizer
    ratios, shares, rates = [], [], {"unconstrained": [], "json_schema": []}
    for r in range(rounds):
        order = [("unconstrained", free), ("json_schema", held)]
        got = dict((name, _run(llm, prompts, p)) for name, p in (order if r % 2 == 0 else order[::-1]))
        rates["unconstrained"].append(got["unconstrained"][0])
        rates["json_schema"].append(got["json_schema"][0])
        ratios.append(got["json_schema"][0] / got["unconstrained"][0])
        shares.append(got["json_schema"][1] * got["json_schema"][0] / (streams * max_tokens))
    return {"model": model, "streams": streams, "max_tokens": max_tokens, "rounds": rounds,
            "cpu": cpu_model(), "cpu_flags": sorted(cpu_flags() & FLAGS_SHOWN),
            "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
            "grammar_share_of_time": round(statistics.median(shares), 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    result = measure(args.model, args.streams, args.max_tokens, args.rounds, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['cpu']} ({' '.join(result['cpu_flags'])})")
    print(f"{args.streams} streams x {args.max_tokens} tokens, {args.rounds} interleaved rounds on {args.model}")
    for name, rate in result["tokens_per_s"].items():
        print(f"  {name:14} {rate:8.1f} tokens/s (median)")
    print(f"  constrained / unconstrained: {result['ratio_median']:.3f} (rounds: {result['ratios']})")
    print(f"  grammar masks, waited for and applied: {100 * result['grammar_share_of_time']:.2f}% of the constrained run")


if __name__ == "__main__":
    main()

"""Time of one decode step at concurrency 1 under several `quantization` settings, in one process.

    python -m r1serve.bench.decode_step [--model smollm2-135m] [--quantization none,auto] [--rounds 7]

Every setting gets its own engine; each round decodes the same greedy 64 tokens with each
engine in turn (interleaved, so machine drift hits all alike) and keeps the median step
time. The table gives medians over rounds and the per-round ratio to the first setting.
Faster to run than `r1serve bench offline` and free of prefill and sampling set-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

from r1serve import LLM, SamplingParams

PROMPT = [{"role": "user", "content": "Explain what a KV cache is in one paragraph."}]


def median_step(llm: LLM, prompt_ids: list[int], tokens: int, request_id: str) -> float:
    engine = llm.engine
    engine.add_request(request_id, {"prompt_token_ids": prompt_ids},
                       SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens))
    engine.step()  # prefill and the first token
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog name, .gguf file or HF directory")
    p.add_argument("--quantization", default="none,auto", help="comma-separated settings; the first is the baseline")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    modes = args.quantization.split(",")
    llms = {m: LLM(args.model, quantization=m) for m in modes}
    ids = next(iter(llms.values())).chat_prompt(PROMPT)["prompt_token_ids"]
    steps: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):  # round 0 warms up
        for m, llm in llms.items():
            t = median_step(llm, ids, args.tokens, f"r{r}")
            if r:
                steps[m].append(t)
    base = steps[modes[0]]
    for m, ts in steps.items():
        ratios = [b / t for b, t in zip(base, ts)]
        print(f"quantization={m:5s} step {statistics.median(ts) * 1e3:6.2f} ms ({1 / statistics.median(ts):5.1f} tok/s)"
              f"  {statistics.median(ratios):.2f}x vs {modes[0]}  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()

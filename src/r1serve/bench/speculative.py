"""`r1serve bench speculative`: what speculative decoding buys, and where it turns itself off.

    r1serve bench speculative --model smollm2-135m --concurrency 1,2,4,8,16 --rounds 5

One process holds two engines on the same model: plain, and with `--speculative ngram` (or
mtp for a checkpoint with an MTP layer). Each round runs every (workload, concurrency)
cell on both, in alternating order, so a cell's ratio pairs runs seconds apart on a noisy
machine; the table gives medians over rounds. Decoding is greedy, so both engines should
produce the same tokens: the table gives the share of requests that did.

Workloads: `quote` asks the model to repeat a passage given in the prompt (the work prompt
lookup exists for: summaries, code edits, RAG answers, a reasoning model restating the
question); `chat` asks for an essay on a topic, where the output copies little of its input.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

from r1serve.engine.drafter import Drafter

PASSAGES = [
    "A paged KV cache stores the keys and values of every sequence in fixed-size blocks, so that a sequence "
    "grows one block at a time and a finished sequence returns its blocks at once. A block table maps each "
    "sequence's positions to the blocks that hold them, and the attention kernel reads the cache through it.",
    "Continuous batching admits a new request as soon as another finishes, instead of waiting for the whole "
    "batch to end. Each step, the scheduler gives every running request its next token and fills what is left "
    "of the token budget with the prompts of waiting requests, split into chunks when they are long.",
    "The water cycle moves water between the oceans, the air and the land. The sun warms the sea and water "
    "evaporates; the vapour rises, cools and condenses into clouds; rain and snow fall back to the ground, and "
    "rivers carry the water back to the sea, where the cycle begins again.",
    "Bread needs only flour, water, salt and yeast. Mix them into a dough, knead it until it is smooth and "
    "elastic, and leave it to rise until it has doubled in size. Shape the loaf, let it rise once more, and bake "
    "it in a hot oven until the crust is brown and the base sounds hollow when tapped.",
]
TOPICS = ["the history of the printing press", "how a paged KV cache works", "why the sky is blue",
          "the rules of chess", "a recipe for bread", "the water cycle", "how compilers optimise loops",
          "the life of a honeybee"]


def conversations(workload: str, n: int) -> list[list[dict]]:
    if workload == "quote":
        text = "Repeat the following text exactly, word for word:\n\n{}"
        return [[{"role": "user", "content": text.format(PASSAGES[i % len(PASSAGES)])}] for i in range(n)]
    if workload == "chat":
        return [[{"role": "user", "content": f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}."}]
                for i in range(n)]
    raise ValueError(f"workload {workload!r}: use quote or chat")


def main(args, cache_dir: Path) -> dict:
    from r1serve.bench.offline import this_machine
    from r1serve.llm import LLM

    common = dict(dtype=args.dtype, cache_dir=cache_dir, cpu_isa=args.cpu_isa)
    engines = {"plain": LLM(args.model, **common),
               "speculative": LLM(args.model, speculative=args.speculative,
                                  num_speculative_tokens=args.num_speculative_tokens, **common)}
    cells = [(w, int(c)) for w in args.workloads.split(",") for c in args.concurrency.split(",")]
    for name, llm in engines.items():  # warm-up: first-call allocations and kernel selection
        _run(llm, conversations("chat", 1), 8)
    rounds = []
    for i in range(args.rounds):
        runs = {}
        for workload, conc in cells:
            convs = conversations(workload, conc)
            order = ["plain", "speculative"] if i % 2 == 0 else ["speculative", "plain"]
            for name in order:
                spec0 = engines[name].engine.stats().spec
                runs[(workload, conc, name)] = _run(engines[name], convs, args.output_len) | {
                    "spec": spec0.since(engines[name].engine.stats().spec)}
            plain, spec = runs[(workload, conc, "plain")], runs[(workload, conc, "speculative")]
            print(f"  round {i + 1}: {workload} c={conc}: plain {plain['tok_s']:.1f} tok/s, speculative "
                  f"{spec['tok_s']:.1f} tok/s", file=sys.stderr)
        rounds.append(runs)
    rows = [_row(rounds, w, c) for w, c in cells]
    step_cost = verification_costs(engines["speculative"], [0] + [int(k) for k in args.draft_sweep.split(",")],
                                   args.rounds)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "machine": this_machine(),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows,
              "step_cost_by_drafts": step_cost}
    print(_table(rows, result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    for llm in engines.values():
        llm.close()
    return result


class LastTokenDrafter(Drafter):
    """Drafts k copies of the last token: a guess the model mostly rejects, at full cost."""

    def propose(self, requests, ks):
        return [[r.token_ids[-1]] * k for r, k in zip(requests, ks)]


def verification_costs(llm, ks: list[int], rounds: int) -> dict[int, float]:
    """A one-sequence decode step's time verifying k drafts over its time with none
    (medians over rounds): what the speculation policy weighs a draft against."""
    from dataclasses import replace

    from r1serve.bench.decode_step import median_step
    from r1serve.engine.speculation import Speculation

    engine, kept = llm.engine, llm.engine.speculation
    prompt_ids = llm.chat_prompt(conversations("chat", 1)[0])["prompt_token_ids"]
    per_round = []
    try:
        for i in range(rounds):
            times = {}
            for k in ks:
                config = replace(engine.config, num_speculative_tokens=max(k, 1), speculative_max_rows=max(k + 1, 2))
                engine.speculation = Speculation(config, LastTokenDrafter(), adaptive=False) if k else None
                times[k] = median_step(llm, prompt_ids, 32, f"verify-{i}-{k}")
            per_round.append({k: t / times[ks[0]] for k, t in times.items()})
    finally:
        engine.speculation = kept
    return {k: statistics.median(x[k] for x in per_round) for k in ks}


def _run(llm, convs: list[list[dict]], max_tokens: int) -> dict:
    from r1serve import SamplingParams

    t0 = time.perf_counter()
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens))
    elapsed = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    return {"time_s": elapsed, "tok_s": sum(map(len, tokens)) / elapsed, "tokens": tokens}


def _row(rounds: list[dict], workload: str, conc: int) -> dict:
    plain = [r[(workload, conc, "plain")] for r in rounds]
    spec = [r[(workload, conc, "speculative")] for r in rounds]
    ratios = [s["tok_s"] / p["tok_s"] for p, s in zip(plain, spec)]
    stats = sum((s["spec"] for s in spec[1:]), spec[0]["spec"])
    out_tokens = sum(len(t) for s in spec for t in s["tokens"])
    same = [a == b for p, s in zip(plain, spec) for a, b in zip(p["tokens"], s["tokens"])]
    return {"workload": workload, "concurrency": conc, "plain_tok_s": statistics.median(p["tok_s"] for p in plain),
            "speculative_tok_s": statistics.median(s["tok_s"] for s in spec), "ratio": statistics.median(ratios),
            "ratios_per_round": ratios, "acceptance_rate": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length,
            "drafted_per_output_token": stats.num_draft_tokens / out_tokens if out_tokens else 0.0,
            "tokens_per_request": out_tokens / len(spec) / conc, "same_tokens": sum(same) / len(same)}


def _table(rows: list[dict], result: dict) -> str:
    lines = [f"{'workload':>8} {'conc':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} {'accepted':>9} "
             f"{'tok/verify':>11} {'drafts/tok':>11} {'same':>5} {'per round':>28}"]
    for r in rows:
        lines.append(f"{r['workload']:>8} {r['concurrency']:>5} {r['plain_tok_s']:12.1f} {r['speculative_tok_s']:11.1f} "
                     f"{r['ratio']:5.2f}x {r['acceptance_rate']:9.0%} {r['mean_accepted_length']:11.2f} "
                     f"{r['drafted_per_output_token']:11.2f} {r['same_tokens']:5.0%} "
                     f"{' '.join(f'{x:.2f}' for x in r['ratios_per_round']):>28}")
    costs = result["step_cost_by_drafts"]
    lines.append("\none sequence's decode step verifying k drafts (x no drafts): "
                 + ", ".join(f"k={k}: {c:.2f}x" for k, c in costs.items()))
    m = result["machine"]
    lines.append(f"\ndrafts/tok 0: speculation turned itself off at that batch; same: requests whose greedy "
                 f"tokens match plain's (in bf16 a near-tie can flip with the batch or the prefix-cache state, "
                 f"drafts or not; the float32 tests check exact equality); peak RSS of the process holding "
                 f"both engines {result['peak_rss_mib']:.0f} MiB")
    lines.append(f"machine: {m['model']}; {', '.join(m['isa']) or 'no vector ISA flags read'}")
    return "\n".join(lines)

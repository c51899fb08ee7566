"""The CPU's whole-layer decode kernel against the layer's modules, in one process: the
same engine generates with the kernel bound and with every layer's `decode_layer` set back
to its twin (`run_modules`), alternating, and reports the median of the paired ratios.

    python benchmarks/cpu_decode_layer.py                                  # the CPU's best ISA
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_decode_layer.py --cpu-isa avx2 --concurrency 1 32
"""
from __future__ import annotations

import argparse
import statistics
import time

from r1serve import LLM, SamplingParams
from r1serve.kernels.cpu_isa import cpu_flags, cpu_model


def paired_rates(llm: LLM, concurrency: int, output_len: int, rounds: int) -> dict[str, list[float]]:
    layers = list(llm.engine.runner.model.model.layers)
    bound = [layer.decode_layer for layer in layers]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    prompts = [f"Tell me a story about the number {i}." for i in range(concurrency)]
    llm.generate(prompts, params)  # warm-up
    rates: dict[str, list[float]] = {"modules": [], "layer kernel": []}
    for _ in range(rounds):
        for mode in rates:
            for layer, kernel in zip(layers, bound):
                layer.decode_layer = kernel if mode == "layer kernel" else layer.run_modules
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            rates[mode].append(concurrency * output_len / (time.perf_counter() - t0))
    for layer, kernel in zip(layers, bound):
        layer.decode_layer = kernel
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cpu-isa", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    llm = LLM(args.model, cpu_isa=args.cpu_isa)
    kernel = {b.op: b.kernel for b in llm.engine.kernels}["decode_layer"]
    print(f"cpu: {cpu_model()}; flags: {' '.join(sorted(f for f in cpu_flags() if 'avx' in f or 'amx' in f))}")
    print(f"decode_layer kernel: {kernel}")
    for n in args.concurrency:
        r = paired_rates(llm, n, args.output_len, args.rounds)
        ratios = [a / b for a, b in zip(r["layer kernel"], r["modules"])]
        print(f"concurrency {n}: modules {statistics.median(r['modules']):.1f} tok/s, layer kernel "
              f"{statistics.median(r['layer kernel']):.1f} tok/s, {statistics.median(ratios):.2f}x "
              f"(rounds {' '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()

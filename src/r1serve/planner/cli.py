"""`r1serve hw list | plan | compare | validate | measure`: arguments and handlers.

Kept free of heavy imports at module level: the parser is built on every `r1serve` call.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from r1serve.errors import R1ServeError

DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$")
TOKENS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*$")


def duration_s(text: str) -> float:
    """'50ms', '2s', '800us'; a bare number is milliseconds."""
    m = DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 50ms, 2s or 800us")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[m.group(2)]


def token_count(text: str) -> int:
    """'4096', '4k' (4,096), '1M'."""
    m = TOKENS.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; write e.g. 4096 or 4k")
    n = float(m.group(1)) * {"": 1, "k": 1024, "m": 2**20}[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"{text!r}: a token count is a whole number >= 1")
    return int(n)


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deepseek-r1",
                   help="deepseek-r1 (built in), a config.json, or an HF model directory (default: deepseek-r1)")
    p.add_argument("--input", type=token_count, default=4096, help="prompt tokens per request (default 4096)")
    p.add_argument("--output", type=token_count, default=1024, help="output tokens per request (default 1024)")
    p.add_argument("--tpot-slo", type=duration_s, default=0.05, help="time per output token, e.g. 50ms (default)")
    p.add_argument("--ttft-slo", type=duration_s, default=None,
                   help="time to first token; shrinks the prefill batch to meet it (default: none)")
    p.add_argument("--mtp", type=float, default=0.0, metavar="ACCEPTANCE",
                   help="decode with one MTP draft token accepted at this rate, e.g. 0.85 (default: off)")
    p.add_argument("--catalog", default=None, help="a TOML file of extra chips (see docs/hardware.md)")
    p.add_argument("--chip-prices", default=None, metavar="FILE.toml",
                   help="what a chip-hour costs you, per chip id ([chips] h100 = 2.2): adds the cost of a million "
                        "output tokens and tokens per unit of money (see docs/hardware.md)")
    p.add_argument("--json", action="store_true")


def add_args(p: argparse.ArgumentParser) -> None:
    hw = p.add_subparsers(dest="hw_command", required=True)
    q = hw.add_parser("list", help="the accelerator catalog, with sources, plus this machine's CPU")
    q.add_argument("--catalog", default=None, help="a TOML file of extra chips")
    q.add_argument("--json", action="store_true")
    q = hw.add_parser("plan", help="serve a model on N chips of one kind: memory, layout, throughput, latency")
    q.add_argument("--chip", required=True, help="a chip id from `r1serve hw list`, e.g. h100, ascend-910c")
    q.add_argument("--chips", type=int, default=None, help="how many (default: the fewest that hold the model)")
    q.add_argument("--weights", default="auto", choices=["auto", "fp8", "int8", "bf16"],
                   help="auto: the checkpoint's format where the chip has it, else INT8, else BF16")
    q.add_argument("--chart", default=None, help="write the step breakdowns and %% of H100 by chip count to this PNG")
    _workload_args(q)
    q = hw.add_parser("compare", help="every chip on the same workload, as a percentage of H100s")
    q.add_argument("--chips", type=int, default=None,
                   help="chips per deployment (default: the fewest, a power of two, that hold the model on all)")
    q.add_argument("--only", default=None, help="comma-separated chip ids (default: all but the CPU)")
    q.add_argument("--chart", default=None, help="write a bar chart of %% of H100 to this PNG")
    q.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    _workload_args(q)
    q = hw.add_parser("validate", help="the planner against published R1 deployments")
    q.add_argument("--markdown", action="store_true")
    q.add_argument("--json", action="store_true")
    q = hw.add_parser("measure", help="achieved memory bandwidth and FLOP/s of the local engine vs this device's "
                                      "peaks, measured now")
    q.add_argument("model", nargs="?", default="smollm2-135m", help="catalog name, .gguf or HF directory")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--batch", type=int, default=4, help="sequences prefilled in one step, then decoded together")
    q.add_argument("--prompt-len", type=int, default=128)
    q.add_argument("--decode-steps", type=int, default=24)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--json", action="store_true")


def run(args, cache_dir) -> None:
    if args.hw_command == "measure":
        cmd_measure(args, cache_dir)
        return
    if args.hw_command == "list":
        cmd_list(args)
        return
    # cache_dir: where computed model shapes are kept (planner/model.py)
    {"plan": cmd_plan, "compare": cmd_compare, "validate": cmd_validate}[args.hw_command](args, cache_dir)


def _emit(args, obj, text) -> None:
    """JSON with --json, else the text view (a callable, so it is built only when shown)."""
    print(json.dumps(obj, indent=2) if args.json else text())


def cmd_list(args) -> None:
    from r1serve.planner.catalog import load_catalog
    from r1serve.planner.report import catalog_text, chip_json

    catalog = load_catalog(args.catalog)
    _emit(args, [chip_json(c) for c in catalog.chips.values()], lambda: catalog_text(catalog))


def _workload(args):
    from r1serve.planner.plan import Workload

    return Workload(args.input, args.output, args.tpot_slo, args.ttft_slo, args.mtp)


def cmd_plan(args, cache_dir=None) -> None:
    from r1serve.planner.catalog import load_catalog
    from r1serve.planner.model import model_shape
    from r1serve.planner.plan import REFERENCE_CHIP, pct_of, plan, reference_plan, smallest_fit
    from r1serve.planner.report import plan_json, plan_text
    from r1serve.planner.roofline import Device, weight_format

    catalog, w = load_catalog(args.catalog), _workload(args)
    chip, m = catalog.chip(args.chip), model_shape(args.model, cache_dir)
    chips = args.chips
    if chips is None:
        if not chip.bandwidth:
            raise R1ServeError(f"{chip.name} has no memory bandwidth figure; add it with --catalog")
        chips = smallest_fit(m, Device(chip, weight_format(m, chip, args.weights)), w) or 1
    p = plan(m, chip, chips, w, args.weights)
    ref = reference_plan(m, catalog.chip(REFERENCE_CHIP), chips, w)
    j = plan_json(p, pct_of(p, ref), ref)
    compared = compare_chip_count(catalog, m, w, [c for c in catalog.chips.values() if c.bandwidth])
    j["compare_chips"] = compared
    j["pct_of_h100_by_chips"] = _by_chip_count(m, catalog, chip, w, args.weights, chips, compared)
    _priced([j], catalog, args)
    if args.chart:
        from r1serve.planner.report import plan_chart

        j["chart"] = str(plan_chart(j, args.chart))
    _emit(args, j, lambda: plan_text(j, p) + (f"\nchart: {args.chart}" if args.chart else ""))


def _priced(rows: list[dict], catalog, args) -> None:
    """Each plan's cost per million output tokens, where --chip-prices prices its chip."""
    from r1serve.planner.chip_prices import ChipPrices, load_chip_prices

    prices = load_chip_prices(args.chip_prices)
    if prices is None:
        return
    by_id = ChipPrices(prices.currency, {catalog.chip(c).id: v for c, v in prices.per_chip_hour.items()})
    for j in rows:
        j["price"] = by_id.cost(j["chip"], j["output_tokens_per_s_per_chip"])


def _by_chip_count(m, catalog, chip, w, weights: str, chips: int, compared: int) -> dict[int, float | None]:
    """% of H100 at this plan's chip count, at `hw compare`'s, and at the powers of two around:
    the ratio moves with the count (more chips hold larger decode batches, and the two chips
    gain at different rates), so a single figure misleads."""
    from r1serve.planner.plan import REFERENCE_CHIP, pct_of, plan, reference_plan

    counts = sorted({chips, compared} | {n for n in (chips // 2, chips * 2, chips * 4) if 1 <= n <= 256})
    out = {}
    for n in counts:
        p = plan(m, chip, n, w, weights)
        out[n] = pct_of(p, reference_plan(m, catalog.chip(REFERENCE_CHIP), n, w))["overall"] if p.fits else None
    return out


def compare_chip_count(catalog, m, w, chips) -> int:
    """What `hw compare` deploys each chip on: the fewest (a power of two) that hold the model on all."""
    from r1serve.planner.plan import smallest_fit
    from r1serve.planner.roofline import Device, weight_format

    fits = [smallest_fit(m, Device(c, weight_format(m, c)), w) for c in chips]
    return max([f for f in fits if f] or [1])


def compare_rows(args, cache_dir=None) -> tuple[list[dict], int]:
    from r1serve.planner.catalog import load_catalog
    from r1serve.planner.model import model_shape
    from r1serve.planner.plan import REFERENCE_CHIP, pct_of, plan, reference_plan
    from r1serve.planner.report import plan_json

    catalog, w, m = load_catalog(args.catalog), _workload(args), model_shape(args.model, cache_dir)
    ids = args.only.split(",") if args.only else [c.id for c in catalog.chips.values() if c.bandwidth]
    chips = [catalog.chip(i.strip()) for i in ids]
    n = args.chips or compare_chip_count(catalog, m, w, chips)
    ref = reference_plan(m, catalog.chip(REFERENCE_CHIP), n, w)
    rows = []
    for c in chips:
        p = plan(m, c, n, w)
        rows.append(plan_json(p, pct_of(p, ref), ref))
    _priced(rows, catalog, args)
    return rows, n


def cmd_compare(args, cache_dir=None) -> None:
    from r1serve.planner.report import compare_chart, compare_text

    rows, n = compare_rows(args, cache_dir)
    title = (f"{rows[0]['model']}: {args.input} in / {args.output} out, TPOT <= {args.tpot_slo * 1e3:g} ms, "
             f"{n} chips each")
    if args.chart:
        compare_chart(rows, args.chart, title)
    chart = f"\nchart: {args.chart}" if args.chart else ""
    _emit(args, {"title": title, "chips": n, "chart": args.chart, "rows": rows},
          lambda: f"{title}\n{compare_text(rows, markdown=args.markdown)}{chart}")


def cmd_validate(args, cache_dir=None) -> None:
    from r1serve.planner.catalog import load_catalog
    from r1serve.planner.model import model_shape
    from r1serve.planner.report import validation_json, validation_text
    from r1serve.planner.validation import validate

    checks = validate(model_shape("deepseek-r1", cache_dir), load_catalog(detect_cpu=False))
    _emit(args, validation_json(checks), lambda: validation_text(checks, markdown=args.markdown))


def cmd_measure(args, cache_dir) -> None:
    from r1serve.planner.measure import MeasureConfig, measure, measurement_text

    if min(args.batch, args.prompt_len, args.decode_steps) < 1:
        raise R1ServeError("--batch, --prompt-len and --decode-steps must all be >= 1")
    config = MeasureConfig(args.batch, args.prompt_len, args.decode_steps)
    result = measure(args.model, config, dtype=args.dtype, device=args.device, cache_dir=cache_dir,
                     num_threads=args.threads, log=lambda msg: print(f"[hw measure] {msg}", file=sys.stderr))
    _emit(args, result.as_dict(), lambda: measurement_text(result))

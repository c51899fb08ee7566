"""Serving benchmark figures for one load level, and their table, JSON and plots."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from r1serve.bench.serve_client import RequestResult


def percentiles(values: list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 in milliseconds (None when there is nothing to summarise)."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = sorted(v * 1000 for v in values)

    def pct(p: float) -> float:  # linear interpolation between closest ranks
        k = (len(ms) - 1) * p
        lo = int(k)
        return ms[lo] + (ms[min(lo + 1, len(ms) - 1)] - ms[lo]) * (k - lo)

    return {"mean": statistics.fmean(ms), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


@dataclass(frozen=True)
class LevelReport:
    load: str  # "concurrency 8" or "rate 4.0/s"
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    reasoning_tokens: int
    answer_tokens: int
    usage_from_server: bool
    ttft_ms: dict
    tpot_ms: dict
    itl_ms: dict
    e2e_ms: dict
    ttfat_ms: dict  # time to first answer token (reasoning models)
    goodput: float | None  # requests/s meeting every SLO given
    errors: list[str]
    # Speculative decoding over the level, from the server's /metrics (None: it has none).
    spec_decode: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(load: str, results: list[RequestResult], duration: float, slo_ttft: float | None,
              slo_tpot: float | None, spec=None) -> LevelReport:
    """spec: the server's speculative-decoding counters over the level (SpecDecodeStats)."""
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    reasoning = sum(r.reasoning_tokens for r in ok)
    good = None
    if slo_ttft is not None or slo_tpot is not None:
        good = sum(_meets(r, slo_ttft, slo_tpot) for r in ok) / duration
    return LevelReport(
        load, len(ok), len(results) - len(ok), duration, len(ok) / duration, out, prompt, out / duration,
        (out + prompt) / duration, reasoning, out - reasoning, bool(ok) and all(r.usage_from_server for r in ok),
        percentiles([r.ttft for r in ok if r.ttft is not None]),
        percentiles([r.tpot for r in ok if r.tpot is not None]),
        percentiles([gap for r in ok for gap in r.itls]),
        percentiles([r.e2e for r in ok if r.e2e is not None]),
        percentiles([r.ttfat for r in ok if r.ttfat is not None]),
        good, sorted({r.error for r in results if r.error})[:5], _spec_figures(spec))


def _spec_figures(spec) -> dict | None:
    if spec is None or not spec.num_drafts:
        return None
    return {"num_drafts": spec.num_drafts, "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens, "acceptance_rate": spec.acceptance_rate,
            "mean_accepted_length": spec.mean_accepted_length}


def _meets(r: RequestResult, slo_ttft: float | None, slo_tpot: float | None) -> bool:
    if slo_ttft is not None and (r.ttft is None or r.ttft > slo_ttft):
        return False
    return slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(levels: list[LevelReport]) -> str:
    head = (f"{'load':>16} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'tot tok/s':>10} "
            f"{'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} {'ITL p99':>8} {'E2E med':>9} {'goodput':>8}")
    units = (f"{'':>16} {'':>5} {'':>5} {'':>7} {'':>10} {'':>10} {'ms':>9} {'ms':>9} {'ms':>9} {'ms':>8} "
             f"{'ms':>9} {'req/s':>8}")
    rows = [head, units]
    for lv in levels:
        rows.append(f"{lv.load:>16} {lv.completed:>5} {lv.failed:>5} {lv.request_throughput:>7.2f} "
                    f"{lv.output_tokens_per_s:>10.1f} {lv.total_tokens_per_s:>10.1f} {_ms(lv.ttft_ms['median']):>9} "
                    f"{_ms(lv.ttft_ms['p99']):>9} {_ms(lv.tpot_ms['median']):>9} {_ms(lv.itl_ms['p99']):>8} "
                    f"{_ms(lv.e2e_ms['median']):>9} {'-' if lv.goodput is None else f'{lv.goodput:.2f}':>8}")
        if lv.spec_decode:
            sd = lv.spec_decode
            rows.append(f"{'':>16} speculative decoding: {sd['acceptance_rate']:.0%} of {sd['num_draft_tokens']} "
                        f"drafted tokens accepted, {sd['mean_accepted_length']:.2f} tokens per verification")
        if lv.reasoning_tokens:
            rows.append(f"{'':>16} reasoning {lv.reasoning_tokens} / answer {lv.answer_tokens} tokens; "
                        f"time to first answer token median {_ms(lv.ttfat_ms['median'])} ms")
    return "\n".join(rows)


def write_outputs(out_dir: Path, args: dict, levels: list[LevelReport],
                  slos: tuple[float | None, float | None] = (None, None)) -> list[Path]:
    """`slos`: (TTFT, TPOT) in seconds, drawn on the plot where given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_serve.json"
    path.write_text(json.dumps({"args": args, "levels": [lv.as_dict() for lv in levels]}, indent=2))
    written = [path]
    plot = _plot(out_dir / "bench_serve.png", levels, str(args.get("model")), slos)
    if plot:
        written.append(plot)
    return written


def _plot(path: Path, levels: list[LevelReport], model: str, slos: tuple[float | None, float | None]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the figures are in the JSON either way
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tput = [lv.output_tokens_per_s for lv in levels]
    slo_ttft, slo_tpot = slos
    for ax, key, label, slo in ((axes[0], "tpot_ms", "median TPOT (ms)", slo_tpot),
                                (axes[1], "ttft_ms", "median TTFT (ms)", slo_ttft)):
        xs = [getattr(lv, key)["median"] or 0 for lv in levels]
        ax.plot(xs, tput, marker="o")
        for lv, x, y in zip(levels, xs, tput):
            ax.annotate(lv.load, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        if slo is not None:
            ax.axvline(slo * 1000, color="tab:red", linestyle="--", label=f"SLO {slo * 1000:g} ms")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.margins(x=0.15, y=0.15)  # room for the labels at the ends
        ax.grid(alpha=0.3)
    fig.suptitle(f"{model}: throughput against latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

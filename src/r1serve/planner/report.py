"""What `r1serve hw` prints: the catalog, a plan, a comparison table and chart, the
validation table. JSON and text views of the same dicts."""
from __future__ import annotations

from pathlib import Path

from r1serve.planner.catalog import Catalog
from r1serve.planner.chip import FIGURES, Chip
from r1serve.planner.plan import PhasePlan, Plan
from r1serve.planner.validation import Check


# ---- catalog --------------------------------------------------------------------------------

def chip_json(chip: Chip) -> dict:
    figures = {k: {"value": f.value, "unit": FIGURES[k][1], "source": f.source,
                   "alternatives": list(f.alternatives)} | ({"note": f.note} if f.note else {})
               for k, f in chip.figures.items()}
    ridge = {fmt: chip.ridge_point(fmt) for fmt in ("bf16", "fp8", "int8") if chip.ridge_point(fmt)}
    return {"id": chip.id, "name": chip.name, "family": chip.family, "devices_per_chip": chip.devices_per_chip,
            "detected": chip.detected, "figures": figures, "ridge_point_flop_per_byte": ridge,
            "calibration": {k: v for k, v in chip.calibration.__dict__.items() if k != "family"},
            "notes": list(chip.notes)}


def catalog_text(catalog: Catalog) -> str:
    lines = []
    for chip in catalog.chips.values():
        dies = f", {chip.devices_per_chip} devices per chip" if chip.devices_per_chip > 1 else ""
        lines.append(f"{chip.id}: {chip.name} [{chip.family}{dies}]")
        for key, f in chip.figures.items():
            label, unit, _ = FIGURES[key]
            value = "—" if f.value is None else f"{f.value:g} {unit}"
            alt = f"  (also: {'; '.join(f.alternatives)})" if f.alternatives else ""
            lines.append(f"  {label:34s} {value:>14s}  {f.source}{alt}")
        ridge = ", ".join(f"{fmt} {chip.ridge_point(fmt):.0f}" for fmt in ("bf16", "fp8", "int8")
                          if chip.ridge_point(fmt))
        if ridge:
            lines.append(f"  {'ridge point, FLOP per byte':34s} {ridge}")
        lines += [f"  {note}" for note in chip.notes]
        lines.append("")
    return "\n".join(lines).rstrip()


# ---- plan -----------------------------------------------------------------------------------

def layout_json(p: PhasePlan, share: int, moe: bool) -> dict:
    lay = p.layout
    return {"chips": p.chips, "devices": lay.devices, "tp": lay.tp, "dp": lay.dp, "ep": lay.devices if moe else 1,
            "micro_batches": lay.micro_batches, "devices_per_chip": share, "engine_flags": engine_flags(p, moe),
            "engine_nearest": engine_nearest(p, moe)}


def engine_flags(p: PhasePlan, moe: bool) -> str:
    """The layout as `r1serve serve` flags: replicas (dp) of tp ranks each, experts split
    across all of an instance's devices."""
    lay = p.layout
    flags = [f"--tensor-parallel-size {lay.tp}"] if lay.tp > 1 else []
    if lay.dp > 1:
        flags.append(f"--data-parallel-size {lay.dp}")
    if moe and lay.devices > 1:
        flags.append("--expert-parallel")
    return " ".join(flags)


def engine_nearest(p: PhasePlan, moe: bool) -> str | None:
    """What the engine runs instead, where it cannot run the layout: DP attention is there
    for replicas of one rank each; replicas of tp > 1 ranks split their experts among their
    own ranks only, so one EP group over all of them becomes one replica of tensor-parallel
    attention over the same devices (the MLA cache then copied on every rank)."""
    lay = p.layout
    if not (moe and lay.dp > 1 and lay.tp > 1):
        return None
    return f"--tensor-parallel-size {lay.devices} --expert-parallel"


def breakdown_json(p: PhasePlan) -> dict:
    return {name: {"ms": round(s * 1e3, 3), "bound": p.cost.bound[name]} for name, s in p.cost.by_op.items()}


def plan_json(plan: Plan, pct: dict, ref: Plan) -> dict:
    m, w, share = plan.model, plan.workload, plan.chip.devices_per_chip
    out = {"model": m.name, "chip": plan.chip.id, "chip_name": plan.chip.name, "chips": plan.chips,
           "weight_format": plan.weight_format, "weight_format_note": format_note(plan), "fits": plan.fits,
           "note": plan.note,
           "input_len": w.input_len, "output_len": w.output_len, "tpot_slo_ms": w.tpot_slo_s * 1e3,
           "parameters": m.parameters, "active_parameters": m.active_parameters,
           "weight_bytes_per_chip": plan.weight_bytes_per_chip, "kv_bytes_per_token": m.kv_bytes_per_token,
           "memory_bytes_per_chip": plan.chip.memory_bytes}
    pre, dec = plan.prefill, plan.decode
    out |= {"kv_bytes_per_chip": dec and dec.kv_bytes_per_chip,
            "prefill_tokens_per_s_per_chip": pre and pre.tokens_per_s_per_chip,
            "prefill_batch_tokens_per_chip": pre and pre.batch_per_chip,
            "decode_tokens_per_s_per_chip": dec and dec.tokens_per_s_per_chip,
            "decode_batch_per_chip": dec and dec.batch_per_chip,
            "ttft_ms": pre and pre.step_s * 1e3,
            "tpot_ms": dec and dec.step_s * 1e3 / (1 + w.mtp_acceptance),
            "meets_tpot_slo": dec and dec.meets_slo,
            "output_tokens_per_s_per_chip": plan.output_tokens_per_s_per_chip,
            "output_tokens_per_s_per_kw": _per_kw(plan),
            "pct_of_h100": pct["overall"], "pct_of_h100_prefill": pct["prefill"],
            "pct_of_h100_decode": pct["decode"], "h100_reference_chips": ref.chips}
    if plan.fits:
        moe = bool(m.n_experts)
        out["layout"] = {"colocated": plan.colocated, "prefill_chips": plan.prefill_chips,
                         "decode_chips": plan.decode_chips, "prefill": layout_json(pre, share, moe),
                         "decode": layout_json(dec, share, moe)}
        out["prefill_breakdown"], out["decode_breakdown"] = breakdown_json(pre), breakdown_json(dec)
    return out


def _per_kw(plan: Plan) -> float | None:
    watts = plan.chip.value("tdp_w")
    tput = plan.output_tokens_per_s_per_chip
    return None if not watts or tput is None else tput / watts * 1000


BOUNDS = ("what bounds each term: compute (the chip's FLOP/s), memory (its bandwidth), scale-up link (the "
          "collectives between chips), static (a fixed cost per kernel: launch, synchronisation, pipeline fill, "
          "which no roofline shows)")


def describe_layout(p: PhasePlan, share: int, moe: bool) -> str:
    lay = p.layout
    dies = f" ({lay.devices} dies)" if share > 1 else ""
    experts = f", experts spread over all {lay.devices} devices (EP{lay.devices})" if moe and lay.devices > 1 else ""
    mb = ", two micro-batches (comm overlapped)" if lay.micro_batches == 2 else ""
    return f"{_chips(p.chips)}{dies}: attention and dense layers TP{lay.tp} x DP{lay.dp}{experts}{mb}"


def _chips(n: int) -> str:
    return f"{n} chip" if n == 1 else f"{n} chips"


FORMAT_NOTES = {"fp8": "FP8 weights and GEMMs", "int8": "INT8 weights and GEMMs (W8A8)", "bf16": "BF16 weights"}


def format_note(plan: Plan) -> str:
    note = FORMAT_NOTES[plan.weight_format]
    if plan.model.checkpoint_format == "fp8" and plan.weight_format != "fp8":
        note += ": the checkpoint is FP8, this chip has no FP8 matmuls"
    return note


def plan_text(j: dict, plan: Plan) -> str:
    gb = 1e9
    head = [f"{j['model']} on {j['chips']} x {j['chip_name']}: {j['weight_format_note']}",
            f"workload: {j['input_len']} tokens in, {j['output_len']} out, TPOT SLO {j['tpot_slo_ms']:g} ms",
            f"parameters {j['parameters'] / 1e9:.1f}B ({j['active_parameters'] / 1e9:.1f}B active), "
            f"KV {j['kv_bytes_per_token']:,} bytes per token"]
    if not j["fits"]:
        return "\n".join(head + [f"does not fit: {j['note']}"])
    share, moe = plan.chip.devices_per_chip, bool(plan.model.n_experts)
    body = [f"memory per chip: weights {j['weight_bytes_per_chip'] / gb:.1f} GB + KV "
            f"{j['kv_bytes_per_chip'] / gb:.1f} GB of {j['memory_bytes_per_chip'] / gb:.0f} GB: fits",
            f"layout: {j['note']}",
            f"  prefill  {describe_layout(plan.prefill, share, moe)}",
            _serve_line(j["model"], j["layout"]["prefill"]),
            f"  decode   {describe_layout(plan.decode, share, moe)}",
            _serve_line(j["model"], j["layout"]["decode"]),
            f"prefill: {j['prefill_tokens_per_s_per_chip']:,.0f} tokens/s per chip "
            f"({j['prefill_batch_tokens_per_chip']:,.0f} tokens per chip per step), TTFT {j['ttft_ms']:,.0f} ms",
            f"decode:  {j['decode_tokens_per_s_per_chip']:,.0f} tokens/s per chip at {j['decode_batch_per_chip']:.1f} "
            f"sequences per chip, TPOT {j['tpot_ms']:.1f} ms ({'meets' if j['meets_tpot_slo'] else 'MISSES'} the SLO)",
            f"overall: {j['output_tokens_per_s_per_chip']:,.0f} output tokens/s per chip, prefill and decode both paid"
            + (f"; {j['output_tokens_per_s_per_kw']:,.0f} per kW of chip power" if j["output_tokens_per_s_per_kw"]
               else ""),
            f"vs {j['h100_reference_chips']} x H100 on the same workload: {_pct(j['pct_of_h100'])} "
            f"(prefill {_pct(j['pct_of_h100_prefill'])}, decode {_pct(j['pct_of_h100_decode'])})"]
    if j.get("price"):
        body.append(_price_line(j["price"]))
    if j.get("pct_of_h100_by_chips"):
        steps = [f"{n} chips {_pct(v)}" + (" (hw compare's count)" if n == j["compare_chips"] else "")
                 for n, v in j["pct_of_h100_by_chips"].items()]
        body.append("% of H100 by chip count (each against as many H100s): " + " · ".join(steps))
    return "\n".join(head + body + _breakdown_text("decode step", j["decode_breakdown"])
                     + _breakdown_text("prefill step", j["prefill_breakdown"]) + [BOUNDS])


def _price_line(price: dict) -> str:
    cur = price["currency"]
    if price["per_million_output_tokens"] is None:
        return f"cost: {price['per_chip_hour']:.2f} {cur} per chip-hour, and no output to spread it over"
    return (f"cost: {price['per_million_output_tokens']:.3f} {cur} per million output tokens "
            f"({price['output_tokens_per_unit']:,.0f} tokens per {cur}) at {price['per_chip_hour']:.2f} {cur} "
            "per chip-hour, prefill paid")


def _serve_line(model: str, lay: dict) -> str:
    line = f"           r1serve serve {model} {lay['engine_flags']}".rstrip()
    if lay["engine_nearest"]:
        line += (f"\n           (DP attention over replicas of several ranks is not in the engine yet; "
                 f"it runs this as {lay['engine_nearest']})")
    return line


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}%"


def _breakdown_text(title: str, b: dict) -> list[str]:
    rows = sorted(b.items(), key=lambda kv: -kv[1]["ms"])
    return [f"{title}, one micro-batch:"] + [f"  {name:32s} {v['ms']:9.2f} ms  {v['bound']}" for name, v in rows]


# ---- compare --------------------------------------------------------------------------------

COMPARE_COLUMNS = (("chip", "chip", "{}"), ("chips", "chips", "{}"), ("fmt", "weight_format", "{}"),
                   ("prefill tok/s", "prefill_tokens_per_s_per_chip", "{:,.0f}"),
                   ("decode tok/s", "decode_tokens_per_s_per_chip", "{:,.0f}"),
                   ("batch", "decode_batch_per_chip", "{:.0f}"), ("TPOT ms", "tpot_ms", "{:.1f}"),
                   ("TTFT ms", "ttft_ms", "{:,.0f}"), ("out tok/s", "output_tokens_per_s_per_chip", "{:,.0f}"),
                   ("tok/s per kW", "output_tokens_per_s_per_kw", "{:,.0f}"), ("% H100", "pct_of_h100", "{:.0f}%"), ("prefill %", "pct_of_h100_prefill", "{:.0f}%"),
                   ("decode %", "pct_of_h100_decode", "{:.0f}%"))


def compare_text(rows: list[dict], markdown: bool = False) -> str:
    columns = COMPARE_COLUMNS + _price_columns(rows)
    cells = [[_cell(r.get(key) if key in r else (r.get("price") or {}).get(key), fmt) for _, key, fmt in columns]
             for r in rows]
    heads = [h for h, _, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return "\n".join(_aligned(row, widths) for row in [heads, *cells])


def _price_columns(rows: list[dict]) -> tuple:
    """With --chip-prices: what a chip-hour and a million output tokens cost (a row's "price")."""
    priced = [r["price"] for r in rows if r.get("price")]
    if not priced:
        return ()
    cur = priced[0]["currency"]
    return ((f"{cur}/chip-h", "per_chip_hour", "{:.2f}"), (f"{cur}/M out", "per_million_output_tokens", "{:.3f}"))


def _aligned(row: list[str], widths: list[int]) -> str:
    # the first column (the chip) left-aligned, numbers right-aligned
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def compare_chart(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; the same backend on servers and in tests
    import matplotlib.pyplot as plt

    chips = [r["chip"] for r in rows]
    series = (("prefill", "pct_of_h100_prefill"), ("decode", "pct_of_h100_decode"), ("overall", "pct_of_h100"))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(chips) + 2), 4.2))
    width = 0.27
    for i, (label, key) in enumerate(series):
        xs = [x + (i - 1) * width for x in range(len(chips))]
        ax.bar(xs, [r.get(key) or 0 for r in rows], width, label=label)
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(chips)), chips, rotation=30, ha="right")
    ax.set_ylabel("% of an H100 deployment, per chip")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return _saved(fig, path)


def _saved(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


BOUND_COLORS = {"compute": "tab:blue", "memory": "tab:orange", "scale-up link": "tab:green",
                "scale-out network": "tab:olive", "static": "tab:gray"}


def plan_chart(j: dict, path: Path) -> Path:
    """One plan drawn: each step's terms (coloured by what bounds them, each step on its own
    scale: prefill runs ~100x longer) and % of H100 by chip count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.6))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2])
    for row, phase in enumerate(("decode", "prefill")):
        _step_bar(fig.add_subplot(grid[row, 0]), f"{phase} step", j.get(f"{phase}_breakdown", {}))
    fig.axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in BOUND_COLORS.values()],
                       labels=[f"{b}-bound" for b in BOUND_COLORS], fontsize=7, ncol=3, loc="upper right",
                       bbox_to_anchor=(1, 1.45))
    counts = fig.add_subplot(grid[:, 1])
    by = {int(n): v for n, v in j.get("pct_of_h100_by_chips", {}).items() if v is not None}
    counts.plot(list(by), list(by.values()), marker="o")
    counts.axhline(100, color="black", linewidth=0.8, linestyle="--")
    counts.axvline(j["chips"], color="tab:red", linewidth=0.8, linestyle=":", label=f"this plan ({j['chips']})")
    counts.set_xscale("log", base=2)
    counts.set_xticks(list(by), [str(n) for n in by])
    counts.minorticks_off()
    counts.set_xlabel("chips (against as many H100s)")
    counts.set_ylabel("% of H100")
    counts.legend(fontsize=8)
    fig.suptitle(f"{j['model']} on {j['chips']} x {j['chip_name']}: {j['input_len']} in / {j['output_len']} out, "
                 f"TPOT <= {j['tpot_slo_ms']:g} ms", fontsize=10)
    return _saved(fig, path)


def _step_bar(ax, title: str, breakdown: dict) -> None:
    """The step as one bar of its terms, longest first, each named where it is wide enough."""
    left, total = 0.0, sum(v["ms"] for v in breakdown.values()) or 1.0
    for name, v in sorted(breakdown.items(), key=lambda kv: -kv[1]["ms"]):
        ax.barh(0, v["ms"], left=left, color=BOUND_COLORS.get(v["bound"], "tab:purple"), edgecolor="white")
        if v["ms"] / total > len(name) / 120:  # about the share of the bar the name needs
            ax.text(left + v["ms"] / 2, 0, name, ha="center", va="center", fontsize=7, color="white")
        left += v["ms"]
    ax.set_yticks([0], [title])
    ax.set_xlabel("ms per micro-batch", fontsize=8)


# ---- validation -----------------------------------------------------------------------------

def validation_json(checks: list[Check]) -> list[dict]:
    return [{"id": c.row.id, "system": c.row.system, "chip": c.row.chip, "phase": c.row.phase,
             "published_per_chip": c.row.figure, "predicted_per_chip": round(c.predicted, 1),
             "error_pct": round(100 * c.error, 1), "within_tolerance": c.ok, "micro_batches": c.micro_batches,
             "source": c.row.source} for c in checks]


def validation_text(checks: list[Check], markdown: bool = False) -> str:
    heads = ("#", "system", "chip", "phase", "published /chip", "predicted /chip", "error")
    rows = [(c.row.id, c.row.system, c.row.chip, c.row.phase, f"{c.row.figure:,.0f}", f"{c.predicted:,.0f}",
             f"{100 * c.error:+.1f}%") for c in checks]
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [heads, *rows])

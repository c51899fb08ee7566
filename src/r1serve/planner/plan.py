"""Plan a deployment: the layout, batch and prefill/decode split that serve a workload best
on N chips of one kind, and what it yields per chip.

Decode runs at the largest batch whose time per output token meets the TPOT SLO and whose
KV cache fits; prefill at DeepSeek's 16K tokens per device (or fewer, to meet a TTFT SLO).
N chips are either one colocated instance or split into a prefill and a decode instance,
whichever gives more output tokens per chip once each request's prefill and decode work
are both paid:

    output tok/s per chip = O x requests/s / N,
    requests/s = min(prefill_chips x P / I, decode_chips x D / O)   (split)
    requests/s per chip = 1 / (I / P + O / D)                          (colocated, time-shared)
"""
from __future__ import annotations

from dataclasses import dataclass

from r1serve.planner.chip import Chip
from r1serve.planner.model import ModelShape
from r1serve.planner.roofline import (Device, Layout, StepCost, kv_bytes_per_sequence_per_device, step_cost,
                                       weight_bytes_per_device, weight_format)
from r1serve.errors import R1ServeError

MEMORY_RESERVE = 0.1  # activations, workspace, fragmentation (vLLM's default utilisation is 0.9)
PREFILL_TOKENS_PER_DEVICE = 16384  # DeepSeek's prefill batch per GPU (Open Infra Week, day 6)


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    tpot_slo_s: float
    ttft_slo_s: float | None = None
    mtp_acceptance: float = 0.0  # 0: no speculative decoding; else the MTP draft token's acceptance rate
    mean_kv_len: float | None = None  # during decode, where known (default: input + output / 2)

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise R1ServeError(f"input {self.input_len} / output {self.output_len} tokens: both must be >= 1")
        if self.tpot_slo_s <= 0 or (self.ttft_slo_s is not None and self.ttft_slo_s <= 0):
            raise R1ServeError("SLOs must be > 0 (e.g. --tpot-slo 50ms, --ttft-slo 2s)")
        if not 0 <= self.mtp_acceptance <= 1:
            raise R1ServeError(f"--mtp {self.mtp_acceptance}: an acceptance rate is in [0, 1]")

    @property
    def decode_context(self) -> float:
        """Mean KV length over a sequence's decode: its prompt plus half its output."""
        return self.mean_kv_len or self.input_len + self.output_len / 2

    @property
    def queries(self) -> int:
        return 2 if self.mtp_acceptance else 1


@dataclass(frozen=True)
class PhasePlan:
    phase: str  # "prefill" | "decode"
    chips: int
    layout: Layout
    step_s: float
    batch_per_chip: float  # decode: sequences; prefill: prompt tokens per step
    tokens_per_s_per_chip: float
    weight_bytes_per_chip: float
    kv_bytes_per_chip: float
    meets_slo: bool
    cost: StepCost


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    chip: Chip
    chips: int
    workload: Workload
    weight_format: str
    fits: bool
    note: str  # why it does not fit, or how the chips are split
    weight_bytes_per_chip: float
    prefill: PhasePlan | None
    decode: PhasePlan | None
    prefill_chips: int  # 0 when colocated
    decode_chips: int
    output_tokens_per_s_per_chip: float | None  # prefill and decode both paid

    @property
    def colocated(self) -> bool:
        return self.fits and self.prefill_chips == 0


def usable_memory(d: Device) -> float:
    return d.memory * (1 - MEMORY_RESERVE)


def candidate_layouts(m: ModelShape, d: Device, devices: int) -> list[Layout]:
    """TP inside one scale-up domain (powers of two), DP over the rest, experts over all."""
    if devices > d.domain and not d.scale_out:
        return []  # no network between domains: an instance stays inside one
    out, tp = [], 1
    while tp <= min(devices, d.domain):
        if devices % tp == 0:
            comm = tp > 1 or (m.n_experts and devices > tp)
            out += [Layout(devices, tp, mb) for mb in ((1, 2) if comm else (1,))]
        tp *= 2
    return out


def kv_room(m: ModelShape, d: Device, layout: Layout) -> float:
    return usable_memory(d) - weight_bytes_per_device(m, d, layout)


def max_sequences(m: ModelShape, d: Device, layout: Layout, context: float) -> int:
    """Sequences per attention group whose caches fit beside the weights."""
    room = kv_room(m, d, layout)
    return int(room // kv_bytes_per_sequence_per_device(m, layout, context)) if room > 0 else 0


def decode_at(m: ModelShape, d: Device, layout: Layout, w: Workload, sequences: int | None = None) -> PhasePlan | None:
    """Decode at a given batch (sequences per attention group), or at the largest that meets
    the TPOT SLO and fits; None if not even one sequence fits."""
    ctx, limit = w.decode_context, max_sequences(m, d, layout, w.decode_context)
    if limit < 1 or (sequences is not None and sequences > limit):
        return None

    def tpot(b: int) -> float:
        return step_cost(m, d, layout, b * w.queries, ctx, "decode", w.queries).seconds / (1 + w.mtp_acceptance)

    b = sequences if sequences is not None else largest(1, limit, lambda b: tpot(b) <= w.tpot_slo_s)
    cost = step_cost(m, d, layout, b * w.queries, ctx, "decode", w.queries)
    per_device = b / layout.tp * (1 + w.mtp_acceptance) / cost.seconds
    return _phase("decode", m, d, layout, cost, b / layout.tp, per_device,
                  b * kv_bytes_per_sequence_per_device(m, layout, ctx), tpot(b) <= w.tpot_slo_s)


def largest(lo: int, hi: int, ok) -> int:
    """The largest b in [lo, hi] with ok(b), for ok true up to some point and false after; lo if none."""
    if not ok(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def prefill_at(m: ModelShape, d: Device, layout: Layout, w: Workload,
               tokens_per_device: int = PREFILL_TOKENS_PER_DEVICE) -> PhasePlan | None:
    """Prefill whole prompts, up to tokens_per_device each step (fewer if a TTFT SLO needs it)."""
    room = kv_room(m, d, layout)
    per_token = kv_bytes_per_sequence_per_device(m, layout, 1)
    most = max(1, tokens_per_device * layout.tp // w.input_len)  # prompts per attention group
    if room < most * w.input_len * per_token:
        most = int(room // (w.input_len * per_token))
    if most < 1:
        return None

    def ttft(n: int) -> float:
        return step_cost(m, d, layout, n * w.input_len, w.input_len, "prefill").seconds

    n = most if w.ttft_slo_s is None else largest(1, most, lambda n: ttft(n) <= w.ttft_slo_s)
    tokens = n * w.input_len
    cost = step_cost(m, d, layout, tokens, w.input_len, "prefill")
    meets = w.ttft_slo_s is None or cost.seconds <= w.ttft_slo_s
    return _phase("prefill", m, d, layout, cost, tokens / layout.tp, tokens / layout.tp / cost.seconds,
                  tokens * per_token, meets)


def _phase(phase: str, m: ModelShape, d: Device, layout: Layout, cost: StepCost, per_device_batch: float,
           per_device_rate: float, kv_per_device: float, meets: bool) -> PhasePlan:
    s = d.share
    return PhasePlan(phase, layout.devices // s, layout, cost.seconds, per_device_batch * s, per_device_rate * s,
                     weight_bytes_per_device(m, d, layout) * s, kv_per_device * s, meets, cost)


def best_phase(m: ModelShape, d: Device, chips: int, w: Workload, phase: str) -> PhasePlan | None:
    """The phase's best layout on `chips` chips: SLO met first, then tokens/s per chip."""
    run = decode_at if phase == "decode" else prefill_at
    return _best([run(m, d, layout, w) for layout in candidate_layouts(m, d, chips * d.share)])


def smallest_fit(m: ModelShape, d: Device, w: Workload, limit: int = 4096) -> int | None:
    """The fewest chips (a power of two) on which the model and one sequence fit."""
    chips = 1
    while chips <= limit:
        if any(max_sequences(m, d, lay, w.decode_context) >= 1 for lay in candidate_layouts(m, d, chips * d.share)):
            return chips
        chips *= 2
    return None


def plan(m: ModelShape, chip: Chip, chips: int, w: Workload, weights: str = "auto") -> Plan:
    if chips < 1:
        raise R1ServeError(f"--chips {chips}: give at least 1")
    if not chip.bandwidth:
        raise R1ServeError(f"{chip.name} has no memory bandwidth figure; give one in a --catalog file "
                           "(measure it with `r1serve hw measure`)")
    d = Device(chip, weight_format(m, chip, weights))
    if chips * d.share > d.domain and not d.scale_out:
        raise R1ServeError(f"{chips} x {chip.name} span more than one scale-up domain "
                           f"({d.domain // d.share} chips) and the catalog has no scale_out_gb_s for it; add one")
    unit = smallest_fit(m, d, w)
    if unit is None or unit > chips:
        return _no_fit(m, d, chips, w, unit)
    options = [_colocated(m, d, chips, w)]
    options += [_split(m, d, chips, p, w) for p in range(unit, chips - unit + 1, unit)]
    return max((o for o in options if o), key=_rank)


def _colocated(m: ModelShape, d: Device, chips: int, w: Workload) -> Plan | None:
    """One instance does both phases, so both see the weights as one TP degree places them
    (micro-batching is chosen per step)."""
    best = None
    for tp in sorted({lay.tp for lay in candidate_layouts(m, d, chips * d.share)}):
        layouts = [lay for lay in candidate_layouts(m, d, chips * d.share) if lay.tp == tp]
        pre = _best([prefill_at(m, d, lay, w) for lay in layouts])
        dec = _best([decode_at(m, d, lay, w) for lay in layouts])
        if pre is None or dec is None:
            continue
        per_chip = w.output_len / (w.input_len / pre.tokens_per_s_per_chip + w.output_len / dec.tokens_per_s_per_chip)
        option = _fitting(m, d, chips, w, pre, dec, 0, chips, per_chip,
                          "colocated: every chip prefills and decodes, time-shared")
        best = option if best is None or _rank(option) > _rank(best) else best
    return best


def _best(plans: list[PhasePlan | None]) -> PhasePlan | None:
    return max((p for p in plans if p), key=lambda p: (p.meets_slo, p.tokens_per_s_per_chip), default=None)


def _rank(p: Plan) -> tuple:
    return (p.decode.meets_slo, p.output_tokens_per_s_per_chip)


def _split(m: ModelShape, d: Device, chips: int, prefill_chips: int, w: Workload) -> Plan | None:
    decode_chips = chips - prefill_chips
    pre = best_phase(m, d, prefill_chips, w, "prefill")
    dec = best_phase(m, d, decode_chips, w, "decode")
    if pre is None or dec is None:
        return None
    rps = min(prefill_chips * pre.tokens_per_s_per_chip / w.input_len,
              decode_chips * dec.tokens_per_s_per_chip / w.output_len)
    return _fitting(m, d, chips, w, pre, dec, prefill_chips, decode_chips, w.output_len * rps / chips,
                    f"disaggregated: {prefill_chips} chips prefill, {decode_chips} decode (PD split)")


def _fitting(m, d, chips, w, pre, dec, prefill_chips, decode_chips, per_chip, note) -> Plan:
    return Plan(m, d.chip, chips, w, d.weight_format, True, note,
                max(pre.weight_bytes_per_chip, dec.weight_bytes_per_chip), pre, dec, prefill_chips, decode_chips,
                per_chip)


def _no_fit(m: ModelShape, d: Device, chips: int, w: Workload, unit: int | None) -> Plan:
    layout = Layout(chips * d.share, 1)
    need = (weight_bytes_per_device(m, d, layout) + kv_bytes_per_sequence_per_device(m, layout, w.decode_context))
    why = (f"needs {need * d.share / 1e9:.0f} GB per chip for weights and one sequence's cache, "
           f"{usable_memory(d) * d.share / 1e9:.0f} GB usable")
    why += f"; use at least {unit} chips" if unit else "; no layout up to 4096 chips fits"
    return Plan(m, d.chip, chips, w, d.weight_format, False, why, weight_bytes_per_device(m, d, layout) * d.share,
                None, None, 0, 0, None)


REFERENCE_CHIP = "h100"


def reference_plan(m: ModelShape, h100: Chip, chips: int, w: Workload) -> Plan:
    """H100s on the same workload: as many chips as the plan has, or the fewest that hold
    the model (a power of two) when that many cannot."""
    ref = plan(m, h100, chips, w)
    if ref.fits:
        return ref
    unit = smallest_fit(m, Device(h100, weight_format(m, h100)), w)
    return plan(m, h100, unit, w) if unit else ref


def pct_of(p: Plan, ref: Plan) -> dict[str, float | None]:
    """Per-chip figures as a percentage of the reference plan's."""
    def pct(a, b):
        return None if a is None or not b else 100 * a / b

    if not (p.fits and ref.fits):
        return {"overall": None, "prefill": None, "decode": None}
    return {"overall": pct(p.output_tokens_per_s_per_chip, ref.output_tokens_per_s_per_chip),
            "prefill": pct(p.prefill.tokens_per_s_per_chip, ref.prefill.tokens_per_s_per_chip),
            "decode": pct(p.decode.tokens_per_s_per_chip, ref.decode.tokens_per_s_per_chip)}

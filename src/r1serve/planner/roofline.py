"""One serving step on one device, as a sum of per-operator rooflines.

Each operator costs max(FLOPs / (peak x compute_eff), bytes / (bandwidth x memory_eff))
plus a static cost per kernel; each collective costs its bytes over the link it crosses
(scale-up inside a domain, scale-out between domains) x comm_eff, plus a static cost. With
two micro-batches one's collectives run while the other computes (DeepSeek's and SGLang's
two-batch overlap), at the price of reading every weight twice per step:

    micro_batches=1:  step = compute + comm
    micro_batches=2:  step = 2 x (compute + comm - OVERLAP x min(compute, comm))   (each of T/2)

OVERLAP is the share of the shorter side the overlap hides. It is below 1 because each
layer's chain attention -> dispatch -> experts -> combine leaves a transfer exposed wherever
the compute beside it is shorter, and on GPUs the communication kernels take SMs from the
GEMMs. It is the one factor read off published profiles rather than kernel benchmarks:
DeepSeek's H800 steps imply 0.65 (decode) and 0.73 (prefill), SGLang's H100 steps 0.4 to
0.45; the planner uses 0.5 for every chip and phase.

A step processes `tokens` tokens per attention group (tp devices that split the heads);
the instance has dp = devices / tp such groups, and the routed experts are spread over
all of its devices.
"""
from __future__ import annotations

import math
from statistics import NormalDist

from dataclasses import dataclass

from r1serve.planner.chip import Calibration, Chip
from r1serve.planner.model import ModelShape
from r1serve.errors import R1ServeError

BYTES_PER_PARAM = {"fp8": 1, "int8": 1, "bf16": 2}
OVERLAP = 0.5
HEAD_BYTES = 2  # embedding and LM head stay BF16 in R1's FP8 checkpoint


@dataclass(frozen=True)
class Device:
    """What one device (a die the software sees) of a chip brings."""

    chip: Chip
    weight_format: str  # "fp8" | "int8" | "bf16": the linear weights and their GEMMs

    @property
    def share(self) -> int:
        return self.chip.devices_per_chip

    @property
    def calibration(self) -> Calibration:
        return self.chip.calibration

    def flops(self, fmt: str) -> float:
        return self.chip.peak_flops(fmt) / self.share

    @property
    def bandwidth(self) -> float:
        return self.chip.bandwidth / self.share

    @property
    def memory(self) -> float:
        return self.chip.memory_bytes / self.share

    @property
    def scale_up(self) -> float:
        return self.chip.value("scale_up_gb_s") / self.share

    @property
    def scale_out(self) -> float:
        return (self.chip.value("scale_out_gb_s") or 0.0) / self.share

    @property
    def domain(self) -> int:
        return int(self.chip.value("scale_up_domain")) * self.share


@dataclass(frozen=True)
class Layout:
    devices: int  # in one model instance
    tp: int  # attention heads and dense MLPs split tp ways; dp = devices / tp groups
    micro_batches: int = 1

    @property
    def dp(self) -> int:
        return self.devices // self.tp


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # "matmul" | "vector" | "comm"
    flops: float = 0.0
    bytes: float = 0.0  # memory traffic (matmul, vector)
    fmt: str = "bf16"  # the rate FLOPs run at
    count: float = 0.0  # kernels, each paying the static cost
    up_bytes: float = 0.0  # comm: over the scale-up link
    out_bytes: float = 0.0  # comm: over the scale-out network


@dataclass(frozen=True)
class StepCost:
    seconds: float
    compute_s: float  # one micro-batch
    comm_s: float  # one micro-batch
    by_op: dict  # op name -> seconds in one micro-batch
    bound: dict  # op name -> the resource that sets its time


def op_terms(op: Op, d: Device) -> tuple[dict[str, float], float]:
    """The op's roofline terms (the largest sets its time) and its static cost, in seconds."""
    c = d.calibration
    if op.kind == "comm":  # the scale-up and scale-out paths run at once
        terms = {"scale-up link": op.up_bytes / (d.scale_up * c.comm_eff) if op.up_bytes else 0.0,
                 "scale-out network": op.out_bytes / (d.scale_out * c.comm_eff) if op.out_bytes else 0.0}
        return terms, op.count * c.collective_us * 1e-6
    terms = {"compute": op.flops / (d.flops(op.fmt) * c.compute_eff),
             "memory": op.bytes / (d.bandwidth * c.memory_eff)}
    return terms, op.count * (c.matmul_us if op.kind == "matmul" else c.vector_us) * 1e-6


def op_seconds(op: Op, d: Device) -> float:
    terms, static = op_terms(op, d)
    return max(terms.values()) + static


def op_bound(op: Op, d: Device) -> str:
    """Which resource sets the op's time: compute, memory, a link, or its static cost."""
    terms, static = op_terms(op, d)
    return max((*((t, name) for name, t in terms.items()), (static, "static")))[1]


def step_cost(m: ModelShape, d: Device, layout: Layout, tokens: float, context: float, phase: str,
              queries: int = 1) -> StepCost:
    """One step of `tokens` tokens per attention group; `context` is the mean KV length
    (decode) or the prompt length (prefill). In decode each sequence brings `queries` query
    tokens (2 when an MTP draft token is verified), all reading its cache once."""
    per_mb = tokens / layout.micro_batches
    ops = step_ops(m, d, layout, per_mb, context, phase, queries)
    by_op = {op.name: op_seconds(op, d) for op in ops}
    bound = {op.name: op_bound(op, d) for op in ops}
    comm = sum(t for op, t in zip(ops, by_op.values()) if op.kind == "comm")
    compute = sum(by_op.values()) - comm
    mb = layout.micro_batches
    seconds = compute + comm if mb == 1 else mb * (compute + comm - OVERLAP * min(compute, comm))
    return StepCost(seconds, compute, comm, by_op, bound)


def step_ops(m: ModelShape, d: Device, layout: Layout, tokens: float, context: float, phase: str,
             queries: int = 1) -> list[Op]:
    """The whole model's operators for one micro-batch, each summed over the layers it runs in."""
    ops = attention_ops(m, d, layout, tokens, context, phase, queries)
    ops += mlp_ops(m, d, layout, tokens)
    ops += expert_ops(m, d, layout, tokens)
    ops += comm_ops(m, d, layout, tokens, phase)
    ops.append(head_op(m, layout, tokens, context, phase))
    return [op for op in ops if op.flops or op.bytes or op.up_bytes or op.out_bytes or op.count]


def attention_ops(m: ModelShape, d: Device, layout: Layout, tokens: float, context: float, phase: str,
                  queries: int = 1) -> list[Op]:
    L, tp, wb = m.num_layers, layout.tp, BYTES_PER_PARAM[d.weight_format]
    kv_layer = m.kv_bytes_per_token / L  # per token per layer
    kv_split = min(tp, m.kv_split_max)  # MLA's latent is shared by all heads: TP copies it
    proj = Op("attention projections", "matmul", L * 2 * tokens * m.attn_params / tp,
              L * m.attn_params * wb / tp, d.weight_format, L * m.proj_kernels)
    if phase == "decode":  # every token reads its whole cache (absorbed MLA / paged GQA)
        flops = tokens * context * m.decode_flops_per_ctx / tp
        traffic = tokens / queries * context * kv_layer / kv_split
    else:  # causal: a prompt of length P attends to (P + 1) / 2 positions on average
        flops = tokens * (context + 1) / 2 * m.prefill_flops_per_ctx / tp
        traffic = 2 * tokens * kv_layer / kv_split
    core = Op("attention core", "matmul", L * flops, L * traffic, "bf16", L)
    # about ten hidden-sized BF16 rows streamed per token per layer (norms in and out, residuals, rope)
    norms = Op("norms, rope, residuals", "vector", 0, L * tokens * 10 * m.hidden * 2, "bf16", L * m.vector_kernels)
    return [proj, core, norms]


def mlp_ops(m: ModelShape, d: Device, layout: Layout, tokens: float) -> list[Op]:
    """Dense MLPs and MoE layers' shared experts: every token, split tp ways."""
    wb, tp = BYTES_PER_PARAM[d.weight_format], layout.tp
    params = m.dense_layers * m.dense_mlp_params + m.moe_layers * m.shared_params
    kernels = m.dense_layers * 2 + m.moe_layers * 3  # gate_up, down (+ router)
    return [Op("dense MLP / shared experts", "matmul", 2 * tokens * params / tp, params * wb / tp,
               d.weight_format, kernels)]


def experts_touched(n_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts that get at least one of `tokens` tokens (uniform routing): the
    weights a small batch reads are these, not all of them."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def ep_imbalance(devices: int, copies_per_device: float) -> float:
    """The busiest device's routed tokens over the mean. Routed at random, a device's count
    spreads about the mean with deviation sqrt(mean) (Poisson), and the median of the largest
    of n such counts sits z = Phi^-1(0.5 ** (1/n)) deviations above it. The skew of real
    routing on top of that is what DeepSeek's EPLB (hot experts replicated) removes, so it
    is not counted."""
    if devices <= 1 or copies_per_device <= 0:
        return 1.0
    z = NormalDist().inv_cdf(0.5 ** (1 / devices))
    return 1 + z / math.sqrt(copies_per_device)


def expert_ops(m: ModelShape, d: Device, layout: Layout, tokens: float) -> list[Op]:
    if not m.n_experts:
        return []
    wb, n = BYTES_PER_PARAM[d.weight_format], layout.devices
    batch = tokens * layout.dp  # the instance's tokens in this micro-batch
    touched = experts_touched(m.n_experts, m.top_k, batch)
    busiest = ep_imbalance(n, batch * m.top_k / n)  # the step waits for the most loaded device
    flops = 2 * batch * m.top_k * m.expert_params / n * busiest
    weights = touched * m.expert_params * wb / n
    inter = m.expert_params // (3 * m.hidden)
    moved = batch * m.top_k * (2 * m.hidden + 3 * inter) * 2 / n * busiest  # permute in/out, activation
    L = m.moe_layers
    return [Op("routed experts", "matmul", L * flops, L * weights, d.weight_format, L * 2),
            Op("routing, permute, activation", "vector", 0, L * moved, "bf16", L * 4)]


def comm_ops(m: ModelShape, d: Device, layout: Layout, tokens: float, phase: str) -> list[Op]:
    ops = []
    act = 2 * m.hidden  # a BF16 activation row
    if layout.tp > 1:  # ring all-reduce: 2 (tp - 1) / tp of the message per device, twice a layer
        per_layer = 2 * tokens * act * 2 * (layout.tp - 1) / layout.tp
        ops.append(Op("TP all-reduce", "comm", up_bytes=m.num_layers * per_layer, count=2 * m.num_layers))
    if m.n_experts and layout.dp > 1:
        ops.append(all_to_all(m, d, layout, tokens, phase))
    return ops


def all_to_all(m: ModelShape, d: Device, layout: Layout, tokens: float, phase: str) -> Op:
    """EP dispatch (FP8/INT8 rows where the weights are 8-bit) and combine (BF16 rows).

    Decode uses low-latency kernels that send each of a token's top_k copies straight to
    its expert's device; prefill uses throughput kernels that send a token once to each
    remote domain it needs and fan out over the scale-up link there (DeepEP's two modes).
    """
    n, k = layout.devices, m.top_k
    domain = min(d.domain, n)
    row = m.hidden * (1 if d.weight_format in ("fp8", "int8") else 2) + m.hidden * 2
    sent = tokens / layout.tp  # each device of an attention group dispatches its share
    in_domain = k * (domain - 1) / n  # copies to other devices of my domain
    off_copies = k * (n - domain) / n
    if phase == "decode" or n <= domain:
        off = off_copies
        up = in_domain
    else:
        domains = n / domain
        off = (domains - 1) * (1 - (1 - 1 / domains) ** k)
        up = in_domain + off_copies * (domain - 1) / domain  # forwarded inside the target domain
    L = m.moe_layers
    return Op("EP dispatch + combine", "comm", up_bytes=L * sent * up * row, out_bytes=L * sent * off * row,
              count=2 * L)


def head_op(m: ModelShape, layout: Layout, tokens: float, context: float, phase: str) -> Op:
    rows = tokens if phase == "decode" else tokens / max(context, 1)  # prefill: each prompt's last token
    return Op("LM head", "matmul", 2 * rows * m.embed_params / layout.tp, m.embed_params * HEAD_BYTES / layout.tp,
              "bf16", 1)


def weight_bytes_per_device(m: ModelShape, d: Device, layout: Layout) -> float:
    wb = BYTES_PER_PARAM[d.weight_format]
    split = m.num_layers * m.attn_params + m.dense_layers * m.dense_mlp_params + m.moe_layers * m.shared_params
    experts = m.moe_layers * m.n_experts * m.expert_params
    return (split * wb + 2 * m.embed_params * HEAD_BYTES) / layout.tp + experts * wb / layout.devices


def kv_bytes_per_sequence_per_device(m: ModelShape, layout: Layout, context: float) -> float:
    """A sequence's cache on each device of its attention group (MLA's latent is copied on all tp)."""
    return context * m.kv_bytes_per_token / min(layout.tp, m.kv_split_max)


def weight_format(m: ModelShape, chip: Chip, requested: str = "auto") -> str:
    """The checkpoint's own format where the chip runs it; an FP8 checkpoint on a chip without
    FP8 runs W8A8 INT8 where the chip has INT8 (as Ascend deployments of R1 do), else BF16."""
    if requested != "auto":
        if requested not in BYTES_PER_PARAM:
            raise R1ServeError(f"weight format {requested!r}; use auto, fp8, int8 or bf16")
        if not chip.supports(requested):
            raise R1ServeError(f"{chip.name} has no {requested.upper()} matmuls; use auto or bf16")
        return requested
    if m.checkpoint_format == "fp8":
        return next(f for f in ("fp8", "int8", "bf16") if chip.supports(f))
    return "bf16"


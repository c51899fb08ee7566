"""Published DeepSeek-R1/V3 serving results, and the planner's prediction of each from the
chip's specs, the model's shape and the stated workload alone (the layout each deployment
states; batch and micro-batching as published or, where not, as the planner picks).

`r1serve hw validate` prints the table; tests/test_hw.py holds every row to +-25%.
"""
from __future__ import annotations

from dataclasses import dataclass

from r1serve.planner.catalog import Catalog
from r1serve.planner.model import ModelShape
from r1serve.planner.plan import Workload, decode_at, prefill_at
from r1serve.planner.roofline import Device, Layout, weight_format

TOLERANCE = 0.25


@dataclass(frozen=True)
class Published:
    id: str
    system: str
    chip: str
    phase: str  # "prefill" (input tokens/s per chip) | "decode" (output tokens/s per chip)
    ep: int  # chips in the expert-parallel instance (attention is data-parallel on each)
    context: int  # prompt length (prefill) or mean KV length (decode)
    figure: float  # per chip, as published (per-node figures divided by 8)
    batch: int | None = None  # prefill: tokens per chip per step; decode: sequences per chip
    tpot_slo_s: float | None = None  # decode rows given as a per-user speed instead of a batch
    source: str = ""


PUBLISHED = (
    Published("1", "DeepSeek profile, prefill", "h800", "prefill", 32, 4096, 62713 / 8, batch=16384,
              source="deepseek-ai/open-infra-index, day 6"),
    Published("2", "DeepSeek profile, decode", "h800", "decode", 128, 4096, 18598 / 8, batch=128,
              source="deepseek-ai/open-infra-index, day 6"),
    Published("3", "DeepSeek production, 24 h average", "h800", "decode", 144, 4989, 14800 / 8,
              tpot_slo_s=1 / 21, source="deepseek-ai/open-infra-index, day 6 (20-22 tok/s per user)"),
    Published("4a", "SGLang large-scale EP, 1K prompts", "h100", "prefill", 32, 1024, 57674 / 8, batch=16384,
              source="LMSYS blog 2025-05-05"),
    Published("4b", "SGLang large-scale EP, 2K prompts", "h100", "prefill", 32, 2048, 54543 / 8, batch=16384,
              source="LMSYS blog 2025-05-05"),
    Published("4c", "SGLang large-scale EP, 4K prompts", "h100", "prefill", 32, 4096, 50302 / 8, batch=16384,
              source="LMSYS blog 2025-05-05"),
    Published("5", "SGLang large-scale EP, decode", "h100", "decode", 72, 2000, 22282 / 8, batch=256,
              source="LMSYS blog 2025-05-05"),
)


@dataclass(frozen=True)
class Check:
    row: Published
    predicted: float
    micro_batches: int

    @property
    def error(self) -> float:
        return self.predicted / self.row.figure - 1

    @property
    def ok(self) -> bool:
        return abs(self.error) <= TOLERANCE


def predict(row: Published, m: ModelShape, catalog: Catalog) -> Check:
    chip = catalog.chip(row.chip)
    d = Device(chip, weight_format(m, chip))
    best = None
    for mb in (1, 2):  # both deployments can overlap with two micro-batches; take what pays
        layout = Layout(row.ep * d.share, 1, mb)
        p = _phase(row, m, d, layout)
        if p and (best is None or p.tokens_per_s_per_chip > best[0]):
            best = (p.tokens_per_s_per_chip, mb)
    return Check(row, *best)


def _phase(row: Published, m: ModelShape, d: Device, layout: Layout):
    if row.phase == "prefill":
        return prefill_at(m, d, layout, Workload(row.context, 1, 1.0), row.batch)
    w = Workload(row.context, 1, row.tpot_slo_s or 10.0, mean_kv_len=row.context)
    return decode_at(m, d, layout, w, row.batch)


def validate(m: ModelShape, catalog: Catalog) -> list[Check]:
    return [predict(row, m, catalog) for row in PUBLISHED]

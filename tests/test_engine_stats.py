"""EngineStats whole: every field reaches /metrics under its name, and data-parallel
replicas' stats merge into one engine's."""
from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from r1serve.engine.engine_stats import EngineStats
from r1serve.server.metrics import ENGINE_COUNTERS, ENGINE_GAUGES, ServerMetrics

FIELDS = [f.name for f in dataclasses.fields(EngineStats)]
# A distinct value per field, so a field exported under another's name shows.
STATS = EngineStats(**{name: (tuple(range(7, 10)) if name == "spec_accepted_per_position"
                              else 0.5 if name == "kv_cache_usage" else 100 + i)
                       for i, name in enumerate(FIELDS)})


def scrape(per_model: dict[str, EngineStats]) -> dict[tuple[str, tuple], float]:
    text = generate_latest(ServerMetrics(lambda: per_model).registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_reaches_metrics(field):
    samples = scrape({"m": STATS})
    value = getattr(STATS, field)
    if field == "spec_accepted_per_position":
        for j, n in enumerate(value):
            assert samples[("r1serve:spec_decode_num_accepted_tokens_per_pos_total",
                            (("model_name", "m"), ("position", str(j))))] == n
        return
    if field in ENGINE_GAUGES:
        name = f"r1serve:{ENGINE_GAUGES[field][0]}"
    else:
        name = f"r1serve:{ENGINE_COUNTERS[field][0]}_total"  # the exposition's name of a counter
    assert samples[(name, (("model_name", "m"),))] == value


def test_the_tables_name_every_field_once():
    exported = [*ENGINE_GAUGES, *ENGINE_COUNTERS, "spec_accepted_per_position"]
    assert sorted(exported) == sorted(FIELDS)
    names = [name for name, _ in [*ENGINE_GAUGES.values(), *ENGINE_COUNTERS.values()]]
    assert len(names) == len(set(names))


def test_replicas_merge_into_one_engine():
    a = EngineStats(num_requests_running=2, num_kv_blocks=100, num_free_blocks=50, prefix_cache_evictions=3,
                    num_steps=10, spec_accepted_per_position=(4, 2))
    b = EngineStats(num_requests_running=1, num_kv_blocks=100, num_free_blocks=100, prefix_cache_evictions=4,
                    num_steps=12, spec_accepted_per_position=(5,), grammar_wait_seconds=0.25)
    m = EngineStats.merged([a, b])
    assert m == EngineStats(num_requests_running=3, kv_cache_usage=0.25, num_kv_blocks=200, num_free_blocks=150,
                            prefix_cache_evictions=7, num_steps=22, grammar_wait_seconds=0.25,
                            spec_accepted_per_position=(9, 2))
    assert EngineStats.merged([]) == EngineStats()

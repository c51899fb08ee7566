"""Prometheus metrics, named as vLLM names its own (prefix `r1serve:`), plus reasoning ones.

Engine state (every field of EngineStats: running, waiting, KV blocks, prefix-cache and
speculation counters) is read from the engine's latest stats at scrape time; per-request figures are observed as requests finish. Each app has
its own registry: two servers in one process (tests) never share counters.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from r1serve.engine.engine_stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


# Every EngineStats field but spec_accepted_per_position (its own family below), as the metric
# it is exported as, vLLM's name where vLLM has one: field -> (metric, help).
ENGINE_GAUGES = {
    "num_requests_running": ("num_requests_running", "Requests in model steps now."),
    "num_requests_waiting": ("num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_cache_usage": ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)."),
    "num_kv_blocks": ("num_kv_blocks", "KV cache blocks the engine holds (of block_size tokens each)."),
    "num_free_blocks": ("num_free_kv_blocks", "KV cache blocks free now (cached prefixes count as free)."),
}
ENGINE_COUNTERS = {
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    "prefix_cache_evictions": ("prefix_cache_evictions", "Cached prefix blocks given to other tokens (the "
                                                         "cache was full)."),
    "num_steps": ("engine_steps", "Engine loop iterations (model steps and command batches)."),
    "grammar_wait_seconds": ("grammar_wait_seconds", "Time steps waited for grammar masks and applied them "
                                                     "(constrained decoding's cost beyond what the forward "
                                                     "pass hid)."),
    # Speculative decoding, as vLLM names it (spec_decode_*).
    "spec_num_drafts": ("spec_decode_num_drafts", "Verifications of drafted tokens (one per request per step "
                                                  "that scored drafts)."),
    "spec_num_draft_tokens": ("spec_decode_num_draft_tokens", "Drafted tokens scored by the target model."),
    "spec_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Drafted tokens the target model accepted."),
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, EngineStats]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable:
        per_model = self.stats()
        for table, family_of in ((ENGINE_GAUGES, GaugeMetricFamily), (ENGINE_COUNTERS, CounterMetricFamily)):
            for field, (name, doc) in table.items():
                family = family_of(f"r1serve:{name}", doc, labels=["model_name"])
                for model, stats in per_model.items():
                    family.add_metric([model], getattr(stats, field))
                yield family
        yield from _spec_families(per_model)


def _spec_families(per_model: dict[str, EngineStats]) -> Iterable:
    per_position = CounterMetricFamily("r1serve:spec_decode_num_accepted_tokens_per_pos",
                                       "Drafted tokens accepted, by their position in the draft (0 = first).",
                                       labels=["model_name", "position"])
    rate = GaugeMetricFamily("r1serve:spec_decode_acceptance_rate",
                             "Accepted over drafted tokens since start (0 without drafts).", labels=["model_name"])
    length = GaugeMetricFamily("r1serve:spec_decode_mean_accepted_length",
                               "Tokens a verification emits on average: accepted drafts + 1.", labels=["model_name"])
    for model, engine in per_model.items():
        for j, n in enumerate(engine.spec_accepted_per_position):
            per_position.add_metric([model, str(j)], n)
        stats = engine.spec
        rate.add_metric([model], stats.acceptance_rate)
        length.add_metric([model], stats.mean_accepted_length)
    yield per_position
    yield rate
    yield length


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, EngineStats]]) -> None:
        """engine_stats: each served model's latest EngineStats, read at scrape time."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats))
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = Counter("r1serve:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("r1serve:generation_tokens", "Tokens generated.", m, registry=r)
        self.reasoning_tokens = Counter("r1serve:reasoning_tokens", "Generated tokens spent thinking.", m, registry=r)
        self.answer_tokens = Counter("r1serve:answer_tokens", "Generated tokens of the answer.", m, registry=r)
        self.request_success = Counter("r1serve:request_success", "Finished requests by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.tool_requests = Counter("r1serve:tool_call_requests", "Chat requests with tools, by tool_choice.",
                                     m + ["tool_choice"], registry=r)
        self.structured_requests = Counter("r1serve:structured_output_requests",
                                           "Requests whose output a grammar constrains, by what it is.",
                                           m + ["kind"], registry=r)
        self.ttft = Histogram("r1serve:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.ttfat = Histogram("r1serve:time_to_first_answer_token_seconds",
                               "Time to the first answer token (after any reasoning).", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("r1serve:inter_token_latency_seconds", "Time between streamed tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("r1serve:e2e_request_latency_seconds", "Request latency, arrival to finish.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("r1serve:request_queue_time_seconds", "Time waiting before the first step.",
                                    m, buckets=LATENCY_BUCKETS, registry=r)

    def count_request(self, model: str, req) -> None:
        """A chat request's tools and constraint (ChatCompletionRequest)."""
        if req.tools:
            self.tool_requests.labels(model, req.tool_mode).inc()
        if req.tool_mode in ("required", "named"):
            self.structured_requests.labels(model, "tool_call").inc()
        elif req.response_format is not None and req.response_format.type != "text":
            self.structured_requests.labels(model, req.response_format.type).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request timings and token counts, reported to ServerMetrics when it ends."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self._itl = metrics.itl.labels(model)  # observed per streamed chunk: look the child up once
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.first_answer: float | None = None
        self.last_token: float | None = None
        self.queued_until: float | None = None

    def on_tokens(self, engine_metrics: dict, streamed: bool) -> None:
        now = time.monotonic()
        if self.first_token is None:
            # The engine's own clock (same process, monotonic): right for non-streamed requests too.
            self.first_token = engine_metrics.get("first_token_time") or now
            self.queued_until = engine_metrics.get("first_scheduled_time")
        elif streamed and self.last_token is not None:
            self._itl.observe(now - self.last_token)
        self.last_token = now

    def on_answer(self) -> None:
        if self.first_answer is None:
            self.first_answer = time.monotonic()

    def answer_is_first_token(self) -> None:
        """No reasoning: the answer starts with the first token (non-streamed requests)."""
        if self.first_answer is None:
            self.first_answer = self.first_token

    def finish(self, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int,
               finish_reasons: Iterable[str | None]) -> None:
        m, model = self.metrics, self.model
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        m.generation_tokens.labels(model).inc(completion_tokens)
        m.reasoning_tokens.labels(model).inc(reasoning_tokens)
        m.answer_tokens.labels(model).inc(completion_tokens - reasoning_tokens)
        for reason in finish_reasons:
            m.request_success.labels(model, reason or "abort").inc()
        if self.first_token is not None:
            m.ttft.labels(model).observe(max(0.0, self.first_token - self.arrival))
        if self.first_answer is not None:
            m.ttfat.labels(model).observe(self.first_answer - self.arrival)
        if self.queued_until is not None:
            m.queue_time.labels(model).observe(max(0.0, self.queued_until - self.arrival))
        m.e2e.labels(model).observe(time.monotonic() - self.arrival)

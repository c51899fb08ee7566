"""Counters a server exposes on /metrics that the load generator reads around each level:
speculative decoding's drafted and accepted tokens, in r1serve's names or vLLM's (the same
counters: spec_decode_num_drafts, spec_decode_num_draft_tokens,
spec_decode_num_accepted_tokens). A server without them (llama.cpp, the DeepSeek API)
reports nothing, and the level's figures simply lack the line."""
from __future__ import annotations

import httpx

from r1serve.engine.spec_decode_stats import SpecDecodeStats

PREFIXES = ("r1serve:", "vllm:")
NAMES = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def metrics_url(base_url: str) -> str:
    """/metrics sits at the server's root, beside the API's /v1."""
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


def read_spec_counters(base_url: str, headers: dict) -> SpecDecodeStats | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(metrics_url(base_url), headers=headers, timeout=10)
        response.raise_for_status()
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    totals = dict.fromkeys(NAMES, 0.0)
    seen = False
    for family in families:
        for sample in family.samples:
            name = next((sample.name.removeprefix(p) for p in PREFIXES if sample.name.startswith(p)), None)
            name = name.removesuffix("_total") if name else None
            if name in totals:
                totals[name] += sample.value
                seen = True
    if not seen:
        return None
    return SpecDecodeStats(*(int(totals[n]) for n in NAMES))

"""`bench offline` runs its peer in the peer's fastest dtype on this machine, and says which
dtype each system used and why."""
from __future__ import annotations

import json
import re

import pytest

from r1serve.bench.offline import fastest, peer_candidates
from r1serve.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_peer_runs_in_its_fastest_dtype_and_says_why():
    chosen = fastest({"bfloat16": 25.0, "float32": 98.0})  # a CPU without native bf16 (AVX2, Zen 3)
    assert chosen.dtype == "float32"
    assert "float32 98.0 tok/s, bfloat16 25.0 tok/s" in chosen.why
    assert fastest({"bfloat16": 140.0, "float32": 98.0}).dtype == "bfloat16"  # AVX512-BF16 / AMX


def test_bench_offline_times_the_peers_dtypes_and_reports_them(tiny, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--cache-dir", str(tmp_path), "bench", "offline", "--model", str(tiny), "--systems", "transformers",
                 "--baseline", "transformers", "--concurrency", "2", "--output-len", "4", "--rounds", "1",
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["dtype"] in peer_candidates() and len(peer_candidates()) == 2
    timed = dict(re.findall(r"(\w+) ([0-9.]+) tok/s", row["dtype_why"]))
    assert set(timed) == set(peer_candidates())  # both measured, the faster kept
    assert row["dtype"] == max(timed, key=lambda d: float(timed[d]))
    given = tmp_path / "given.json"
    assert main(["--cache-dir", str(tmp_path), "bench", "offline", "--model", str(tiny), "--systems", "transformers",
                 "--peer-dtype", "float32", "--concurrency", "1", "--output-len", "4", "--rounds", "1",
                 "--out", str(given)]) == 0
    row = json.loads(given.read_text())["rows"][0]
    assert (row["dtype"], row["dtype_why"]) == ("float32", "as given (--peer-dtype)")

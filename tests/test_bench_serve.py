"""`r1serve bench serve` against a real r1serve server: every figure present and consistent."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from r1serve.bench.serve_report import percentiles
from r1serve.cli import main

from server_process import ServerProcess


@pytest.fixture(scope="module")
def tiny_server(tiny, tmp_path_factory):
    server = ServerProcess([str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1"],
                           tmp_path_factory.mktemp("bench") / "server.log")
    yield server
    server.stop()


def run_bench(capsys, server, tmp_path, *extra):
    rc = main(["bench", "serve", "--base-url", server.base + "/v1", "--model", "tiny", "--num-prompts", "12",
               "--input-len", "24", "--output-len", "10", "--ignore-eos", "--out", str(tmp_path), *extra])
    assert rc == 0
    out = capsys.readouterr().out
    return json.loads((tmp_path / "bench_serve.json").read_text())["levels"], out


def test_closed_loop_levels(capsys, tiny_server, tiny, tmp_path):
    usage_before = httpx.get(tiny_server.base + "/v1/usage", timeout=30).json()["data"]
    levels, out = run_bench(capsys, tiny_server, tmp_path, "--concurrency", "1,4", "--tokenizer", str(tiny),
                            "--slo-ttft", "30s", "--slo-tpot", "10s")
    assert [lv["load"] for lv in levels] == ["concurrency 1", "concurrency 4"]
    for lv in levels:
        assert lv["completed"] == 12 and lv["failed"] == 0 and lv["usage_from_server"]
        assert lv["output_tokens"] == 12 * 10  # --ignore-eos: exactly output-len each
        assert lv["prompt_tokens"] >= 12 * 20
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["duration_s"])
        assert lv["total_tokens_per_s"] > lv["output_tokens_per_s"]
        assert lv["goodput"] == pytest.approx(lv["request_throughput"])  # generous SLOs: every request good
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            p = lv[metric]
            assert 0 < p["median"] <= p["p90"] <= p["p99"], metric
        assert lv["ttft_ms"]["median"] <= lv["e2e_ms"]["median"]
    # Tokens the benchmark counted are the tokens the server billed.
    usage_after = httpx.get(tiny_server.base + "/v1/usage", timeout=30).json()["data"]
    billed = sum(r["completion_tokens"] for r in usage_after) - sum(r["completion_tokens"] for r in usage_before)
    assert billed == sum(lv["output_tokens"] for lv in levels)
    assert "concurrency 4" in out and (tmp_path / "bench_serve.png").is_file()


def test_the_api_key_is_never_written(capsys, tiny_server, tmp_path):
    run_bench(capsys, tiny_server, tmp_path, "--api-key", "sk-secret-never-stored", "--num-prompts", "2")
    written = "".join(f.read_text(errors="replace") for f in tmp_path.iterdir() if f.suffix in (".json", ".csv", ".md"))
    assert "sk-secret-never-stored" not in written
    assert json.loads((tmp_path / "bench_serve.json").read_text())["args"]["api_key_sent"] is True


def test_open_loop_and_a_tight_slo(capsys, tiny_server, tmp_path):
    levels, _ = run_bench(capsys, tiny_server, tmp_path, "--request-rate", "20", "--dataset", "chat",
                          "--slo-ttft", "0.001ms")
    (lv,) = levels
    assert lv["load"] == "rate 20/s" and lv["completed"] == 12 and lv["goodput"] == 0


def test_failures_are_counted(capsys, tiny_server, tmp_path):
    levels, _ = run_bench(capsys, tiny_server, tmp_path, "--concurrency", "2", "--output-len", "100000")
    assert levels[0]["failed"] == 12 and levels[0]["completed"] == 0
    assert "HTTP 400" in levels[0]["errors"][0] and "context length" in levels[0]["errors"][0]


def test_percentiles_are_ordered():
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["median"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert percentiles([])["median"] is None


def prefix_hits(server) -> float:
    return server.metric("r1serve:prefix_cache_hits_total")


def test_levels_get_fresh_prompts_of_the_asked_length(capsys, tiny_server, tiny, tmp_path):
    """Replayed prompts would be served from the prefix cache at every level after the first."""
    args = ["bench", "serve", "--base-url", tiny_server.base + "/v1", "--num-prompts", "6", "--input-len", "40",
            "--output-len", "2", "--concurrency", "2,2", "--tokenizer", str(tiny), "--out", str(tmp_path)]
    hits = {}
    for mode in ("fresh", "same"):
        before = prefix_hits(tiny_server)
        assert main(args + (["--same-prompts", "--seed", "7"] if mode == "same" else ["--seed", "3"])) == 0
        hits[mode] = prefix_hits(tiny_server) - before
        levels = json.loads((tmp_path / "bench_serve.json").read_text())["levels"]
        # --input-len is the prompt's length (no chat template added; the server may add BOS)
        assert all(6 * 40 <= lv["prompt_tokens"] <= 6 * 41 for lv in levels), levels
    assert hits["same"] >= 6 * 32 and hits["fresh"] < hits["same"] / 4, hits
    out = capsys.readouterr().out
    assert "ms" in out.splitlines()[1]  # the units row under the header


def test_defaults_find_the_model_and_duration_bounds_a_level(capsys, tiny_server, tmp_path):
    started = time.monotonic()
    rc = main(["bench", "serve", "--base-url", tiny_server.base + "/v1", "--num-prompts", "100000",
               "--input-len", "8", "--output-len", "2", "--concurrency", "2", "--duration", "1",
               "--out", str(tmp_path)])  # no --model: the server's
    (lv,) = json.loads((tmp_path / "bench_serve.json").read_text())["levels"]
    assert rc == 0 and 0 < lv["completed"] < 100000 and time.monotonic() - started < 30
    assert json.loads((tmp_path / "bench_serve.json").read_text())["args"]["model"] == "tiny"

"""The offline benchmark's bookkeeping, and one real r1serve cell on a tiny model."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest

from r1serve.bench.arguments import add_offline_args as add_args
from r1serve.bench.offline import paired_ratios, run_cell, run_interleaved, summarize
from r1serve.bench.server_runner import StreamedResponse, post_request

pytestmark = pytest.mark.usefixtures("one_thread")


def cell(system, conc, tok_s):
    return {"system": system, "concurrency": conc, "output_tok_s": tok_s, "ttft_s": 0.1, "peak_rss_mib": 10.0,
            "median_s": 1.0, "times_s": [1.0], "dtype": "bfloat16", "output_len": 8}


def test_ratios_are_paired_within_each_round():
    rounds = [[cell("r1serve", 1, 40.0), cell("transformers", 1, 20.0)],
              [cell("r1serve", 1, 20.0), cell("transformers", 1, 5.0)]]  # a round where the machine was busier
    assert paired_ratios(rounds, "r1serve", 1) == [2.0, 4.0]
    assert paired_ratios(rounds, "transformers", 1) == []
    merged = summarize([rounds[0][0], rounds[1][0]])
    assert merged["output_tok_s"] == 30.0 and merged["times_s"] == [1.0, 1.0]


def assert_rate_counts_every_token(row: dict, tokens: int, wall_s: float) -> None:
    """tok/s is every output token over the median timed run; the timed runs (and the TTFT
    probes before them) happened inside the call, so together they fit in its wall time."""
    assert row["median_s"] == statistics.median(row["times_s"])
    assert row["output_tok_s"] * row["median_s"] == pytest.approx(tokens)
    assert 0 < sum(row["times_s"]) + row["ttft_s"] < wall_s


def this_process_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_import_peak_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report this process's.
    code = "import torch; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / 1024


def machine_memory_mib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_r1serve_cell_generates_every_token(tiny, tmp_path):
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(["--model", str(tiny), "--output-len", "8", "--dtype", "float32"])
    args.cache_dir = str(tmp_path)
    rss_before = this_process_peak_mib()
    t0 = time.perf_counter()
    row = run_cell(args, "r1serve", 3, tmp_path)
    wall = time.perf_counter() - t0
    assert row["concurrency"] == 3 and row["output_len"] == 8 and len(row["times_s"]) == args.repeats
    assert_rate_counts_every_token(row, 3 * 8, wall)
    # In process: the peak is this process's, read as the cell ends.
    assert rss_before <= row["peak_rss_mib"] <= this_process_peak_mib()


def test_http_cell_counts_tokens_from_the_servers_usage(tiny, tmp_path):
    parser = argparse.ArgumentParser()
    add_args(parser)
    # 3 x 64 tokens: enough streamed chunks that the API server's CPU time, which /proc counts
    # in clock ticks (10 ms), is sure to reach one.
    args = parser.parse_args(["--model", str(tiny), "--output-len", "64", "--dtype", "float32"])
    args.cache_dir = str(tmp_path)
    t0 = time.perf_counter()
    row = run_cell(args, "http", 3, tmp_path)  # asserts every one of the 3 x 64 tokens came back
    wall = time.perf_counter() - t0
    assert row["system"] == "http"
    assert_rate_counts_every_token(row, 3 * 64, wall)
    # The server's peak is its own process tree's, which holds an engine process with torch
    # imported: more than a bare `import torch` takes here, less than the machine has.
    assert torch_import_peak_mib() < row["peak_rss_mib"] < machine_memory_mib()
    # The API server's and the load generator's CPU per timed run (the engine process not
    # counted): some, and no more than every core busy for the whole run (plus a clock tick).
    most = row["median_s"] * os.cpu_count() + 1 / os.sysconf("SC_CLK_TCK")
    assert 0 < row["server_cpu_s"] <= most and 0 < row["client_cpu_s"] <= most


def test_interleaved_rounds_pair_each_system_once(tiny, tmp_path):
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(["--model", str(tiny), "--output-len", "6", "--dtype", "float32", "--rounds", "2",
                              "--interleave"])
    args.cache_dir = str(tmp_path)
    rounds = run_interleaved(args, ["r1serve", "http"], 2, tmp_path)  # asserts every token came back, each run
    assert [[c["system"] for c in rnd] for rnd in rounds] == [["r1serve", "http"]] * 2
    assert len(paired_ratios(rounds, "http", 2, baseline="r1serve")) == 2
    assert all(len(c["times_s"]) == 1 for rnd in rounds for c in rnd)


def test_streamed_response_reads_usage_from_the_last_event():
    """The load generator's HTTP parsing on a canned chunked SSE response, split at awkward bytes."""
    events = [b'data: {"choices":[{"text":"a"}],"usage":null}\n\n',
              b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body
    stream = StreamedResponse(post_request("127.0.0.1", "/v1/completions", {"prompt": "hi"}))
    for i in range(0, len(raw), 7):
        assert not stream.complete
        stream.feed(raw[i:i + 7])
    assert stream.complete and stream.status == 200 and stream.first_body_s > 0
    assert stream.usage() == {"completion_tokens": 2}


def test_ratios_against_another_baseline():
    rounds = [[cell("r1serve", 32, 400.0), cell("http", 32, 380.0)]]
    assert paired_ratios(rounds, "http", 32, baseline="r1serve") == [0.95]


def test_llama_server_cell_runs_against_any_openai_endpoint(tiny, tmp_path):
    """The llama-server system needs nothing of llama.cpp: a running `r1serve serve` stands
    in for it here (any OpenAI-compatible server with streamed usage and ignore_eos)."""
    from r1serve.bench.server_runner import EndpointRunner
    from server_process import ServerProcess

    server = ServerProcess([str(tiny), "--dtype", "float32", "--served-model-name", "bench"], tmp_path / "server.log")
    try:
        parser = argparse.ArgumentParser()
        add_args(parser)
        args = parser.parse_args(["--model", str(tiny), "--output-len", "8", "--llama-server-url",
                                  f"{server.base}/v1", "--llama-server-pid", str(server.proc.pid)])
        args.cache_dir = str(tmp_path)
        row = run_cell(args, "llama-server", 3, tmp_path)  # asserts every one of the 3 x 8 tokens came back
        assert row["system"] == "llama-server" and row["dtype"] == "gguf" and row["output_tok_s"] > 0
        assert 0 < row["peak_rss_mib"] < machine_memory_mib()  # read from the given pid's /proc status
    finally:
        server.stop()
    with pytest.raises(ValueError, match="must be an http:// URL"):
        EndpointRunner("localhost:8080", None)
    args.llama_server_url = None
    with pytest.raises(ValueError, match="needs --llama-server-url"):
        run_cell(args, "llama-server", 1, tmp_path)


def test_first_token_skips_events_without_text():
    """A server may send events before its first token (llama-server reports a long prompt's
    progress): TTFT is the first event carrying text, not the first bytes."""
    events = [b'data: {"prompt_progress":{"processed":512}}\n\n', b'data: {"choices":[{"text":"a"}]}\n\n',
              b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n', b"data: [DONE]\n\n"]
    stream = StreamedResponse(post_request("127.0.0.1", "/v1/completions", {"prompt": "hi"}))
    stream.feed(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for e in events:
        stream.feed(b"%x\r\n%s\r\n" % (len(e), e))
        time.sleep(0.01)
    stream.feed(b"0\r\n\r\n")
    assert stream.complete and stream.first_token_s > stream.first_body_s + 0.005
    assert stream.last_body_s >= stream.first_token_s


def test_vs_llama_server_measures_a_real_server(tmp_path):
    """One server's round of `bench vs-llama-server` (start, decode at 1 and 2 streams,
    prefill, peak memory) against a real `r1serve serve` of a small GGUF; and the table's
    ratios are paired within rounds."""
    from gguf_models import write_model

    from r1serve.bench.arguments import add_vs_llama_server_args
    from r1serve.bench.vs_llama_server import Round, Server, _free_port, commands, measure, report

    path = write_model(tmp_path / "m.gguf", "qwen2", "q4_k_m")
    parser = argparse.ArgumentParser()
    add_vs_llama_server_args(parser)
    args = parser.parse_args([str(path), "--llama-server", "/nonexistent", "--streams", "1,2", "--decode-tokens", "6",
                              "--prompt-tokens", "64", "--context", "512", "--threads", "1",
                              "--r1serve-args", "--dtype", "float32"])
    port = _free_port()
    cmd = commands(args, port, 0.01)["r1serve"]
    assert cmd[-2:] == ["--dtype", "float32"] and "--no-webui" in commands(args, port, 0.01)["llama-server"]
    r = measure(Server("r1serve", cmd, port), args, "t")
    assert r.start_s > 0 and set(r.decode_tok_s) == {1, 2} and all(v > 0 for v in r.decode_tok_s.values())
    assert 40 <= r.prompt_tokens < 512 and r.prefill_tok_s > 0 and 0 < r.peak_mib < machine_memory_mib()
    rounds = [Round("r1serve", 2.0, {1: 20.0}, 100.0, 60, 900.0), Round("llama-server", 1.0, {1: 10.0}, 50.0, 60, 1000.0),
              Round("r1serve", 4.0, {1: 10.0}, 40.0, 60, 900.0), Round("llama-server", 1.0, {1: 10.0}, 50.0, 60, 1000.0)]
    args.streams = [1]
    table = report(rounds, args)
    assert table["start (s)"]["ratio"] == 3.0 and table["decode, 1 stream (tok/s)"]["ratio"] == 1.5
    assert table["peak memory (MiB)"]["ratio"] == 0.9

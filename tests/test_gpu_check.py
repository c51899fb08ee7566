"""benchmarks/gpu_check.py without a GPU: its arguments, tables and JSON, and its kernel and
end-to-end code paths on tiny shapes (--smoke, the CPU, the Triton interpreter)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import triton_interpreter

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_arguments(gpu_check):
    args = gpu_check.parse_args([])
    assert args.device == "cuda" and args.sections == "peaks,kernels,e2e" and args.concurrency == "1,64"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "kernels,speed"])
    with pytest.raises(SystemExit):  # the interpreter is no benchmark
        gpu_check.parse_args(["--device", "cpu"])


def test_tables_and_json(gpu_check, tmp_path):
    R = gpu_check.Result
    results = [R("mla_decode_attention", "B=1 ctx=32768", 3e-3, True, 250.0, 3400.0, "GB/s", 4200.0, 0.7),
               R("fused_moe_fp8", "N=4096", 2e-2, True, 9000.0, 700.0, "TFLOP/s", 1300.0, 0.6),
               R("fp8_block_gemm", "M=64", error="CompilationError: out of shared memory")]
    table = gpu_check.format_kernel_table(results)
    assert "81%" in table and "70% met" in table and "54%" in table and "60% MISSED" in table
    assert "ERROR" in table and "out of shared memory" in table
    e2e = [{"model": "llama", "system": "r1serve", "concurrency": 64, "tok_s": 9000.0},
           {"model": "llama", "system": "transformers", "concurrency": 64, "tok_s": 1500.0},
           {"model": "llama", "system": "r1serve", "concurrency": 1, "error": "OOM"}]
    assert "6.00x" in gpu_check.format_e2e_table(e2e) and "ERROR OOM" in gpu_check.format_e2e_table(e2e)
    report = gpu_check.Report(device="H200", peaks={"copy_GBps": 4200.0}, kernels=results, e2e=e2e)
    report.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kernels"][0]["fraction_of_peak"] == pytest.approx(3400 / 4200) and data["e2e"][1]["tok_s"] == 1500


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: run the script itself, not the interpreter "
                                                      "(it would turn the process's kernels into interpreted ones)")
def test_smoke_run_checks_every_kernel_against_its_twin(gpu_check, tmp_path):
    unavailable = triton_interpreter.enable()
    if unavailable:
        pytest.skip(unavailable)
    if triton_interpreter.problems():
        pytest.skip(f"the triton interpreter here differs from a GPU: {triton_interpreter.problems()}")
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--smoke", "--device", "cpu", "--sections", "peaks,kernels,e2e", "--e2e-models", "llama",
                             "--concurrency", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    kernels = {r["kernel"] for r in data["kernels"]}
    assert kernels == {"paged_decode_attention", "mla_decode_attention", "write_latent", "rotary_kv_write",
                       "add_rms_norm", "fp8_act_quant", "fp8_block_gemm", "fused_moe", "fused_moe_fp8"}
    assert all(r["ok"] and r["error"] is None for r in data["kernels"]), data["kernels"]
    assert {r["system"] for r in data["e2e"]} == {"r1serve", "r1serve --enforce-eager", "r1serve --speculative ngram",
                                                  "transformers"}
    # Whether the speculative row's tokens were plain's (the check the device run reports; a
    # bf16 near-tie may flip on a CPU's reference kernels, so only its presence is asserted).
    assert all(isinstance(r["same_tokens"], bool) for r in data["e2e"] if "--speculative" in r["system"])
    assert all(r["tok_s"] > 0 for r in data["e2e"]), data["e2e"]
    assert status == 0

"""`r1serve hw`: the accelerator catalog, the roofline planner (checked against published
R1 deployments), and the local measurement on a tiny model."""
from __future__ import annotations

import json

import pytest

from r1serve.planner.catalog import load_catalog
from r1serve.planner.measure import MeasureConfig, measure, weight_bytes_read
from r1serve.planner.model import model_shape, shape_from_config
from r1serve.planner.plan import (Workload, decode_at, max_sequences, pct_of, plan, reference_plan,
                                      smallest_fit)
from r1serve.planner.roofline import (Device, Layout, experts_touched, step_cost, weight_bytes_per_device,
                                       weight_format)
from r1serve.planner.validation import PUBLISHED, TOLERANCE, predict
from r1serve.cli import main
from r1serve.errors import R1ServeError

WORKLOAD = Workload(4096, 1024, 0.05)
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def r1():
    return model_shape("deepseek-r1")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def device(catalog, r1, chip_id: str) -> Device:
    chip = catalog.chip(chip_id)
    return Device(chip, weight_format(r1, chip))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the model's numbers ------------------------------------------------------------------------

def test_r1_sizes_come_out_of_the_real_config(r1):
    assert r1.parameters == pytest.approx(671.0e9, rel=0.001)
    assert r1.active_parameters - r1.embed_params == pytest.approx(36.6e9, rel=0.005)  # active without the embedding
    assert r1.kv_bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert (r1.num_layers, r1.moe_layers, r1.n_experts, r1.top_k) == (61, 58, 256, 8)
    assert r1.expert_params == pytest.approx(44e6, rel=0.01)
    assert r1.parts_total() == pytest.approx(r1.parameters, rel=1e-5)  # norms are the rest
    assert r1.checkpoint_format == "fp8"
    # absorbed MLA decode: 2 x heads x (576 + 512) FLOP per context position per layer
    assert r1.decode_flops_per_ctx == 2 * 128 * (576 + 512)


def test_r1_weight_bytes_add_up_over_the_devices(catalog, r1):
    d = device(catalog, r1, "h100")  # FP8: one byte per parameter, embedding and LM head in BF16
    pure_tp = Layout(8, 8)
    total = weight_bytes_per_device(r1, d, pure_tp) * 8
    assert total == pytest.approx(r1.parts_total() + 2 * r1.embed_params, rel=1e-9)
    # DP attention: every device holds attention, dense MLPs and shared experts; experts are split
    replicated = (r1.num_layers * r1.attn_params + r1.dense_layers * r1.dense_mlp_params
                  + r1.moe_layers * r1.shared_params + 2 * r1.embed_params * 2)
    assert replicated == pytest.approx(19.0e9, rel=0.01)
    ep = weight_bytes_per_device(r1, d, Layout(16, 1))
    assert ep == pytest.approx(replicated + r1.moe_layers * r1.n_experts * r1.expert_params / 16, rel=1e-9)


def test_dense_config_sizes(tmp_path):
    m = shape_from_config("llama-8b", LLAMA_8B)
    assert m.parameters == pytest.approx(8.03e9, rel=0.01)
    assert m.kv_bytes_per_token == 2 * 8 * 128 * 32 * 2  # K and V, 8 KV heads of 128, 32 layers, BF16
    assert m.parts_total() == pytest.approx(m.parameters, rel=1e-4)
    assert (m.n_experts, m.checkpoint_format, m.kv_split_max) == (0, "bf16", 8)


# ---- the chips ----------------------------------------------------------------------------------

def test_catalog_has_every_chip_of_the_reference_with_sources(catalog):
    for chip_id in ("a100", "h100", "h800", "h20", "h200", "b200", "ascend-910b-376t", "ascend-910b-313t",
                    "ascend-910b-280t", "ascend-910c"):
        chip = catalog.chip(chip_id)
        assert chip.bandwidth and chip.peak_flops("bf16") and chip.memory_bytes
        assert all(f.source for f in chip.figures.values())
    assert catalog.chip("h800").figures["bf16_tflops"].alternatives  # sources disagree: both kept
    assert catalog.chip("910c") is catalog.chip("ascend-910c")
    assert not catalog.chip("ascend-910c").supports("fp8") and catalog.chip("h20").supports("fp8")
    cpu = catalog.chip("cpu")
    assert cpu.detected and cpu.peak_flops("bf16") > 0 and "estimate" in cpu.figures["bf16_tflops"].source


# Ridge points worked out by hand from the vendors' datasheet figures (dense peak / HBM
# bandwidth, as collected in the project's accelerator reference, accelerators.md), in FLOP
# per byte: written out here, not read from the catalog, so a wrong figure or formula shows.
DATASHEET_RIDGE = {
    ("a100", "bf16"): 153.0,  # 312 TFLOPS / 2.039 TB/s (A100 SXM datasheet)
    ("a100", "int8"): 306.0,  # 624 TOPS / 2.039 TB/s
    ("h100", "bf16"): 295.2,  # 989 / 3.35 (H100 SXM datasheet)
    ("h100", "fp8"): 590.7,  # 1,979 / 3.35
    ("h800", "fp8"): 590.7,  # the H100's die and HBM; only the NVLink is cut
    ("h20", "bf16"): 37.0,  # 148 / 4.0 (H20 specification)
    ("h20", "fp8"): 74.0,  # 296 / 4.0
    ("h200", "bf16"): 206.0,  # 989 / 4.8 (H200 datasheet)
    ("b200", "fp8"): 584.4,  # 4,500 / 7.7 (DGX B200 datasheet; 8 TB/s would give 562.5)
    ("ascend-910b-376t", "int8"): 470.0,  # 752 / 1.6 (Huawei)
    ("ascend-910c", "bf16"): 221.25,  # 708 / 3.2 (two 910B-class dies)
}


@pytest.mark.parametrize("chip_id, fmt", list(DATASHEET_RIDGE), ids=[f"{c}-{f}" for c, f in DATASHEET_RIDGE])
def test_ridge_points_match_the_datasheets(catalog, chip_id, fmt):
    assert catalog.chip(chip_id).ridge_point(fmt) == pytest.approx(DATASHEET_RIDGE[chip_id, fmt], rel=1e-3)


def test_ridge_points_of_missing_formats_and_expert_gemms(catalog):
    # No FP8 on the A100 or on Ascend (accelerators.md): no FP8 ridge point either.
    assert catalog.chip("a100").ridge_point("fp8") is None and catalog.chip("ascend-910c").ridge_point("fp8") is None
    # An FP8 expert GEMM (1 byte per weight, 2 FLOP per weight per token) stops being memory-bound at
    # ridge / 2 tokens per expert; accelerators.md: "memory-bound until a few hundred tokens per expert".
    assert 250 < catalog.chip("h800").ridge_point("fp8") / 2 < 350


def test_unknown_chip_says_which_exist(catalog):
    with pytest.raises(R1ServeError, match="known chips: .*h100"):
        catalog.chip("tpu-v9")


def test_user_catalog_adds_chips(tmp_path, capsys):
    f = tmp_path / "chips.toml"
    f.write_text('[chips.mi300x]\nname = "AMD Instinct MI300X"\nfamily = "nvidia-hopper"\nbf16_tflops = 1307\n'
                 'fp8_tflops = { value = 2615, source = "AMD datasheet" }\nhbm_gb = 192\nhbm_tb_s = 5.3\n'
                 'scale_up_gb_s = 448\nscale_out_gb_s = 50\n')
    chip = load_catalog(f).chip("mi300x")
    assert chip.bandwidth == 5.3e12 and chip.figures["fp8_tflops"].source == "AMD datasheet"
    rc, out, _ = run(capsys, "hw", "list", "--catalog", str(f), "--json")
    assert rc == 0 and "mi300x" in [c["id"] for c in json.loads(out)]
    rc, out, _ = run(capsys, "hw", "plan", "--chip", "mi300x", "--chips", "8", "--catalog", str(f), "--json")
    assert rc == 0 and json.loads(out)["fits"] is True


def test_user_calibration_overrides_the_family(tmp_path, catalog, r1):
    f = tmp_path / "chips.toml"
    f.write_text('[chips.slow-h200]\nfamily = "nvidia-hopper"\nbf16_tflops = 989\nfp8_tflops = 1979\n'
                 'hbm_gb = 141\nhbm_tb_s = 4.8\nscale_up_gb_s = 450\n'
                 '[chips.slow-h200.calibration]\nmemory_eff = 0.4\n')
    slow = load_catalog(f).chip("slow-h200")
    assert slow.calibration.memory_eff == 0.4 and slow.calibration.compute_eff == 0.5  # the rest from the family
    w = Workload(1024, 256, 0.05)
    fast = decode_at(r1, device(catalog, r1, "h200"), Layout(8, 1), w)
    slower = decode_at(r1, Device(slow, "fp8"), Layout(8, 1), w)
    assert slower.tokens_per_s_per_chip < fast.tokens_per_s_per_chip
    # no scale_out_gb_s: one 8-chip domain is the most an instance can span
    with pytest.raises(R1ServeError, match="scale_out_gb_s"):
        plan(r1, slow, 16, WORKLOAD)


@pytest.mark.parametrize("text, error", [
    ("[chips.x]\nfamily = 'nvidia-hopper'\nbf16_tflops = 1\n", "needs hbm_gb"),
    ("[chips.x]\nfamily = 'nope'\n", "family 'nope'"),
    ("[chips.x\n", "not valid TOML"),
    ("[chips.x]\nfamily = 'ascend'\nbf16_tflops = 'fast'\n", "give a number"),
])
def test_bad_user_catalog_is_a_clear_error(tmp_path, capsys, text, error):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    rc, _, err = run(capsys, "hw", "list", "--catalog", str(f))
    assert rc == 2 and error in err


# ---- the planner --------------------------------------------------------------------------------

def test_fits_and_does_not_fit(catalog, r1):
    assert not plan(r1, catalog.chip("h100"), 8, WORKLOAD).fits  # 671 GB of FP8 > 8 x 80 GB
    p = plan(r1, catalog.chip("h100"), 8, WORKLOAD)
    assert "at least 16 chips" in p.note and p.output_tokens_per_s_per_chip is None
    for chip_id, chips in (("h100", 16), ("h200", 8), ("b200", 8), ("ascend-910c", 8), ("ascend-910b-376t", 16)):
        p = plan(r1, catalog.chip(chip_id), chips, WORKLOAD)
        assert p.fits, (chip_id, p.note)
        assert p.weight_bytes_per_chip + p.decode.kv_bytes_per_chip <= 0.9 * catalog.chip(chip_id).memory_bytes
    assert smallest_fit(r1, device(catalog, r1, "h100"), WORKLOAD) == 16
    assert smallest_fit(r1, device(catalog, r1, "h200"), WORKLOAD) == 8


def test_weight_format_follows_the_chip(catalog, r1):
    assert weight_format(r1, catalog.chip("h800")) == "fp8"
    assert weight_format(r1, catalog.chip("ascend-910c")) == "int8"  # no FP8: W8A8, as Ascend deployments run
    assert weight_format(shape_from_config("l", LLAMA_8B), catalog.chip("h100")) == "bf16"
    with pytest.raises(R1ServeError, match="no FP8"):
        weight_format(r1, catalog.chip("a100"), "fp8")


def test_decode_batch_is_the_largest_that_meets_the_slo(catalog, r1):
    d = device(catalog, r1, "h800")
    layout = Layout(32, 1)
    p = decode_at(r1, d, layout, WORKLOAD)
    assert p.meets_slo and p.step_s <= WORKLOAD.tpot_slo_s
    b = int(p.batch_per_chip)
    over = step_cost(r1, d, layout, b + 1, WORKLOAD.decode_context, "decode").seconds
    assert over > WORKLOAD.tpot_slo_s or b + 1 > max_sequences(r1, d, layout, WORKLOAD.decode_context)


def test_small_batches_read_only_the_experts_they_use():
    assert experts_touched(256, 8, 1) == pytest.approx(8)
    assert experts_touched(256, 8, 10_000) == pytest.approx(256)


# One chip, a dense BF16 model, no links: prefill of 4K-token prompts is compute-bound, so a
# chip's prefill share of an H100 is their BF16 peak ratio; a TPOT SLO no batch meets leaves
# decode at one sequence, which streams the weights each step, so its decode share is their
# bandwidth ratio. The ratios are the datasheet figures of accelerators.md; 5% allows for
# the per-kernel static costs and the memory-bound norms the roofline adds to each step.
SPEC_RATIOS = {
    "h20": (148 / 989, 4.0 / 3.35),  # H20 spec vs H100 datasheet: 15% of the FLOP/s, 1.19x the bandwidth
    "a100": (312 / 989, 2.039 / 3.35),  # A100 vs H100 datasheets: 0.32x the FLOP/s, 0.61x the bandwidth
}


@pytest.mark.parametrize("chip_id", list(SPEC_RATIOS))
def test_pct_of_h100_follows_the_spec_ratio_that_bounds_each_phase(catalog, chip_id):
    llama = shape_from_config("llama-8b", LLAMA_8B)
    w = Workload(4096, 1024, tpot_slo_s=1e-6)
    p = plan(llama, catalog.chip(chip_id), 1, w)
    ref = reference_plan(llama, catalog.chip("h100"), 1, w)
    assert p.decode.batch_per_chip == ref.decode.batch_per_chip == 1
    pct = pct_of(p, ref)
    compute, bandwidth = SPEC_RATIOS[chip_id]
    assert pct["prefill"] == pytest.approx(100 * compute, rel=0.05)
    assert pct["decode"] == pytest.approx(100 * bandwidth, rel=0.05)
    # overall pays both phases per request, so it lies between them
    assert min(pct["prefill"], pct["decode"]) < pct["overall"] < max(pct["prefill"], pct["decode"])


def test_reference_is_the_fewest_h100s_that_hold_the_model(catalog, r1):
    # 671 GB of FP8 weights do not fit 8 x 80 GB; 16 H100s do (as test_fits_and_does_not_fit).
    ref = reference_plan(r1, catalog.chip("h100"), 8, WORKLOAD)
    assert ref.fits and ref.chips == 16
    assert pct_of(plan(r1, catalog.chip("h100"), 8, WORKLOAD), ref)["overall"] is None  # no fit, no share


def test_faster_memory_and_compute_rank_as_physics_says(catalog, r1):
    out = {c: plan(r1, catalog.chip(c), 32, WORKLOAD) for c in ("h20", "h100", "h200", "b200")}
    decode = {c: p.decode.tokens_per_s_per_chip for c, p in out.items()}
    prefill = {c: p.prefill.tokens_per_s_per_chip for c, p in out.items()}
    assert decode["b200"] > decode["h200"] > decode["h100"] > decode["h20"]
    assert prefill["b200"] > prefill["h100"] > 3 * prefill["h20"]  # H20: 15% of H100's FLOP/s


@pytest.mark.parametrize("row", PUBLISHED, ids=[r.id for r in PUBLISHED])
def test_published_results_are_predicted_within_25_percent(catalog, r1, row):
    check = predict(row, r1, catalog)
    assert abs(check.error) <= TOLERANCE, f"{row.system}: predicted {check.predicted:.0f}, published {row.figure:.0f}"


def test_bad_workloads_are_clear_errors(capsys):
    for flag, value, message in (("--input", "0", "whole number >= 1"), ("--tpot-slo", "fast", "not a duration")):
        with pytest.raises(SystemExit) as exit_info:  # argparse rejects the value before anything runs
            main(["hw", "plan", "--chip", "h100", flag, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    rc, _, err = run(capsys, "hw", "plan", "--chip", "tpu-v9")
    assert rc == 2 and "unknown chip" in err
    rc, _, err = run(capsys, "hw", "plan", "--chip", "h100", "--mtp", "2")
    assert rc == 2 and "acceptance rate" in err


# ---- the command line ---------------------------------------------------------------------------

def test_cli_list_json(capsys):
    rc, out, _ = run(capsys, "hw", "list", "--json")
    chips = {c["id"]: c for c in json.loads(out)}
    assert rc == 0 and {"h100", "ascend-910c", "cpu"} <= set(chips)
    assert chips["h100"]["figures"]["hbm_tb_s"]["value"] == 3.35
    assert chips["h100"]["ridge_point_flop_per_byte"]["bf16"] == pytest.approx(295.2, abs=0.1)


REQUIRED = ("fits", "weight_bytes_per_chip", "kv_bytes_per_token", "prefill_tokens_per_s_per_chip",
            "decode_tokens_per_s_per_chip", "decode_batch_per_chip", "ttft_ms", "tpot_ms", "pct_of_h100")


def test_cli_plan_json(capsys):
    rc, out, _ = run(capsys, "hw", "plan", "--model", "deepseek-r1", "--chip", "ascend-910c", "--chips", "16",
                     "--input", "4096", "--output", "1024", "--tpot-slo", "50ms", "--json")
    j = json.loads(out)
    assert rc == 0 and all(k in j for k in REQUIRED)
    assert j["fits"] and j["kv_bytes_per_token"] == 70_272 and j["weight_format"] == "int8"
    assert j["tpot_ms"] <= 50 and j["decode_batch_per_chip"] >= 1 and 0 < j["pct_of_h100"] < 150
    assert j["weight_bytes_per_chip"] < 128e9 and j["ttft_ms"] > 0


def test_cli_compare_json_and_chart(capsys, tmp_path):
    chart = tmp_path / "compare.png"
    rc, out, _ = run(capsys, "hw", "compare", "--model", "deepseek-r1", "--input", "4k", "--output", "1k",
                     "--tpot-slo", "50ms", "--only", "h100,h20,ascend-910c", "--json", "--chart", str(chart))
    j = json.loads(out)
    rows = {r["chip"]: r for r in j["rows"]}
    assert rc == 0 and j["chips"] == 16 and set(rows) == {"h100", "h20", "ascend-910c"}
    assert all(k in r for r in rows.values() for k in REQUIRED)
    assert rows["h100"]["pct_of_h100"] == pytest.approx(100)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CHIP_PRICES = 'currency = "EUR"\n[chips]\nh100 = 2.0\n910c = 1.0\n'  # "910c": the alias a user types


def test_chip_prices_give_the_cost_of_a_million_tokens_in_compare_and_plan(capsys, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text(CHIP_PRICES)
    rc, out, _ = run(capsys, "hw", "compare", "--only", "h100,h20,ascend-910c", "--chip-prices", str(prices), "--json")
    rows = {r["chip"]: r for r in json.loads(out)["rows"]}
    assert rc == 0 and rows["h20"]["price"] is None
    for chip, hourly in (("h100", 2.0), ("ascend-910c", 1.0)):
        price, per_s = rows[chip]["price"], rows[chip]["output_tokens_per_s_per_chip"]
        assert price["currency"] == "EUR" and price["per_chip_hour"] == hourly
        assert price["per_million_output_tokens"] == pytest.approx(hourly / (per_s * 3600) * 1e6)
        assert price["output_tokens_per_unit"] == pytest.approx(per_s * 3600 / hourly)
    rc, text, _ = run(capsys, "hw", "compare", "--only", "h100,h20", "--chip-prices", str(prices))
    h100_line = next(line for line in text.splitlines() if line.startswith("h100"))
    assert "EUR/M out" in text and f"{rows['h100']['price']['per_million_output_tokens']:.3f}" in h100_line
    rc, text, _ = run(capsys, "hw", "plan", "--chip", "910c", "--chips", "16", "--chip-prices", str(prices))
    cost = rows["ascend-910c"]["price"]["per_million_output_tokens"]
    assert rc == 0 and f"cost: {cost:.3f} EUR per million output tokens" in text


@pytest.mark.parametrize("text, error", [("[chips]\nh100 = -1\n", "price per chip-hour >= 0"),
                                         ("currency = 'USD'\n", "no [chips] table"),
                                         ("[chips]\ntpu-v9 = 1\n", "unknown chip 'tpu-v9'")])
def test_bad_chip_prices_are_clear_errors(capsys, tmp_path, text, error):
    prices = tmp_path / "prices.toml"
    prices.write_text(text)
    rc, _, err = run(capsys, "hw", "compare", "--chip-prices", str(prices))
    assert rc == 2 and error in err


def test_plan_draws_its_chart(capsys, tmp_path):
    chart = tmp_path / "plan.png"
    rc, out, _ = run(capsys, "hw", "plan", "--chip", "h20", "--chart", str(chart), "--json")
    assert rc == 0 and json.loads(out)["chart"] == str(chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_validate_json(capsys):
    rc, out, _ = run(capsys, "hw", "validate", "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == len(PUBLISHED) and all(r["within_tolerance"] for r in rows)


# ---- measure ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("hw") / "tiny-llama", "llama")


@pytest.mark.usefixtures("one_thread")
def test_measure_reports_fractions_of_measured_peaks(tiny_llama):
    m = measure(str(tiny_llama), MeasureConfig(batch=2, prompt_len=16, decode_steps=4), dtype="float32",
                num_threads=1)
    for name, value in m.fractions().items():
        assert 0 < value <= 1.5, (name, value)
    assert m.peaks.memory_read > 0 and m.peaks.matmul_flops > 0 and m.peaks.dtype == "float32"
    assert m.decode.tokens_per_step == 2 and m.prefill.tokens_per_step == 32
    assert m.decode.bytes_per_step > m.peaks.working_set_bytes  # weights plus the KV cache


@pytest.mark.usefixtures("one_thread")
def test_cli_measure_json(tiny_llama, capsys):
    rc, out, _ = run(capsys, "hw", "measure", str(tiny_llama), "--dtype", "float32", "--threads", "1",
                     "--batch", "1", "--prompt-len", "8", "--decode-steps", "3", "--json")
    j = json.loads(out)
    assert rc == 0 and 0 < j["decode_bandwidth_fraction"] <= 1.5 and 0 < j["prefill_flops_fraction"] <= 1.5


def test_weight_bytes_read_counts_embedding_rows_only():
    from torch import nn

    model = nn.Sequential(nn.Embedding(1000, 8), nn.Linear(8, 4, bias=False))
    assert weight_bytes_read(model, 3) == 3 * 8 * 4 + 8 * 4 * 4  # three looked-up rows, the whole linear


# ---- the planner's layouts in the engine's flags --------------------------------------------------


def engine_config_from(flags: str, tmp_path):
    """The EngineConfig `r1serve serve MODEL <flags>` would build (validated as the engine does)."""
    from r1serve.cli import build_parser, engine_options
    from r1serve.config import EngineConfig

    args = build_parser().parse_args(["serve", "model", *flags.split()])
    return EngineConfig(model="model", cache_dir=tmp_path, **engine_options(args))


@pytest.mark.parametrize("chip_id,chips", [("h20", 8), ("h100", 16), ("ascend-910c", 16)])
def test_plan_states_its_layout_in_engine_flags(capsys, tmp_path, chip_id, chips):
    rc, out, _ = run(capsys, "hw", "plan", "--chip", chip_id, "--chips", str(chips), "--json")
    assert rc == 0
    for phase in ("prefill", "decode"):
        lay = json.loads(out)["layout"][phase]
        if lay["engine_nearest"] is None:  # the engine runs the layout itself
            config = engine_config_from(lay["engine_flags"], tmp_path)
            assert (config.tensor_parallel_size, config.data_parallel_size) == (lay["tp"], lay["dp"])
        else:  # DP attention over one EP group: the engine's nearest covers the same devices
            config = engine_config_from(lay["engine_nearest"], tmp_path)
            assert config.tensor_parallel_size * config.data_parallel_size == lay["devices"]
            assert f"--data-parallel-size {lay['dp']}" in lay["engine_flags"]
        assert config.expert_parallel == ("--expert-parallel" in lay["engine_flags"])
    rc, text, _ = run(capsys, "hw", "plan", "--chip", chip_id, "--chips", str(chips))
    assert "r1serve serve deepseek-r1 " in text


def test_ep_imbalance_is_the_busiest_device_of_random_routing():
    import random

    from r1serve.planner.roofline import ep_imbalance

    assert ep_imbalance(1, 100) == 1.0
    # Large batches even out; a few tokens per device leave the busiest far above the mean.
    assert ep_imbalance(32, 100_000) == pytest.approx(1, abs=0.02)
    assert ep_imbalance(32, 4) > 2
    rng = random.Random(0)
    for devices, per_device in ((8, 16), (32, 64), (144, 8)):
        busiest = []
        for _ in range(200):
            counts = [0] * devices
            for _ in range(devices * per_device):
                counts[rng.randrange(devices)] += 1
            busiest.append(max(counts) / per_device)
        simulated = sorted(busiest)[len(busiest) // 2]
        assert ep_imbalance(devices, per_device) == pytest.approx(simulated, rel=0.15)


def test_plan_says_how_the_ratio_moves_with_the_chip_count_and_agrees_with_compare(capsys):
    rc, out, _ = run(capsys, "hw", "plan", "--chip", "ascend-910c", "--chips", "8", "--json")
    plan_j = json.loads(out)
    rc2, out, _ = run(capsys, "hw", "compare", "--only", "h100,ascend-910c", "--json")
    compare_j = json.loads(out)
    assert rc == rc2 == 0
    by_chips = {int(n): v for n, v in plan_j["pct_of_h100_by_chips"].items()}
    assert plan_j["compare_chips"] == compare_j["chips"] and {8, compare_j["chips"]} <= set(by_chips)
    row = next(r for r in compare_j["rows"] if r["chip"] == "ascend-910c")
    assert by_chips[compare_j["chips"]] == pytest.approx(row["pct_of_h100"])  # the two commands agree
    assert by_chips[8] == pytest.approx(plan_j["pct_of_h100"])
    h100 = next(r for r in compare_j["rows"] if r["chip"] == "h100")
    assert h100["output_tokens_per_s_per_kw"] == pytest.approx(h100["output_tokens_per_s_per_chip"] / 700 * 1000)
    rc, out, _ = run(capsys, "hw", "plan", "--chip", "ascend-910c", "--chips", "8")
    assert "% of H100 by chip count" in out and "(hw compare's count)" in out and "static (a fixed cost" in out


def test_a_planner_answer_needs_no_torch_once_the_shape_is_known(tmp_path):
    import subprocess
    import sys

    assert model_shape("deepseek-r1", tmp_path) == model_shape("deepseek-r1")  # computed, then kept
    code = ("import sys; from r1serve.planner.model import model_shape; "
            f"model_shape('deepseek-r1', {str(tmp_path)!r}); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"  # a cached shape: no torch import, an answer in a fraction of a second

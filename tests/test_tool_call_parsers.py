"""The tool-call parsers on scripted outputs, split at every position: a streamed reply must
come out exactly as the whole one, with nothing of the markup in the content."""
from __future__ import annotations

import json

import pytest

from r1serve.server.reasoning import ReasoningSplitter
from r1serve.tool_calls import FORMATS, ToolCallParser, detect_format, parse_tool_calls
from r1serve.tool_calls.formats import closed_schema

DS_CALLS = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
            '{"city": "Paris", "note": "a ``` b}"}\n```<｜tool▁call▁end｜>\n'
            '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"utc": true}\n```<｜tool▁call▁end｜>'
            '<｜tool▁calls▁end｜>')
DS_V31 = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"utc": false}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
HERMES = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"deep": [1, 2]}}}\n</tool_call>\n'
          '<tool_call>\n{"arguments": {"utc": true}, "name": "get_time"}\n</tool_call>')

CASES = [
    ("deepseek_v3", "Let me check." + DS_CALLS, "Let me check.",
     [("get_weather", '{"city": "Paris", "note": "a ``` b}"}'), ("get_time", '{"utc": true}')]),
    ("deepseek_v3", DS_V31, "", [("get_time", '{"utc": false}')]),
    ("deepseek_v3", "No tools needed: 4.", "No tools needed: 4.", []),
    ("hermes", "Sure.\n" + HERMES, "Sure.\n",
     [("get_weather", '{"city": "Paris", "n": {"deep": [1, 2]}}'), ("get_time", '{"utc": true}')]),
    ("hermes", "a < b and </tool is text", "a < b and </tool is text", []),
]


def streamed(fmt, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser, content, calls = ToolCallParser(fmt), "", {}
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += delta.content
        for c in delta.calls:
            if c.name is not None:  # a call's first delta names it, once
                assert c.index == len(calls)
                calls[c.index] = [c.name, ""]
            else:
                assert c.index in calls and c.arguments
            calls[c.index][1] += c.arguments
    return content, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_whole_output(name, text, content, calls):
    got_content, got_calls = parse_tool_calls(FORMATS[name], text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for _, args in calls:
        json.loads(args)  # never a fence or a closing brace too many


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_split_at_every_position(name, text, content, calls):
    fmt = FORMATS[name]
    for cut in range(len(text) + 1):
        assert streamed(fmt, [text[:cut], text[cut:]]) == (content, calls), cut
    assert streamed(fmt, list(text)) == (content, calls)  # one character at a time


def test_r1_calls_after_thinking_are_read_from_the_answer_only():
    fmt = FORMATS["deepseek_v3"]
    # A call written while thinking is part of the thought; the answer's calls are the calls.
    text = "I could call <｜tool▁calls▁begin｜>get_time here.\n</think>\n\n" + DS_CALLS
    for cut in range(len(text) + 1):
        splitter, parser = ReasoningSplitter(open_at_start=True), ToolCallParser(fmt)
        reasoning, content, names = "", "", []
        for piece in (text[:cut], text[cut:], None):
            d = splitter.feed(piece) if piece is not None else splitter.flush()
            reasoning += d.reasoning
            out = parser.feed(d.content, last=piece is None)
            content += out.content
            names += [c.name for c in out.calls if c.name]
        assert reasoning == "I could call <｜tool▁calls▁begin｜>get_time here.\n" and content == ""
        assert names == ["get_weather", "get_time"]


def test_a_cut_off_call_keeps_its_name_and_what_arguments_came():
    text = DS_CALLS[:DS_CALLS.index('"Paris"') + 4]
    content, calls = parse_tool_calls(FORMATS["deepseek_v3"], text)
    assert content == "" and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Par'


@pytest.mark.parametrize("name", ["hermes", "deepseek_v3"])
def test_a_call_whose_end_marker_was_cut_has_its_arguments_whole(name):
    fmt = FORMATS[name]
    whole = HERMES if name == "hermes" else DS_CALLS
    end = whole.index(fmt.call_end) + 3  # the output stopped three characters into the end marker
    _, calls = parse_tool_calls(fmt, whole[:end])
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] == "Paris"


def test_format_is_detected_from_the_chat_template():
    from r1serve.bench.random_checkpoint import HERMES_CHAT_TEMPLATE
    from r1serve.tokenizer.r1_chat_format import R1_CHAT_TEMPLATE

    assert detect_format(R1_CHAT_TEMPLATE).name == "deepseek_v3"
    assert detect_format(HERMES_CHAT_TEMPLATE).name == "hermes"
    assert detect_format("{{ messages[0]['content'] }}") is None and detect_format(None) is None


def test_closed_schema_closes_objects_that_list_properties():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": [{"x": 1}]}}},
                                               "c": {"type": "object", "additionalProperties": True}}}
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True
    assert closed["properties"]["a"]["properties"]["b"] == {"enum": [{"x": 1}]}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ARGS = '{"city": "Paris"}'


def _history(arguments):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]


@pytest.mark.parametrize("r1_format", [False, True])
def test_templates_render_tools_calls_and_results_as_transformers_does(tmp_path, r1_format):
    import transformers

    from r1serve.bench.random_checkpoint import write_tokenizer
    from r1serve.tokenizer import Tokenizer
    from r1serve.tokenizer.chat_template import ToolArguments

    write_tokenizer(tmp_path, r1_format=r1_format, tools=True)
    ours = Tokenizer.from_dir(tmp_path)
    text = ours.apply_chat_template(_history(ToolArguments.of(ARGS)), add_generation_prompt=True, tools=TOOLS)
    # transformers passes what it is given: DeepSeek's template concatenates the arguments'
    # text, Qwen-style templates apply tojson to an object.
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        _history(ARGS if r1_format else json.loads(ARGS)), tools=TOOLS, add_generation_prompt=True, tokenize=False,
        chat_template=ours.chat_template)
    assert text == theirs
    fmt = detect_format(ours.chat_template)
    assert fmt.call_begin in text and "get_weather" in text and "sunny" in text and text.count(ARGS) >= 1

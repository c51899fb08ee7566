"""R1 reasoning: the text split into reasoning_content / content on scripted streams, and the
engine's token-level count and budget on a real (tiny) model."""
from __future__ import annotations

import pytest

from r1serve import SamplingParams
from r1serve.sampling_params import ReasoningSpec
from r1serve.server.reasoning import ReasoningSplitter, split_reasoning

pytestmark = pytest.mark.usefixtures("one_thread")


def stream(pieces: list[str], open_at_start: bool) -> tuple[str, str]:
    s = ReasoningSplitter(open_at_start)
    reasoning = content = ""
    for piece in pieces:
        d = s.feed(piece)
        reasoning, content = reasoning + d.reasoning, content + d.content
    d = s.flush()
    return reasoning + d.reasoning, content + d.content


def every_split(text: str) -> list[list[str]]:
    """The text cut into two pieces at every position, and into single characters."""
    return [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]


@pytest.mark.parametrize("pieces", every_split("Let me think.</think>\n\nThe answer is 4."))
def test_prompt_ends_in_think_tag_split_anywhere(pieces):
    assert stream(pieces, open_at_start=True) == ("Let me think.", "The answer is 4.")


@pytest.mark.parametrize("pieces", every_split("<think>\nHmm, 2+2.\n</think>\n\n4"))
def test_output_opens_the_tag_itself(pieces):
    assert stream(pieces, open_at_start=False) == ("\nHmm, 2+2.\n", "4")


@pytest.mark.parametrize("pieces", every_split("Still thinking about </thi"))
def test_never_closed_is_all_reasoning(pieces):
    assert stream(pieces, open_at_start=True) == ("Still thinking about </thi", "")


@pytest.mark.parametrize("pieces", every_split("  <thinking> is not the tag; plain answer"))
def test_no_thinking_is_all_content(pieces):
    assert stream(pieces, open_at_start=False) == ("", "  <thinking> is not the tag; plain answer")


def test_short_outputs_that_look_like_a_tag_start():
    assert stream(["<th"], open_at_start=False) == ("", "<th")
    assert stream(["<think>"], open_at_start=False) == ("", "")
    assert stream(["x</think>"], open_at_start=True) == ("x", "")
    assert stream(["</think>\n\n", "\n", "a\n"], open_at_start=True) == ("", "a\n")


def test_whole_text_matches_streamed():
    text = "<think>a < b, and </ is not </think> yet</think>\n\nyes </think> stays in the answer"
    whole = split_reasoning(text, open_at_start=False)
    assert (whole.reasoning, whole.content) == stream(list(text), open_at_start=False)
    assert whole.reasoning == "a < b, and </ is not "
    assert whole.content == " yet</think>\n\nyes </think> stays in the answer"


def test_nothing_is_held_longer_than_needed():
    s = ReasoningSplitter(open_at_start=True)
    assert s.feed("abc<").reasoning == "abc"  # "<" may start </think>: held
    assert s.feed("b").reasoning == "<b"  # it did not


# ---- the engine's count and budget (token level) ------------------------------------------------

START, END = (11,), (7, 8)  # any ids of the tiny vocabulary stand in for <think> / </think>
PROMPT = {"prompt_token_ids": [5, 17, 42, 99, 3, 250, 7]}


def run(llm, spec, max_tokens=12):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, reasoning=spec)
    return llm.generate([PROMPT], params)[0].outputs[0]


@pytest.mark.parametrize("budget", [0, 1, 4])
def test_budget_forces_the_end_marker(llm, budget):
    free = run(llm, None)
    out = run(llm, ReasoningSpec(START, END, open_at_start=True, max_tokens=budget))
    assert out.token_ids[:budget] == free.token_ids[:budget]
    assert tuple(out.token_ids[budget:budget + 2]) == END
    assert out.num_reasoning_tokens == budget + len(END)
    assert len(out.token_ids) == 12


def test_count_stops_at_the_models_own_end_marker(llm):
    free = run(llm, None).token_ids
    # Use the model's own 3rd and 4th tokens as the end marker: it "closes" thinking by itself.
    spec = ReasoningSpec(START, tuple(free[2:4]), open_at_start=True, max_tokens=None)
    out = run(llm, spec)
    assert out.token_ids == free
    first_close = next(i for i in range(1, len(free)) if tuple(free[i - 1:i + 1]) == spec.end_ids)
    assert out.num_reasoning_tokens == first_close + 1


def test_output_that_does_not_open_thinking_counts_nothing(llm):
    free = run(llm, None).token_ids
    not_first = next(t for t in range(300) if t != free[0])
    out = run(llm, ReasoningSpec((not_first,), END, open_at_start=False, max_tokens=2))
    assert out.token_ids == free  # no budget applies either
    assert out.num_reasoning_tokens == 0


def test_output_that_opens_thinking_itself(llm):
    free = run(llm, None).token_ids
    out = run(llm, ReasoningSpec((free[0],), END, open_at_start=False, max_tokens=3))
    assert out.token_ids[:3] == free[:3] and tuple(out.token_ids[3:5]) == END
    assert out.num_reasoning_tokens == 5

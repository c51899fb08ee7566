"""IncrementalDetokenizer with the real SmolLM2 byte-level BPE tokenizer, fed one token at a time."""
from __future__ import annotations

import pytest

from r1serve.engine.detokenizer import IncrementalDetokenizer
from r1serve.sampling_params import SamplingParams

FFFD = "\ufffd"
TEXTS = [
    "Hello 😀 world 🎉!",
    "日本語のテキスト、漢字",
    "Café naïve façade — ümlaut",
    "👨‍👩‍👧 family: 한국어 and Ελληνικά",
    " leading space, then ½ ≥ ∑ → 𝔘",
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from r1serve.models.gguf_checkpoint import GGUFCheckpoint

    return GGUFCheckpoint.open(smollm2_gguf).tokenizer()


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode("Please repeat after me:", add_special_tokens=False)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def feed(tok, prompt, ids, **params) -> tuple[IncrementalDetokenizer, list[tuple[str, str, str | None]]]:
    """Feed ids one by one; returns the detokenizer and (text, visible_text, stop) after each."""
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(**params))
    steps = []
    for t in ids:
        stop = d.add_tokens([t])
        steps.append((d.text, d.visible_text(finished=False), stop))
        if stop is not None:
            break
    return d, steps


@pytest.mark.parametrize("text", TEXTS)
def test_text_equals_decode_and_never_shows_a_broken_character(tok, prompt, text):
    ids = encode(tok, text)
    # The case under test: some tokens are only part of a character.
    assert any(FFFD in tok.decode([t]) for t in ids), "no multi-byte character is split here"
    d, steps = feed(tok, prompt, ids)
    for i, (shown, visible, stop) in enumerate(steps):
        assert FFFD not in shown, f"step {i}: {shown!r}"
        assert text.startswith(shown), f"step {i}: {shown!r} is not a prefix of the final text"
        assert visible == shown and stop is None
        if i:
            assert shown.startswith(steps[i - 1][0])  # text only grows
    assert d.text == tok.decode(ids) == text
    assert d.flush() is None and d.text == text  # nothing left pending


def test_every_prefix_of_the_tokens_decodes_without_fffd(tok, prompt):
    # Cut the output after every token: each cut shows the longest complete-character prefix.
    ids = encode(tok, "".join(TEXTS))
    d = IncrementalDetokenizer(tok, prompt, SamplingParams())
    for n, t in enumerate(ids, start=1):
        d.add_tokens([t])
        full = tok.decode(ids[:n])
        assert FFFD not in d.text
        if not full.endswith(FFFD):
            assert d.text == full, f"after {n} tokens"
        else:  # held back: the broken character and the token it came in (' \ufffd': its space too)
            assert full.startswith(d.text)
            assert full[len(d.text):].strip(FFFD).strip() == "", "text held back beyond the broken character"


def test_several_tokens_at_once(tok, prompt):
    ids = encode(tok, TEXTS[0] + TEXTS[1])
    d = IncrementalDetokenizer(tok, prompt, SamplingParams())
    for i in range(0, len(ids), 3):
        d.add_tokens(ids[i:i + 3])
        assert FFFD not in d.text
    assert d.text == TEXTS[0] + TEXTS[1]


def test_flush_emits_a_trailing_partial_character(tok, prompt):
    ids = encode(tok, "ok 😀")
    first_byte = next(i for i, t in enumerate(ids) if FFFD in tok.decode([t]))
    d, _ = feed(tok, prompt, ids[:first_byte + 1])
    assert d.text == "ok"  # the emoji's first byte is held
    assert d.flush() is None
    assert d.text == tok.decode(ids[:first_byte + 1]) and d.text.endswith(FFFD)


def test_special_tokens_skipped_or_kept(tok, prompt):
    eos = next(iter(tok.eos_token_ids))
    ids = encode(tok, "Hi there") + [eos]
    d, _ = feed(tok, prompt, ids)
    assert d.text == "Hi there"
    d, _ = feed(tok, prompt, ids, skip_special_tokens=False)
    assert d.text == "Hi there" + tok.decode([eos], skip_special_tokens=False) and d.text != "Hi there"


def test_first_token_keeps_its_leading_space(tok, prompt):
    d, _ = feed(tok, prompt, encode(tok, " world"))
    assert d.text == " world"


# ---- stop strings ---------------------------------------------------------------------------------

STORY = "Hello 😀 world 🎉! This is the end. More text after it."


def stop_case(tok, prompt, stop, include=False, text=STORY):
    ids = encode(tok, text)
    d, steps = feed(tok, prompt, ids, stop=stop, include_stop_str_in_output=include)
    return ids, d, steps


@pytest.mark.parametrize("stop", ["end. Mo", "😀 wor", "🎉!", " is the"])
def test_stop_string_split_across_tokens_is_caught_and_not_leaked(tok, prompt, stop):
    ids = encode(tok, STORY)
    # The stop string really spans several tokens.
    assert not any(stop in tok.decode([t]) for t in ids)
    _, d, steps = stop_case(tok, prompt, stop)
    idx = STORY.find(stop)
    assert d.stop_hit == stop and steps[-1][2] == stop
    assert d.text == STORY[:idx]
    assert d.visible_text(finished=True) == STORY[:idx]
    # It stopped at the token that completed the stop string, not later.
    assert len(steps) == next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    for shown, visible, _ in steps:
        assert stop not in shown and stop not in visible
        assert STORY[:idx].startswith(visible)


def test_include_stop_str_in_output(tok, prompt):
    _, d, _ = stop_case(tok, prompt, "end. Mo", include=True)
    assert d.text == STORY[:STORY.find("end. Mo") + len("end. Mo")]
    assert d.visible_text(finished=False) == d.text  # stopped: nothing to hold back


def test_stop_string_inside_one_token(tok, prompt):
    _, d, _ = stop_case(tok, prompt, "ell")
    assert d.text == "H" and d.stop_hit == "ell"


def test_earliest_stop_string_wins(tok, prompt):
    _, d, _ = stop_case(tok, prompt, ["end", "world", "🎉"])
    assert d.stop_hit == "world" and d.text == "Hello 😀 "


def test_stop_string_in_the_prompt_does_not_stop(tok):
    prompt = encode(tok, "This is the end")
    _, d, _ = stop_case(tok, prompt, "end", text=" of it, friend.")
    # "friend" holds "end": that one counts, the prompt's does not.
    assert d.stop_hit == "end" and d.text == " of it, fri"
    _, d, _ = stop_case(tok, prompt, "end", text=" of it all.")
    assert d.stop_hit is None and d.text == " of it all."


def test_min_tokens_holds_back_stop_strings(tok, prompt):
    ids = encode(tok, STORY)
    # "world" is complete after token 4; with min_tokens=6 it no longer ends the text, "end" does.
    assert tok.decode(ids[:4]).endswith("world")
    _, d, _ = stop_case(tok, prompt, ["world", "end"])
    assert d.stop_hit == "world"
    d, _ = feed(tok, prompt, ids, stop=["world", "end"], min_tokens=6)
    assert d.stop_hit == "end" and d.text == STORY[:STORY.find("end")]
    # A stop string that straddles the min_tokens boundary still counts.
    n = next(n for n in range(1, len(ids)) if "world" in tok.decode(ids[:n]))
    d, _ = feed(tok, prompt, ids, stop=["world"], min_tokens=n)
    assert d.stop_hit == "world" and d.text == "Hello 😀 "


def test_no_stop_strings_means_no_hold_back(tok, prompt):
    _, steps = feed(tok, prompt, encode(tok, STORY))
    assert all(visible == shown for shown, visible, _ in steps)


def longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@pytest.mark.parametrize("stop", [["END!"], ["xyz"], ["Hello 😀 world!!"], ["ab", "abcdef"]])
def test_visible_text_holds_back_a_possible_stop_prefix_and_never_retracts(tok, prompt, stop):
    # One character per step where the tokenizer allows, so short texts are seen too.
    text = "abcde Hello 😀 world 🎉! The END"
    ids = encode(tok, text)
    d, steps = feed(tok, prompt, ids, stop=stop)
    final = d.text
    previous = ""
    for shown, visible, hit in steps:
        if hit is not None:
            break
        assert shown.startswith(visible)
        tail = shown[len(visible):]
        assert len(tail) >= longest_stop_prefix_suffix(shown, stop), \
            f"{shown!r}: shows {visible!r}, yet its tail may begin a stop string of {stop}"
        assert final.startswith(visible)
        assert visible.startswith(previous), f"visible text went back from {previous!r} to {visible!r}"
        previous = visible
    assert d.visible_text(finished=True) == final


def test_visible_text_on_a_short_text_with_a_long_stop(tok, prompt):
    # The text is shorter than the hold: nothing may show, since all of it could begin the stop.
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=["abcdef"]))
    for t in encode(tok, "a b c d"):
        d.add_tokens([t])
        assert d.visible_text(finished=False) == d.text[:max(0, len(d.text) - 5)]
    assert d.text == "a b c d" and d.visible_text(finished=True) == "a b c d"


def test_text_buffer_is_a_string_read_from_the_end():
    """Appends, tails and cuts against a plain str, at random."""
    import random

    from r1serve.engine.detokenizer import TextBuffer

    rng = random.Random(0)
    buf, plain = TextBuffer(), ""
    for step in range(2000):
        action = rng.random()
        if action < 0.7:
            piece = "".join(rng.choice("ab é\n") for _ in range(rng.randint(0, 4)))
            buf.append(piece)
            plain += piece
        elif action < 0.8 and plain:
            n = rng.randint(0, len(plain))
            buf.truncate(n)
            plain = plain[:n]
        elif action < 0.85:
            assert str(buf) == plain  # joining, then appending again, keeps both right
        start = rng.randint(0, len(plain))
        end = rng.randint(start, len(plain))
        assert len(buf) == len(plain) and buf.tail(start, end) == plain[start:end] and buf.tail(start) == plain[start:]
    assert str(buf) == plain

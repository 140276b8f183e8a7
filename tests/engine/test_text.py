"""Detokenizing and stop strings: never a split character, never part of a stop string."""

from __future__ import annotations

import pytest

from chatstream.engine.detokenize import IncrementalDetokenizer, StopMatcher


def test_multibyte_text_is_never_split(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = "日本語のテキスト 🙂🚀 café naïve — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "the text must span byte-level tokens for this test to mean anything"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    for d in deltas:
        d.encode("utf-8")  # each delta is whole text


@pytest.mark.parametrize("stops, feeds, flushed", [
    (["</end>"], [("Hello </e", "Hello ", False), ("nd> more", "", True)], None),      # held back, then cut
    (["STOP"], [("ST", "", False), ("ART", "START", False)], ""),                      # a false alarm, released
    ([], [("abc", "abc", False)], None),                                               # no stop strings
], ids=["held-then-cut", "false-alarm-released", "no-stop-strings"])
def test_stop_strings_are_held_back_then_cut_or_released(stops, feeds, flushed):
    m = StopMatcher(stops)
    for text, emitted, hit in feeds:
        assert m.feed(text) == (emitted, hit), text
    if flushed is not None:
        assert m.flush() == flushed


def reference_feed(pending: str, text: str, stops: list[str]) -> tuple[str, bool, str]:
    """The plain definition: cut at the earliest stop string in the text held so far; otherwise hold back the
    longest suffix that is the beginning of a stop string. Returns (emitted, hit, still held)."""
    pending += text
    starts = [i for i in (pending.find(s) for s in stops) if i >= 0]
    if starts:
        return pending[:min(starts)], True, ""
    hold = max([k for s in stops for k in range(1, min(len(s) - 1, len(pending)) + 1)
                if pending.endswith(s[:k])], default=0)
    return pending[:len(pending) - hold], False, pending[len(pending) - hold:]


def test_matcher_agrees_with_the_plain_definition():
    import random
    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        m, held = StopMatcher(stops), ""
        for _ in range(rng.randint(1, 12)):
            text = "".join(rng.choice("ab cd") for _ in range(rng.randint(0, 4)))
            want_out, want_hit, held = reference_feed(held, text, stops)
            assert m.feed(text) == (want_out, want_hit), (stops, text)
            if want_hit:
                break
        else:
            assert m.flush() == held


def test_many_long_stop_strings_cost_little_per_token():
    # Matching used to cost stops x held^2 per token on the engine thread (1000 stops: 26 s of
    # engine time for one request). The server caps the stops (sampling.MAX_STOP_STRINGS); the matcher stays
    # cheap even far past the cap, while text that may become a stop string is held back.
    import time
    stops = [f"{i:04d}" + "x" * 96 for i in range(1000)]
    almost = "0042" + "x" * 95
    start = time.perf_counter()
    m = StopMatcher(stops)
    for _ in range(4):
        for ch in almost:
            assert m.feed(ch) == ("", False)
        assert m.feed("y") == (almost + "y", False)
    m.feed(almost)
    assert m.feed("xz") == ("", True)
    assert time.perf_counter() - start < 2.0

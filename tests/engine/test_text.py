"""Detokenizing and stop strings: never a split character, never part of a stop string."""

from __future__ import annotations

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


def test_stop_string_is_held_back_then_cut():
    m = StopMatcher(["</end>"])
    assert m.feed("Hello </e") == ("Hello ", False)
    assert m.feed("nd> more") == ("", True)


def test_false_alarm_is_released():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
    assert m.flush() == ""


def test_no_stop_strings_passes_through():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)

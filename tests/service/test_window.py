"""The prompt window of a long conversation (window.py), without a model: turns of known sizes."""

from __future__ import annotations

import pytest

from chatstream.errors import ChatStreamError
from chatstream.prompt import ChatPrompt
from chatstream.window import fit

HEAD = 10  # the system prompt's tokens: always in the prompt


def renderer(sizes: list[int]):
    """Token ids of the prompt holding turns ``s..`` of turns with these sizes (a token is its turn's index)."""
    def render(left_out: int) -> list[int]:
        return [-1] * HEAD + [i for i, n in enumerate(sizes) if i >= left_out for _ in range(n)]
    return render


def converse(sizes: list[int], budget: int, keep: float) -> list:
    """The window of every turn of a conversation whose turns have these sizes, the start saved between turns."""
    start, out = 0, []
    for n in range(1, len(sizes) + 1):
        window = fit(renderer(sizes[:n]), n, budget, keep, start)
        start = window.start
        out.append(window)
    return out


def test_the_window_moves_in_jumps_and_later_turns_extend_the_prompt():
    windows = converse([100] * 30, budget=1000, keep=0.5)
    moves = [i for i, w in enumerate(windows) if w.moved]
    assert moves[0] == 9  # ten turns of 100 and the head do not fit 1000
    # After a jump the newest turns fill at most half the budget (four turns); the next five only add to the end.
    assert all(b - a == 6 for a, b in zip(moves, moves[1:])), moves
    for before, after in zip(windows, windows[1:]):
        assert len(after.ids) <= 1000
        if not after.moved:
            assert after.ids[:len(before.ids)] == before.ids, "a turn that does not move the window extends the prompt"
        else:
            assert after.start > before.start and len(after.ids) <= HEAD + 500


def test_keep_one_is_the_old_rule_one_turn_at_a_time():
    windows = converse([100] * 20, budget=1000, keep=1.0)
    assert [w.start for w in windows][9:] == list(range(1, 12))
    assert all(w.moved for w in windows[9:])


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_the_newest_turns_are_always_in_the_prompt(keep):
    sizes = [37, 250, 12, 90, 140, 60, 300, 45, 80, 20, 220, 75, 130, 10, 95] * 2
    budget = 700
    for n, window in enumerate(converse(sizes, budget, keep), start=1):
        kept = sorted(set(window.ids) - {-1})
        assert kept == list(range(window.start, n)), "whole turns, the newest included, in order"
        assert window.ids[:HEAD] == [-1] * HEAD, "the system prompt stays"
        # Every newest turn that fits in keep x budget is in the prompt, and at least the last exchange with the
        # newest turn (the newest alone when the two do not fit).
        fitting = next(s for s in range(n) if HEAD + sum(sizes[s:n]) <= max(keep * budget, HEAD + sizes[n - 1]))
        if n >= 2 and HEAD + sizes[n - 2] + sizes[n - 1] <= budget:
            fitting = min(fitting, n - 2)
        assert window.start <= fitting, (n, window.start, fitting)
        assert len(window.ids) <= budget


def test_a_turn_too_long_for_the_budget_is_refused_and_a_stale_start_is_ignored():
    with pytest.raises(ChatStreamError) as err:
        fit(renderer([100, 2000]), 2, 1000, 0.5, 0)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    # A start saved for a longer history (cleared since) counts from the first turn again.
    assert fit(renderer([100, 100]), 2, 1000, 0.5, start=7).start == 0


def test_the_start_is_saved_with_the_conversation():
    prompt = ChatPrompt()
    prompt.add_requester_msg("hi")
    prompt.window_start = 3
    assert ChatPrompt.from_dict(prompt.to_dict()).window_start == 3
    assert ChatPrompt.from_dict({**prompt.to_dict(), "window_start": "x"}).window_start == 0
    prompt.clear_history()
    assert prompt.window_start == 0

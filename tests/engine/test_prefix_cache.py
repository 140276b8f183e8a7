"""The prefix cache: kept KV of finished sequences serves the prompts that start with it.

Without a model first (the engine's real step around the fake runner of helpers.py: every row must hold
exactly its sequence's tokens, loaded or prefilled), then on the real model: greedy output with a
cache hit equals the output without the cache, alone, under concurrency and under eviction.
"""

from __future__ import annotations

import random

import pytest

from chatstream.engine.prefix_cache import Drop, PrefixIndex, Save

from .helpers import Driver, FakeRunner, ask, running


class KeepingRunner(FakeRunner):
    def __init__(self, max_batch):
        super().__init__(max_batch)
        self.kept: dict[int, list[int]] = {}

    def apply(self, orders):
        for o in orders:
            if isinstance(o, Save):
                self.kept[o.key] = list(self.rows[o.row][:o.length])
            elif isinstance(o, Drop):
                del self.kept[o.key]
            else:
                super().apply([o])

    def load(self, row, key, length):
        for p in range(length):
            self._write(row, p, self.kept[key][p])


class KeepingDriver(Driver):
    def __init__(self, max_batch, **budgets):
        super().__init__(max_batch, runner=KeepingRunner(max_batch), **budgets)

    def step(self):
        ran = super().step()
        prefixes = self.scheduler.prefixes
        assert prefixes.held_tokens <= prefixes.budget_tokens
        assert set(self.runner.kept) == set(prefixes.entries)
        for key, tokens in prefixes.entries.items():
            assert self.runner.kept[key] == tokens
        return ran


def test_index_keeps_the_longest_match_extends_and_evicts_least_recently_used():
    index = PrefixIndex(budget_tokens=10)
    a, _ = index.insert([1, 2, 3, 4])
    assert index.lookup([1, 2, 3, 4, 5]) == (a, 4)
    assert index.lookup([1, 2, 3, 4]) == (a, 3), "the last prompt token is always prefilled"
    assert index.lookup([9, 1]) == (None, 0)
    b, drops = index.insert([1, 2, 3, 4, 5, 6])          # the conversation went on: the old turn is dropped
    assert drops == [a] and index.held_tokens == 6
    assert index.insert([1, 2, 3]) == (None, [])          # already held inside b
    c, drops = index.insert([7, 8, 9])
    assert drops == [] and index.held_tokens == 9
    index.lookup([1, 2, 0])                               # b is used: c is now the oldest
    d, drops = index.insert([5, 5])
    assert drops == [c] and index.held_tokens == 8 and list(index.entries) == [b, d]
    assert index.insert(list(range(11))) == (None, [])    # larger than the whole budget: not kept
    assert index.hit_tokens == 4 + 3 + 2 and index.prompt_tokens == 5 + 4 + 2 + 3


def test_a_conversation_turn_prefills_only_its_new_tokens():
    drv = KeepingDriver(max_batch=2, prefill_tokens=512, prefix_cache_tokens=1000)
    first = drv.submit(prompt=list(range(100, 140)), max_new=5)
    drv.run_out()
    history = first.prompt_ids + first.generated      # the client sends the whole history back
    second = drv.submit(prompt=history + [7, 8, 9], max_new=5)
    drv.step()
    # Kept: the prompt and the generated tokens that went through the model (all but the last).
    assert second.cached_tokens == len(history) - 1
    assert drv.runner.prefill_passes[-1] == [(second, len(history) - 1, 4)]


@pytest.mark.parametrize("seed", range(6))
def test_random_conversations_always_find_their_own_tokens(seed):
    rng = random.Random(seed)
    max_batch = rng.choice([1, 2, 4])
    budget = rng.choice([30, 100, 400])
    drv = KeepingDriver(max_batch, prefill_tokens=rng.choice([8, 64]), prefill_tokens_decoding=rng.choice([4, 16]),
                        prefix_cache_tokens=budget)
    systems = [[rng.randint(0, 50) for _ in range(rng.randint(5, 30))] for _ in range(3)]
    for t in range(300):
        if rng.random() < 0.3:
            if drv.finished and rng.random() < 0.5:
                prev = rng.choice(drv.finished)
                base = prev.prompt_ids + prev.generated
            else:
                base = rng.choice(systems)
            prompt = base + [rng.randint(0, 50) for _ in range(rng.randint(1, 10))]
            if len(prompt) < 200:
                drv.submit(prompt=prompt, max_new=rng.randint(1, 8))
        drv.end_one_at_random(rng, 0.03)
        drv.step()
    drv.run_out()
    assert drv.scheduler.prefixes.hit_tokens > 0


# -- the real model ---------------------------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant. Answer in one short sentence, plainly, without lists, and never repeat "
          "the question. If you do not know, say so.")
QUESTIONS = ["What is the capital of France?", "What is 2+2?", "Name a color.", "Who wrote Hamlet?"]


def system_prompts(tok) -> list[list[int]]:
    """Each of QUESTIONS after the one long SYSTEM prompt they share."""
    return [render(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) for q in QUESTIONS]


def render(tok, turns):
    return tok(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def plain(model_and_tokenizer):
    """Answers computed without a prefix cache, for any list of prompts."""
    memo = {}

    def answers(prompts):
        missing = [p for p in prompts if tuple(p) not in memo]
        if missing:
            with running(model_and_tokenizer) as eng:
                for ids, c in zip(missing, ask(eng, missing)):
                    memo[tuple(ids)] = summary(c)
        return [memo[tuple(p)] for p in prompts]
    return answers


def summary(c):
    return c.text, c.end.reason, c.end.completion_tokens


def test_next_turn_hits_and_answers_as_without_cache(model_and_tokenizer, plain):
    _, tok = model_and_tokenizer
    with running(model_and_tokenizer, prefix_cache_tokens=4096) as eng:
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
        first_ids = render(tok, turns)
        first = ask(eng, [first_ids])[0]
        assert first.end.cached_prompt_tokens == 0
        # Another request takes the same cache row meanwhile: the kept copy must serve the next turn.
        haiku = render(tok, [{"role": "user", "content": "Write a haiku about the sea."}])
        other = ask(eng, [haiku], max_new_tokens=40)[0]
        assert other.end.cached_prompt_tokens < 10
        turns += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
        second_ids = render(tok, turns)
        second = ask(eng, [second_ids])[0]
        # The whole first turn (prompt and answer, the answer re-tokenized from its text) is reused.
        assert second.end.cached_prompt_tokens >= len(first_ids)
        assert [summary(first), summary(second)] == plain([first_ids, second_ids])
        stats = eng.prefix_cache_stats
        assert stats["cached_tokens"] == sum(c.end.cached_prompt_tokens for c in (first, other, second))
        assert stats["prompt_tokens"] == len(first_ids) + other.end.prompt_tokens + len(second_ids)
        assert 0 < stats["held_tokens"] <= 4096 and stats["held_bytes"] == stats["held_tokens"] * 30 * 2 * 3 * 64 * 4


def test_concurrent_hits_on_one_prefix_answer_as_without_cache(model_and_tokenizer, plain):
    prompts = system_prompts(model_and_tokenizer[1])
    with running(model_and_tokenizer, prefix_cache_tokens=4096) as eng:
        warm = ask(eng, [prompts[0]])
        outs = ask(eng, prompts)  # four at once, all starting from the kept system prompt
    assert all(c.end.cached_prompt_tokens >= 30 for c in outs)
    assert [summary(c) for c in warm + outs] == plain([prompts[0]] + prompts)


def test_eviction_keeps_the_budget_and_never_changes_an_answer(model_and_tokenizer, plain):
    prompts = system_prompts(model_and_tokenizer[1])
    budget = len(prompts[0]) + 30   # room for about one finished sequence: each end evicts the previous one
    held, outs = [], []
    with running(model_and_tokenizer, prefix_cache_tokens=budget) as eng:
        for _ in range(2):
            for c in ask(eng, prompts):
                outs.append(c)
                held.append(eng.prefix_cache_stats["held_tokens"])
    assert max(held) <= budget
    assert any(c.end.cached_prompt_tokens for c in outs)
    assert [summary(c) for c in outs] == plain(prompts + prompts)

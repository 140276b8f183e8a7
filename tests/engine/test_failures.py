"""One request never harms another: a request whose sampling, admission or consumer fails is failed
alone, and the streams beside it finish with exactly the text they would have had alone."""

from __future__ import annotations

import pytest

from chatstream.engine import Delta, Failed, SamplingParams
from chatstream.engine.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS

from .helpers import QUESTIONS, Collector, prompt, running

HEALTHY = QUESTIONS[:3]


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):
    with running(model_and_tokenizer) as eng:
        yield eng


@pytest.fixture(scope="module")
def alone(engine, model_and_tokenizer):
    """Each healthy question's greedy answer (text and end) when it runs by itself."""
    _, tok = model_and_tokenizer
    answers = []
    for q in HEALTHY:
        c = Collector()
        engine.submit(prompt(tok, q), SamplingParams(max_new_tokens=20, temperature=0), c)
        assert c.done.wait(120)
        answers.append((c.text, c.end))
    return answers


def beside_three_healthy(engine, tok, poison_ids, poison_params, poison_collector=None):
    """Submit one request between healthy greedy ones; return (poisoned collector, healthy collectors)."""
    healthy = [Collector() for _ in HEALTHY]
    engine.submit(prompt(tok, HEALTHY[0]), SamplingParams(max_new_tokens=20, temperature=0), healthy[0])
    poisoned = poison_collector or Collector()
    engine.submit(poison_ids, poison_params, poisoned)
    for q, c in zip(HEALTHY[1:], healthy[1:]):
        engine.submit(prompt(tok, q), SamplingParams(max_new_tokens=20, temperature=0), c)
    for c in healthy + [poisoned]:
        assert c.done.wait(120), "a stream never ended"
    return poisoned, healthy


def assert_healthy_untouched(engine, healthy, alone):
    assert [(c.text, c.end) for c in healthy] == alone
    assert engine.scheduler.active == 0


class PoisonedParams(SamplingParams):
    """Sampling settings that raise inside the batched step (any bug or odd value that gets past validate)."""

    @property
    def greedy(self):
        raise RuntimeError("poisoned sampling")


def test_a_request_whose_sampling_raises_fails_alone(engine, model_and_tokenizer, alone):
    _, tok = model_and_tokenizer
    poisoned, healthy = beside_three_healthy(engine, tok, prompt(tok, QUESTIONS[3]), PoisonedParams(temperature=1.0))
    assert isinstance(poisoned.end, Failed) and "poisoned sampling" in str(poisoned.end.error)
    assert_healthy_untouched(engine, healthy, alone)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 5e-6])
def test_a_vanishing_temperature_is_greedy(engine, model_and_tokenizer, alone, temperature):
    # Once 1e-39 made NaN probabilities; multinomial raised and every stream of every user ended.
    _, tok = model_and_tokenizer
    tiny, healthy = beside_three_healthy(engine, tok, prompt(tok, HEALTHY[1]),
                                         SamplingParams(max_new_tokens=20, temperature=temperature, top_p=0.9))
    assert (tiny.text, tiny.end) == alone[1]
    assert_healthy_untouched(engine, healthy, alone)


def test_a_huge_top_k_is_no_filter(engine, model_and_tokenizer, alone):
    # top_k is only checked to be >= 0; 2**70 overflowed the batched step's tensor.
    _, tok = model_and_tokenizer
    c, healthy = beside_three_healthy(engine, tok, prompt(tok, HEALTHY[1]),
                                      SamplingParams(max_new_tokens=5, temperature=1.0, top_k=2**70, seed=1))
    assert c.end.reason == "length"
    assert_healthy_untouched(engine, healthy, alone)


@pytest.mark.parametrize("seed", [2**64, 2**70, -1, 1.5, True])
def test_out_of_range_seeds_are_refused_at_submit(engine, seed):
    # Once seed 2**70 raised in admission; every other stream failed and this one hung forever.
    with pytest.raises(ValueError, match="seed"):
        engine.submit([1, 2, 3], SamplingParams(seed=seed), Collector())
    SamplingParams(seed=2**64 - 1).validate()
    SamplingParams(seed=0).validate()


class SkipsValidation(SamplingParams):
    def validate(self):
        pass


def test_a_sequence_that_fails_admission_fails_alone_and_never_hangs(engine, model_and_tokenizer, alone):
    _, tok = model_and_tokenizer
    bad, healthy = beside_three_healthy(engine, tok, prompt(tok, QUESTIONS[3]),
                                        SkipsValidation(seed=2**70, temperature=1.0))
    assert isinstance(bad.end, Failed)
    assert_healthy_untouched(engine, healthy, alone)


class RaisesOnText(Collector):
    def __call__(self, event):
        if isinstance(event, Delta):
            raise RuntimeError("consumer broke")
        super().__call__(event)


def test_a_consumer_whose_callback_raises_fails_alone(engine, model_and_tokenizer, alone):
    _, tok = model_and_tokenizer
    broken, healthy = beside_three_healthy(engine, tok, prompt(tok, QUESTIONS[3]),
                                           SamplingParams(max_new_tokens=20, temperature=0), RaisesOnText())
    assert isinstance(broken.end, Failed) and "consumer broke" in str(broken.end.error)
    assert_healthy_untouched(engine, healthy, alone)


def test_stop_strings_are_capped_with_a_clear_error(engine):
    with pytest.raises(ValueError, match=str(MAX_STOP_STRINGS)):
        engine.submit([1, 2, 3], SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), Collector())
    with pytest.raises(ValueError, match=str(MAX_STOP_LENGTH)):
        engine.submit([1, 2, 3], SamplingParams(stop=["x" * (MAX_STOP_LENGTH + 1)]), Collector())
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="abc").validate()
    SamplingParams(stop=["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS).validate()


def test_the_engine_serves_on_after_every_poison(engine, model_and_tokenizer, alone):
    _, tok = model_and_tokenizer
    c = Collector()
    engine.submit(prompt(tok, HEALTHY[0]), SamplingParams(max_new_tokens=20, temperature=0), c)
    assert c.done.wait(120) and (c.text, c.end) == alone[0]


def test_sampling_survives_nan_and_inf_logits():
    # A model that produced NaN or inf for one row: that row still gets a token, and no row raises.
    import torch

    from chatstream.engine.sampling import sample
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[0] = float("nan")
    logits[1, 7] = float("inf")
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=1) for _ in range(3)]
    picks = sample(logits, params, [None] * 3, [torch.Generator().manual_seed(1) for _ in range(3)])
    assert all(isinstance(p, int) and 0 <= p < 50 for p in picks)
    assert picks[1] == 7
    alone = sample(logits[2:], params[2:], [None], [torch.Generator().manual_seed(1)])
    assert picks[2] == alone[0]


def test_greedy_picks_the_first_of_equal_maxima_and_a_nan_as_argmax_does():
    # greedy takes max's indices (faster than argmax): the same token as argmax, ties and NaN included
    import torch

    from chatstream.engine.sampling import sample
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 3, (6, 40), generator=gen).float()  # many equal maxima
    logits[1, 9] = float("nan")
    logits[2, 5] = logits[2, 30] = float("inf")
    logits[3] = float("-inf")
    params = [SamplingParams(temperature=0) for _ in range(6)]
    picks = sample(logits, params, [None] * 6, [None] * 6)
    assert picks == logits.argmax(dim=-1).tolist()
    assert picks[1] == 9 and picks[2] == 5

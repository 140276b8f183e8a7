"""The batching engine on the real model: batching must not change answers, cancellation frees rows."""

from __future__ import annotations

import time

import pytest

from chatstream.engine import Failed, Finished, SamplingParams

from .helpers import QUESTIONS, Collector, ask, prompt, running


@pytest.fixture
def engine(model_and_tokenizer):
    with running(model_and_tokenizer, cpu_linear="onednn") as eng:
        yield eng


def run_all(engine, tok, questions, **params):
    return ask(engine, [prompt(tok, q) for q in questions], timeout=120, **params)


def assert_serves_again(engine, tok):
    """No row is held any more, and the next request is answered right."""
    assert engine.scheduler.active == 0
    assert "Paris" in run_all(engine, tok, [QUESTIONS[0]])[0].text


def test_greedy_output_is_the_same_alone_and_in_a_batch(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    alone = [run_all(engine, tok, [q])[0].text for q in QUESTIONS]
    # Six requests on four rows with small prefill budgets (16 tokens while rows decode): chunked prefill
    # beside decoding rows, queueing and row moves all happen.
    together = [c.text for c in run_all(engine, tok, QUESTIONS)]
    assert together == alone
    assert "Paris" in alone[0]


def test_greedy_matches_transformers_generate(engine):
    # The reference is a separate, untouched copy of the model running PyTorch's own kernels: the engine's
    # prepacked oneDNN layers must not change a greedy answer.
    import torch

    from chatstream import load_model
    reference, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    assert engine.packed_linears > 0
    assert not any(type(m).__name__ == "PackedLinear" for m in reference.modules())
    expected = []
    for question in QUESTIONS:
        ids = prompt(tok, question)
        with torch.inference_mode():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        expected.append(tok.decode(ref[0, len(ids):], skip_special_tokens=True))
    assert [c.text for c in run_all(engine, tok, QUESTIONS)] == expected


def test_finish_reasons_and_usage(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    short = run_all(engine, tok, [QUESTIONS[0]], max_new_tokens=3)[0]
    assert short.end == Finished("length", len(prompt(tok, QUESTIONS[0])), 3)
    full = run_all(engine, tok, [QUESTIONS[0]], max_new_tokens=50)[0]
    assert full.end.reason == "stop" and full.text == "The capital of France is Paris."
    stopped = run_all(engine, tok, [QUESTIONS[0]], stop=["France"])[0]
    assert stopped.text == "The capital of " and stopped.end.reason == "stop"


def test_cancel_frees_the_row_at_the_next_step(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    c = Collector()
    seq = engine.submit(prompt(tok, "Write a long story."), SamplingParams(max_new_tokens=400, temperature=0), c)
    while not c.text:
        c.done.wait(0.01)
    engine.cancel(seq)
    assert c.done.wait(5)
    assert c.end.reason == "cancelled" and c.end.completion_tokens < 400
    assert_serves_again(engine, tok)  # from the freed row


def test_sampling_is_seeded_per_request(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 12, "seed": 11}
    first = run_all(engine, tok, [QUESTIONS[1]], **params)[0].text
    # Same seed, now sharing the batch with other requests: same text.
    outs = run_all(engine, tok, [QUESTIONS[1], QUESTIONS[2], QUESTIONS[3]], **params)
    assert outs[0].text == first


def test_repetition_penalty_changes_greedy_output(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    plain = run_all(engine, tok, ["Repeat the word cat ten times."], max_new_tokens=20)[0].text
    penalized = run_all(engine, tok, ["Repeat the word cat ten times."], max_new_tokens=20,
                        repetition_penalty=2.0)[0].text
    assert plain != penalized


def test_prompt_too_long_and_bad_params_are_refused(engine):
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(600)), SamplingParams(), Collector())
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1, 2, 3], SamplingParams(top_p=0), Collector())


def test_a_failing_step_fails_its_streams_and_the_engine_recovers(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    healthy = engine.runner.model

    class Broken:
        dtype, config = healthy.dtype, healthy.config

        def __call__(self, *a, **k):
            raise RuntimeError("injected")
    engine.runner.model = Broken()
    c = Collector()
    engine.submit(prompt(tok, QUESTIONS[0]), SamplingParams(temperature=0), c)
    assert c.done.wait(10) and isinstance(c.end, Failed)
    engine.runner.model = healthy
    assert_serves_again(engine, tok)


def test_cache_reserves_each_sequence_on_admission_and_shrinks_when_idle(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    ids = prompt(tok, "Write a long story.")
    seen = []

    class Watch(Collector):
        def __call__(self, event):
            seen.append(engine.runner.cache.capacity)  # called on the engine thread, between steps
            super().__call__(event)

    c = Watch()
    engine.idle_shrink_seconds = 0.3
    engine.submit(ids, SamplingParams(max_new_tokens=100, temperature=0), c)
    assert c.done.wait(120)
    need = len(ids) + 100
    # Reserved once, rounded up to 64 positions, never grown mid-stream.
    assert set(seen) == {-(-need // 64) * 64}
    assert engine.runner.cache.capacity == -(-need // 64) * 64  # not at once: the next request would reallocate it
    deadline = time.monotonic() + 5
    while engine.runner.cache.capacity > 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.runner.cache.capacity == 64

"""bfloat16 linear layers (linear_dtype) keep the engine's promise: batching and the prefix cache never
change a greedy answer. That rests on the batch-invariant attention (attention.py) and on products whose
rows do not depend on their batch (bf16_linear.py); without the first, 2 of 8 answers changed with the
batch (bench/results/2026-12-04-bf16-linear.md)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from chatstream import load_model
from chatstream.engine import Engine, SamplingParams, attention, native, bf16_linear
from chatstream.engine.runner import ModelRunner
from chatstream.render import encode_chat

from .helpers import forward_passes

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "How do airplanes fly?",
             "Give me a recipe for pancakes.", "What is 12 times 12?"]

needs_bf16 = pytest.mark.skipif(bf16_linear.cpu_multiplies_bf16() is not None,
                                reason="this CPU has no native bfloat16 products")


def test_the_invariant_attention_computes_attention():
    # float32 throughout: the same logits as SDPA's up to rounding, the same greedy tokens.
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    prompts = [tok(text)["input_ids"] for text in
               ("The capital of France is", "Water boils at a temperature of one hundred", "Hi there")]
    runner = ModelRunner(model, 4)
    runner.invariant = True
    got = forward_passes(runner, prompts)
    want = forward_passes(ModelRunner(model, 4), prompts)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=2e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_a_row_gets_the_same_bits_alone_among_longer_rows_and_in_a_prefill_chunk():
    assert bf16_linear.attention_invariant()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 3, 64, generator=gen)
    for length in (1, 63, 64, 65, 300):
        view = attention.padded_view(length)
        k, v = (torch.randn(1, 3, view, 64, generator=gen) for _ in range(2))
        mask = torch.zeros(1, 1, 3, view, dtype=torch.bool)
        mask[..., :length] = True
        alone = attention.attend(q, k, v, attention.block_bias(mask), 0.125)
        for extra, rows in ((1, 2), (64, 8), (500, 16)):
            wide = attention.padded_view(length + extra)
            # the engine hands views of longer cache rows (a row's capacity is the largest reservation)
            kb, vb = (torch.randn(rows, 3, wide + 192, 64, generator=gen)[:, :, :wide] for _ in range(2))
            kb[0, :, :view], vb[0, :, :view] = k[0], v[0]
            qb = torch.randn(rows, 3, 3, 64, generator=gen)
            qb[0] = q[0]
            maskb = torch.ones(rows, 1, 3, wide, dtype=torch.bool)
            maskb[0, ..., length:] = False
            out = attention.attend(qb, kb, vb, attention.block_bias(maskb), 0.125)
            assert torch.equal(out[0], alone[0]), (length, extra, rows)


@pytest.fixture(params=["served", "onednn"])
def products(request, monkeypatch):
    """The products the engine serves with (AMX's where the CPU has it), then oneDNN's."""
    if request.param == "onednn":
        monkeypatch.setenv("CHATSTREAM_AMX_LINEAR", "0")
    native.amx_linear.cache_clear()
    yield request.param
    monkeypatch.undo()
    native.amx_linear.cache_clear()


@needs_bf16
def test_bf16_products_give_a_row_the_same_bits_at_any_row_count(products):
    # down_proj's shape. On the AMD EPYC oneDNN reduces a 1536-wide input differently from 13 rows on
    # unless the input is split; on AMX its kernel from 33 rows on gives some rows other bits unless the
    # rows go in pieces. The check finds what this CPU needs (nothing, for the AMX products).
    linear = torch.nn.Linear(1536, 576, bias=False)
    reason, layouts = bf16_linear.product_layouts(torch.nn.Sequential(linear))
    assert reason is None and layouts[(576, 1536)] in bf16_linear.LAYOUTS
    with torch.inference_mode():
        layer = bf16_linear.BF16Linear(linear, layout=layouts[(576, 1536)])
        assert bf16_linear.rows_invariant(layer, 1536, rows=(2, 13, 33, 100, 700))


def test_the_row_check_compares_every_row():
    # AMX's large-batch kernel changed 5 of 37 rows, none of them the first, middle or last row that an
    # earlier check sampled; such a layer must fail.
    class OneRowOff(torch.nn.Module):
        def forward(self, x):
            out = x.clone()
            if len(x) > 4:
                out[1] = torch.nextafter(out[1], torch.full_like(out[1], float("inf")))
            return out

    assert not bf16_linear.rows_invariant(OneRowOff(), 8)
    assert bf16_linear.rows_invariant(torch.nn.Identity(), 8)


def answers(engine, prompts, together: bool, tokens: int = 40) -> list[str]:
    outs = []

    def collect(done, text):
        def on_event(event):
            if type(event).__name__ == "Delta":
                text.append(event.text)
            else:
                done.set()
        return on_event

    for ids in prompts:
        done, text = threading.Event(), []
        engine.submit(ids, SamplingParams(max_new_tokens=tokens, temperature=0), collect(done, text))
        outs.append((done, text))
        if not together:
            assert done.wait(900)
    for done, _ in outs:
        assert done.wait(900)
    return ["".join(text) for _, text in outs]


@needs_bf16
@pytest.mark.parametrize("cpu_linear", ["auto", pytest.param("int8", marks=pytest.mark.skipif(
    "not native.amx_linear()", reason="int8 weights need the AMX products"))])
def test_bf16_answers_are_the_same_alone_in_a_batch_of_8_and_from_the_prefix_cache(cpu_linear):
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=8, linear_dtype="bfloat16", prefix_cache_tokens=16384,
                    cpu_linear=cpu_linear)
    engine.start()
    try:
        assert engine.linear_dtype == "bfloat16" and engine.runner.invariant
        assert engine.int8_weights == (cpu_linear == "int8")
        assert engine.info["dtype"] == ("float32/int8-weight-linear" if cpu_linear == "int8"
                                        else "float32/bfloat16-linear")
        assert engine.info["kernels"] == ("compiled" if native.load() is None else "pytorch")
        # keys and values in bfloat16 where the compiled kernel serves (half the bytes a step reads), in int8
        # with int8 weights (half that again)
        kv = torch.int8 if cpu_linear == "int8" else torch.bfloat16
        assert engine.runner.cache.dtype == (kv if native.load() is None else None)
        assert engine.info["kv_cache"] == (str(kv).removeprefix("torch.") if native.load() is None else "float32")
        prompts = [encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
        alone = answers(engine, prompts, together=False)
        assert answers(engine, prompts, together=True) == alone
        # Second turns: read from the prefix cache here, prefilled afresh by an engine without one.
        second = [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                    {"role": "user", "content": "Tell me more."}], add_generation_prompt=True)
                  for q, a in zip(QUESTIONS, alone)]
        from_cache = answers(engine, second, together=False, tokens=24)
        assert engine.prefix_cache_stats["cached_tokens"] > 0
    finally:
        engine.stop()
    model, _ = load_model("builtin:smollm2-135m-instruct", device="cpu")
    fresh_engine = Engine(model, tok, max_batch=8, linear_dtype="bfloat16", cpu_linear=cpu_linear)
    fresh_engine.start()
    try:
        assert answers(fresh_engine, second, together=True, tokens=24) == from_cache
    finally:
        fresh_engine.stop()


@pytest.mark.parametrize("cpu_linear,linear_dtype", [("auto", "auto"), ("bfloat16", "float32")])
def test_auto_serves_bf16_only_where_the_check_passes(caplog, cpu_linear, linear_dtype):
    # the engine's linear_dtype="auto", and the server's --cpu-linear bfloat16 that asks for the same
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=2, cpu_linear=cpu_linear, linear_dtype=linear_dtype)
    with caplog.at_level(logging.INFO, logger="chatstream.engine"):
        engine.start()
    engine.stop()
    reason, _ = bf16_linear.check(load_model("builtin:smollm2-135m-instruct", device="cpu")[0])
    assert engine.linear_dtype == ("bfloat16" if reason is None else "float32")
    assert engine.runner.invariant == (reason is None)
    if reason:
        assert reason in caplog.text


@needs_bf16
def test_int8_weights_fall_back_to_bfloat16_ones_where_there_are_no_amx_products(caplog, monkeypatch):
    monkeypatch.setattr(native, "amx_linear", lambda: False)
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=2, cpu_linear="int8")
    with caplog.at_level(logging.WARNING, logger="chatstream.engine"):
        engine.start()
    engine.stop()
    assert not engine.int8_weights and "int8 weights need AMX products" in caplog.text
    assert "int8" not in repr(model.lm_head)


def test_bf16_is_refused_where_the_engine_cannot_run_the_invariant_attention(caplog):
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    model.config._attn_implementation = "eager"  # runs through transformers: no invariant attention there
    engine = Engine(model, tok, max_batch=2, linear_dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="chatstream.engine"):
        engine.start()
    engine.stop()
    assert engine.linear_dtype == "float32" and not engine.runner.invariant
    assert "serve in float32, not bfloat16" in caplog.text


def test_an_unknown_linear_dtype_is_refused():
    with pytest.raises(ValueError, match="linear_dtype"):
        Engine(torch.nn.Linear(2, 2), None, linear_dtype="int4")


@needs_bf16
@pytest.mark.skipif("native.load() is not None", reason="int8 keys and values need the compiled kernels")
@pytest.mark.parametrize("cpu_linear,kv_cache_dtype,kept", [
    ("bfloat16", "auto", torch.bfloat16), ("bfloat16", "int8", torch.int8),
    pytest.param("int8", "bfloat16", torch.bfloat16, marks=pytest.mark.skipif(
        "not native.amx_linear()", reason="int8 weights need the AMX products"))])
def test_kv_cache_dtype_says_what_the_bf16_modes_keep_keys_and_values_in(cpu_linear, kv_cache_dtype, kept):
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=2, cpu_linear=cpu_linear, kv_cache_dtype=kv_cache_dtype)
    engine.start()
    try:
        assert engine.runner.cache.dtype == kept and engine.info["kv_cache"] == str(kept).removeprefix("torch.")
        prompt = encode_chat(tok, [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
        assert "Paris" in answers(engine, [prompt], together=False, tokens=16)[0]
    finally:
        engine.stop()


def test_float32_serving_keeps_the_models_dtype_in_its_kv_cache_and_says_so(caplog):
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=2, cpu_linear="torch", kv_cache_dtype="int8")
    with caplog.at_level(logging.WARNING, logger="chatstream.engine"):
        engine.start()
    engine.stop()
    assert engine.runner.cache.dtype is None and engine.info["kv_cache"] == "float32"
    assert "kv_cache_dtype applies to the bfloat16 and int8 modes" in caplog.text


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(torch.nn.Linear(2, 2), None, kv_cache_dtype="fp8")

"""The engine's own Llama forward pass gives transformers' logits, bit for bit, in prefill and decode."""

from __future__ import annotations

import pytest
import torch

from chatstream import load_model
from chatstream.engine import llama_forward
from chatstream.engine.cpu_linear import pack_linears
from chatstream.engine.fused_linear import fuse_projections
from chatstream.engine.runner import ModelRunner
from chatstream.engine.scheduler import Chunk

from .helpers import forward_passes, seq


@pytest.mark.parametrize("prepared", ["as loaded", "fused and packed"])
def test_the_same_logits_as_transformers(prepared):
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    assert llama_forward.unsupported(model) is None
    if prepared != "as loaded":
        fuse_projections(model)
        if torch.backends.mkldnn.is_available():
            pack_linears(model)
    prompts = [tok(text)["input_ids"] for text in
               ("The capital of France is", "Water boils at a temperature of one hundred", "Hi there")]
    native = forward_passes(ModelRunner(model, 4, native=True), prompts)
    reference = forward_passes(ModelRunner(model, 4, native=False), prompts)
    assert len(native) == len(reference) == 8
    for got, want in zip(native, reference):
        assert torch.equal(got, want)


def test_other_models_run_through_transformers():
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    model.config._attn_implementation = "eager"
    assert "eager" in llama_forward.unsupported(model)
    runner = ModelRunner(model, 2)
    forward_passes(runner, [tok("Hello there, how are you?")["input_ids"]], rows_decoding=1)
    assert runner._native_forward is None
    assert "Linear" in llama_forward.unsupported(torch.nn.Linear(2, 2))


def test_a_swapped_model_is_the_one_that_runs(model_and_tokenizer):
    # The failure tests swap in a model that raises; the native forward must not keep running the old one.
    model, tok = model_and_tokenizer

    class Broken(torch.nn.Module):
        config = model.config

        def forward(self, **kwargs):
            raise RuntimeError("broken on purpose")

        def parameters(self, recurse=True):
            return model.parameters()

    runner = ModelRunner(model, 2)
    forward_passes(runner, [tok("Hello there, how are you?")["input_ids"]], rows_decoding=1)
    assert runner._native_forward is not None
    runner.model = Broken()
    with pytest.raises(RuntimeError, match="on purpose"):
        forward_passes(runner, [tok("Hello there, how are you?")["input_ids"]], rows_decoding=1)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the served CPU kernel is oneDNN's")
def test_a_step_of_chunks_and_decoding_rows_is_each_part_in_a_pass_of_its_own():
    # The engine runs a step's prompt chunks and decoding rows as one pass (one read of the weights);
    # each part must get exactly the logits, and leave exactly the cache, of a pass of its own.
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    fuse_projections(model)
    pack_linears(model)
    texts = ("The capital of France is", "Water boils at a temperature of one hundred",
             "Name three colors of the rainbow, please", "Hi there")
    ids = [tok(t)["input_ids"] for t in texts]
    results = []
    for mixed in (True, False):
        runner = ModelRunner(model, 4)
        seqs = [seq(p, row) for row, p in enumerate(ids)]
        decoding, prefilling = seqs[:2], seqs[2:]
        out = []
        with torch.inference_mode():
            runner.reserve(64)
            for s, row_logits in zip(decoding, runner.prefill([Chunk(s, 0, len(s.prompt_ids)) for s in decoding])):
                s.length, s.next_token = len(s.prompt_ids), int(row_logits.argmax())
            chunks = [Chunk(s, 0, len(s.prompt_ids) - 1) for s in prefilling]  # ragged, then the last token
            for chunks in (chunks, [Chunk(s, len(s.prompt_ids) - 1, 1) for s in prefilling]):
                if mixed:
                    prefill_logits, decode_logits = runner.step(chunks, decoding)
                else:
                    decode_logits, prefill_logits = runner.decode(decoding), runner.prefill(chunks)
                out += [prefill_logits, decode_logits]
                for s, row_logits in zip(decoding, decode_logits):
                    s.length, s.next_token = s.length + 1, int(row_logits.argmax())
            for s, row_logits in zip(prefilling, prefill_logits):
                s.length, s.next_token = len(s.prompt_ids), int(row_logits.argmax())
            out.append(runner.decode(seqs))  # reads what both kinds of pass wrote to the cache
        results.append(out)
    assert len(results[0]) == 5
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_logits_of_gives_every_positions_logits_as_transformers_does():
    # What bench/dtype_quality.py measures perplexity with: every position's logits through the served
    # pass, in chunks that continue one another, equal to transformers' one pass over the whole text.
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    ids = tok("The capital of France is Paris. The capital of Italy is Rome. " * 3)["input_ids"]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids])).logits[0]
        got = ModelRunner(model, 2).logits_of(ids, chunk=16)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))

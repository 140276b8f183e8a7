"""Sibling projections fused into one product: the same numbers, whatever order or inputs the model uses."""

from __future__ import annotations

import pytest
import torch

from chatstream import load_model
from chatstream.engine import Engine
from chatstream.engine.cpu_linear import pack_linears
from chatstream.engine.fused_linear import FusedLinear, LinearSlice, fuse_projections


class Block(torch.nn.Module):
    """The shape of a Llama attention block's projections, with a forward that can misuse them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16, bias=bias)
        self.k_proj = torch.nn.Linear(16, 8, bias=bias)
        self.v_proj = torch.nn.Linear(16, 8, bias=bias)

    def forward(self, x, other=None, order=("q", "k", "v")):
        inputs = {"q": x, "k": x if other is None else other, "v": x}
        return {name: getattr(self, f"{name}_proj")(inputs[name]) for name in order}


def reference_and_fused(bias=False):
    torch.manual_seed(0)
    plain = Block(bias).eval()
    fused = Block(bias).eval()
    fused.load_state_dict(plain.state_dict())
    assert fuse_projections(fused) == 1
    assert fuse_projections(fused) == 0  # nothing left to fuse
    assert isinstance(fused.k_proj, LinearSlice)
    return plain, fused


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("order", [("q", "k", "v"), ("v", "q", "k"), ("k", "k", "q", "v")])
def test_each_projection_gives_what_it_gave_alone(bias, order):
    plain, fused = reference_and_fused(bias)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        want, got = plain(x, order=order), fused(x, order=order)
    for name in order:
        assert torch.allclose(got[name], want[name], rtol=1e-6, atol=1e-6), name


def test_a_projection_of_another_input_is_computed_for_that_input():
    plain, fused = reference_and_fused()
    x, other = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        want, got = plain(x, other), fused(x, other)
    for name in "qkv":
        assert torch.allclose(got[name], want[name], rtol=1e-6, atol=1e-6), name


def test_an_input_changed_in_place_between_siblings_is_computed_again():
    plain, fused = reference_and_fused()
    x = torch.randn(2, 16)
    with torch.no_grad():
        fused.q_proj(x)
        x.mul_(2)  # same object, new values
        got = fused.k_proj(x)
        assert torch.allclose(got, plain.k_proj(x), rtol=1e-6, atol=1e-6)


def test_the_product_is_let_go_once_every_sibling_has_its_part():
    _, fused = reference_and_fused()
    group: FusedLinear = fused.q_proj.fused
    with torch.inference_mode():
        fused(torch.randn(64, 16))
    assert getattr(group._last, "held", None) is None


def test_the_served_model_gives_the_same_logits_fused_and_packed():
    plain, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    model, _ = load_model("builtin:smollm2-135m-instruct", device="cpu")
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    pack_linears(plain)
    pack_linears(model)
    ids = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        want = plain(**ids).logits
        got = model(**ids).logits
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < 1e-4


def test_the_engine_fuses_only_where_it_packs():
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    engine = Engine(model, tok, max_batch=2, cpu_linear="torch")
    engine.start()
    engine.stop()
    assert engine.fused_projections == 0 and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    if not torch.backends.mkldnn.is_available():
        return
    engine = Engine(model, tok, max_batch=2, cpu_linear="onednn")
    engine.start()
    engine.stop()
    assert engine.fused_projections == 2 * model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].mlp.up_proj, LinearSlice)

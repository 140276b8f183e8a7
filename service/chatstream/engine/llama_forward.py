"""The forward pass of a Llama model, without transformers' per-call machinery.

Why: at 30 layers of SmolLM2-135M, what a step costs beyond its matrix
products is mostly Python. transformers' forward wraps every layer and every
attention call in decorators (output capture, deprecated-argument checks,
kernel hubs, an attention-function lookup) and passes keyword arguments
through five levels; a model of the same shape with tiny matrices runs a
decode step in 10-14 ms on the 2-core AMD EPYC of bench/results, which is a
quarter of a 42 ms step of the real one. vLLM has its own model code for the
same reason.

This pass calls the model's own modules (embedding, norms, projections, MLP,
rotary embedding; packed or fused as the engine made them) in the order and
with the arithmetic of ``LlamaForCausalLM.forward`` in transformers 5 with the
``sdpa`` attention: the same operations on the same tensors, so the logits are
the same (tests/engine/test_llama_forward.py compares them bit for bit). It
serves only what it was checked against: ``LlamaForCausalLM`` with ``sdpa``
attention and the plain SiLU MLP; anything else runs through transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
# transformers' own helpers (plain functions), so that the arithmetic is theirs by construction.
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.llama.modeling_llama import rotate_half


def unsupported(model) -> str | None:
    """None when :class:`LlamaForward` can run ``model``, else why not."""
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not LlamaForCausalLM"
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(config, '_attn_implementation', None)!r} is not sdpa"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    layers = model.model.layers
    if len(layers) != config.num_hidden_layers:
        return "the model has another number of layers than its config says"
    for layer in layers:
        if (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__) != (
                "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"):
            return f"layer {type(layer).__name__} is not transformers' Llama layer"
    return None


class LlamaForward:
    """``forward(input_ids, positions, mask, cache)``: the logits of each row's last position ([n, vocab])."""

    def __init__(self, model):
        self.model = model
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        inner = self.model.model  # read at each call: the engine packs and fuses the modules after building this
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, layer in enumerate(inner.layers):
            hidden = hidden + self._attention(index, layer.self_attn, layer.input_layernorm(hidden),
                                              cos, sin, mask, cache)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = inner.norm(hidden)
        return self.model.lm_head(hidden[:, -1:, :])[:, -1, :]

    def _attention(self, index, attn, x, cos, sin, mask, cache) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        k, v = cache.update(k, v, index)
        if length == 1 and self.groups > 1:
            # One query per row: its heads attend to their key/value head as one block of queries.
            out = F.scaled_dot_product_attention(q.reshape(batch, -1, self.groups, self.head_dim), k, v,
                                                 attn_mask=mask, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, repeat_kv(k, self.groups), repeat_kv(v, self.groups),
                                                 attn_mask=mask, scale=self.scaling)
        out = out.reshape(batch, -1, length, self.head_dim).transpose(1, 2).contiguous()
        return attn.o_proj(out.reshape(batch, length, -1).contiguous())

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

The bfloat16 mode (``invariant``, with the compiled kernels built: native.py) runs another pass,
``_compiled``: the same layers, with the steps between the products (norms, residual adds, rotary,
activation) compiled and handing the products bfloat16. Its logits are not transformers' (that mode's
never are: bfloat16 products), and bench/dtype_quality.py measures how far they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
# transformers' own helpers (plain functions), so that the arithmetic is theirs by construction.
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.llama.modeling_llama import rotate_half

from . import attention, native
from .bf16_linear import BF16Linear
from .fused_linear import GROUPS, LinearSlice
from .kv_cache import Plan


# rotary embeddings whose frequencies do not depend on the sequence's length (transformers' "dynamic" and
# "longrope" ones do)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


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


@dataclass
class Pass:
    """One forward pass over a flat run of tokens: one per decoding row first, then prompt chunks.

    Every layer but attention works on each token alone, so decoding rows and prompt chunks share
    one pass and the weights are read once a step. Attention runs per part: the decoding rows
    against their own cache rows (``decode_plan``), the chunks in the ``[n, width]`` layout of a
    prefill pass (right-aligned; padding queries attend to column 0 only, so their softmax is
    defined, write no keys, and their outputs are never read), so each query sees what it would
    see in a pass of its own, and a pass of one part alone is transformers' pass token for token.
    """
    ids: torch.Tensor | None = None        # [T]
    positions: torch.Tensor | None = None  # [T]
    last: torch.Tensor | None = None       # indexes of the tokens whose logits are returned
    decode: int = 0                        # the first ``decode`` tokens are the decoding rows'
    decode_mask: torch.Tensor | None = None    # [decode, 1, 1, view]
    decode_plan: Plan | None = None
    chunks: tuple[int, int] = (0, 0)      # (n, width): the last n * width tokens, one chunk per row
    prefill_mask: torch.Tensor | None = None   # [n, 1, width, view]
    prefill_plan: Plan | None = None
    decode_bias: torch.Tensor | None = None    # the masks for attention.attend (invariant operators only)
    prefill_bias: torch.Tensor | None = None


class LlamaForward:
    """``forward(pass_, cache)``: the logits of the pass's ``last`` tokens ([len(last), vocab])."""

    def __init__(self, model, invariant: bool = False):
        self.model = model
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        # Batch-invariant attention instead of SDPA: a row's bits do not depend on its batch (bfloat16
        # linear layers need it); the runner then hands it views of whole blocks (ModelRunner._view).
        # The compiled kernel where it builds (native.py), else attention.py's operators.
        self.invariant = invariant
        self.kernel = invariant and native.load() is None
        self._layers_for = self._layers = None
        self._weights_for = self._weights_cache = None
        self._rope_for = self._rope = None

    def layers(self) -> list[Layer] | None:
        """The model's layers for the compiled row-wise steps (layer_kernel.cpp), or None where they do not
        serve: the bfloat16 mode with the kernels built, q/k/v and gate/up fused, no biases. Read at each
        pass (the engine packs and fuses the modules after building this), made again when they change."""
        inner = self.model.model
        if not self.kernel:
            return None
        key = tuple(id(m) for m in (inner.layers[0].self_attn.q_proj, inner.layers[-1].mlp.down_proj))
        if self._layers_for != key:
            self._layers_for, self._layers = key, _fused_layers(inner)
        return self._layers

    def __call__(self, p: Pass, cache) -> torch.Tensor:
        layers = self.layers()
        if layers is not None:
            return self._compiled(layers, p, cache)
        inner = self.model.model  # read at each call: the engine packs and fuses the modules after building this
        hidden = inner.embed_tokens(p.ids[None])
        cos, sin = inner.rotary_emb(hidden, position_ids=p.positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, head_dim], against [T, heads, head_dim]
        if self.invariant and not self.kernel:  # the masks in attention.attend's form, once a pass
            groups = self.groups
            if p.decode:
                mask = p.decode_mask
                p.decode_bias = attention.block_bias(mask.expand(mask.shape[0], 1, groups, mask.shape[-1]))
            if p.chunks[0]:
                (n, width), view = p.chunks, p.prefill_mask.shape[-1]
                mask = p.prefill_mask[:, :, None].expand(n, 1, groups, width, view)
                p.prefill_bias = attention.block_bias(mask.reshape(n, 1, groups * width, view))
        for index, layer in enumerate(inner.layers):
            hidden = hidden + self._attention(index, layer.self_attn, layer.input_layernorm(hidden),
                                              cos, sin, p, cache)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(inner.norm(hidden[:, p.last]))[0]

    def _compiled(self, layers: list[Layer], p: Pass, cache) -> torch.Tensor:
        """The bfloat16 mode's pass with the row-wise steps compiled (layer_kernel.cpp): per layer a norm
        (with the residual add), the q/k/v product, rotary, attention, o_proj, a norm, gate/up, the
        activation and down_proj; the products take bfloat16 straight from the steps before them."""
        inner = self.model.model
        hidden = inner.embed_tokens(p.ids)  # [T, hidden], float32: the residual stream
        cos, sin = self._rotary(inner.rotary_emb, hidden, p.positions)
        rows, positions = _destinations(p)
        like = torch.empty(0, layers[0].kv_heads, 0, self.head_dim)  # the cache's per-layer shape
        weights = self._weights(layers)
        if weights is not None:  # the same loop in C++ (pass_kernel.cpp): a quarter of a decode step was dispatch
            cache.layer(len(layers) - 1, like)  # allocates every layer
            (n, width), d = p.chunks, p.decode
            decode = (d, p.decode_plan.view_len, p.decode_mask[:, 0]) if d else (0, 0, None)
            prefill = (n, width, p.prefill_plan.rows[0], p.prefill_plan.view_len, p.prefill_mask[:, 0]) if n \
                else (0, 0, 0, 0, None)
            native.layers(hidden, cos, sin, rows, positions, weights, cache.spans(),
                          decode, prefill)
            return self.model.lm_head(inner.norm(hidden[p.last]))
        x = native.rms_norm(hidden, None, layers[0].input_norm, layers[0].eps)
        for index, layer in enumerate(layers):
            kv = cache.layer(index, like)  # keys, values (and their scales in int8)
            q = native.rotary(layer.qkv.product(x), cos, sin, layer.q_heads, *kv[:2], rows, positions, *kv[2:])
            out = self._attend(q, p, p.decode_plan and p.decode_plan.views(*kv),
                               p.prefill_plan and p.prefill_plan.views(*kv))
            x = native.rms_norm(hidden, layer.o_proj.product(out.to(torch.bfloat16)), layer.post_norm, layer.eps)
            down = layer.down_proj.product(native.silu_mul(layer.gate_up.product(x)))
            if index + 1 < len(layers):
                x = native.rms_norm(hidden, down, layers[index + 1].input_norm, layers[index + 1].eps)
            else:
                hidden += down
        return self.model.lm_head(inner.norm(hidden[p.last]))

    def _rotary(self, rope, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (``[T, head_dim]``) at ``positions``: rows of a table that the model's rotary embedding
        computed once for every position up to the longest seen, where its frequencies do not change with
        the length (3% of a decode step at 16 rows, computed anew each pass). A position's values are then
        the same in every pass, whatever else the pass holds."""
        if rope.rope_type not in STATIC_ROPE:
            cos, sin = rope(hidden[None], position_ids=positions[None])
            return cos[0], sin[0]
        need = int(positions.max()) + 1
        if self._rope_for is not rope or self._rope[0].shape[0] < need:
            every = torch.arange(-(-need // 1024) * 1024, device=positions.device)[None]
            cos, sin = rope(hidden[None], position_ids=every)
            self._rope_for, self._rope = rope, (cos[0], sin[0])
        return self._rope[0][positions], self._rope[1][positions]

    def _weights(self, layers: list[Layer]) -> tuple | None:
        """native.layers' weights for ``layers``, or None where that one call cannot run them: a product
        not in AMX blocks (oneDNN's column pieces), or norms' epsilons or head counts that differ."""
        if self._weights_for is not layers:
            self._weights_for, self._weights_cache = layers, None
            products = [m for layer in layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]
            first = layers[0]
            if (all(m.packed is not None for m in products)
                    and all((x.eps, x.q_heads, x.kv_heads) == (first.eps, first.q_heads, first.kv_heads) for x in layers)):
                self._weights_cache = ([w for x in layers for w in (x.input_norm, x.post_norm)],
                                       [m.packed for m in products], [m.scales for m in products],
                                       [m.out_features for m in products], first.eps, first.q_heads, first.kv_heads,
                                       self.scaling)
        return self._weights_cache

    def _attention(self, index, attn, x, cos, sin, p: Pass, cache) -> torch.Tensor:
        tokens = x.shape[1]
        q = attn.q_proj(x).view(tokens, -1, self.head_dim)
        k = attn.k_proj(x).view(tokens, -1, self.head_dim)
        v = attn.v_proj(x).view(tokens, -1, self.head_dim)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        d, (n, width) = p.decode, p.chunks
        decode_kv = cache.update(k[:d, :, None], v[:d, :, None], index, plan=p.decode_plan) if d else None
        prefill_kv = None
        if n:  # [n, heads, width, head_dim], as transformers lays out a batch
            kp, vp = (t[d:].view(n, width, -1, self.head_dim).transpose(1, 2) for t in (k, v))
            prefill_kv = cache.update(kp, vp, index, plan=p.prefill_plan)
        return attn.o_proj(self._attend(q, p, decode_kv, prefill_kv)[None])

    def _attend(self, q, p: Pass, decode_kv, prefill_kv) -> torch.Tensor:
        """Attention of a pass's queries (``[T, heads, head_dim]``) over the keys and values the cache holds
        for its decoding rows and for its chunks (the views ``Plan.views`` gives, this pass's own written;
        int8 ones with their scales): ``[T, heads * head_dim]``."""
        parts = []
        d = p.decode
        if d:
            keys, values, *scales = decode_kv
            # One query per row: its heads attend to their key/value head as one block of queries.
            qd = q[:d].reshape(d, -1, self.groups, self.head_dim)
            if self.kernel:
                out = native.attend(qd, keys, values, p.decode_mask[:, 0], self.scaling, *scales)
            elif self.invariant:
                out = attention.attend(qd, keys, values, p.decode_bias, self.scaling)
            else:
                out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=p.decode_mask, scale=self.scaling)
            parts.append(out.reshape(d, -1))
        n, width = p.chunks
        if n:
            # [n, heads, width, head_dim], as transformers lays out a batch
            qp = q[d:].view(n, width, -1, self.head_dim).transpose(1, 2)
            keys, values, *scales = prefill_kv
            if self.invariant:
                # each key/value head's queries as one block: [n, kv_heads, groups * width, head_dim]
                grouped = qp.reshape(n, keys.shape[1], self.groups * width, self.head_dim)
                if self.kernel:  # query g * width + w sees what mask row w sees
                    out = native.attend(grouped, keys, values, p.prefill_mask[:, 0], self.scaling, *scales)
                else:
                    out = attention.attend(grouped, keys, values, p.prefill_bias, self.scaling)
                out = out.view(n, -1, width, self.head_dim)
            else:
                out = F.scaled_dot_product_attention(qp, repeat_kv(keys, self.groups), repeat_kv(values, self.groups),
                                                     attn_mask=p.prefill_mask, scale=self.scaling)
            parts.append(out.transpose(1, 2).reshape(n * width, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _destinations(p: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token of a pass writes its key and value: (cache row, position), row -1 for a chunk's
    padding."""
    rows = torch.full((len(p.ids),), -1, dtype=torch.long)
    positions = torch.zeros(len(p.ids), dtype=torch.long)
    if p.decode:
        rows[:p.decode] = p.decode_plan.decode_rows
        positions[:p.decode] = p.decode_plan.decode_positions
    n, width = p.chunks
    for i, row, start, count in (p.prefill_plan.prefill if n else ()):
        first = p.decode + i * width + width - count
        rows[first:first + count] = row
        positions[first:first + count] = torch.arange(start, start + count)
    return rows, positions


@dataclass
class Layer:
    """What the compiled pass needs of one decoder layer."""
    qkv: BF16Linear
    o_proj: BF16Linear
    gate_up: BF16Linear
    down_proj: BF16Linear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    q_heads: int
    kv_heads: int


def _fused_layers(inner) -> list[Layer] | None:
    """The layers as :class:`Layer`, or None where one is not q/k/v and gate/up fused (in that order),
    packed in bfloat16 without biases, with float32 norms of one epsilon."""
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = _fused(attn, GROUPS[0]), _fused(mlp, GROUPS[1])  # q/k/v, gate/up
        products = (qkv, attn.o_proj, gate_up, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if (not all(type(m) is BF16Linear and m.bias is None for m in products)
                or any(n.weight.dtype != torch.float32 or n.variance_epsilon != norms[0].variance_epsilon
                       for n in norms)):
            return None
        head_dim = attn.head_dim
        layers.append(Layer(qkv, attn.o_proj, gate_up, mlp.down_proj, norms[0].weight, norms[1].weight,
                            norms[0].variance_epsilon, attn.q_proj.out_features // head_dim,
                            attn.k_proj.out_features // head_dim))
    return layers


def _fused(parent, names) -> torch.nn.Module | None:
    """The one layer behind ``parent``'s projections ``names`` when fused_linear.py fused them in that order."""
    slices = [getattr(parent, name, None) for name in names]
    if not all(type(m) is LinearSlice for m in slices):
        return None
    fused = slices[0].fused
    if any(m.fused is not fused or m.index != i for i, m in enumerate(slices)) or len(fused.spans) != len(names):
        return None
    return fused.linear

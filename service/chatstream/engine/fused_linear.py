"""One matrix multiplication for the sibling projections that read the same input.

Why: a decode step on the CPU is a pass over every weight, one kernel call per
layer, and a small matrix is read more slowly than a large one (call overhead,
threads that wait for each other). Llama-family blocks project one input three
times (``q_proj``, ``k_proj``, ``v_proj``) and the MLP twice (``gate_proj``,
``up_proj``). Measured on the 2-core AMD EPYC of bench/results with oneDNN
prepacked float32 weights at one row: q+k+v in 201 us as three calls, 147 us
as one; gate+up in 466 us as two, 353 us as one; about 5 ms of a 45 ms step
over SmolLM2-135M's 30 layers. vLLM's model code fuses the same pairs
(``QKVParallelLinear``, ``MergedColumnParallelLinear``).

The model's code is left as it is: each projection is replaced by a
:class:`LinearSlice` of one :class:`FusedLinear` whose weight is the rows of
the originals stacked. The first slice called computes the fused product and
keeps it; its siblings called with the same tensor (the same object, and,
outside inference mode, not modified in place since) take their columns of
it. Any other input is
computed afresh, so a model that calls the projections on different inputs
still gets the right answer, only without the saving. Each output column is
the same dot product as before, over the same row of the same weight.
"""

from __future__ import annotations

import threading

import torch

# Names of sibling projections of one input, in the order their rows are stacked (HF's naming for
# Llama, Mistral, Qwen2/3, Gemma and most decoders).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(torch.nn.Module):
    """A linear layer over the stacked weights of several; ``part(x, i)`` is layer ``i``'s output."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        weights = [m.weight.detach() for m in linears]
        has_bias = linears[0].bias is not None
        # Built on the meta device: its own weight would be allocated and initialised only to be replaced.
        self.linear = torch.nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=has_bias,
                                      device="meta")
        self.linear.weight = torch.nn.Parameter(torch.cat(weights), requires_grad=False)
        if has_bias:
            self.linear.bias = torch.nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
        edges = [0]
        for w in weights:
            edges.append(edges[-1] + w.shape[0])
        self.spans = list(zip(edges, edges[1:]))
        self._last = threading.local()  # per thread: two engines may run one model

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        held = getattr(last, "held", None)
        version = _version(x)
        if held is None or held[0] is not x or held[1] != version or index in held[3]:
            held = last.held = (x, version, self.linear(x), set())
        taken = held[3]
        taken.add(index)
        if len(taken) == len(self.spans):  # every sibling has its columns: let go of the product
            last.held = None
        start, stop = self.spans[index]
        return held[2][..., start:stop]


def _version(x: torch.Tensor) -> int:
    """The in-place write counter; inference tensors keep none (inference mode: the identity alone decides)."""
    return -1 if x.is_inference() else x._version


class LinearSlice(torch.nn.Module):
    """What stands where one of the fused projections was: its columns of the fused product."""

    def __init__(self, fused: FusedLinear, index: int, original: torch.nn.Linear):
        super().__init__()
        self.fused = fused
        self.index = index
        self.in_features = original.in_features
        self.out_features = original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused={self.index}"


def fuse_projections(model: torch.nn.Module) -> int:
    """Replace each group of sibling projections (:data:`GROUPS`) by slices of one fused layer; how many groups.

    A group is fused only when all of its members are plain ``nn.Linear`` layers with the same input size,
    dtype and device, all with a bias or all without. Fusing twice finds nothing left to fuse.
    """
    fused = 0
    for parent, names, members in _groups(model):
        group = FusedLinear(members)
        for index, (name, member) in enumerate(zip(names, members)):
            setattr(parent, name, LinearSlice(group, index, member))
        fused += 1
    return fused


def fused_shapes(model: torch.nn.Module) -> set[tuple[int, int]]:
    """The ``(out_features, in_features)`` of the layers :func:`fuse_projections` would make."""
    return {(sum(m.out_features for m in members), members[0].in_features) for _, _, members in _groups(model)}


def _groups(model: torch.nn.Module):
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(type(m) is torch.nn.Linear for m in members):
                continue
            first = members[0]
            if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
                   or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None)
                   for m in members):
                continue
            yield parent, names, members

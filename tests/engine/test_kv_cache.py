"""The slot KV cache in int8 (the engine's int8 mode): a row's scales move, swap and grow with its keys and
values, so that a sequence moved to another row, or a cache grown under it, still reads what it wrote."""

from __future__ import annotations

import pytest
import torch

from chatstream.engine import native
from chatstream.engine.kv_cache import SlotKVCache


def filled(rows: int = 3) -> SlotKVCache:
    cache = SlotKVCache(rows, initial_capacity=64, dtype=torch.int8)
    like = torch.empty(0, 2, 0, 16)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        for t in cache.layer(layer, like):  # keys, values, key scales, value scales
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen) if t.dtype == torch.int8 else
                    torch.rand(t.shape, generator=gen))
    return cache


def row(cache: SlotKVCache, r: int, length: int) -> list[torch.Tensor]:
    return [t[r, :, :length].clone() for layer in cache.layers() for t in layer]


def test_an_int8_layer_holds_keys_values_and_a_scale_per_position_and_head():
    cache = filled()
    keys, values, key_scales, value_scales = cache.layer(0, torch.empty(0, 2, 0, 16))
    assert keys.dtype == values.dtype == torch.int8 and keys.shape == (3, 2, 64, 16)
    assert key_scales.dtype == value_scales.dtype == torch.float32 and key_scales.shape == (3, 2, 64)
    assert len(cache.layers()) == 2 and all(len(layer) == 4 for layer in cache.layers())
    # a bfloat16 cache has no scales
    assert len(SlotKVCache(2, dtype=torch.bfloat16).layer(0, torch.empty(0, 2, 0, 16))) == 2


@pytest.fixture(params=["one call", "python"])
def copies(request, monkeypatch):
    """Spans copied by the compiled rows_kernel.cpp (where the kernels are loaded), then by Python's loop."""
    if request.param == "one call":
        if native.load() is not None:
            pytest.skip(f"no compiled kernels: {native.load()}")
    else:
        monkeypatch.setattr(native, "loaded", lambda: False)
    return request.param


def test_a_moved_or_swapped_row_takes_its_scales_along(copies):
    cache = filled()
    first, last = row(cache, 0, 40), row(cache, 2, 40)
    rest = [t[1, :, 40:].clone() for t in cache.spans()]
    cache.move_row(2, 1, 40)
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 1, 40), last))
    assert all(torch.equal(t[1, :, 40:], r) for t, r in zip(cache.spans(), rest))  # nothing past the span
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 0, 40), first))
    cache.swap_rows(0, 1, 40)
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 0, 40), last))
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 1, 40), first))


def test_growing_and_shrinking_keep_the_scales_of_what_is_kept():
    cache = filled()
    before = row(cache, 1, 64)
    cache.ensure_capacity(200)
    assert cache.capacity == 256 and all(t.shape[2] == 256 for layer in cache.layers() for t in layer)
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 1, 64), before))
    cache.shrink()
    assert all(t.shape[2] == 64 for layer in cache.layers() for t in layer)
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 1, 64), before))


def test_only_the_compiled_kernels_write_int8():
    cache = filled()
    plan = cache.plan_decode(1, torch.tensor([3]), 4)
    with pytest.raises(RuntimeError, match="compiled kernels only"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0, plan=plan)


def test_the_prefix_cache_keeps_a_span_and_puts_it_back_into_another_row(copies):
    from chatstream.engine.prefix_cache import Save
    from chatstream.engine.runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)  # its cache and kept entries alone, no model
    runner.cache, runner.kept = filled(), {}
    saved = row(runner.cache, 0, 30)
    runner.apply([Save(key=7, row=0, length=30)])
    assert runner.kept_bytes == sum(t.numel() * t.element_size() for t in saved)
    runner.cache.move_row(1, 0, 64)  # row 0 overwritten
    runner.load(2, 7, 30)
    assert all(torch.equal(a, b) for a, b in zip(row(runner.cache, 2, 30), saved))

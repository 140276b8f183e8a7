"""The compiled batch-invariant attention (attention_native.py): attention's result, and a query's bits
whatever its batch, its view, its neighbours in a prefill chunk and the number of threads."""

from __future__ import annotations

import shutil

import pytest
import torch

from chatstream.engine import attention_native

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert attention_native.load() is None


def sdpa(q, k, v, mask):
    rows = mask[:, None, torch.arange(q.shape[2]) % mask.shape[1]]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=rows, scale=0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_computes_attention(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 6, 64, generator=gen)
    k, v = (torch.randn(5, 3, 300, 64, generator=gen).to(dtype) for _ in range(2))
    lengths = torch.tensor([1, 17, 64, 65, 300])
    mask = (torch.arange(300)[None, :] < lengths[:, None])[:, None].expand(5, 2, 300).clone()
    mask[1:, 1, 0] = False  # a second mask row: queries 1, 3, 5 of each head skip key 0
    got = attention_native.attend(q, k, v, mask, 0.125)
    want = sdpa(q, k.float(), v.float(), mask)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_a_query_gets_the_same_bits_alone_among_longer_rows_in_a_chunk_and_on_one_thread():
    gen = torch.Generator().manual_seed(1)
    length, wide, width = 150, 700, 5
    # a cache of 4 rows whose capacity is longer than any view, read as views
    k, v = (torch.randn(4, 3, 1024, 64, generator=gen) for _ in range(2))
    q = torch.randn(4, 3, 3, 64, generator=gen)
    seen = torch.ones(4, 1, wide, dtype=torch.bool)
    seen[2, :, length:] = False
    among = attention_native.attend(q, k[:, :, :wide], v[:, :, :wide], seen, 0.125)[2]
    alone = attention_native.attend(q[2:3], k[2:3, :, :length], v[2:3, :, :length],
                                    torch.ones(1, 1, length, dtype=torch.bool), 0.125)[0]
    assert torch.equal(among, alone)
    # the same query as the last of a prefill chunk: query g * width + w sees what mask row w sees
    chunk = torch.randn(1, 3, 3, width, 64, generator=gen)
    chunk[0, :, :, -1] = q[2]
    causal = (torch.arange(wide)[None, :] <= torch.arange(length - width, length)[:, None])[None]
    out = attention_native.attend(chunk.reshape(1, 3, 3 * width, 64), k[2:3, :, :wide], v[2:3, :, :wide],
                                  causal, 0.125)
    assert torch.equal(out.view(1, 3, 3, width, 64)[0, :, :, -1], alone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(attention_native.attend(q, k[:, :, :wide], v[:, :, :wide], seen, 0.125)[2], alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_whatever_the_number_of_queries_sharing_its_keys(dtype):
    # The kernel reads a key once for all the queries of a mask row (up to four at a time); a query's
    # arithmetic must not depend on how many there are: 1, 3 (SmolLM2's heads per key/value head), 5, 8.
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 2, 333, 64, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(1, 2, 8, 64, generator=gen)
    seen = torch.ones(1, 1, 333, dtype=torch.bool)
    alone = attention_native.attend(q[:, :, 2:3], k, v, seen, 0.125)
    for count in (3, 5, 8):
        assert torch.equal(attention_native.attend(q[:, :, :count], k, v, seen, 0.125)[:, :, 2:3], alone)


def test_keys_it_does_not_see_may_hold_anything():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 3, 64, generator=gen)
    k, v = (torch.randn(1, 3, 128, 64, generator=gen) for _ in range(2))
    seen = torch.zeros(1, 1, 128, dtype=torch.bool)
    seen[..., :40] = True
    clean = attention_native.attend(q, k, v, seen, 0.125)
    k[..., 40:, :], v[..., 40:, :] = float("nan"), float("inf")
    assert torch.equal(attention_native.attend(q, k, v, seen, 0.125), clean)


def test_turned_off_it_says_so(monkeypatch):
    monkeypatch.setenv("CHATSTREAM_NATIVE_ATTENTION", "0")
    assert "turned off" in attention_native._load()

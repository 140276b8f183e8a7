"""The compiled kernels (native.py): the batch-invariant attention (its result, and a query's bits
whatever its batch, its view, its neighbours in a prefill chunk and the number of threads), the
row-wise steps of a layer and, where the CPU has AMX, the bfloat16 products."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from chatstream.engine import native

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert native.load() is None


def sdpa(q, k, v, mask):
    rows = mask[:, None, torch.arange(q.shape[2]) % mask.shape[1]]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=rows, scale=0.125)


def quantized(x):
    """``x`` ([..., D]) as the int8 cache holds it: int8 and a scale per vector (native.quantize_int8's rule)."""
    q, scales = native.quantize_int8(x.reshape(-1, x.shape[-1]))
    return q.view(x.shape), scales.view(x.shape[:-1])


def kv_args(k, v, dtype):
    """keys, values and (for int8) their scales, as native.attend takes them."""
    if dtype != torch.int8:
        return k.to(dtype), v.to(dtype)
    (kq, ks), (vq, vs) = quantized(k), quantized(v)
    return kq, vq, ks, vs


def dequantized(args):
    return [t.float() * s[..., None] for t, s in zip(args[:2], args[2:])] if len(args) == 4 else [t.float() for t in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("head_dim", [64, 48])  # 48: the scalar code for head sizes the vectors do not take
def test_it_computes_attention(dtype, head_dim):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 6, head_dim, generator=gen)
    kv = kv_args(*(torch.randn(5, 3, 300, head_dim, generator=gen) for _ in range(2)), dtype)
    lengths = torch.tensor([1, 17, 64, 65, 300])
    mask = (torch.arange(300)[None, :] < lengths[:, None])[:, None].expand(5, 2, 300).clone()
    mask[1:, 1, 0] = False  # a second mask row: queries 1, 3, 5 of each head skip key 0
    got = native.attend(q, kv[0], kv[1], mask, 0.125, *kv[2:])
    want = sdpa(q, *dequantized(kv), mask)  # int8: what the int8 keys and values stand for
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_int8_keys_and_values_come_with_their_scales_and_only_they():
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 8, 64)
    mask = torch.ones(1, 1, 8, dtype=torch.bool)
    kq, ks = quantized(k)
    with pytest.raises(RuntimeError, match="come with their scales"):
        native.attend(q, kq, kq, mask, 0.125)
    with pytest.raises(RuntimeError, match="come with their scales"):
        native.attend(q, k, k, mask, 0.125, ks, ks)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        native.attend(q, kq, kq, mask, 0.125, ks[..., :4], ks[..., :4])


def test_a_query_gets_the_same_bits_alone_among_longer_rows_in_a_chunk_and_on_one_thread():
    gen = torch.Generator().manual_seed(1)
    length, wide, width = 150, 700, 5
    # a cache of 4 rows whose capacity is longer than any view, read as views
    k, v = (torch.randn(4, 3, 1024, 64, generator=gen) for _ in range(2))
    q = torch.randn(4, 3, 3, 64, generator=gen)
    seen = torch.ones(4, 1, wide, dtype=torch.bool)
    seen[2, :, length:] = False
    among = native.attend(q, k[:, :, :wide], v[:, :, :wide], seen, 0.125)[2]
    alone = native.attend(q[2:3], k[2:3, :, :length], v[2:3, :, :length],
                                    torch.ones(1, 1, length, dtype=torch.bool), 0.125)[0]
    assert torch.equal(among, alone)
    # the same query as the last of a prefill chunk: query g * width + w sees what mask row w sees
    chunk = torch.randn(1, 3, 3, width, 64, generator=gen)
    chunk[0, :, :, -1] = q[2]
    causal = (torch.arange(wide)[None, :] <= torch.arange(length - width, length)[:, None])[None]
    out = native.attend(chunk.reshape(1, 3, 3 * width, 64), k[2:3, :, :wide], v[2:3, :, :wide],
                                  causal, 0.125)
    assert torch.equal(out.view(1, 3, 3, width, 64)[0, :, :, -1], alone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(native.attend(q, k[:, :, :wide], v[:, :, :wide], seen, 0.125)[2], alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_query_gets_the_same_bits_whatever_the_number_of_queries_sharing_its_keys(dtype):
    # The kernel reads a key once for all the queries of a mask row (up to four at a time); a query's
    # arithmetic must not depend on how many there are: 1, 3 (SmolLM2's heads per key/value head), 5, 8.
    gen = torch.Generator().manual_seed(3)
    kv = kv_args(*(torch.randn(1, 2, 333, 64, generator=gen) for _ in range(2)), dtype)
    q = torch.randn(1, 2, 8, 64, generator=gen)
    seen = torch.ones(1, 1, 333, dtype=torch.bool)
    alone = native.attend(q[:, :, 2:3], kv[0], kv[1], seen, 0.125, *kv[2:])
    for count in (3, 5, 8):
        assert torch.equal(native.attend(q[:, :, :count], kv[0], kv[1], seen, 0.125, *kv[2:])[:, :, 2:3], alone)


def test_an_int8_query_gets_the_same_bits_alone_and_among_longer_rows_of_a_wider_cache():
    gen = torch.Generator().manual_seed(4)
    length, wide = 150, 700
    kq, vq, ks, vs = kv_args(*(torch.randn(4, 3, 1024, 64, generator=gen) for _ in range(2)), torch.int8)
    q = torch.randn(4, 3, 3, 64, generator=gen)
    seen = torch.ones(4, 1, wide, dtype=torch.bool)
    seen[2, :, length:] = False
    among = native.attend(q, kq[:, :, :wide], vq[:, :, :wide], seen, 0.125, ks[:, :, :wide], vs[:, :, :wide])[2]
    alone = native.attend(q[2:3], kq[2:3, :, :length], vq[2:3, :, :length], torch.ones(1, 1, length, dtype=torch.bool),
                          0.125, ks[2:3, :, :length], vs[2:3, :, :length])[0]
    assert torch.equal(among, alone)


def test_keys_it_does_not_see_may_hold_anything():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 3, 64, generator=gen)
    k, v = (torch.randn(1, 3, 128, 64, generator=gen) for _ in range(2))
    seen = torch.zeros(1, 1, 128, dtype=torch.bool)
    seen[..., :40] = True
    clean = native.attend(q, k, v, seen, 0.125)
    k[..., 40:, :], v[..., 40:, :] = float("nan"), float("inf")
    assert torch.equal(native.attend(q, k, v, seen, 0.125), clean)


def test_turned_off_it_says_so(monkeypatch):
    monkeypatch.setenv("CHATSTREAM_NATIVE_KERNELS", "0")
    assert "turned off" in native._load()


def test_a_failing_build_says_why_and_leaves_nothing_behind(monkeypatch, tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'no such intrinsic' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    reason = native._load()
    assert reason.startswith("compiling the kernels failed") and "no such intrinsic" in reason
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


# -- the row-wise steps of a layer (layer_kernel.cpp) -------------------------------------------------

def bf16_close(got, want):
    """Within a bfloat16 rounding step of a float32 reference's own rounding (a last-bit difference
    before rounding can move a value by one step)."""
    want = want.float()
    return torch.allclose(got.float(), want.to(torch.bfloat16).float(), rtol=1 / 128, atol=1e-6)


def test_rms_norm_adds_the_residual_in_place_and_normalises_each_row():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    gen = torch.Generator().manual_seed(4)
    hidden, delta = torch.randn(7, 576, generator=gen), torch.randn(7, 576, generator=gen).bfloat16()
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.rand(576, generator=gen) + 0.5
    want_hidden = hidden + delta.float()
    with torch.inference_mode():
        got = native.rms_norm(hidden, delta, norm.weight, 1e-5)
        assert got.dtype == torch.bfloat16 and torch.equal(hidden, want_hidden)
        assert bf16_close(got, norm(want_hidden))
        assert bf16_close(native.rms_norm(hidden.clone(), None, norm.weight, 1e-5), norm(hidden))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_turns_q_and_k_as_transformers_does_and_writes_k_and_v_where_told(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(6, (9 + 2 * 3) * 64, generator=gen).bfloat16()
    angles = torch.rand(6, 32, generator=gen) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = qkv.float().view(6, 15, 64).split([9, 3, 3], dim=1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)  # [T, heads, D] against cos, sin [T, 1, D]
    keys, values = torch.zeros(3, 3, 20, 64, dtype=dtype), torch.zeros(3, 3, 20, 64, dtype=dtype)
    rows, positions = torch.tensor([2, -1, 0, 2, 0, 1]), torch.tensor([7, 0, 0, 8, 1, 19])
    got_q = native.rotary(qkv, cos, sin, 9, keys, values, rows, positions)
    assert torch.equal(got_q, want_q)
    written = torch.zeros(3, 20, dtype=torch.bool)
    for t, (row, at) in enumerate(zip(rows.tolist(), positions.tolist())):
        if row >= 0:
            assert torch.equal(keys[row, :, at], want_k[t].to(dtype)) and torch.equal(values[row, :, at], v[t].to(dtype))
            written[row, at] = True
    assert not keys.transpose(1, 2)[~written].any() and not values.transpose(1, 2)[~written].any()


def test_rotary_writes_int8_keys_and_values_with_a_scale_per_position_and_head():
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(5, (9 + 2 * 3) * 64, generator=gen).bfloat16()
    qkv[3, (9 + 3 + 1) * 64:(9 + 3 + 2) * 64] = 0  # a value head of zeros: scale 0, and zeros
    angles = torch.rand(5, 32, generator=gen) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rows, positions = torch.tensor([2, -1, 0, 2, 1]), torch.tensor([7, 0, 0, 8, 19])
    # the float32 keys and values, as a float32 cache takes them
    keys, values = torch.zeros(3, 3, 20, 64), torch.zeros(3, 3, 20, 64)
    want_q = native.rotary(qkv, cos, sin, 9, keys, values, rows, positions)
    k8, v8 = torch.zeros(3, 3, 20, 64, dtype=torch.int8), torch.zeros(3, 3, 20, 64, dtype=torch.int8)
    ks, vs = torch.full((3, 3, 20), -1.0), torch.full((3, 3, 20), -1.0)
    assert torch.equal(native.rotary(qkv, cos, sin, 9, k8, v8, rows, positions, ks, vs), want_q)
    for row, at in zip(rows.tolist(), positions.tolist()):
        if row < 0:
            continue
        for got, got_scale, want in ((k8, ks, keys), (v8, vs, values)):
            q, scale = quantized(want[row, :, at])
            assert torch.equal(got[row, :, at], q)
            assert torch.equal(got_scale[row, :, at], torch.where(want[row, :, at].abs().amax(-1) > 0, scale, 0.0))
            assert (got[row, :, at].float() * got_scale[row, :, at, None] - want[row, :, at]).abs().max() <= (
                got_scale[row, :, at].max() / 2)
    assert vs[2, 1, 8] == 0 and not v8[2, 1, 8].any()
    assert (ks == -1).sum() == 3 * 20 * 3 - 4 * 3  # nothing written but the four tokens' heads


def test_silu_mul_gates_up_by_silu_of_gate():
    gen = torch.Generator().manual_seed(6)
    gate_up = (torch.randn(5, 2 * 1536 + 2 * 7, generator=gen) * 6).bfloat16()  # a tail past 16 lanes too
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert bf16_close(native.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def test_the_row_wise_steps_give_a_row_the_same_bits_among_other_rows_and_on_one_thread():
    gen = torch.Generator().manual_seed(7)
    rows = 40  # more than a thread's share of rows (16), so that two threads take part
    hidden, delta = torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen)
    weight = torch.rand(576, generator=gen)
    qkv, gate_up = torch.randn(rows, 15 * 64, generator=gen), torch.randn(rows, 2 * 1536, generator=gen)
    cos, sin = torch.rand(rows, 64, generator=gen), torch.rand(rows, 64, generator=gen)

    def steps(r: slice):
        count = r.stop - r.start
        keys, values = torch.zeros(count, 3, 1, 64, dtype=torch.bfloat16), torch.zeros(count, 3, 1, 64,
                                                                                      dtype=torch.bfloat16)
        q = native.rotary(qkv[r].contiguous(), cos[r], sin[r], 9, keys, values, torch.arange(count),
                          torch.zeros(count, dtype=torch.long))
        return (native.rms_norm(hidden[r].clone(), delta[r].contiguous(), weight, 1e-5), q, keys, values,
                native.silu_mul(gate_up[r].contiguous()))

    among = steps(slice(0, rows))
    alone = steps(slice(33, 34))
    assert all(torch.equal(a[33:34], b) for a, b in zip(among, alone))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert all(torch.equal(a, b) for a, b in zip(steps(slice(0, rows)), among))
    finally:
        torch.set_num_threads(threads)


def test_the_compiled_pass_answers_as_the_plain_bfloat16_pass():
    # The same model served with the row-wise steps compiled and with PyTorch's operators: logits apart by
    # bfloat16 rounding at most, and the same greedy token but where the two best are as close as that.
    from chatstream import load_model
    from chatstream.engine import cpu_linear
    from chatstream.engine.runner import ModelRunner

    from .helpers import forward_passes
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    if cpu_linear.prepare_linears(model, "onednn", "bfloat16").linear_dtype != "bfloat16":
        pytest.skip("this CPU does not serve bfloat16 products")
    prompts = [tok(text)["input_ids"] for text in ("The capital of France is", "Water boils at", "Hi there")]
    compiled, plain = ModelRunner(model, 4), ModelRunner(model, 4)
    compiled.serve_invariant()
    plain.serve_invariant()
    plain._native().layers = lambda: None
    assert compiled._native().layers() is not None
    with torch.inference_mode():
        for got, want in zip(forward_passes(compiled, prompts), forward_passes(plain, prompts)):
            apart = (got - want).abs().max()
            assert apart < 0.05 * want.abs().max()
            top2 = want.topk(2, dim=-1).values
            differ = got.argmax(-1) != want.argmax(-1)
            # a different greedy token only where the plain pass's best two are closer than the passes are
            assert (top2[differ, 0] - top2[differ, 1] < apart).all()
            if differ.any():
                break  # each pass then feeds its own token, and the next logits are of other inputs


def test_the_products_compile_for_a_cpu_without_amx(tmp_path):
    # the AMD EPYC of bench/results has no AMX: the library must still build there, or it loses the
    # attention and row-wise kernels too
    command = native.compile_command(shutil.which("g++"), native.HERE / "linear_kernel.cpp", tmp_path / "linear.o",
                                     ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


needs_amx = pytest.mark.skipif("not native.amx_linear()", reason="no AMX products on this CPU")


@needs_amx
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (576, 1536), (37, 35), (20, 3)])
def test_amx_products_sum_bfloat16_products_in_float32(out_features, in_features):
    # the model's shapes, and shapes whose columns and inputs are not whole tiles (padded with zeros)
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(3, 7, in_features, generator=gen).bfloat16()  # any leading shape
    packed = native.pack_linear(weight)
    want = x.float() @ weight.bfloat16().float().T
    got = native.linear(x, packed, out_features, bf16_out=False)
    assert got.shape == (3, 7, out_features) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(native.linear(x, packed, out_features, bf16_out=True), got.bfloat16())


@needs_amx
def test_an_amx_product_gives_a_row_the_same_bits_alone_among_any_rows_and_on_one_thread():
    # oneDNN's kernel changes from 33 rows on this CPU and gave 5 of 37 rows other bits; here no row count
    # (a decode step, a partial tile, a prefill) and no thread count changes a row
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(3072, 576, generator=gen)
    x = torch.randn(300, 576, generator=gen).bfloat16()
    packed = native.pack_linear(weight)
    alone = torch.cat([native.linear(x[r:r + 1], packed, 3072, bf16_out=False) for r in range(300)])
    for rows in (2, 8, 15, 16, 17, 33, 300):
        assert torch.equal(native.linear(x[:rows], packed, 3072, bf16_out=False), alone[:rows]), rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(native.linear(x, packed, 3072, bf16_out=False), alone)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_bf16_layers_use_the_amx_products_where_they_serve():
    from chatstream.engine.bf16_linear import BF16Linear
    linear = torch.nn.Linear(576, 960)
    layer = BF16Linear(linear)
    assert "amx" in repr(layer)
    x = torch.randn(4, 576)
    want = x.bfloat16().float() @ linear.weight.detach().bfloat16().float().T + linear.bias.detach()
    assert (layer(x) - want).abs().max() <= 1e-5 * want.abs().max()


@needs_amx
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (576, 1536), (37, 35), (20, 3)])
def test_int8_products_sum_what_the_int8_weights_hold(out_features, in_features):
    gen = torch.Generator().manual_seed(10)
    weight = torch.randn(out_features, in_features, generator=gen)
    weight[1] = 0  # an output with no weights: scale 1, sums 0
    q, scales = native.quantize_int8(weight)
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 7, in_features, generator=gen).bfloat16()
    x[0, 0] = 0  # a row of zeros
    x[0, 1, 0] = 1000.0  # a row whose other elements are far below its largest
    packed, packed_scales = native.pack_linear_int8(weight)
    assert torch.equal(packed_scales, scales)
    want = (x.double() @ q.double().T) * scales.double()
    size = (x.double().abs() @ q.double().abs().T) * scales.double()
    # each input rounded to a step of 2^(e - 15), its row's largest below 2^e (exact where the row has no
    # element far above the others); the rest is float32 rounding
    largest = x.float().abs().amax(-1, keepdim=True)
    step = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 15)
    rounding = step / 2 * (q.double().abs().sum(1) * scales.double())
    got = native.linear_int8(x, packed, scales, out_features, bf16_out=False)
    assert got.shape == (3, 7, out_features) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= rounding + 1e-5 * size).all()
    assert ((got.double() - want).abs()[1:] <= 1e-5 * size[1:]).all()  # rows of randn: no such element
    assert torch.equal(got[0, 0], torch.zeros(out_features))
    assert torch.equal(native.linear_int8(x, packed, scales, out_features, bf16_out=True), got.bfloat16())
    x[0, 3] = x[0, 3] * 1e-36  # a row of tiny values: no float overflows on the way
    tiny = (x[0, 3].double() @ q.double().T) * scales.double()
    got_tiny = native.linear_int8(x, packed, scales, out_features, bf16_out=False)[0, 3].double()
    assert ((got_tiny - tiny).abs() <= 2.0 ** -116 * q.double().abs().sum(1) * scales.double()
            + 1e-5 * size[0, 3] * 1e-36).all()  # steps of 2^-115 there
    assert torch.equal(got_tiny, torch.zeros_like(got_tiny))  # each element below half a step
    x[0, 2, -1] = float("nan")  # as a float product would, not a number: NaN
    assert native.linear_int8(x, packed, scales, out_features, bf16_out=False)[0, 2].isnan().all()


@needs_amx
def test_an_int8_product_gives_a_row_the_same_bits_alone_among_any_rows_and_on_one_thread():
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(960, 576, generator=gen)
    x = torch.randn(300, 576, generator=gen).bfloat16()
    packed, scales = native.pack_linear_int8(weight)
    alone = torch.cat([native.linear_int8(x[r:r + 1], packed, scales, 960, bf16_out=False) for r in range(300)])
    for rows in (2, 8, 15, 16, 17, 33, 300):
        assert torch.equal(native.linear_int8(x[:rows], packed, scales, 960, bf16_out=False), alone[:rows]), rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(native.linear_int8(x, packed, scales, 960, bf16_out=False), alone)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_bf16_layers_with_int8_weights_multiply_by_what_those_hold():
    from chatstream.engine.bf16_linear import BF16Linear
    linear = torch.nn.Linear(576, 960)
    layer = BF16Linear(linear, int8=True)
    assert "int8 weights" in repr(layer)
    q, scales = native.quantize_int8(linear.weight)
    x = torch.randn(4, 576)
    want = x.bfloat16().double() @ (q.double() * scales.double()[:, None]).T + linear.bias.detach().double()
    assert (layer(x).double() - want).abs().max() <= 1e-4 * want.abs().max()


@needs_amx
@pytest.mark.parametrize("cpu_linear_mode", ["onednn", "int8"])
def test_the_pass_in_one_call_gives_the_bits_of_the_layer_loop(cpu_linear_mode):
    # pass_kernel.cpp runs llama_forward's loop over the layers in C++ (a quarter of a decode step was the
    # loop's dispatch): a mixed step of decoding rows and two prompt chunks, and decode steps after it,
    # must give the loop's logits bit for bit, in the bfloat16 mode and in the int8 one.
    import types

    from chatstream import load_model
    from chatstream.engine import cpu_linear
    from chatstream.engine.runner import ModelRunner
    from chatstream.engine.scheduler import Chunk

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (70,), generator=gen).tolist() for _ in range(6)]
    logits = {}
    for one_call in (True, False):
        model, _ = load_model("builtin:smollm2-135m-instruct", device="cpu")
        cpu_linear.prepare_linears(model, cpu_linear_mode, "bfloat16")
        runner = ModelRunner(model, 6)
        runner.serve_invariant(torch.int8 if cpu_linear_mode == "int8" else torch.bfloat16)
        forward = runner._native()
        assert forward._weights(forward.layers()) is not None  # the one call serves this mode
        if not one_call:
            forward._weights = lambda layers: None
        seqs = [types.SimpleNamespace(prompt_ids=ids, row=r, length=0, next_token=None) for r, ids in enumerate(prompts)]
        out = []
        with torch.inference_mode():
            runner.reserve(128)
            for s in seqs[:4]:
                out.append(runner.prefill([Chunk(s, 0, 50)]))
                s.length, s.next_token = 50, 1
            # rows 0-3 decode while row 4 goes on from 0 and row 5 starts: chunks of 9 and 30 tokens
            out.extend(runner.step([Chunk(seqs[4], 0, 9), Chunk(seqs[5], 0, 30)], seqs[:4]))
            for step in range(3):
                out.append(runner.decode(seqs[:4]))
                for s in seqs[:4]:
                    s.length, s.next_token = s.length + 1, 2 + step
        logits[one_call] = out
    assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))


def test_the_compiled_pass_reads_cos_and_sin_from_a_table_that_grows_with_the_positions():
    from chatstream import load_model
    from chatstream.engine.llama_forward import LlamaForward

    model, _ = load_model("builtin:smollm2-135m-instruct", device="cpu")
    rope, forward = model.model.rotary_emb, LlamaForward(model, invariant=True)
    hidden = torch.zeros(1, 576)
    short = forward._rotary(rope, hidden, torch.tensor([3, 700]))
    assert forward._rope[0].shape[0] == 1024
    long = forward._rotary(rope, hidden, torch.tensor([2000, 700, 3, 5]))
    assert forward._rope[0].shape[0] == 2048  # grown to the next 1024 past the longest position
    # a position's values do not depend on the pass, and they are the model's rotary embedding's
    assert torch.equal(short[0][1], long[0][1]) and torch.equal(short[1][0], long[1][2])
    want = rope(hidden[None], position_ids=torch.tensor([[2000, 700, 3, 5]]))
    assert all(torch.allclose(got, w[0], atol=1e-6) for got, w in zip(long, want))

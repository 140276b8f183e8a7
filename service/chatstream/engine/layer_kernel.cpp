// The row-wise steps of a Llama layer between its products, in the bfloat16 mode: RMSNorm (with the
// residual add before it), rotary embedding, SiLU-gated MLP activation.
//
// Why: in PyTorch they are about sixty operator calls a layer (norms, casts, slices, rotate_half, adds),
// a quarter of a decode step at 8 rows on the 2-core machines of bench/results, nearly all of it
// dispatch. Here they are three calls a layer, and they hand the products bfloat16 directly.
//
// Each is row-wise: a token's row is computed from that row alone, by one thread, in an order fixed in
// the source, so its bits do not depend on the other rows of the pass or on the number of threads
// (kernel_math.h says why a vector lane and the scalar tail agree). The products' outputs come in as
// bfloat16 (one piece) or float32 (a product cut in column pieces, bf16_linear.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "kernel_math.h"
#include "kernels.h"

namespace {

using namespace chatstream;

constexpr int64_t ROWS_PER_TASK = 16;  // rows a thread takes at once: a decode step's rows stay on one

template <typename F>
void each_row(int64_t rows, const F& f) {
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

template <typename F>
void dispatch_input(const at::Tensor& t, const F& f) {  // float32 or bfloat16 data, as a typed pointer
  if (t.scalar_type() == at::kBFloat16)
    f(t.data_ptr<at::BFloat16>());
  else
    f(t.data_ptr<float>());
}

void check_input(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), what, " must be a contiguous [rows, features] tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              " must be float32 or bfloat16");
}

}  // namespace

namespace chatstream {

// hidden ([T, H] float32, contiguous) += delta where given (in place: the residual stream), then
// RMSNorm of each row: w * (x / sqrt(mean(x^2) + eps)), returned in bfloat16 for the next product.
// The mean's sum runs in 16 lanes and reduce's tree, then the rest of the row in order.
at::Tensor rms_norm(at::Tensor hidden, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.scalar_type() == at::kFloat,
              "rms_norm: hidden must be a contiguous [rows, features] float32 tensor");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  TORCH_CHECK(w.numel() == H, "rms_norm: weight must have one value per feature");
  if (delta) {
    check_input(*delta, "rms_norm: delta");
    TORCH_CHECK(delta->sizes() == hidden.sizes(), "rms_norm: delta must have hidden's shape");
  }
  at::Tensor out = at::empty({T, H}, hidden.options().dtype(at::kBFloat16));
  float* hp = hidden.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const float e = static_cast<float>(eps);
  const auto norm = [&](int64_t r) {
    float* x = hp + r * H;
    vfloat acc = {};
    int64_t i = 0;
    for (; i + W <= H; i += W) {
      const vfloat v = load(x + i);
      acc = acc + v * v;
    }
    float sum = reduce(acc);
    for (; i < H; ++i) sum += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(H) + e);
    at::BFloat16* y = op + r * H;
    for (i = 0; i + W <= H; i += W) store_bf16(load(wp + i) * (load(x + i) * scale), y + i);
    for (; i < H; ++i) y[i] = to_bf16(wp[i] * (x[i] * scale));
  };
  if (delta) {
    dispatch_input(*delta, [&](const auto* dp) {
      each_row(T, [&](int64_t r) {
        float* x = hp + r * H;
        for (int64_t i = 0; i < H; ++i) x[i] = x[i] + scalar(dp + r * H + i);
        norm(r);
      });
    });
  } else {
    each_row(T, norm);
  }
  return out;
}

// The rotary embedding of q and k from one fused q/k/v product ([T, (q_heads + 2 kv_heads) * D]):
// x * cos + rotate_half(x) * sin, as transformers' apply_rotary_pos_emb computes it, with cos and sin
// [T, D] float32. Returns q [T, q_heads, D] float32 (what the attention kernel reads); writes token t's
// k and v into the caches ([rows, kv_heads, capacity, D], float32, bfloat16 or int8) at row rows[t],
// position positions[t] (a padding token, rows[t] < 0, writes nothing). int8 caches come with their
// scales ([rows, kv_heads, capacity] float32): each head's key and value is quantized on its own
// (quantize_int8), from float32.
at::Tensor rotary(const at::Tensor& qkv, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t q_heads,
                  int64_t kv_heads, at::Tensor key_cache, at::Tensor value_cache,
                  const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales,
                  const at::Tensor& rows_in, const at::Tensor& positions_in) {
  check_input(qkv, "rotary: qkv");
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const at::Tensor rows = rows_in.to(at::kLong).contiguous(), positions = positions_in.to(at::kLong).contiguous();
  const int64_t T = qkv.size(0), D = cos.size(-1);
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (q_heads + 2 * kv_heads) * D && cos.numel() == T * D &&
                  sin.numel() == T * D && rows.numel() == T && positions.numel() == T,
              "rotary: shapes disagree");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.strides() == value_cache.strides() && key_cache.scalar_type() == value_cache.scalar_type() &&
                  key_cache.size(1) == kv_heads && key_cache.size(3) == D && key_cache.stride(3) == 1,
              "rotary: the caches must be [rows, kv_heads, capacity, D] of one dtype and layout");
  const bool int8 = int8_kv(key_cache, key_scales, value_scales, "rotary");
  TORCH_CHECK(!int8 || D <= 256, "rotary: int8 caches take heads of at most 256 values");  // quantized from f[256]
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(rp[t] < key_cache.size(0) && (rp[t] < 0 || (pp[t] >= 0 && pp[t] < key_cache.size(2))),
                "rotary: a token's row or position is outside the cache");
  at::Tensor q = at::empty({T, q_heads, D}, qkv.options().dtype(at::kFloat));
  float* qp = q.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t half = D / 2, width = qkv.size(1);
  const int64_t s0 = key_cache.stride(0), s1 = key_cache.stride(1), s2 = key_cache.stride(2);
  float* ksp = int8 ? key_scales->data_ptr<float>() : nullptr;
  float* vsp = int8 ? value_scales->data_ptr<float>() : nullptr;
  const int64_t c0 = int8 ? key_scales->stride(0) : 0, c1 = int8 ? key_scales->stride(1) : 0,
                c2 = int8 ? key_scales->stride(2) : 0;
  const auto run = [&](const auto* xp, auto* kp, auto* vp) {
    using KV = std::remove_pointer_t<decltype(kp)>;
    const auto turn = [&](const auto* x, const float* c, const float* s, auto* y) {  // one head
      for (int64_t i = 0; i < D; ++i) {
        const float other = i < half ? -scalar(x + i + half) : scalar(x + i - half);
        put(scalar(x + i) * c[i] + other * s[i], y + i);
      }
    };
    each_row(T, [&](int64_t t) {
      const auto* x = xp + t * width;
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t h = 0; h < q_heads; ++h) turn(x + h * D, c, s, qp + (t * q_heads + h) * D);
      if (rp[t] < 0) return;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = rp[t] * s0 + h * s1 + pp[t] * s2;
        const auto* value = x + (q_heads + kv_heads + h) * D;
        if constexpr (std::is_same_v<KV, int8_t>) {
          float f[256];
          const int64_t sat = rp[t] * c0 + h * c1 + pp[t] * c2;
          turn(x + (q_heads + h) * D, c, s, f);
          ksp[sat] = quantize_int8(f, D, kp + at);
          for (int64_t i = 0; i < D; ++i) f[i] = scalar(value + i);
          vsp[sat] = quantize_int8(f, D, vp + at);
        } else {
          turn(x + (q_heads + h) * D, c, s, kp + at);
          for (int64_t i = 0; i < D; ++i) put(scalar(value + i), vp + at + i);
        }
      }
    });
  };
  dispatch_input(qkv, [&](const auto* xp) {
    if (int8)
      run(xp, key_cache.data_ptr<int8_t>(), value_cache.data_ptr<int8_t>());
    else if (key_cache.scalar_type() == at::kBFloat16)
      run(xp, key_cache.data_ptr<at::BFloat16>(), value_cache.data_ptr<at::BFloat16>());
    else
      run(xp, key_cache.data_ptr<float>(), value_cache.data_ptr<float>());
  });
  return q;
}

// silu(gate) * up from one fused gate/up product ([T, 2I]), in bfloat16 for down_proj: silu(g) =
// g * sigmoid(g), sigmoid from exp of -|g| (exp_nonpositive), 16 lanes at a time and the rest one by one.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_input(gate_up, "silu_mul: gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * I, "silu_mul: gate_up must have an even number of columns");
  at::Tensor out = at::empty({T, I}, gate_up.options().dtype(at::kBFloat16));
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  dispatch_input(gate_up, [&](const auto* xp) {
    each_row(T, [&](int64_t r) {
      const auto* g = xp + r * 2 * I;
      const auto* u = g + I;
      at::BFloat16* y = op + r * I;
      int64_t i = 0;
      for (; i + W <= I; i += W) {
        const vfloat gv = load(g + i);
        const vfloat e = exp_nonpositive<vfloat, vint>(-(gv < 0.0f ? -gv : gv));
        const vfloat sig = gv >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        store_bf16((gv * sig) * load(u + i), y + i);
      }
      for (; i < I; ++i) {
        const float gs = scalar(g + i);
        const float e = exp_nonpositive<float, int32_t>(-(gs < 0.0f ? -gs : gs));
        const float sig = gs >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        y[i] = to_bf16((gs * sig) * scalar(u + i));
      }
    });
  });
  return out;
}

}  // namespace chatstream

TORCH_LIBRARY_FRAGMENT(chatstream, m) {
  m.def("rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor qkv, Tensor cos, Tensor sin, int q_heads, int kv_heads, Tensor(a!) key_cache, "
        "Tensor(b!) value_cache, Tensor(c!)? key_scales, Tensor(d!)? value_scales, Tensor rows, Tensor positions) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("rms_norm", chatstream::rms_norm);
  m.impl("rotary", chatstream::rotary);
  m.impl("silu_mul", chatstream::silu_mul);
}

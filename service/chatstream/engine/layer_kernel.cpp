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
#include <tuple>

#include "kernel_math.h"

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
    for (i = 0; i < H; ++i) y[i] = to_bf16(wp[i] * (x[i] * scale));
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
// [T, D] float32. Returns q [T, q_heads, D] float32 (what the attention kernel reads) and k, v
// [T, kv_heads, D] in bfloat16 (kv_bf16, the cache's dtype) or float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary(const at::Tensor& qkv, const at::Tensor& cos_in,
                                                      const at::Tensor& sin_in, int64_t q_heads, int64_t kv_heads,
                                                      bool kv_bf16) {
  check_input(qkv, "rotary: qkv");
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const int64_t T = qkv.size(0), D = cos.size(-1);
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (q_heads + 2 * kv_heads) * D && cos.numel() == T * D &&
                  sin.numel() == T * D,
              "rotary: shapes disagree");
  const auto opts = qkv.options();
  at::Tensor q = at::empty({T, q_heads, D}, opts.dtype(at::kFloat));
  const auto kv_type = kv_bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor k = at::empty({T, kv_heads, D}, opts.dtype(kv_type));
  at::Tensor v = at::empty({T, kv_heads, D}, opts.dtype(kv_type));
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t half = D / 2, width = qkv.size(1);
  dispatch_input(qkv, [&](const auto* xp) {
    const auto turn = [&](const auto* x, const float* c, const float* s, auto* y) {  // one head
      using Y = std::remove_pointer_t<decltype(y)>;
      for (int64_t i = 0; i < D; ++i) {
        const float other = i < half ? -scalar(x + i + half) : scalar(x + i - half);
        const float out = scalar(x + i) * c[i] + other * s[i];
        if constexpr (std::is_same_v<Y, float>) y[i] = out; else y[i] = to_bf16(out);
      }
    };
    const auto rows = [&](auto* kp, auto* vp) {
      using KV = std::remove_pointer_t<decltype(kp)>;
      each_row(T, [&](int64_t r) {
        const auto* x = xp + r * width;
        const float* c = cp + r * D;
        const float* s = sp + r * D;
        for (int64_t h = 0; h < q_heads; ++h) turn(x + h * D, c, s, q.data_ptr<float>() + (r * q_heads + h) * D);
        for (int64_t h = 0; h < kv_heads; ++h) {
          turn(x + (q_heads + h) * D, c, s, kp + (r * kv_heads + h) * D);
          const auto* value = x + (q_heads + kv_heads + h) * D;
          KV* out = vp + (r * kv_heads + h) * D;
          for (int64_t i = 0; i < D; ++i) {
            if constexpr (std::is_same_v<KV, float>) out[i] = scalar(value + i); else out[i] = to_bf16(scalar(value + i));
          }
        }
      });
    };
    if (kv_bf16)
      rows(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
    else
      rows(k.data_ptr<float>(), v.data_ptr<float>());
  });
  return {q, k, v};
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
        const vfloat a = (gv * sig) * load(u + i);
        for (int l = 0; l < W; ++l) y[i + l] = to_bf16(a[l]);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatstream, m) {
  m.def("rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor qkv, Tensor cos, Tensor sin, int q_heads, int kv_heads, bool kv_bf16) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rotary", rotary);
  m.impl("silu_mul", silu_mul);
}

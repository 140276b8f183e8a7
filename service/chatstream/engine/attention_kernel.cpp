// Attention whose result for a query depends on that query, its keys and values and its mask alone.
//
// Why a kernel of its own: see attention_native.py. What makes it invariant is how it is written:
//
// * one query at a time, over the keys it sees in index order; keys it does not see are skipped,
//   so neither the view's length nor the batch's other rows enter any sum;
// * every sum has a fixed order written in the source: a dot product over head_dim in LANES
//   accumulators and then a fixed tree, the softmax's denominator and the weighted values
//   key after key;
// * it is compiled with -ffp-contract=off and without -ffast-math, so the compiler may vectorize
//   across independent lanes but may neither fuse a multiply into an add nor reorder a sum: a
//   vectorized loop and its scalar tail compute the same IEEE operations, bit for bit;
// * exp is a fixed polynomial (below), the same bits whichever code path evaluates it.
//
// Threads split (row, key/value head, block of queries): a query is computed by one thread, start to
// end, so the number of threads does not change its bits either.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int LANES = 16;       // accumulators of a dot product (one AVX-512 register, or two AVX2)
constexpr int64_t QUERIES = 8;  // queries that share one pass over a key/value head's keys

// exp(x) for x <= 0, about 1 ulp: exp(x) = 2^n * exp(r), |r| <= ln2/2, exp(r) a degree-6 polynomial
// (Cephes' expf). Plain arithmetic only, so it vectorizes and every path gives the same bits.
inline float exp_nonpositive(float x) {
  if (x < -87.0f) return 0.0f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

template <typename KV>
inline float as_float(const KV* p) {
  return static_cast<float>(*p);
}

template <>
inline float as_float<at::BFloat16>(const at::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(p->x) << 16;  // exact: bfloat16 is float32's upper half
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename KV>
inline float dot(const float* q, const KV* k, int64_t dim) {
  float acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= dim; i += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += q[i + l] * as_float(k + i + l);
  for (int l = 0; i < dim; ++i, ++l) acc[l] += q[i] * as_float(k + i);
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

template <typename KV>
void attend_block(const float* q, int64_t q_stride, int64_t count, const KV* keys, const KV* values,
                  int64_t kv_stride, const bool* mask, int64_t mask_stride, int64_t mask_rows,
                  int64_t first_query, int64_t length, int64_t dim, float scale, float* out,
                  int64_t out_stride, std::vector<float>& scores) {
  scores.resize(static_cast<size_t>(count * length));
  float top[QUERIES], total[QUERIES];
  for (int64_t m = 0; m < count; ++m) top[m] = -std::numeric_limits<float>::infinity();
  // scores, and each query's maximum (exact in any order)
  for (int64_t j = 0; j < length; ++j) {
    const KV* key = keys + j * kv_stride;
    for (int64_t m = 0; m < count; ++m) {
      const bool* seen = mask + ((first_query + m) % mask_rows) * mask_stride;
      if (!seen[j]) continue;
      const float s = dot(q + m * q_stride, key, dim) * scale;
      scores[m * length + j] = s;
      if (s > top[m]) top[m] = s;
    }
  }
  for (int64_t m = 0; m < count; ++m) {
    total[m] = 0.0f;
    std::fill(out + m * out_stride, out + m * out_stride + dim, 0.0f);
  }
  // weights, their sum and the weighted values, key after key
  for (int64_t j = 0; j < length; ++j) {
    const KV* value = values + j * kv_stride;
    for (int64_t m = 0; m < count; ++m) {
      const bool* seen = mask + ((first_query + m) % mask_rows) * mask_stride;
      if (!seen[j]) continue;
      const float w = exp_nonpositive(scores[m * length + j] - top[m]);
      total[m] += w;
      float* o = out + m * out_stride;
      for (int64_t i = 0; i < dim; ++i) o[i] += w * as_float(value + i);
    }
  }
  for (int64_t m = 0; m < count; ++m) {
    float* o = out + m * out_stride;
    for (int64_t i = 0; i < dim; ++i) o[i] /= total[m];
  }
}

// q: [B, H, M, D] float32; keys, values: [B, H, L, D] (float32 or bfloat16, last dimension contiguous,
// views of longer rows allowed); mask: [B, R, L] bool, query m of a head sees key j where
// mask[b, m % R, j]; every query must see at least one key. Returns [B, H, M, D] float32.
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && mask_in.dim() == 3,
              "attend: q, keys, values are [B, H, M|L, D] and mask is [B, R, L]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "attend: q must be float32");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() && keys.strides() == values.strides() &&
                  keys.sizes() == values.sizes(),
              "attend: keys and values must have one dtype, shape and layout");
  TORCH_CHECK(keys.stride(3) == 1, "attend: the keys' last dimension must be contiguous");
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "attend: mask must be bool");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), L = keys.size(2);
  const int64_t R = mask.size(1);
  TORCH_CHECK(keys.size(0) == B && keys.size(1) == H && keys.size(3) == D && mask.size(0) == B &&
                  mask.size(2) == L && R > 0 && M % R == 0,
              "attend: shapes disagree");
  at::Tensor out = at::empty({B, H, M, D}, q.options());
  const int64_t blocks = (M + QUERIES - 1) / QUERIES;
  const float s = static_cast<float>(scale);
  const float* qp = q.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, keys.scalar_type(), "attend", [&] {
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    const int64_t kb = keys.stride(0), kh = keys.stride(1), kl = keys.stride(2);
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / (H * blocks), h = (unit / blocks) % H, first = (unit % blocks) * QUERIES;
        const int64_t count = std::min(QUERIES, M - first);
        const int64_t qo = ((b * H + h) * M + first) * D;
        attend_block<scalar_t>(qp + qo, D, count, kp + b * kb + h * kh, vp + b * kb + h * kh, kl,
                               mp + b * R * L, L, R, first, L, D, s, op + qo, D, scores);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(chatstream, m) {
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("attend", attend);
}

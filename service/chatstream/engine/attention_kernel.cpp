// Attention whose result for a query depends on that query, its keys and values and its mask alone.
//
// Why a kernel of its own: see attention_native.py. What makes it invariant is how it is written:
//
// * one query at a time, over the keys it sees in index order; keys it does not see are skipped,
//   so neither the view's length nor the batch's other rows enter any sum;
// * every sum has a fixed order written in the source: a dot product over head_dim in 16 lanes and
//   then a fixed tree, the softmax's denominator and the weighted values key after key;
// * vectors are GCC's vector extensions (16 floats; AVX-512 registers where the CPU has them, else
//   pairs of AVX2 ones), whose operations are per lane, and it is compiled with -ffp-contract=off and
//   without -ffast-math: the compiler may neither fuse a multiply into an add nor reorder a sum, so
//   a lane computes the same IEEE operations as the scalar code for the same element, bit for bit;
// * exp is a fixed polynomial (below), the same bits in a vector lane and in scalar code.
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
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QUERIES = 8;  // queries a unit of work holds (one key/value head of one row)
constexpr int64_t W = 16;       // lanes of a vector

typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vhalf __attribute__((vector_size(32)));
typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));

template <typename T, typename F>
inline T bitcast(const F& from) {
  static_assert(sizeof(T) == sizeof(F));
  T to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

inline vfloat load(const float* p) { return bitcast<vfloat>(*reinterpret_cast<const float(*)[W]>(p)); }
inline vfloat load(const double* p) {
  vfloat v;
  for (int l = 0; l < W; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline vfloat load(const at::BFloat16* p) {  // exact: bfloat16 is float32's upper half
  const vhalf h = bitcast<vhalf>(*reinterpret_cast<const uint16_t(*)[W]>(p));
  return bitcast<vfloat>(__builtin_convertvector(h, vuint) << 16);
}

inline float scalar(const float* p) { return *p; }
inline float scalar(const double* p) { return static_cast<float>(*p); }
inline float scalar(const at::BFloat16* p) { return bitcast<float>(static_cast<uint32_t>(p->x) << 16); }

// The sum of 16 lanes in a fixed tree: lane l with l + 8, then l + 4, l + 2, l + 1.
inline float reduce(vfloat v) {
  const vfloat8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x) for x <= 0, about 1 ulp: exp(x) = 2^n * exp(r), |r| <= ln2/2, exp(r) a degree-6 polynomial
// (Cephes' expf); n is rounded by adding and subtracting 1.5 * 2^23. T is float or vfloat: the same
// operations, lane by lane.
template <typename T, typename I>
inline T exp_nonpositive(T x) {
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  T r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits = bitcast<I>(p);
  if constexpr (std::is_same_v<T, float>) {
    bits += static_cast<int32_t>(n) * (1 << 23);
    return x < -87.0f ? 0.0f : bitcast<float>(bits);
  } else {
    bits += __builtin_convertvector(n, vint) * (1 << 23);
    return bitcast<vfloat>(bits & ~(x < -87.0f));  // lanes below -87: 0
  }
}

// Queries [first_query, first_query + count) of one row's key/value head; D a multiple of 16.
template <int64_t D, typename KV>
void attend_block(const float* q, int64_t count, const KV* keys, const KV* values, int64_t kv_stride,
                  const bool* mask, int64_t mask_rows, int64_t first_query, int64_t length, float scale,
                  float* out, std::vector<float>& weights) {
  constexpr int64_t V = D / W;
  weights.resize(static_cast<size_t>(length));
  float* s = weights.data();
  for (int64_t m = 0; m < count; ++m) {
    // The keys it sees: [lo, hi), every one in between (a run: the engine's masks are a prefix, a
    // causal prefix, or key 0 for a padding query) or else read key by key from the mask.
    const bool* seen = mask + ((first_query + m) % mask_rows) * length;
    int64_t lo = 0, hi = length;
    while (lo < length && !seen[lo]) ++lo;
    while (hi > lo && !seen[hi - 1]) --hi;
    bool run = true;
    for (int64_t j = lo; j < hi; ++j) run = run && seen[j];
    vfloat qv[V];
    for (int64_t t = 0; t < V; ++t) qv[t] = load(q + m * D + t * W);
    // scores, and their maximum (exact in any order)
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; ++j) {
      if (!run && !seen[j]) continue;
      const KV* key = keys + j * kv_stride;
      vfloat acc = qv[0] * load(key);
      for (int64_t t = 1; t < V; ++t) acc = acc + qv[t] * load(key + t * W);
      s[j] = reduce(acc) * scale;
      top = std::max(top, s[j]);
    }
    // weights, 16 keys at a time and the rest one by one (the same operations); unseen keys weigh 0
    int64_t j = lo;
    for (; j + W <= hi; j += W) {
      vfloat x = load(s + j) - top;
      for (int l = 0; !run && l < W; ++l) x[l] = seen[j + l] ? x[l] : -100.0f;
      const vfloat e = exp_nonpositive<vfloat, vint>(x);
      std::memcpy(s + j, &e, sizeof e);
    }
    for (; j < hi; ++j) s[j] = (run || seen[j]) ? exp_nonpositive<float, int32_t>(s[j] - top) : 0.0f;
    float total = 0.0f;  // in key order; an unseen key adds an exact zero
    for (j = lo; j < hi; ++j) total += s[j];
    // the weighted values, key after key
    vfloat acc[V] = {};
    for (j = lo; j < hi; ++j) {
      if (!run && !seen[j]) continue;
      const KV* value = values + j * kv_stride;
      const float w = s[j];
      for (int64_t t = 0; t < V; ++t) acc[t] = acc[t] + w * load(value + t * W);
    }
    for (int64_t t = 0; t < V; ++t) {
      const vfloat o = acc[t] / total;
      std::memcpy(out + m * D + t * W, &o, sizeof o);
    }
  }
}

// The same for any head_dim, in scalar code.
template <typename KV>
void attend_block_any(const float* q, int64_t count, const KV* keys, const KV* values, int64_t kv_stride,
                      const bool* mask, int64_t mask_rows, int64_t first_query, int64_t length, int64_t dim,
                      float scale, float* out, std::vector<float>& weights) {
  weights.resize(static_cast<size_t>(length));
  float* s = weights.data();
  for (int64_t m = 0; m < count; ++m) {
    const bool* seen = mask + ((first_query + m) % mask_rows) * length;
    const float* qm = q + m * dim;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) {
      if (!seen[j]) continue;
      float acc[W] = {};
      for (int64_t i = 0; i < dim; ++i) acc[i % W] += qm[i] * scalar(keys + j * kv_stride + i);
      vfloat v;
      std::memcpy(&v, acc, sizeof v);
      s[j] = reduce(v) * scale;
      top = std::max(top, s[j]);
    }
    float total = 0.0f;
    float* o = out + m * dim;
    std::fill(o, o + dim, 0.0f);
    for (int64_t j = 0; j < length; ++j) {
      if (!seen[j]) continue;
      const float w = exp_nonpositive<float, int32_t>(s[j] - top);
      total += w;
      for (int64_t i = 0; i < dim; ++i) o[i] += w * scalar(values + j * kv_stride + i);
    }
    for (int64_t i = 0; i < dim; ++i) o[i] /= total;
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
      std::vector<float> weights;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / (H * blocks), h = (unit / blocks) % H, first = (unit % blocks) * QUERIES;
        const int64_t count = std::min(QUERIES, M - first);
        const int64_t qo = ((b * H + h) * M + first) * D;
        const scalar_t* k = kp + b * kb + h * kh;
        const scalar_t* v = vp + b * kb + h * kh;
        const bool* mb = mp + b * R * L;
        if (D == 64)
          attend_block<64>(qp + qo, count, k, v, kl, mb, R, first, L, s, op + qo, weights);
        else if (D == 128)
          attend_block<128>(qp + qo, count, k, v, kl, mb, R, first, L, s, op + qo, weights);
        else
          attend_block_any(qp + qo, count, k, v, kl, mb, R, first, L, D, s, op + qo, weights);
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

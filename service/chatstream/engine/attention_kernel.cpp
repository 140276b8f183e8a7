// Attention whose result for a query depends on that query, its keys and values and its mask alone.
//
// Why a kernel of its own: see native.py. What makes it invariant is how it is written:
//
// * a query is computed over the keys its mask row lets it see, in index order; keys it does not see
//   are skipped, so neither the view's length nor the batch's other rows enter any sum. The queries
//   that share a mask row and a key/value head (a decode row's heads of one key/value head) are
//   computed together, each key read once for all of them, with each query's arithmetic what it
//   would be alone;
// * every sum has a fixed order written in the source: a dot product over head_dim in 16 lanes and
//   then a fixed tree (for 16 keys at once, the same tree), the softmax's denominator in 16 lanes
//   over the same keys and then the tree, the weighted values key after key;
// * vectors are GCC's vector extensions (16 floats; AVX-512 registers where the CPU has them, else
//   pairs of AVX2 ones), whose operations are per lane, and it is compiled with -ffp-contract=off and
//   without -ffast-math: the compiler may neither fuse a multiply into an add nor reorder a sum. The
//   only fused multiply-adds are written out (fma(): the dot products' terms after the first, and
//   the weighted values), and a key's dot product is the same vector code for the 16-key tiles and
//   for the keys after them, so every key's score has one computation;
// * exp is a fixed polynomial (below), the same bits in a vector lane and in scalar code.
//
// Threads split (row, key/value head, mask row): a query is computed by one thread, start to end, so
// the number of threads does not change its bits either.
//
// Where the time goes: a decode step reads every cached key and value once, and at 16 rows of 400
// positions that is more bytes than the weights, so the kernel reads them once for all the queries
// of a key/value head, asks for them ahead of use (prefetch) and takes them in bfloat16 too, or in int8
// with a float32 scale per position and head (the int8 mode: 68 bytes a head and position against 128).
// An int8 key's score is its dot product times its scale, then the softmax scale; an int8 value's
// weight is multiplied by its scale before the weighted sum: per key, so the order is still fixed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernel_math.h"
#include "kernels.h"

namespace {

using namespace chatstream;

// The 16 sums of 16 vectors in one vector, lane k holding reduce(v[k]) bit for bit: the same tree
// (lane l with l + 8, then l + 4, then l + 2 with l + 1's pair, as reduce() adds them), done for 16
// keys at once with shuffles across vectors instead of one key at a time.
__attribute__((always_inline)) inline vfloat reduce16(const vfloat* v) {
  vfloat a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: key 2i's l + (l + 8); lanes 8-15: key 2i + 1's
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                   30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes for each of keys 4i .. 4i + 3: l + (l + 4)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                   31);
  for (int i = 0; i < 2; ++i)  // two lanes for each of keys 8i .. 8i + 7: (b0 + b2), (b1 + b3)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The keys a mask row lets a query see: [lo, hi), and whether every key in between is seen (a run: the
// engine's masks are a prefix, a causal prefix, or key 0 for a padding query).
struct Seen {
  const bool* row;
  int64_t lo, hi;
  bool run;
  Seen(const bool* mask_row, int64_t length) : row(mask_row), lo(0), hi(length), run(true) {
    while (lo < length && !row[lo]) ++lo;
    while (hi > lo && !row[hi - 1]) --hi;
    for (int64_t j = lo; j < hi; ++j) run = run && row[j];
  }
  bool operator()(int64_t j) const { return run || row[j]; }
};

// Keys and values are read once a step from memory (a cache row is far larger than the CPU's caches),
// key after key; asking for them AHEAD keys early keeps the loads from waiting on memory (a hint: a
// prefetch past the end of a row reads nothing and faults on nothing).
constexpr int64_t AHEAD = 64;

template <typename KV>
inline void prefetch(const KV* p, int64_t count) {
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(KV)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + i);
}

// NQ queries that see the same keys (one mask row of one key/value head), together: each key and value
// is read once for all of them, and each query's arithmetic is what it would be alone (the same
// operations in the same order whatever NQ is). D is a multiple of 16. Every sum's order depends on
// the query's own keys alone: scores 16 keys at a time from lo (reduce16) and the rest key by key
// (reduce, the same bits); the denominator in 16 lanes over the same tiles, then reduce's tree, then
// the rest in key order; the weighted values key after key.
template <int64_t D, int NQ, typename KV>
void attend_queries(const float* const* q, float* const* out, const KV* keys, const KV* values, int64_t kv_stride,
                    const float* key_scales, const float* value_scales, const Seen& seen, float scale, float* scores,
                    int64_t length) {
  constexpr bool int8 = std::is_same_v<KV, int8_t>;
  constexpr int64_t V = D / W;
  const int64_t lo = seen.lo, hi = seen.hi;
  const float inf = std::numeric_limits<float>::infinity();
  vfloat qv[NQ][V];
  float* s[NQ];
  for (int g = 0; g < NQ; ++g) {
    for (int64_t t = 0; t < V; ++t) qv[g][t] = load(q[g] + t * W);
    s[g] = scores + g * length;
  }
  // each query's dot products with one key, before reduce's tree
  const auto dots = [&](int64_t j, vfloat* acc, int64_t step) {
    prefetch(keys + (j + AHEAD) * kv_stride, D);
    vfloat key[V];
    for (int64_t t = 0; t < V; ++t) key[t] = load(keys + j * kv_stride + t * W);
    for (int g = 0; g < NQ; ++g) {
      vfloat a = qv[g][0] * key[0];
      for (int64_t t = 1; t < V; ++t) a = fma(qv[g][t], key[t], a);
      acc[g * step] = a;
    }
  };
  // scores, and their maxima (exact in any order); an unseen key's score is not used
  vfloat topv[NQ];
  for (int g = 0; g < NQ; ++g) topv[g] = vfloat{} - inf;
  int64_t j = lo;
  for (; j + W <= hi; j += W) {
    vfloat part[NQ][W];
    for (int k = 0; k < W; ++k) dots(j + k, &part[0][k], W);
    for (int g = 0; g < NQ; ++g) {
      vfloat x = reduce16(part[g]);
      if constexpr (int8) x = x * load(key_scales + j);
      x = x * scale;
      std::memcpy(s[g] + j, &x, sizeof x);
      for (int l = 0; !seen.run && l < W; ++l) x[l] = seen.row[j + l] ? x[l] : -inf;
      topv[g] = topv[g] > x ? topv[g] : x;
    }
  }
  float top[NQ];
  for (int g = 0; g < NQ; ++g) {
    top[g] = -inf;
    for (int l = 0; l < W; ++l) top[g] = std::max(top[g], topv[g][l]);
  }
  for (int64_t k = j; k < hi; ++k) {
    if (!seen(k)) continue;
    vfloat acc[NQ];
    dots(k, acc, 1);
    for (int g = 0; g < NQ; ++g) {
      float x = reduce(acc[g]);
      if constexpr (int8) x = x * key_scales[k];
      s[g][k] = x * scale;
      top[g] = std::max(top[g], s[g][k]);
    }
  }
  // weights (unseen keys weigh 0) and their sums
  float total[NQ];
  for (int g = 0; g < NQ; ++g) {
    vfloat totv = {};
    for (j = lo; j + W <= hi; j += W) {
      vfloat x = load(s[g] + j) - top[g];
      for (int l = 0; !seen.run && l < W; ++l) x[l] = seen.row[j + l] ? x[l] : -100.0f;
      const vfloat e = exp_nonpositive<vfloat, vint>(x);
      totv = totv + e;
      std::memcpy(s[g] + j, &e, sizeof e);
    }
    total[g] = reduce(totv);
    for (; j < hi; ++j) {
      s[g][j] = seen(j) ? exp_nonpositive<float, int32_t>(s[g][j] - top[g]) : 0.0f;
      total[g] += s[g][j];
    }
  }
  // the weighted values, key after key
  vfloat acc[NQ][V] = {};
  for (j = lo; j < hi; ++j) {
    if (!seen(j)) continue;
    prefetch(values + (j + AHEAD) * kv_stride, D);
    vfloat value[V];
    for (int64_t t = 0; t < V; ++t) value[t] = load(values + j * kv_stride + t * W);
    for (int g = 0; g < NQ; ++g) {
      float w = s[g][j];
      if constexpr (int8) w = w * value_scales[j];
      for (int64_t t = 0; t < V; ++t) acc[g][t] = fma(splat(w), value[t], acc[g][t]);
    }
  }
  for (int g = 0; g < NQ; ++g)
    for (int64_t t = 0; t < V; ++t) {
      const vfloat o = acc[g][t] / total[g];
      std::memcpy(out[g] + t * W, &o, sizeof o);
    }
}

// The queries of one mask row, at most four at a time.
template <int64_t D, typename KV>
void attend_row(const float* const* q, float* const* out, int64_t count, const KV* keys, const KV* values,
                int64_t kv_stride, const float* ks, const float* vs, const Seen& seen, float scale, float* scores,
                int64_t length) {
  for (; count >= 4; count -= 4, q += 4, out += 4)
    attend_queries<D, 4>(q, out, keys, values, kv_stride, ks, vs, seen, scale, scores, length);
  if (count == 3) attend_queries<D, 3>(q, out, keys, values, kv_stride, ks, vs, seen, scale, scores, length);
  if (count == 2) attend_queries<D, 2>(q, out, keys, values, kv_stride, ks, vs, seen, scale, scores, length);
  if (count == 1) attend_queries<D, 1>(q, out, keys, values, kv_stride, ks, vs, seen, scale, scores, length);
}

// The same for any head_dim, in scalar code.
template <typename KV>
void attend_query_any(const float* q, const KV* keys, const KV* values, int64_t kv_stride, const float* key_scales,
                      const float* value_scales, const Seen& seen, int64_t dim, float scale, float* out, float* s) {
  constexpr bool int8 = std::is_same_v<KV, int8_t>;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = seen.lo; j < seen.hi; ++j) {
    if (!seen(j)) continue;
    float acc[W] = {};
    for (int64_t i = 0; i < dim; ++i) acc[i % W] += q[i] * scalar(keys + j * kv_stride + i);
    vfloat v;
    std::memcpy(&v, acc, sizeof v);
    float x = reduce(v);
    if constexpr (int8) x = x * key_scales[j];
    s[j] = x * scale;
    top = std::max(top, s[j]);
  }
  float total = 0.0f;
  std::fill(out, out + dim, 0.0f);
  for (int64_t j = seen.lo; j < seen.hi; ++j) {
    if (!seen(j)) continue;
    const float w = exp_nonpositive<float, int32_t>(s[j] - top);
    total += w;
    float wv = w;
    if constexpr (int8) wv = wv * value_scales[j];
    for (int64_t i = 0; i < dim; ++i) out[i] += wv * scalar(values + j * kv_stride + i);
  }
  for (int64_t i = 0; i < dim; ++i) out[i] /= total;
}

}  // namespace

namespace chatstream {

// q: [B, H, M, D] float32; keys, values: [B, H, L, D] (float32, bfloat16 or int8, last dimension
// contiguous, views of longer rows allowed); int8 keys and values come with their scales, [B, H, L]
// float32 (key j of a head is keys[..., j, :] * key_scales[..., j]); mask: [B, R, L] bool, query m of a
// head sees key j where mask[b, m % R, j]; every query must see at least one key. Returns [B, H, M, D]
// float32.
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& mask_in, double scale, const std::optional<at::Tensor>& key_scales,
                  const std::optional<at::Tensor>& value_scales) {
  TORCH_CHECK(q_in.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && mask_in.dim() == 3,
              "attend: q, keys, values are [B, H, M|L, D] and mask is [B, R, L]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "attend: q must be float32");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() && keys.strides() == values.strides() &&
                  keys.sizes() == values.sizes(),
              "attend: keys and values must have one dtype, shape and layout");
  const bool int8 = int8_kv(keys, key_scales, value_scales, "attend");
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
  const float s = static_cast<float>(scale);
  const float* qp = q.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float* ksp = int8 ? key_scales->data_ptr<float>() : nullptr;
  const float* vsp = int8 ? value_scales->data_ptr<float>() : nullptr;
  const int64_t sb = int8 ? key_scales->stride(0) : 0, sh = int8 ? key_scales->stride(1) : 0;
  const auto run = [&](auto* kp, auto* vp) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    const int64_t kb = keys.stride(0), kh = keys.stride(1), kl = keys.stride(2);
    // a unit of work: one row's key/value head and one mask row, i.e. queries r, r + R, r + 2R, ...
    at::parallel_for(0, B * H * R, 1, [&](int64_t begin, int64_t end) {
      const int64_t count = M / R;
      std::vector<float> scores(static_cast<size_t>(std::min<int64_t>(count, 4) * L));
      std::vector<const float*> qs(static_cast<size_t>(count));
      std::vector<float*> outs(static_cast<size_t>(count));
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / (H * R), h = (unit / R) % H, r = unit % R;
        const Seen seen(mp + (b * R + r) * L, L);
        const KV* k = kp + b * kb + h * kh;
        const KV* v = vp + b * kb + h * kh;
        const float* ks = int8 ? ksp + b * sb + h * sh : nullptr;
        const float* vs = int8 ? vsp + b * sb + h * sh : nullptr;
        for (int64_t i = 0; i < count; ++i) {
          const int64_t at = ((b * H + h) * M + r + i * R) * D;
          qs[i] = qp + at;
          outs[i] = op + at;
        }
        if (D == 64)
          attend_row<64>(qs.data(), outs.data(), count, k, v, kl, ks, vs, seen, s, scores.data(), L);
        else if (D == 128)
          attend_row<128>(qs.data(), outs.data(), count, k, v, kl, ks, vs, seen, s, scores.data(), L);
        else
          for (int64_t i = 0; i < count; ++i)
            attend_query_any(qs[i], k, v, kl, ks, vs, seen, D, s, outs[i], scores.data());
      }
    });
  };
  if (int8)
    run(keys.data_ptr<int8_t>(), values.data_ptr<int8_t>());
  else if (keys.scalar_type() == at::kBFloat16)
    run(keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>());
  else
    run(keys.data_ptr<float>(), values.data_ptr<float>());
  return out;
}

}  // namespace chatstream

TORCH_LIBRARY(chatstream, m) {
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale, Tensor? key_scales=None, "
        "Tensor? value_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("attend", chatstream::attend);
}

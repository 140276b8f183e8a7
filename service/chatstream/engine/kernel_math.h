// What the engine's compiled kernels share: 16-float vectors, exact loads of bfloat16 and int8, a fixed-order
// sum of a vector's lanes and a fixed exp. The arithmetic is IEEE float32, per lane, in the order the
// source gives (the kernels are compiled with -ffp-contract=off and without -ffast-math), so a vector
// lane and the scalar code for the same element give the same bits.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace chatstream {

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
inline vfloat load(const at::BFloat16* p) {  // exact: bfloat16 is float32's upper half
#if defined(__AVX512F__)  // one widening load (the generic code below compiles to halves and inserts)
  return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  const vhalf h = bitcast<vhalf>(*reinterpret_cast<const uint16_t(*)[W]>(p));
  return bitcast<vfloat>(__builtin_convertvector(h, vuint) << 16);
#endif
}

// x in every lane.
inline vfloat load(const int8_t* p) {  // exact: every int8 is a float
#if defined(__AVX512F__)
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t vbyte __attribute__((vector_size(16)));
  return __builtin_convertvector(bitcast<vbyte>(*reinterpret_cast<const int8_t(*)[W]>(p)), vfloat);
#endif
}

inline vfloat splat(float x) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(x);
#else
  vfloat v;
  for (int64_t l = 0; l < W; ++l) v[l] = x;
  return v;
#endif
}

inline float scalar(const float* p) { return *p; }
inline float scalar(const at::BFloat16* p) { return bitcast<float>(static_cast<uint32_t>(p->x) << 16); }
inline float scalar(const int8_t* p) { return static_cast<float>(*p); }

// The sum of 16 lanes in a fixed tree: lane l with l + 8, then l + 4, l + 2, l + 1.
inline float reduce(vfloat v) {
  const vfloat8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// a * b + c in each lane, rounded once (a fused multiply-add: the same bits however it is computed).
inline vfloat fma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  for (int64_t l = 0; l < W; ++l) c[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return c;
#endif
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

// float32 to bfloat16, rounded to nearest even, as PyTorch's .to(torch.bfloat16) rounds (NaN: 0x7fc0).
inline at::BFloat16 to_bf16(float x) { return at::BFloat16(x); }

// The same for 16 lanes, stored at p.
inline void store_bf16(vfloat x, at::BFloat16* p) {
  const vuint u = bitcast<vuint>(x);
  vuint r = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  r = (x != x) ? vuint{} + 0x7fc0u : r;
  const vhalf h = __builtin_convertvector(r, vhalf);
  std::memcpy(p, &h, sizeof h);
}

// One float32 value stored as the destination's type: as it is, or rounded as to_bf16 rounds.
// x[0, n) as int8 in q, and the scale they are read back with (x ~ q * scale): the largest magnitude over
// 127, each value divided by it and rounded to the nearest integer (ties to even), 0 for a zero vector.
// native.quantize_int8 does the same for the weights, in PyTorch.
inline float quantize_int8(const float* x, int64_t n, int8_t* q) {
  float top = 0.0f;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, std::fabs(x[i]));
  const float scale = top / 127.0f;
  for (int64_t i = 0; i < n; ++i)
    q[i] = scale > 0.0f ? static_cast<int8_t>(std::clamp(std::nearbyint(x[i] / scale), -127.0f, 127.0f)) : 0;
  return scale;
}

// Whether keys and values (``kv``: [B, H, L, D] float32, bfloat16 or int8) are int8; int8 ones, and only
// they, come with their scales ([B, H, L] float32, keys' and values' of one layout, contiguous along L).
inline bool int8_kv(const at::Tensor& kv, const std::optional<at::Tensor>& key_scales,
                    const std::optional<at::Tensor>& value_scales, const char* what) {
  const bool int8 = kv.scalar_type() == at::kChar;
  TORCH_CHECK(kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16 || int8, what,
              ": keys and values must be float32, bfloat16 or int8");
  TORCH_CHECK(int8 == (key_scales.has_value() && value_scales.has_value()), what,
              ": int8 keys and values, and only they, come with their scales");
  if (int8)
    TORCH_CHECK(key_scales->scalar_type() == at::kFloat && value_scales->scalar_type() == at::kFloat &&
                    key_scales->sizes() == kv.sizes().slice(0, 3) && value_scales->sizes() == key_scales->sizes() &&
                    value_scales->strides() == key_scales->strides() && key_scales->stride(2) == 1,
                what, ": the scales must be float32 [B, H, L] of one layout, contiguous along L");
  return int8;
}

inline void put(float x, float* p) { *p = x; }
inline void put(float x, at::BFloat16* p) { *p = to_bf16(x); }

}  // namespace chatstream

// The bfloat16 mode's products on CPUs with AMX: y = x W^T, x and W in bfloat16, summed in float32.
//
// Why: the products are 71% of a decode step at 8 rows, and oneDNN runs them at about half the
// machine's read bandwidth within a step. Its bits for a row also change with the row count (from 33
// rows on the Intel Xeon of bench/results), so bf16_linear.py had to cut a prefill into pieces of 32
// rows, which runs its products 2.2x slower. Here a row's output does not depend on the other rows, by
// construction, so prefill and decode rows get the same bits without any cut.
//
// Invariance: output (m, n) is one float32 accumulator (a lane of an AMX tile), and the input's
// columns are added to it 32 at a time, in order, one TDPBF16PS each (a fixed operation of a row of
// x and a column of W). The tiles (16 rows, 64 columns) and the threads (which split the columns) only
// choose which accumulators run together, never their order, so a row's bits are the same alone,
// among any rows and on any number of threads.
//
// Layout: pack() turns W [N, K] into blocks of 16 output columns, each [K/2][16][2]: for a pair of input
// columns, the 16 outputs' two weights side by side, as TDPBF16PS takes them (the "VNNI" layout); 16
// pairs of a block are one weight tile. N is padded to 16 and K to 32 with zeros (x too, where K is not a
// multiple of 32: a copy), and the last rows of x, fewer than 16, are copied into a zero-padded tile.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define CHATSTREAM_AMX 1
#else
#define CHATSTREAM_AMX 0
#endif

namespace {

constexpr int64_t LANES = 16;  // output columns of a block (one row of an accumulator tile)
constexpr int64_t CHUNK = 32;  // input columns of one tile product
constexpr int64_t AHEAD = 4;   // chunks a block's weights are asked for ahead of their tile loads (a
                               // prefetch past the end of the weights reads nothing and faults on nothing)

constexpr int64_t CHUNK8 = 64;  // input columns of one integer tile product (int8 weights)

int64_t blocks_of(int64_t n) { return (n + LANES - 1) / LANES; }
int64_t padded(int64_t k) { return (k + CHUNK - 1) / CHUNK * CHUNK; }
int64_t padded8(int64_t k) { return (k + CHUNK8 - 1) / CHUNK8 * CHUNK8; }

// w [N, K] (T: bfloat16's bits or int8) in blocks of 16 output columns, each [ldk / G][16][G]: G input
// columns of the 16 outputs side by side (4 bytes, as the tile products take them), K padded to ldk and
// N to 16 with zeros.
template <typename T>
at::Tensor pack_blocks(const at::Tensor& w, int64_t ldk) {
  constexpr int64_t G = 4 / sizeof(T);
  const int64_t N = w.size(0), K = w.size(1), groups = ldk / G;
  at::Tensor packed = at::zeros({blocks_of(N) * groups * LANES * G}, w.options());
  const T* src = static_cast<const T*>(w.data_ptr());
  T* dst = static_cast<T*>(packed.data_ptr());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      dst[((n / LANES) * groups + k / G) * LANES * G + (n % LANES) * G + k % G] = src[n * K + k];
  return packed;
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear: weight must be [out_features, in_features]");
  return pack_blocks<uint16_t>(weight.to(at::kBFloat16).contiguous(), padded(weight.size(1)));
}

#if CHATSTREAM_AMX

// 16 float32 lanes, the first `valid` of them, stored as float32 or rounded to bfloat16 (nearest even,
// as PyTorch rounds).
template <typename Out>
inline void store(__m512 acc, Out* out, int64_t valid) {
  const __mmask16 mask = valid >= LANES ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  if constexpr (std::is_same_v<Out, float>)
    _mm512_mask_storeu_ps(out, mask, acc);
  else
    _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(acc));
}

// AMX tiles: 0-3 accumulate four blocks of 16 columns for 16 rows, 4 holds 16 rows x 32 input columns
// of x, 5-7 take turns holding a block's weights for those 32 columns (16 pairs x 16 columns x 2).
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

bool amx_permitted() {  // Linux hands a process the tiles' state only when asked (once, for every thread)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

template <typename Out>
void store_rows(const float* acc, int64_t rows, int64_t columns, Out* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) store(_mm512_loadu_ps(acc + r * LANES), out + r * ldo, columns);
}

// Blocks [first, first + B) for the 16 rows of x at xt (ldx columns, zero-padded to a multiple of 32),
// the first `rows` of them stored into out (rows of N); the weights are asked for ahead where `prefetch`
// (the first rows of a prefill: later row tiles find them in the caches).
template <int B, typename Out>
void tile(const uint16_t* xt, int64_t ldx, const uint16_t* w, int64_t block_stride, int64_t first, int64_t rows,
          Out* out, int64_t N, bool prefetch) {
  if constexpr (B > 0) _tile_zero(0);
  if constexpr (B > 1) _tile_zero(1);
  if constexpr (B > 2) _tile_zero(2);
  if constexpr (B > 3) _tile_zero(3);
  const uint16_t* wb = w + first * block_stride;
  for (int64_t k = 0; k < ldx; k += 32) {
    const uint16_t* wk = wb + k * LANES;  // 16 pairs of 16 columns x 2 per 32 input columns
    if (prefetch)
      for (int b = 0; b < B; ++b)
        for (int line = 0; line < 16; ++line)
          _mm_prefetch(reinterpret_cast<const char*>(wk + b * block_stride + AHEAD * CHUNK * LANES + line * 32),
                       _MM_HINT_T0);
    _tile_loadd(4, xt + k, ldx * 2);
    if constexpr (B > 0) { _tile_loadd(5, wk, 64); _tile_dpbf16ps(0, 4, 5); }
    if constexpr (B > 1) { _tile_loadd(6, wk + block_stride, 64); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (B > 2) { _tile_loadd(7, wk + 2 * block_stride, 64); _tile_dpbf16ps(2, 4, 7); }
    if constexpr (B > 3) { _tile_loadd(5, wk + 3 * block_stride, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  alignas(64) float acc[4][16 * LANES];
  if constexpr (B > 0) _tile_stored(0, acc[0], 64);
  if constexpr (B > 1) _tile_stored(1, acc[1], 64);
  if constexpr (B > 2) _tile_stored(2, acc[2], 64);
  if constexpr (B > 3) _tile_stored(3, acc[3], 64);
  for (int b = 0; b < B; ++b)
    store_rows(acc[b], rows, N - (first + b) * LANES, out + (first + b) * LANES, N);
}

template <typename Out>
void product(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t block_stride, int64_t N, Out* out) {
  const int64_t blocks = blocks_of(N);
  const int64_t whole = M / 16 * 16;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> tail;  // the last rows, fewer than 16, in a tile's worth of rows padded with zeros
    if (whole < M) {
      tail.assign(16 * ldx, 0);
      std::copy(x + whole * ldx, x + M * ldx, tail.begin());
    }
    const TileConfig config;
    _tile_loadconfig(&config);
    for (int64_t first = begin; first < end; first += 4) {
      const int64_t count = std::min<int64_t>(4, end - first);
      for (int64_t m = 0; m < M; m += 16) {
        const uint16_t* xt = m < whole ? x + m * ldx : tail.data();
        Out* om = out + m * N;
        const int64_t rows = std::min<int64_t>(16, M - m);
        switch (count) {
          case 1: tile<1>(xt, ldx, w, block_stride, first, rows, om, N, m == 0); break;
          case 2: tile<2>(xt, ldx, w, block_stride, first, rows, om, N, m == 0); break;
          case 3: tile<3>(xt, ldx, w, block_stride, first, rows, om, N, m == 0); break;
          default: tile<4>(xt, ldx, w, block_stride, first, rows, om, N, m == 0);
        }
      }
    }
    _tile_release();
  });
}

// ---- int8 weights: W8A16 on AMX's integer tiles ----
//
// Why: a decode step reads every weight once, so int8 weights halve its bytes. Widening them to bfloat16
// for TDPBF16PS costs more instructions than the halved bytes save (measured: 1.05x at best), so the
// products run on the integer tiles instead, and the activations go there as 16-bit integers: each row
// of x is scaled by a power of two to at most 2^15 and rounded (exact for every element within 2^7 of
// the row's largest; the smaller ones to within 2^-16 of it), then split into a signed high byte and an
// unsigned low byte, x = 256 hi + lo. TDPBSSD (hi) and TDPBUSD (lo) sum their products with the int8
// weights exactly, in int32; the output is 256 hi_sum + lo_sum in float32 (the sums converted, exact
// below 2^24, and one fused multiply-add), times the column's scale, times the row's power of two
// (exact). Integer sums have no order, so a row's bits never depend on the other rows or the threads.
//
// Layout: pack_int8() turns q [N, K] into blocks of 16 output columns, each [K/4][16][4] (four input
// columns of the 16 outputs side by side, as TDPBSSD takes them), K padded to 64 and N to 16 with zeros.

constexpr int64_t PASS = 128;  // rows of x a thread takes through all its blocks at a time

// A row of x (K bfloat16) as hi and lo bytes, zero-padded to ldx, and its power of two. The bytes go
// where a tile load finds them: 64 input columns of a row at hi + (k / 64) * 1024 (a tile's 16 rows are
// 64 bytes apart, the chunks of a row tile one tile apart: each tile load reads one contiguous KiB).
void split_row(const uint16_t* x, int64_t K, int64_t ldx, int8_t* hi, uint8_t* lo, float* two) {
  __m512 top = _mm512_setzero_ps();
  int64_t k = 0;
  const auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  __mmask16 nonfinite = 0;  // max() drops a NaN, so NaNs and infinities are looked for apart
  for (; k + 16 <= K; k += 16) {
    const __m512 v = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    nonfinite |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN, +inf, -inf, SNaN
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  float largest = nonfinite ? NAN : _mm512_reduce_max_ps(top);
  for (; k < K; ++k) {
    uint32_t bits = uint32_t(x[k]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    largest = std::isfinite(v) ? std::max(largest, std::fabs(v)) : NAN;
  }
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest < 2^exponent
  exponent = std::max(exponent, -100);  // 2^(15 - exponent) stays a float; a row below 2^-100 is rounded
                                        // to steps of 2^-115 (none is near: a layer's inputs are normed)
  const float down = std::ldexp(1.0f, 15 - exponent);  // a bfloat16 below 2^exponent times this is below 2^15
  // a row of zeros gives zeros; one holding an infinity or NaN gives NaN, as a float product would
  *two = !std::isfinite(largest) ? NAN : largest > 0 ? std::ldexp(1.0f, exponent - 15) : 0.0f;
  const __m512 scale = _mm512_set1_ps(largest > 0 ? down : 0.0f);
  for (k = 0; k < ldx; k += 16) {
    const int64_t valid = std::min<int64_t>(16, K - k);
    const __mmask16 mask = valid >= 16 ? __mmask16(0xffff) : valid > 0 ? __mmask16((1u << valid) - 1) : 0;
    const __m512 v = widen(_mm256_maskz_loadu_epi16(mask, x + k));
    const __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(v, scale));  // nearest, ties to even
    const int64_t at = k / CHUNK8 * 1024 + k % CHUNK8;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at), _mm512_cvtepi32_epi8(_mm512_srai_epi32(n, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(n, _mm512_set1_epi32(0xff))));
  }
}

// 16 outputs of one row from its two int32 sums: 256 hi + lo in float32, times the columns' scales,
// times the row's power of two (exact).
inline __m512 combine(const int32_t* hi, const int32_t* lo, const float* scale, __mmask16 mask, float two) {
  const __m512 total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(hi)), _mm512_set1_ps(256.0f),
                                       _mm512_cvtepi32_ps(_mm512_loadu_si512(lo)));
  return _mm512_mul_ps(_mm512_mul_ps(total, _mm512_maskz_loadu_ps(mask, scale)), _mm512_set1_ps(two));
}

// Blocks first, first + 1 (B of them) for a row tile of hi/lo (split_row's layout); tiles 0/1 sum hi/lo for
// the first block, 2/3 for the second, 4/5 hold x's hi/lo, 6/7 the blocks' weights.
template <int B, typename Out>
void tile8(const int8_t* hi, const uint8_t* lo, int64_t ldx, const int8_t* wb, int64_t block_stride, int64_t rows,
           const float* two, Out* out, int64_t columns, const float* scale, int64_t N, bool prefetch) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (B > 1) { _tile_zero(2); _tile_zero(3); }
  for (int64_t k = 0; k < ldx; k += CHUNK8) {
    const int8_t* wk = wb + k * LANES;  // 16 quads of 16 columns x 4 per 64 input columns
    for (int b = 0; prefetch && b < B; ++b)
      for (int line = 0; line < 16; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(wk + b * block_stride + AHEAD * CHUNK8 * LANES + line * 64),
                     _MM_HINT_T0);
    _tile_loadd(4, hi + k * 16, 64);
    _tile_loadd(5, lo + k * 16, 64);
    _tile_loadd(6, wk, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbusd(1, 5, 6);
    if constexpr (B > 1) {
      _tile_loadd(7, wk + block_stride, 64);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  alignas(64) int32_t acc[4][16 * LANES];
  _tile_stored(0, acc[0], 64);
  _tile_stored(1, acc[1], 64);
  if constexpr (B > 1) { _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64); }
  for (int b = 0; b < B; ++b) {
    const int64_t valid = columns - b * LANES;
    const __mmask16 mask = valid >= LANES ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
    for (int64_t r = 0; r < rows; ++r)
      store(combine(acc[2 * b] + r * LANES, acc[2 * b + 1] + r * LANES, scale + b * LANES, mask, two[r]),
            out + b * LANES + r * N, valid);
  }
}

template <typename Out>
void product8(const int8_t* hi, const uint8_t* lo, const float* two, int64_t ldx, int64_t M, const int8_t* w,
              const float* scale, int64_t block_stride, int64_t N, Out* out) {
  const int64_t blocks = blocks_of(N);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const TileConfig config;
    _tile_loadconfig(&config);
    // a prefill's rows PASS at a time, so that their bytes (two a column) stay in the core's cache while
    // every block of the thread's columns goes over them
    for (int64_t start = 0; start < M; start += PASS) {
      const int64_t stop = std::min(M, start + PASS);
      for (int64_t first = begin; first < end; first += 2) {
        const bool pair = end - first >= 2;
        for (int64_t m = start; m < stop; m += 16) {
          const int64_t rows = std::min<int64_t>(16, M - m), columns = N - first * LANES;
          Out* om = out + m * N + first * LANES;
          const int8_t* wb = w + first * block_stride;
          if (pair)
            tile8<2>(hi + m * ldx, lo + m * ldx, ldx, wb, block_stride, rows, two + m, om, columns,
                     scale + first * LANES, N, m == start);
          else
            tile8<1>(hi + m * ldx, lo + m * ldx, ldx, wb, block_stride, rows, two + m, om, columns,
                     scale + first * LANES, N, m == start);
        }
      }
    }
    _tile_release();
  });
}

#endif

bool available() {
#if CHATSTREAM_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// [..., out_features] for x [..., K], in bfloat16 or float32
at::Tensor output_for(const at::Tensor& x, int64_t out_features, bool bf16_out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return at::empty(shape, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
}

}  // namespace

namespace chatstream {

// x [..., K] bfloat16 times the packed weight of out_features outputs: [..., out_features], in bfloat16
// (rounded once, from the float32 sum) or float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, bool bf16_out) {
  TORCH_CHECK(available(), "linear: this CPU or its kernel gives no AMX");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear: x and the packed weight must be bfloat16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, ldx = padded(K), block_stride = ldx * LANES;
  TORCH_CHECK(packed.numel() == blocks_of(out_features) * block_stride,
              "linear: the packed weight is not [", out_features, ", ", K, "]");
  at::Tensor out = output_for(x, out_features, bf16_out);
  if (M == 0) return out;
  at::Tensor xp = x.reshape({M, K}).contiguous();
  if (ldx != K) xp = at::constant_pad_nd(xp, {0, ldx - K});  // columns padded with zeros to a whole chunk
#if CHATSTREAM_AMX
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  if (bf16_out)
    product(xs, ldx, M, ws, block_stride, out_features, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else
    product(xs, ldx, M, ws, block_stride, out_features, out.data_ptr<float>());
#endif
  return out;
}

at::Tensor pack_int8(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pack_linear_int8: q must be [out_features, in_features] int8");
  return pack_blocks<int8_t>(q.contiguous(), padded8(q.size(1)));
}

// x [..., K] bfloat16 times the int8 weight q (packed) whose columns are scaled by `scales` (float32,
// out_features): [..., out_features] in bfloat16 (rounded from the float32 result) or float32.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                       bool bf16_out) {
  TORCH_CHECK(available(), "linear_int8: this CPU or its kernel gives no AMX");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kChar,
              "linear_int8: x must be bfloat16 and the packed weight int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == out_features &&
                  scales.is_contiguous(),
              "linear_int8: scales must be out_features contiguous float32 values");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, ldx = padded8(K), block_stride = ldx * LANES;
  TORCH_CHECK(packed.numel() == blocks_of(out_features) * block_stride,
              "linear_int8: the packed weight is not [", out_features, ", ", K, "]");
  at::Tensor out = output_for(x, out_features, bf16_out);
  if (M == 0) return out;
#if CHATSTREAM_AMX
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const int64_t tiles = (M + 15) / 16 * 16;  // rows of whole tiles, the last ones zero
  std::vector<int8_t> hi(tiles * ldx, 0);
  std::vector<uint8_t> lo(tiles * ldx, 0);
  std::vector<float> two(tiles, 0.0f);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t at = m / 16 * 16 * ldx + m % 16 * CHUNK8;  // row m % 16 of its row tile's first chunk
      split_row(xs + m * K, K, ldx, &hi[at], &lo[at], &two[m]);
    }
  });
  const int8_t* ws = packed.data_ptr<int8_t>();
  if (bf16_out)
    product8(hi.data(), lo.data(), two.data(), ldx, M, ws, scales.data_ptr<float>(), block_stride, out_features,
             reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else
    product8(hi.data(), lo.data(), two.data(), ldx, M, ws, scales.data_ptr<float>(), block_stride, out_features,
             out.data_ptr<float>());
#endif
  return out;
}

}  // namespace chatstream

TORCH_LIBRARY_FRAGMENT(chatstream, m) {
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int out_features, bool bf16_out) -> Tensor");
  m.def("pack_linear_int8(Tensor q) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scales, int out_features, bool bf16_out) -> Tensor");
  m.def("linear_available", &available);
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("pack_linear", pack);
  m.impl("linear", chatstream::linear);
  m.impl("pack_linear_int8", chatstream::pack_int8);
  m.impl("linear_int8", chatstream::linear_int8);
}

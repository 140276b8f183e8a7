// The decoder layers of one forward pass in one call: per layer a norm (with the residual add), the
// q/k/v product, rotary (writing the keys and values), attention for the decoding rows and for the
// prompt chunks, o_proj, a norm, gate/up, the activation and down_proj, as llama_forward.py's loop runs
// them, calling the same kernels (kernels.h) in the same order, so the bits are the same.
//
// Why: from Python that loop is about 55 operator calls a layer (the kernels, and the slices, views,
// reshapes and casts between them), and at 16 decoding rows on the 2-core Intel Xeon of bench/results
// their dispatch was 3.1 of a 12.6 ms step, the kernels 9.5. Here it is one call a pass.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using namespace chatstream;

// What the queries of one part of a pass see of a layer's buffers: rows [first, first + count), the
// first `view` positions of each (llama_forward.Plan.views).
at::Tensor view(const at::Tensor& buffer, int64_t first, int64_t count, int64_t positions) {
  return buffer.slice(0, first, first + count).slice(2, 0, positions);
}

std::optional<at::Tensor> view(const std::optional<at::Tensor>& buffer, int64_t first, int64_t count,
                               int64_t positions) {
  if (!buffer) return std::nullopt;
  return view(*buffer, first, count, positions);
}

}  // namespace

namespace chatstream {

// hidden ([T, H] float32, the residual stream, updated in place) through every layer. Per layer l:
// norms[2l], norms[2l + 1] (input and post-attention RMSNorm weights), packed[4l .. 4l + 3] the
// q/k/v, o, gate/up and down products (bfloat16 AMX blocks, or int8 ones with their scales[4l + i]),
// out_features[4l + i] their widths; cache[per * l ..] the layer's keys and values (and, int8, their
// scales: per is 2 or 4). The pass's first `decode` tokens are decoding rows 0 .. decode - 1 seeing
// decode_view positions through decode_mask ([decode, 1, view] bool); the last chunks * width tokens
// are the prompt chunks of rows prefill_row .. prefill_row + chunks - 1, right-aligned in width,
// seeing prefill_view positions through prefill_mask ([chunks, width, view]).
void layers(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& rows,
            const at::Tensor& positions, at::TensorList norms, at::TensorList packed,
            const c10::List<std::optional<at::Tensor>>& scales, at::IntArrayRef out_features, double eps,
            int64_t q_heads, int64_t kv_heads, double scale, at::TensorList cache, int64_t decode,
            int64_t decode_view, const std::optional<at::Tensor>& decode_mask, int64_t chunks, int64_t width,
            int64_t prefill_row, int64_t prefill_view, const std::optional<at::Tensor>& prefill_mask) {
  const int64_t count = static_cast<int64_t>(norms.size()) / 2;
  TORCH_CHECK(count > 0 && static_cast<int64_t>(norms.size()) == 2 * count &&
                  static_cast<int64_t>(packed.size()) == 4 * count &&
                  static_cast<int64_t>(scales.size()) == 4 * count &&
                  static_cast<int64_t>(out_features.size()) == 4 * count && kv_heads > 0 && q_heads % kv_heads == 0,
              "layers: 2 norms, 4 products, 4 scales and 4 widths per layer, q_heads a multiple of kv_heads");
  const int64_t per = static_cast<int64_t>(cache.size()) / count;
  TORCH_CHECK((per == 2 || per == 4) && per * count == static_cast<int64_t>(cache.size()),
              "layers: keys and values (and their scales) for each layer");
  TORCH_CHECK(decode + chunks * width == hidden.size(0) && (decode == 0 || decode_mask) &&
                  (chunks == 0 || prefill_mask),
              "layers: the decoding rows and the chunks must be the pass's tokens, each part with its mask");
  const int64_t D = cos.size(-1), groups = q_heads / kv_heads;
  const auto product = [&](const at::Tensor& x, int64_t i) {
    const std::optional<at::Tensor> s = scales.get(i);
    return s ? linear_int8(x, packed[i], *s, out_features[i], true) : linear(x, packed[i], out_features[i], true);
  };
  at::Tensor x = rms_norm(hidden, std::nullopt, norms[0], eps);
  for (int64_t l = 0; l < count; ++l) {
    const at::Tensor& keys = cache[per * l];
    const at::Tensor& values = cache[per * l + 1];
    const std::optional<at::Tensor> key_scales = per == 4 ? std::optional<at::Tensor>(cache[per * l + 2]) : std::nullopt;
    const std::optional<at::Tensor> value_scales =
        per == 4 ? std::optional<at::Tensor>(cache[per * l + 3]) : std::nullopt;
    const at::Tensor q = rotary(product(x, 4 * l), cos, sin, q_heads, kv_heads, keys, values, key_scales,
                                value_scales, rows, positions);  // [T, q_heads, D]
    std::vector<at::Tensor> parts;
    if (decode) {  // one query per row: its heads attend to their key/value head as one block of queries
      const at::Tensor qd = q.slice(0, 0, decode).reshape({decode, kv_heads, groups, D});
      parts.push_back(attend(qd, view(keys, 0, decode, decode_view), view(values, 0, decode, decode_view),
                             *decode_mask, scale, view(key_scales, 0, decode, decode_view),
                             view(value_scales, 0, decode, decode_view))
                          .reshape({decode, q_heads * D}));
    }
    if (chunks) {  // each key/value head's queries as one block: query g * width + w sees mask row w
      const at::Tensor grouped = q.slice(0, decode)
                                     .view({chunks, width, q_heads, D})
                                     .transpose(1, 2)
                                     .reshape({chunks, kv_heads, groups * width, D});
      const auto seen = [&](const auto& b) { return view(b, prefill_row, chunks, prefill_view); };
      parts.push_back(attend(grouped, seen(keys), seen(values), *prefill_mask, scale, seen(key_scales),
                             seen(value_scales))
                          .view({chunks, q_heads, width, D})
                          .transpose(1, 2)
                          .reshape({chunks * width, q_heads * D}));
    }
    const at::Tensor out = parts.size() == 1 ? parts[0] : at::cat(parts);
    x = rms_norm(hidden, product(out.to(at::kBFloat16), 4 * l + 1), norms[2 * l + 1], eps);
    const at::Tensor down = product(silu_mul(product(x, 4 * l + 2)), 4 * l + 3);
    if (l + 1 < count)
      x = rms_norm(hidden, down, norms[2 * (l + 1)], eps);
    else
      hidden.add_(down);
  }
}

}  // namespace chatstream

TORCH_LIBRARY_FRAGMENT(chatstream, m) {
  m.def("layers(Tensor(a!) hidden, Tensor cos, Tensor sin, Tensor rows, Tensor positions, Tensor[] norms, "
        "Tensor[] packed, Tensor?[] scales, int[] out_features, float eps, int q_heads, int kv_heads, float scale, "
        "Tensor[] cache, int decode, int decode_view, Tensor? decode_mask, int chunks, int width, int prefill_row, "
        "int prefill_view, Tensor? prefill_mask) -> ()");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("layers", chatstream::layers);
}

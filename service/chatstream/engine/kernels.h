// The kernels one source calls in another (pass_kernel.cpp runs a pass's layers with them, in C++),
// as each file defines and documents them; Python reaches the same functions as torch.ops.chatstream.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace chatstream {

// attention_kernel.cpp
at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                  double scale, const std::optional<at::Tensor>& key_scales,
                  const std::optional<at::Tensor>& value_scales);

// layer_kernel.cpp
at::Tensor rms_norm(at::Tensor hidden, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
at::Tensor rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t q_heads,
                  int64_t kv_heads, at::Tensor key_cache, at::Tensor value_cache,
                  const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales,
                  const at::Tensor& rows, const at::Tensor& positions);
at::Tensor silu_mul(const at::Tensor& gate_up);

// linear_kernel.cpp
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, bool bf16_out);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                       bool bf16_out);

}  // namespace chatstream

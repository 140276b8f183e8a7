// A sequence's span of cached positions, copied across every layer's key/value buffers in one call: the
// prefix cache keeps a finished turn's span (clone_spans) and puts it back into a row for the next turn
// (copy_spans), and the scheduler moves rows (copy_spans from a row to another).
//
// Why: with 30 layers of keys, values and their scales that is 120 slices and copies each time, and from
// Python their dispatch was 9% of the engine thread's time at 16 conversations x 6 turns on the 2-core
// Intel Xeon of bench/results; the bytes themselves (3.5 MB at 300 positions, int8) take a fraction of it.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

// Positions [0, length) of buffer row `row` ([rows, kv_heads, capacity(, D)]), or of a kept span
// ([kv_heads, positions(, D)]) where row < 0.
at::Tensor span(const at::Tensor& buffer, int64_t row, int64_t length) {
  const at::Tensor r = row < 0 ? buffer : buffer.select(0, row);
  return r.narrow(1, 0, length);
}

// dst[i]'s span (row dst_row) = src[i]'s (row src_row), for every i.
void copy_spans(at::TensorList src, int64_t src_row, at::TensorList dst, int64_t dst_row, int64_t length) {
  TORCH_CHECK(src.size() == dst.size(), "copy_spans: as many sources as destinations");
  for (size_t i = 0; i < src.size(); ++i) span(dst[i], dst_row, length).copy_(span(src[i], src_row, length));
}

// A copy of each buffer's span at `row`.
std::vector<at::Tensor> clone_spans(at::TensorList buffers, int64_t row, int64_t length) {
  std::vector<at::Tensor> out;
  out.reserve(buffers.size());
  for (const at::Tensor& b : buffers) out.push_back(span(b, row, length).clone());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatstream, m) {
  m.def("copy_spans(Tensor[] src, int src_row, Tensor(a!)[] dst, int dst_row, int length) -> ()");
  m.def("clone_spans(Tensor[] buffers, int row, int length) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(chatstream, CPU, m) {
  m.impl("copy_spans", copy_spans);
  m.impl("clone_spans", clone_spans);
}

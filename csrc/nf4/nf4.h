// NF4 ops: shared host-side declarations (CPU kernels, CUDA wrappers).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace lorax::nf4 {

// The per-block absmax of an NF4 weight: fp32 [blocks], or double-quantized (uint8 [blocks] with an 8-bit
// code book, fp32 absmax per blocksize2 entries and an offset): absmax_i = code2[q_i] * absmax2[i / bs2] + offset.
struct AbsmaxState {
  at::Tensor absmax;
  std::optional<at::Tensor> code2;
  std::optional<at::Tensor> absmax2;
  double offset = 0.0;
  int64_t blocksize2 = 256;
  bool nested() const { return code2.has_value(); }
};

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4: blocksize must be a power of two in 32..4096 (as bitsandbytes), got ", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t blocksize);
at::Tensor absmax_fp32_cpu(const AbsmaxState& s);
at::Tensor dequantize_cpu(const at::Tensor& codes, const AbsmaxState& s, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype);

}  // namespace lorax::nf4

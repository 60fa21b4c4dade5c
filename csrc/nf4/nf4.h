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

// The absmax state of an op call, checked: nested_code and nested_absmax come together, on the absmax's device,
// and the 8-bit code book has its 256 entries.
inline AbsmaxState make_absmax_state(const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                                     const std::optional<at::Tensor>& absmax2, double offset, int64_t blocksize2) {
  TORCH_CHECK(code2.has_value() == absmax2.has_value(),
              "nf4: a double-quantized absmax needs both nested_code and nested_absmax");
  if (code2) {
    TORCH_CHECK(code2->numel() == 256, "nf4: nested_code must have 256 entries, got ", code2->numel());
    TORCH_CHECK(code2->device() == absmax.device() && absmax2->device() == absmax.device(),
                "nf4: absmax, nested_code and nested_absmax must be on one device");
  }
  return AbsmaxState{absmax, code2, absmax2, offset, blocksize2};
}

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4: blocksize must be a power of two in 32..4096 (as bitsandbytes), got ", blocksize);
}

// Sizes of an NF4 tensor: codes [ceil(numel / 2)] uint8, absmax [ceil(numel / blocksize)].
inline void check_nf4_sizes(const char* op, const at::Tensor& codes, int64_t absmax_numel, int64_t blocksize,
                            int64_t numel) {
  check_blocksize(blocksize);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(codes.numel() == (numel + 1) / 2, op, ": codes hold ", codes.numel() * 2, " values, the shape asks for ",
              numel);
  TORCH_CHECK(absmax_numel == (numel + blocksize - 1) / blocksize, op, ": ", absmax_numel, " absmax values for ",
              numel, " elements in blocks of ", blocksize);
}

// Arguments of the 8-bit absmax quantizer: fp32 values, a 256-entry fp32 code book, a positive blocksize.
inline void check_quantize_absmax_args(const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4_quantize_absmax: absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "nf4_quantize_absmax: code must be 256 float32 values, got ", code.numel(), " ", code.scalar_type());
  TORCH_CHECK(absmax.device() == code.device(), "nf4_quantize_absmax: absmax and code must be on one device");
  TORCH_CHECK(blocksize > 0, "nf4_quantize_absmax: blocksize must be positive, got ", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t blocksize);
at::Tensor absmax_fp32_cpu(const AbsmaxState& s);
at::Tensor dequantize_cpu(const at::Tensor& codes, const AbsmaxState& s, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype);

}  // namespace lorax::nf4

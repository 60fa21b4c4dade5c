// Activation dtypes as the CUDA launchers see them (no ATen here, so .cu files stay light), and the conversion
// from at::ScalarType for the host-side wrappers.
#pragma once

namespace lorax {

enum class DType { kFloat, kHalf, kBFloat16 };

}  // namespace lorax

#if defined(LORAX_DTYPE_FROM_ATEN)
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace lorax {

inline DType kernel_dtype(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kFloat;
    case c10::ScalarType::Half: return DType::kHalf;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", t, "; use float32, float16 or bfloat16");
  }
}

}  // namespace lorax
#endif

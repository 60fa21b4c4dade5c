// Input checks shared by every op: one line per argument, with a shape comment beside it at the call site.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>

#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(d, x) TORCH_CHECK((x).dim() == (d), #x " must be " #d "-D, got ", (x).dim(), "-D")
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device: ", (x).device(), " vs ", (y).device())
#define CHECK_FLOAT_INPUT(x)                                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                             \
                  (x).scalar_type() == at::kBFloat16,                                                          \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

// log2 of a power of two (kernels shift instead of dividing).
inline int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, what, " must be a power of two, got ", v);
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

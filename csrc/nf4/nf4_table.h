// The NF4 code book of bitsandbytes (QLoRA), the exact float32 values, and the quantization bounds.
#pragma once

#if !defined(__CUDACC__)
#include <cmath>
#endif

#if defined(__CUDACC__)
#define LORAX_HD __host__ __device__
#define LORAX_UNROLL _Pragma("unroll")
#else
#define LORAX_HD
#define LORAX_UNROLL
#endif

namespace lorax::nf4 {

constexpr int kNumCodes = 16;
constexpr int kZeroCode = 7;  // the code of 0.0, used to pad an odd element count
// The most parts with their own offset in one double-quantized absmax (AbsmaxState in nf4.h): a fused q | k | v
// projection has three.
constexpr int kMaxAbsmaxParts = 3;

// bitsandbytes.functional.get_4bit_type("nf4"), as float32.
#define LORAX_NF4_VALUES                                                                                       \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,            \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,             \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, \
   1.0f}

// Code of a value already scaled into [-1, 1]: the number of midpoints strictly below it, which is what
// bitsandbytes' torch.bucketize(scaled, midpoints) returns (a value on a midpoint takes the lower code).
template <typename Table>
LORAX_HD inline int nearest_code(float v, const Table& table) {
  int code = 0;
  LORAX_UNROLL
  for (int i = 0; i < kNumCodes - 1; ++i) {
    float mid = (table[i] + table[i + 1]) / 2.0f;
    code += mid < v ? 1 : 0;
  }
  return code;
}

}  // namespace lorax::nf4

namespace lorax::nf4 {

// bitsandbytes' CPU 8-bit blockwise quantizer (used for the double-quantized absmax) does not search the code
// book with the scaled value itself: it rounds the value onto a grid of 65536 points over [-1, 1] and takes the
// code of that grid point (the count of code midpoints strictly below it). We reproduce that byte for byte.
constexpr int kGridPoints = 65536;

// Grid index of a value in [-1, 1]: trunc(fma((v + 1) / 2, 65535, 0.5)), one rounding in the fma.
LORAX_HD inline int grid_index(float v) {
  float t = (v + 1.0f) * 0.5f;
#if defined(__CUDA_ARCH__)
  float g = __fmaf_rn(t, 65535.0f, 0.5f);
#else
  float g = std::fma(t, 65535.0f, 0.5f);
#endif
  return static_cast<int>(g) & 0xFFFF;
}

// The grid point itself: 2i / 65535 - 1, rounded as bitsandbytes computes it.
LORAX_HD inline float grid_value(int i) {
  float two_i = static_cast<float>(i) + static_cast<float>(i);
  return two_i / 65535.0f - 1.0f;
}

// Code of value v (already scaled by 1/absmax and clamped to [-1, 1]) in a sorted 256-entry code book whose
// 255 midpoints `mids[j] = (code[j] + code[j+1]) * 0.5` are given: the number of midpoints below the grid point.
LORAX_HD inline int code_on_grid(float v, const float* mids) {
  float g = grid_value(grid_index(v));
  int lo = 0, hi = 255;  // first j with mids[j] >= g, or 255
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (mids[mid] < g) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace lorax::nf4

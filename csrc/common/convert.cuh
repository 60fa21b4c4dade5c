// float <-> activation dtype conversions for CUDA kernels (round to nearest even), and the DType -> CUDA type
// dispatch of their launchers; shared by every kernel family.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"

namespace lorax {

// Calls f(T{}) with T the CUDA type of dtype (float, __half or __nv_bfloat16): the one switch from a launcher's
// DType to its kernels' template argument.
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

// Round to T and back: the roundings transformers' eager code makes between ops.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<T>(v));
}

// SwiGLU's T(T(silu(g)) * u) for g and u already in T (layers.h): the silu_mul op and the NF4 GEMV's epilogue.
template <typename T>
__device__ __forceinline__ T silu_mul_rounded(float g, float u) {
  const float silu = rounded<T>(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
  return from_float<T>(__fmul_rn(silu, u));
}

// Rotary embedding of one element of a pair (layers.h), inputs already in T: x[i] (second = false) or x[i + D/2]
// (second) from its own value `self`, its partner's `other` and the position's c = cos, s = sin at its index:
// T(T(self c) - T(other s)) or T(T(self c) + T(other s)). The rotary kernels and the NF4 GEMV's epilogue.
template <typename T>
__device__ __forceinline__ T rotary_rounded(float self, float other, float c, float s, bool second) {
  const float a = rounded<T>(__fmul_rn(self, c)), b = rounded<T>(__fmul_rn(other, s));
  return from_float<T>(second ? __fadd_rn(a, b) : __fsub_rn(a, b));
}

}  // namespace lorax

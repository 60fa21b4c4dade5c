// float <-> activation dtype conversions for CUDA kernels (round to nearest even), shared by every kernel family.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lorax {

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

}  // namespace lorax

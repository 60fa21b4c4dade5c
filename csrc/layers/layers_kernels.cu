// Fused layer op CUDA kernels. Each is one pass over its rows: RMSNorm a CTA per row (a block-wide sum of
// squares, then the scaled write), rotary a CTA per token (a thread per (head, pair of elements) of q and k;
// with a KV cache, the rotated k and v go to the token's slot too), silu_mul a grid over rows x column chunks.
// The roundings of layers.h are spelled out with the _rn intrinsics so that nvcc does not contract them into
// FMAs: rotary is bit-identical to the CPU kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/convert.cuh"
#include "common/launch.cuh"
#include "common/warp.cuh"
#include "layers/layers_cuda.h"

namespace lorax::layers::cuda {
namespace {

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                int64_t residual_stride, const T* __restrict__ weight, T* __restrict__ out,
                                T* __restrict__ sum, int cols, float eps) {
  pdl_prologue();
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  const T* rr = residual != nullptr ? residual + row * residual_stride : nullptr;
  // the value normalized: x, or T(x + residual) (recomputed in the second pass rather than read back from sum,
  // which this kernel writes: no read-after-write through the read-only path)
  auto value = [&](int i) {
    return rr != nullptr ? rounded<T>(__fadd_rn(to_float(xr[i]), to_float(rr[i]))) : to_float(xr[i]);
  };
  float sq = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = value(i);
    if (rr != nullptr) sum[row * cols + i] = from_float<T>(v);
    sq += v * v;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq) / static_cast<float>(cols) + eps);  // IEEE sqrt and division
  T* o = out + row * cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x)
    o[i] = from_float<T>(__fmul_rn(to_float(weight[i]), rounded<T>(__fmul_rn(value(i), inv))));
}

template <typename T>
__global__ void rotary_kernel(Rotating q, Rotating k, const T* __restrict__ cos, const T* __restrict__ sin,
                              const int64_t* __restrict__ positions, int half, KvWrite kv) {
  pdl_prologue();
  const int64_t t = blockIdx.x;
  const T* c = cos + positions[t] * 2 * half;
  const T* s = sin + positions[t] * 2 * half;
  const int64_t pairs = (q.heads + k.heads) * half;
  const int64_t slot = kv.k_cache != nullptr ? kv.slot_mapping[t] : -1;
  const int64_t row = k.heads * 2 * half;  // elements of a cache slot
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t h = p / half;
    const int i = static_cast<int>(p % half);
    const bool is_q = h < q.heads;
    const Rotating& r = is_q ? q : k;
    T* v = static_cast<T*>(r.data) + t * r.token_stride + (is_q ? h : h - q.heads) * r.head_stride;
    const float x1 = to_float(v[i]), x2 = to_float(v[i + half]);
    const T lo = rotary_rounded<T>(x1, x2, to_float(c[i]), to_float(s[i]), false);
    const T hi = rotary_rounded<T>(x2, x1, to_float(c[i + half]), to_float(s[i + half]), true);
    v[i] = lo;
    v[i + half] = hi;
    if (!is_q && slot >= 0) {
      T* cached = static_cast<T*>(kv.k_cache) + slot * row + (h - q.heads) * 2 * half;
      cached[i] = lo;
      cached[i + half] = hi;
    }
  }
  if (slot < 0) return;
  const T* vt = static_cast<const T*>(kv.v.data) + t * kv.v.token_stride;
  T* cached = static_cast<T*>(kv.v_cache) + slot * row;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x)
    cached[e] = vt[e / (2 * half) * kv.v.head_stride + e % (2 * half)];
}

constexpr int kSiluThreads = 256, kSiluPerThread = 4;

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate, int64_t gate_stride, const T* __restrict__ up,
                                int64_t up_stride, T* __restrict__ out, int64_t cols) {
  pdl_prologue();
  const int64_t row = blockIdx.x;
  const T* g = gate + row * gate_stride;
  const T* u = up + row * up_stride;
  T* o = out + row * cols;
  const int64_t first = int64_t{blockIdx.y} * kSiluThreads * kSiluPerThread + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kSiluPerThread; ++j) {
    const int64_t i = first + j * kSiluThreads;
    if (i < cols) o[i] = silu_mul_rounded<T>(to_float(g[i]), to_float(u[i]));
  }
}

template <typename T>
void launch_rms_norm(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                     const void* weight, void* out, void* sum, int64_t rows, int64_t cols, float eps,
                     cudaStream_t stream) {
  if (rows == 0) return;
  // about eight elements per thread, whole warps, at most 1024 threads
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (cols / 8 + 31) / 32 * 32)));
  launch(rms_norm_kernel<T>, static_cast<unsigned>(rows), threads, 0, stream, static_cast<const T*>(x), x_stride,
         static_cast<const T*>(residual), residual_stride, static_cast<const T*>(weight), static_cast<T*>(out),
         static_cast<T*>(sum), static_cast<int>(cols), eps);
}

template <typename T>
void launch_rotary(Rotating q, Rotating k, const void* cos, const void* sin, const int64_t* positions, int64_t tokens,
                   int64_t head_dim, const KvWrite& kv, cudaStream_t stream) {
  const int64_t pairs = (q.heads + k.heads) * head_dim / 2;
  if (tokens == 0 || pairs == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(512, (pairs + 31) / 32 * 32));
  launch(rotary_kernel<T>, static_cast<unsigned>(tokens), threads, 0, stream, q, k, static_cast<const T*>(cos),
         static_cast<const T*>(sin), positions, static_cast<int>(head_dim / 2), kv);
}

template <typename T>
void launch_silu_mul(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out,
                     int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>((cols + kSiluThreads * kSiluPerThread - 1) / (kSiluThreads * kSiluPerThread)));
  launch(silu_mul_kernel<T>, grid, kSiluThreads, 0, stream, static_cast<const T*>(gate), gate_stride,
         static_cast<const T*>(up), up_stride, static_cast<T*>(out), cols);
}

}  // namespace

void rms_norm(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride, const void* weight,
              void* out, void* sum, int64_t rows, int64_t cols, float eps, DType dtype, cudaStream_t stream) {
  with_dtype(dtype, [&](auto t) {
    launch_rms_norm<decltype(t)>(x, x_stride, residual, residual_stride, weight, out, sum, rows, cols, eps, stream);
  });
}

void rotary_embedding(Rotating q, Rotating k, const void* cos, const void* sin, const int64_t* positions,
                      int64_t tokens, int64_t head_dim, KvWrite kv, DType dtype, cudaStream_t stream) {
  with_dtype(dtype, [&](auto t) {
    launch_rotary<decltype(t)>(q, k, cos, sin, positions, tokens, head_dim, kv, stream);
  });
}

void silu_mul(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out, int64_t rows,
              int64_t cols, DType dtype, cudaStream_t stream) {
  with_dtype(dtype, [&](auto t) {
    launch_silu_mul<decltype(t)>(gate, gate_stride, up, up_stride, out, rows, cols, stream);
  });
}

}  // namespace lorax::layers::cuda

// SGMV / BGMV CUDA kernels over the paged adapter pool. Correct-first versions: one CTA per (group, rank row)
// for shrink and per (group, 256 outputs) for expand, tokens in tiles of kTile so that each CTA reads its slice
// of the adapter's weights once per tile of tokens, with fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora/lora_cuda.h"

namespace lorax::lora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 8;      // tokens per pass
constexpr int kTokenSplit = 8;  // CTAs sharing one group's tokens (grid z)

__device__ __forceinline__ int64_t layer_module(const Pool& p, int64_t adapter) {
  return (adapter * p.layers + p.layer) * p.modules + p.module;
}

__device__ __forceinline__ const int32_t* row_pages(const Pool& p, int64_t adapter, int ab, int64_t row) {
  return p.page_table + ((layer_module(p, adapter) * 2 + ab) * p.max_rank_table + row) * p.chunks;
}

__device__ __forceinline__ int64_t token_at(const TokenGroups& g, int64_t pos) { return g.order ? g.order[pos] : pos; }

template <typename T>
__global__ void shrink_kernel(const T* __restrict__ x, int64_t in, Pool p, TokenGroups g, float* __restrict__ v,
                              int64_t max_rank) {
  __shared__ float partial[kThreads / 32][kTile];
  const int64_t gi = blockIdx.x, row = blockIdx.y;
  const int adapter = g.adapters[gi];
  if (adapter < 0 || row >= p.ranks[layer_module(p, adapter)]) return;
  const int32_t* pages = row_pages(p, adapter, 0, row);
  const T* arena = static_cast<const T*>(p.arena);
  const int64_t page = int64_t{1} << p.page_log2, begin = g.starts[gi], end = g.starts[gi + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t t0 = begin + int64_t{blockIdx.z} * kTile; t0 < end; t0 += int64_t{gridDim.z} * kTile) {
    int64_t tok[kTile];
#pragma unroll
    for (int j = 0; j < kTile; ++j) tok[j] = t0 + j < end ? token_at(g, t0 + j) : -1;
    float acc[kTile] = {};
    for (int64_t k = threadIdx.x; k < in; k += kThreads) {
      const float w = static_cast<float>(arena[int64_t{pages[k >> p.page_log2]} * page + (k & (page - 1))]);
#pragma unroll
      for (int j = 0; j < kTile; ++j)
        if (tok[j] >= 0) acc[j] += static_cast<float>(x[tok[j] * in + k]) * w;
    }
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float s = acc[j];
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) partial[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < kTile && tok[threadIdx.x] >= 0) {
      float s = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) s += partial[w][threadIdx.x];
      v[tok[threadIdx.x] * max_rank + row] = s;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void expand_kernel(T* __restrict__ y, int64_t out, const float* __restrict__ v, int64_t max_rank, Pool p,
                              const float* __restrict__ scales, TokenGroups g) {
  const int64_t gi = blockIdx.x, o = int64_t{blockIdx.y} * kThreads + threadIdx.x;
  const int adapter = g.adapters[gi];
  if (adapter < 0 || o >= out) return;
  const int rank = p.ranks[layer_module(p, adapter)];
  const float scale = scales[adapter];
  const T* arena = static_cast<const T*>(p.arena);
  const int64_t page = int64_t{1} << p.page_log2, chunk = o >> p.page_log2, in_page = o & (page - 1);
  const int64_t begin = g.starts[gi], end = g.starts[gi + 1];
  for (int64_t t0 = begin + int64_t{blockIdx.z} * kTile; t0 < end; t0 += int64_t{gridDim.z} * kTile) {
    int64_t tok[kTile];
#pragma unroll
    for (int j = 0; j < kTile; ++j) tok[j] = t0 + j < end ? token_at(g, t0 + j) : -1;
    float acc[kTile] = {};
    for (int i = 0; i < rank; ++i) {
      const float w = static_cast<float>(arena[int64_t{row_pages(p, adapter, 1, i)[chunk]} * page + in_page]);
#pragma unroll
      for (int j = 0; j < kTile; ++j)
        if (tok[j] >= 0) acc[j] += v[tok[j] * max_rank + i] * w;
    }
#pragma unroll
    for (int j = 0; j < kTile; ++j)
      if (tok[j] >= 0) {
        T& dst = y[tok[j] * out + o];
        dst = static_cast<T>(static_cast<float>(dst) + scale * acc[j]);
      }
  }
}

template <typename T>
void launch_shrink(const void* x, int64_t in, const Pool& p, const TokenGroups& g, float* v, int64_t max_rank,
                   cudaStream_t stream) {
  dim3 grid(g.count, max_rank, kTokenSplit);
  shrink_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), in, p, g, v, max_rank);
}

template <typename T>
void launch_expand(void* y, int64_t out, const float* v, int64_t max_rank, const Pool& p, const float* scales,
                   const TokenGroups& g, cudaStream_t stream) {
  dim3 grid(g.count, (out + kThreads - 1) / kThreads, kTokenSplit);
  expand_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(y), out, v, max_rank, p, scales, g);
}

}  // namespace

void shrink(const void* x, DType dtype, int64_t tokens, int64_t in, const Pool& p, const TokenGroups& g, float* v,
            int64_t max_rank, cudaStream_t stream) {
  if (tokens == 0 || g.count == 0) return;
  switch (dtype) {
    case DType::kFloat: return launch_shrink<float>(x, in, p, g, v, max_rank, stream);
    case DType::kHalf: return launch_shrink<__half>(x, in, p, g, v, max_rank, stream);
    case DType::kBFloat16: return launch_shrink<__nv_bfloat16>(x, in, p, g, v, max_rank, stream);
  }
}

void expand(void* y, DType dtype, int64_t tokens, int64_t out, const float* v, int64_t max_rank, const Pool& p,
            const float* scales, const TokenGroups& g, cudaStream_t stream) {
  if (tokens == 0 || g.count == 0) return;
  switch (dtype) {
    case DType::kFloat: return launch_expand<float>(y, out, v, max_rank, p, scales, g, stream);
    case DType::kHalf: return launch_expand<__half>(y, out, v, max_rank, p, scales, g, stream);
    case DType::kBFloat16: return launch_expand<__nv_bfloat16>(y, out, v, max_rank, p, scales, g, stream);
  }
}

}  // namespace lorax::lora::cuda

// Paged KV cache CUDA kernels. Decode attention is a correct-first single-pass kernel: one CTA per (head,
// sequence), each warp walks every 4th position with an online softmax (running max, sum and the weighted sum
// of values in registers, head_dim spread over the lanes), and the warps are merged in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_cuda.h"
#include "common/convert.cuh"

namespace lorax::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

template <typename T>
__global__ void kv_cache_write_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                                      const T* __restrict__ v, const int64_t* __restrict__ slot_mapping, int64_t row) {
  const int64_t t = blockIdx.x, slot = slot_mapping[t];
  if (slot < 0) return;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    k_cache[slot * row + i] = k[t * row + i];
    v_cache[slot * row + i] = v[t * row + i];
  }
}

template <typename T>
__global__ void decode_kernel(const T* __restrict__ q, T* __restrict__ out, Cache c, const int32_t* __restrict__ tables,
                              int64_t max_blocks, const int32_t* __restrict__ lens, float scale, int64_t window) {
  __shared__ float warp_max[kWarps], warp_sum[kWarps];
  __shared__ float warp_acc[kWarps][kMaxPerLane * 32];
  const int64_t h = blockIdx.x, b = blockIdx.y, heads = gridDim.x, D = c.head_dim;
  const int64_t kv_head = h / (heads / c.kv_heads), token_stride = c.kv_heads * D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t len = min(int64_t{lens[b]}, max_blocks * c.block_size);
  const int64_t first = window > 0 && len > window ? len - window : 0;
  const T* kc = static_cast<const T*>(c.k);
  const T* vc = static_cast<const T*>(c.v);
  const int32_t* table = tables + b * max_blocks;

  float qr[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    qr[i] = d < D ? to_float(q[(b * heads + h) * D + d]) * scale : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t pos = first + warp; pos < len; pos += kWarps) {
    const int64_t base = (int64_t{table[pos / c.block_size]} * c.block_size + pos % c.block_size) * token_stride +
                         kv_head * D;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) s += qr[i] * to_float(kc[base + d]);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s), corr = __expf(m - m_new), p = __expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      acc[i] = acc[i] * corr + (d < D ? p * to_float(vc[base + d]) : 0.0f);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, warp_max[w]);
  float total_sum = 0.0f;
  for (int w = 0; w < kWarps; ++w)
    if (warp_sum[w] > 0.0f) total_sum += warp_sum[w] * __expf(warp_max[w] - total_max);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (warp_sum[w] > 0.0f) o += warp_acc[w][d] * __expf(warp_max[w] - total_max);
    out[(b * heads + h) * D + d] = from_float<T>(total_sum > 0.0f ? o / total_sum : 0.0f);
  }
}

template <typename T>
void launch_write(void* kc, void* vc, const void* k, const void* v, const int64_t* slots, int64_t tokens, int64_t row,
                  cudaStream_t stream) {
  if (tokens == 0) return;
  kv_cache_write_kernel<T><<<tokens, 128, 0, stream>>>(static_cast<T*>(kc), static_cast<T*>(vc),
                                                       static_cast<const T*>(k), static_cast<const T*>(v), slots, row);
}

template <typename T>
void launch_decode(const void* q, void* out, const Cache& c, const int32_t* tables, int64_t max_blocks,
                   const int32_t* lens, int64_t batch, int64_t heads, float scale, int64_t window, cudaStream_t stream) {
  if (batch == 0) return;
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  decode_kernel<T><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(q), static_cast<T*>(out), c, tables,
                                                     max_blocks, lens, scale, window);
}

}  // namespace

void kv_cache_write(void* k_cache, void* v_cache, const void* k, const void* v, const int64_t* slot_mapping,
                    int64_t tokens, int64_t row, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_write<float>(k_cache, v_cache, k, v, slot_mapping, tokens, row, stream);
    case DType::kHalf: return launch_write<__half>(k_cache, v_cache, k, v, slot_mapping, tokens, row, stream);
    case DType::kBFloat16:
      return launch_write<__nv_bfloat16>(k_cache, v_cache, k, v, slot_mapping, tokens, row, stream);
  }
}

void paged_attention_decode(const void* q, void* out, const Cache& c, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* context_lens, int64_t batch, int64_t heads, float scale, int64_t window,
                            DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat:
      return launch_decode<float>(q, out, c, block_tables, max_blocks, context_lens, batch, heads, scale, window, stream);
    case DType::kHalf:
      return launch_decode<__half>(q, out, c, block_tables, max_blocks, context_lens, batch, heads, scale, window,
                                   stream);
    case DType::kBFloat16:
      return launch_decode<__nv_bfloat16>(q, out, c, block_tables, max_blocks, context_lens, batch, heads, scale,
                                          window, stream);
  }
}

}  // namespace lorax::attention::cuda

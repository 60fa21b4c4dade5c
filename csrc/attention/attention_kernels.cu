// Paged KV cache CUDA kernels.
//
// Decode attention (split_kernel + combine_kernel, flash-decoding style): one CTA per (kv head, sequence, split)
// serves all the query heads of its GQA group, so each K and V row is read once. A split walks chunks of CHUNK
// positions (chunk split, split + S, ...). Per chunk: (1) TPP threads per position, 16 bytes each, score every
// position of the chunk at once (all table, K and V loads issued before any arithmetic); (2) one warp per head takes
// the chunk's max and exponentials (online softmax across chunks); (3) the same threads accumulate p * V in
// registers. The position groups are summed in shared memory, in a fixed order; with S > 1 splits, each writes
// its (max, sum, unnormalised output), and the last of a (sequence, kv head)'s CTAs to finish merges them (it
// counts them in with an atomic on a counter that it then puts back to zero), or without counters
// combine_kernel does. S depends on the batch and the block-table width only, not the context lengths, so a CUDA
// graph captured once stays right; the splits that a shorter context does not reach leave at once, and only the
// ones that walked a chunk are merged (one alone writes the output itself). Head sizes that 16-byte loads do
// not tile (or GQA groups over 8) take general_kernel: one CTA per (head, sequence), a warp per position.
// With an OutputShrink, the CTA that writes a (sequence, kv head)'s output also multiplies it by its columns of the
// sequence's adapter's A rows (o_proj's LoRA shrink), and the last of the sequence's kv heads sums their shares: the
// shrink kernel that would start the o projection is gone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attention/attention_cuda.h"
#include "common/convert.cuh"
#include "common/launch.cuh"
#include "common/warp.cuh"
#include "lora/lora_device.cuh"

namespace lorax::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

template <typename T>
__global__ void kv_cache_write_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                                      const T* __restrict__ v, const int64_t* __restrict__ slot_mapping, int64_t row,
                                      int64_t k_stride, int64_t v_stride) {
  pdl_prologue();
  const int64_t t = blockIdx.x, slot = slot_mapping[t];
  if (slot < 0) return;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    k_cache[slot * row + i] = k[t * k_stride + i];
    v_cache[slot * row + i] = v[t * v_stride + i];
  }
}

template <typename T>
__global__ void general_kernel(const T* __restrict__ q, T* __restrict__ out, Cache c,
                               const int32_t* __restrict__ tables, int64_t max_blocks,
                               const int32_t* __restrict__ lens, float scale, int64_t window) {
  pdl_prologue();
  __shared__ float max_w[kWarps], sum_w[kWarps];
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
    s = warp_sum(s);
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
    max_w[warp] = m;
    sum_w[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, max_w[w]);
  float total_sum = 0.0f;
  for (int w = 0; w < kWarps; ++w)
    if (sum_w[w] > 0.0f) total_sum += sum_w[w] * __expf(max_w[w] - total_max);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (sum_w[w] > 0.0f) o += warp_acc[w][d] * __expf(max_w[w] - total_max);
    out[(b * heads + h) * D + d] = from_float<T>(total_sum > 0.0f ? o / total_sum : 0.0f);
  }
}

template <typename T>
void launch_write(void* kc, void* vc, const void* k, const void* v, const int64_t* slots, int64_t tokens, int64_t row,
                  int64_t k_stride, int64_t v_stride, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(kv_cache_write_kernel<T>, tokens, 128, 0, stream, static_cast<T*>(kc), static_cast<T*>(vc),
         static_cast<const T*>(k), static_cast<const T*>(v), slots, row, k_stride, v_stride);
}

constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;  // query heads per kv head served by split_kernel
constexpr int kPasses = 8;    // positions per thread per chunk: CHUNK = kPasses * kThreads / TPP

// Split partials: per (sequence, head, split) a running max, a sum of exponentials and D unnormalised outputs.
struct Partials {
  float* max;
  float* sum;
  float* acc;
};

// The largest running max of the first `walked` splits of (sequence, head) bh (of `splits` in the partials' layout)
// that saw a position. Loads bypass L1 (here and in merged): in split_kernel's last CTA they read what other CTAs
// wrote during the same kernel.
// Every load is unconditional (a select, not a branch, skips a split without positions), so the splits' loads are
// all in flight at once rather than one L2 round trip after another.
__device__ __forceinline__ float split_top(const Partials& part, int64_t bh, int64_t splits, int64_t walked) {
  float top = -INFINITY;
#pragma unroll 4
  for (int64_t s = 0; s < walked; ++s) {
    const float l = __ldcg(part.sum + bh * splits + s), m = __ldcg(part.max + bh * splits + s);
    top = l > 0.0f ? fmaxf(top, m) : top;
  }
  return top;
}

// Output element d of (sequence, head) bh from its splits: sum_s e^(m_s - top) acc_s / sum_s e^(m_s - top) l_s.
__device__ __forceinline__ float merged(const Partials& part, int64_t bh, int64_t splits, int64_t walked, int64_t D,
                                        int64_t d, float top) {
  float num = 0.0f, den = 0.0f;
#pragma unroll 4
  for (int64_t s = 0; s < walked; ++s) {
    const float l = __ldcg(part.sum + bh * splits + s), m = __ldcg(part.max + bh * splits + s);
    const float acc = __ldcg(part.acc + (bh * splits + s) * D + d);
    const float w = l > 0.0f ? __expf(m - top) : 0.0f;
    num += w * acc;
    den += w * l;
  }
  return den > 0.0f ? num / den : 0.0f;
}

// How many splits of a context walk a chunk: chunks first / chunk .. ceil(len / chunk) - 1 go to splits 0, 1, ...
// in turn. At least one, so that an empty context still gets its zeros written.
__device__ __forceinline__ int64_t walked_splits(int64_t len, int64_t first, int64_t chunk, int64_t splits) {
  return max(int64_t{1}, min(splits, (len + chunk - 1) / chunk - first / chunk));
}

// ---- OutputShrink: decode attention's output times the LoRA A rows of the projection that reads it ----

struct ShrinkRow {
  int adapter, rank;  // sequence b's pool slot (-1: none) and its rank at the projection (0: nothing to shrink)
};

__device__ __forceinline__ ShrinkRow shrink_row(const OutputShrink& s, int64_t b) {
  const int a = lora::cuda::segment_adapter(s.seg_starts, s.seg_slots, s.segments, s.pool.slots, b);
  return {a, min(lora::cuda::adapter_rank(s.pool, a), static_cast<int>(s.pool.max_rank_table))};
}

// Asks L2 for sequence b's A rows over columns [c0, c0 + width) (a kv head's query heads): which of the kv head's
// splits will read them (the last to finish) is not known yet, so the first asks, as the splits start. (Inlined
// here and below: as functions, they took a 136-byte stack frame for OutputShrink's copy, and no fewer registers.)
template <typename T>
__device__ __forceinline__ void prefetch_output_shrink(const OutputShrink& s, int64_t b, int64_t c0, int width) {
  const ShrinkRow row = shrink_row(s, b);
  const int step = min(128 / static_cast<int>(sizeof(T)), 1 << s.pool.page_log2);  // a line, inside one page
  const int lines = (width + step - 1) / step;
  const int64_t mask = (int64_t{1} << s.pool.page_log2) - 1;
  const T* arena = static_cast<const T*>(s.pool.arena);
  for (int i = threadIdx.x; i < row.rank * lines; i += blockDim.x) {
    const int64_t c = c0 + int64_t{i % lines} * step;
    const int64_t page = lora::cuda::row_pages(s.pool, row.adapter, 0, i / lines)[c >> s.pool.page_log2];
    prefetch_l2(arena + (page << s.pool.page_log2) + (c & mask));
  }
}

// For the CTA that wrote the output of (sequence b, kv head kvh): o[h * D + d] (shared memory) holds its `group`
// heads' values as written (rounded to T), columns [c0, c0 + width) of out[b] flattened, c0 = kvh * width. Adds their
// share of v[b] = out[b] @ A.T to s.shares; the last of the sequence's kv heads to get there sums the shares in kv
// head order into v[b] (CUDA's threadFenceReduction pattern, as the splits merge). A warp per A row, 16 bytes a
// lane (inside one page: pages of at least 16 bytes).
template <typename T>
__device__ __forceinline__ void output_shrink(const OutputShrink& s, const float* o, int64_t b, int64_t kvh,
                                              int64_t kv_heads, int width) {
  constexpr int VEC = 16 / sizeof(T);
  const ShrinkRow row = shrink_row(s, b);
  const int64_t R = s.pool.max_rank_table;
  float* v = s.v + b * R;
  if (row.rank == 0) {  // every kv head's CTA sees it: the first writes the zeros, and none counts in
    if (kvh == 0)
      for (int64_t j = threadIdx.x; j < R; j += blockDim.x) v[j] = 0.0f;
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t c0 = kvh * width, mask = (int64_t{1} << s.pool.page_log2) - 1;
  const T* arena = static_cast<const T*>(s.pool.arena);
  for (int j = warp; j < row.rank; j += warps) {
    const int32_t* pages = lora::cuda::row_pages(s.pool, row.adapter, 0, j);
    float sum = 0.0f;
    for (int i = lane * VEC; i < width; i += 32 * VEC) {
      const int64_t c = c0 + i;
      const T* at = arena + (int64_t{pages[c >> s.pool.page_log2]} << s.pool.page_log2) + (c & mask);
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(at));
      const T* a = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum = fmaf(o[i + e], to_float(a[e]), sum);
    }
    sum = warp_sum(sum);
    if (lane == 0) s.shares[(b * kv_heads + kvh) * R + j] = sum;
  }
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* arrived = s.counters + b;
    last = atomicAdd(arrived, 1) == kv_heads - 1;
    if (last) *arrived = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) {
    float sum = 0.0f;
    if (j < row.rank)
      for (int64_t k = 0; k < kv_heads; ++k) sum += __ldcg(s.shares + (b * kv_heads + k) * R + j);  // other CTAs'
    v[j] = sum;
  }
}

template <typename T, int TPP>
__global__ void __launch_bounds__(kThreads) split_kernel(const T* __restrict__ q, T* __restrict__ out, Cache c,
                                                         const int32_t* __restrict__ tables, int64_t max_blocks,
                                                         const int32_t* __restrict__ lens, int group, float scale,
                                                         int64_t window, Partials part, int32_t* counters,
                                                         OutputShrink shrink) {
  pdl_prologue();
  constexpr int VEC = 16 / sizeof(T), D = TPP * VEC, PPP = kThreads / TPP, CHUNK = PPP * kPasses;
  __shared__ float q_s[kMaxGroup][D];
  __shared__ float p_s[kMaxGroup][CHUNK];
  __shared__ float acc_s[kMaxGroup][D];
  __shared__ float max_s[kMaxGroup], sum_s[kMaxGroup], corr_s[kMaxGroup];
  const int64_t kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int64_t heads = c.kv_heads * group, h0 = kvh * group;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, t = tid % TPP, j = tid / TPP;
  const int64_t len = min(int64_t{lens[b]}, max_blocks * c.block_size);
  const int64_t first = window > 0 && len > window ? len - window : 0;
  const int32_t* table = tables + b * max_blocks;
  // S is sized for the longest context the block table holds; a split with no chunk of this one leaves at once,
  // and when one split walks them all it writes the output itself.
  const int64_t walked = walked_splits(len, first, CHUNK, splits);
  if (split >= walked) return;
  if (shrink.v != nullptr && split == 0) prefetch_output_shrink<T>(shrink, b, kvh * group * D, group * D);

  for (int i = tid; i < kMaxGroup * D; i += kThreads) {
    const int h = i / D, d = i % D;
    q_s[h][d] = h < group ? to_float(q[(b * heads + h0 + h) * D + d]) * scale : 0.0f;
    acc_s[h][d] = 0.0f;
  }
  if (tid < kMaxGroup) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }
  __syncthreads();

  float acc[kMaxGroup][VEC];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[h][v] = 0.0f;

  for (int64_t chunk = first / CHUNK + split; chunk * CHUNK < len; chunk += splits) {
    // (1) scores: the table entries, then every K row of the chunk, then the dot products
    int64_t row[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t pos = chunk * CHUNK + p * PPP + j;
      row[p] = pos >= first && pos < len
                   ? ((int64_t{table[pos / c.block_size]} * c.block_size + pos % c.block_size) * c.kv_heads + kvh) * D
                   : -1;
    }
    uint4 raw[kPasses], vals[kPasses];  // K and V rows, all asked for at once: one memory round trip a chunk
#pragma unroll
    for (int p = 0; p < kPasses; ++p)
      raw[p] = row[p] >= 0 ? *reinterpret_cast<const uint4*>(static_cast<const T*>(c.k) + row[p] + t * VEC)
                          : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int p = 0; p < kPasses; ++p)
      if (row[p] >= 0) vals[p] = *reinterpret_cast<const uint4*>(static_cast<const T*>(c.v) + row[p] + t * VEC);
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const T* k = reinterpret_cast<const T*>(&raw[p]);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= group) break;
        float s = 0.0f;
#pragma unroll
        for (int v = 0; v < VEC; ++v) s += q_s[h][t * VEC + v] * to_float(k[v]);
#pragma unroll
        for (int o = TPP / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (t == 0) p_s[h][p * PPP + j] = row[p] >= 0 ? s : -INFINITY;
      }
    }
    __syncthreads();
    // (2) online softmax across chunks: one warp per head
    for (int h = warp; h < group; h += kThreads / 32) {
      float m = -INFINITY;
      for (int i = lane; i < CHUNK; i += 32) m = fmaxf(m, p_s[h][i]);
      m = warp_max(m);
      const float m_new = fmaxf(max_s[h], m);  // finite: every chunk walked holds a position in [first, len)
      float l = 0.0f;
      for (int i = lane; i < CHUNK; i += 32) {
        const float e = __expf(p_s[h][i] - m_new);
        p_s[h][i] = e;
        l += e;
      }
      l = warp_sum(l);
      __syncwarp();
      if (lane == 0) {
        const float corr = __expf(max_s[h] - m_new);
        corr_s[h] = corr;
        sum_s[h] = sum_s[h] * corr + l;
        max_s[h] = m_new;
      }
    }
    // (3) values: this thread's VEC dimensions of every position it scored
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) break;
      const float corr = corr_s[h];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[h][v] *= corr;
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      if (row[p] < 0) continue;
      const T* val = reinterpret_cast<const T*>(&vals[p]);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= group) break;
        const float w = p_s[h][p * PPP + j];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[h][v] += w * to_float(val[v]);
      }
    }
    __syncthreads();  // p_s and corr_s are rewritten by the next chunk
  }

  // the position groups' partial outputs, summed in a fixed order (j = 0, 1, ...): the result does not depend on
  // which CTA or warp finishes first
  for (int jj = 0; jj < PPP; ++jj) {
    if (j == jj) {
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= group) break;
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc_s[h][t * VEC + v] += acc[h][v];
      }
    }
    __syncthreads();
  }
  for (int i = tid; i < group * D; i += kThreads) {
    const int h = i / D, d = i % D;
    const int64_t bh = b * heads + h0 + h;
    if (walked == 1) {
      const T value = from_float<T>(sum_s[h] > 0.0f ? acc_s[h][d] / sum_s[h] : 0.0f);
      out[bh * D + d] = value;
      acc_s[h][d] = to_float(value);  // (this thread's element alone) for the shrink
    } else {
      part.acc[(bh * splits + split) * D + d] = acc_s[h][d];
      if (d == 0) {
        part.max[bh * splits + split] = max_s[h];
        part.sum[bh * splits + split] = sum_s[h];
      }
    }
  }
  if (walked > 1) {
    if (counters == nullptr) return;  // (combine_kernel merges the splits)
    // The last CTA of this (sequence, kv head) to finish merges its splits (CUDA's threadFenceReduction pattern): a
    // CTA's partials are visible to the whole GPU before it counts itself in, and the last one puts the counter back
    // to zero for the next call once every split has arrived.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      int32_t* arrived = counters + b * c.kv_heads + kvh;
      last = atomicAdd(arrived, 1) == walked - 1;
      if (last) *arrived = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid < group) max_s[tid] = split_top(part, b * heads + h0 + tid, splits, walked);  // now each head's top
    __syncthreads();
    for (int i = tid; i < group * D; i += kThreads) {
      const int h = i / D, d = i % D;
      const T value = from_float<T>(merged(part, b * heads + h0 + h, splits, walked, D, d, max_s[h]));
      out[(b * heads + h0 + h) * D + d] = value;
      acc_s[h][d] = to_float(value);
    }
  }
  if (shrink.v != nullptr) {
    __syncthreads();  // every thread's output values are in acc_s
    output_shrink<T>(shrink, &acc_s[0][0], b, kvh, c.kv_heads, group * static_cast<int>(D));
  }
}

// Merges the splits of one (head, sequence): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// (A context that one split walks has its output from split_kernel already.)
template <typename T>
__global__ void combine_kernel(T* __restrict__ out, Partials part, int64_t splits, int64_t D,
                               const int32_t* __restrict__ lens, int64_t heads, int64_t max_positions, int64_t window,
                               int64_t chunk) {
  pdl_prologue();
  const int64_t bh = blockIdx.x;
  const int64_t len = min(int64_t{lens[bh / heads]}, max_positions);
  const int64_t walked = walked_splits(len, window > 0 && len > window ? len - window : 0, chunk, splits);
  if (walked == 1) return;
  const float top = split_top(part, bh, splits, walked);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    out[bh * D + d] = from_float<T>(merged(part, bh, splits, walked, D, d, top));
}

// Threads per position for split_kernel (16 bytes each), or 0 where general_kernel must run.
int split_tpp(const Cache& c, int64_t heads, int64_t elem) {
  const int64_t vec = 16 / elem, group = heads / c.kv_heads;
  if (group > kMaxGroup || c.head_dim % vec != 0) return 0;
  const int64_t tpp = c.head_dim / vec;
  const bool aligned = reinterpret_cast<uintptr_t>(c.k) % 16 == 0 && reinterpret_cast<uintptr_t>(c.v) % 16 == 0;
  return aligned && (tpp == 8 || tpp == 16 || tpp == 32) ? static_cast<int>(tpp) : 0;
}

template <typename T>
void launch_decode(const void* q, void* out, const Cache& c, const int32_t* tables, int64_t max_blocks,
                   const int32_t* lens, int64_t batch, int64_t heads, float scale, int64_t window, float* workspace,
                   int64_t splits, int32_t* counters, const OutputShrink* shrink, cudaStream_t stream) {
  if (batch == 0 || heads == 0) return;
  const int tpp = split_tpp(c, heads, sizeof(T));
  if (tpp == 0) {
    const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(batch));
    launch(general_kernel<T>, grid, kWarps * 32, 0, stream, static_cast<const T*>(q), static_cast<T*>(out), c, tables,
           max_blocks, lens, scale, window);
    return;
  }
  const int64_t rows = batch * heads;
  const Partials part{workspace, workspace + rows * splits, workspace + 2 * rows * splits};
  const dim3 grid(static_cast<unsigned>(c.kv_heads), static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  const int group = static_cast<int>(heads / c.kv_heads);
  auto run = [&](auto kernel) {
    launch(kernel, grid, kThreads, 0, stream, static_cast<const T*>(q), static_cast<T*>(out), c, tables, max_blocks,
           lens, group, scale, window, part, counters, shrink != nullptr ? *shrink : OutputShrink{});
  };
  if (tpp == 8) run(split_kernel<T, 8>);
  if (tpp == 16) run(split_kernel<T, 16>);
  if (tpp == 32) run(split_kernel<T, 32>);
  if (splits > 1 && counters == nullptr)
    launch(combine_kernel<T>, static_cast<unsigned>(rows), static_cast<unsigned>(std::min<int64_t>(c.head_dim, 256)), 0,
           stream, static_cast<T*>(out), part, splits, c.head_dim, lens, heads, max_blocks * c.block_size, window,
           int64_t{kThreads} / tpp * kPasses);
}

}  // namespace

void kv_cache_write(void* k_cache, void* v_cache, const void* k, const void* v, const int64_t* slot_mapping,
                    int64_t tokens, int64_t row, int64_t k_stride, int64_t v_stride, DType dtype,
                    cudaStream_t stream) {
  with_dtype(dtype, [&](auto t) {
    launch_write<decltype(t)>(k_cache, v_cache, k, v, slot_mapping, tokens, row, k_stride, v_stride, stream);
  });
}

int64_t decode_splits(const Cache& c, int64_t batch, int64_t heads, int64_t max_blocks, DType dtype, int num_sms) {
  const int64_t elem = dtype == DType::kFloat ? 4 : 2;
  const int tpp = split_tpp(c, heads, elem);
  if (tpp == 0 || batch == 0) return 1;
  const int64_t chunk = int64_t{kThreads} / tpp * kPasses;
  const int64_t chunks = (max_blocks * c.block_size + chunk - 1) / chunk;
  const int64_t ctas = batch * c.kv_heads, target = 2 * int64_t{num_sms};  // about two CTAs per SM
  return std::max<int64_t>(1, std::min(chunks, (target + ctas - 1) / ctas));
}

void paged_attention_decode(const void* q, void* out, const Cache& c, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* context_lens, int64_t batch, int64_t heads, float scale, int64_t window,
                            float* workspace, int64_t splits, int32_t* counters, const OutputShrink* shrink,
                            DType dtype, cudaStream_t stream) {
  with_dtype(dtype, [&](auto t) {
    launch_decode<decltype(t)>(q, out, c, block_tables, max_blocks, context_lens, batch, heads, scale, window,
                               workspace, splits, counters, shrink, stream);
  });
}

bool output_shrink_serves(const Cache& c, int64_t heads, DType dtype) {
  return split_tpp(c, heads, dtype == DType::kFloat ? 4 : 2) != 0;
}

}  // namespace lorax::attention::cuda

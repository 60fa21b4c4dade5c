// NF4 CUDA launchers: raw pointers and sizes only, so the .cu files need no ATen headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "lora/lora_cuda.h"
#include "nf4/nf4_table.h"

namespace lorax::nf4::cuda {

using lorax::DType;

// The absmax of an NF4 weight as the kernels read it (see AbsmaxState in nf4.h).
struct AbsmaxArgs {
  const void* absmax = nullptr;    // fp32 [blocks], or uint8 [blocks] when code2 is set
  const float* code2 = nullptr;    // [256] 8-bit code book of the double quantization, or null
  const float* absmax2 = nullptr;  // [ceil(blocks / blocksize2)]
  // Part j's offset; its nested blocks start at part_groups[j - 1] (unused parts: past every block).
  float offsets[kMaxAbsmaxParts] = {};
  uint32_t part_groups[kMaxAbsmaxParts - 1] = {0xFFFFFFFFu, 0xFFFFFFFFu};
  int blocksize2_log2 = 8;
};

void quantize(const float* x, int64_t n, int blocksize_log2, uint8_t* codes, float* absmax, cudaStream_t stream);
void quantize_absmax(const float* absmax, int64_t n, const float* code, int64_t blocksize, uint8_t* q,
                     float* absmax2, cudaStream_t stream);
void dequantize_absmax(const AbsmaxArgs& a, int64_t blocks, float* out, cudaStream_t stream);
void dequantize(const uint8_t* codes, const AbsmaxArgs& a, int blocksize_log2, int64_t n, DType dtype, void* out,
                cudaStream_t stream);

// y[M, N] = x[M, K] @ W[N, K].T (+ bias), W in NF4, for few rows of x: the GEMV for M <= kGemvMaxM (needs
// K % 32 == 0 and N * K < 2^31; it multiplies by the NF4 values rounded to x's dtype, then scales in fp32), a fused
// dequant + tensor-core GEMM up to kGemmMaxM (N % 16 == 0, K % 128 == 0; it rounds each scaled weight to x's
// dtype). Both need fp16 / bf16 x, and x and codes 16-byte aligned.
// On an H100 the GEMV on CUDA cores beat the GEMM's M = 8 tile only at M = 1: its work grew with each row of x
// (bench/RESULTS.md, 2026-11-24). The tensor-core GEMV looks each code byte up once for all rows of x, and has no
// split-K partials to sum in a second kernel, so it takes up to 8 rows (not yet timed on a GPU; tests read this
// line).
constexpr int64_t kGemvMaxM = 8;
constexpr int64_t kGemmMaxM = 32;  // above this, dequantize + cuBLAS was as fast on an H100
bool gemm_supported(int64_t M, int64_t N, int64_t K, DType dtype);
int64_t gemm_workspace_floats(int64_t M, int64_t N, int64_t K, int num_sms);
void gemm(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a,
          int blocksize_log2, int64_t N, const void* bias, float* workspace, int num_sms, void* y,
          cudaStream_t stream);

// The LoRA expand of each row m of x, added in the GEMV's epilogue: y[m, column[i] + o] += scales[a] *
// v[m, i * max_rank : i * max_rank + rank] . B_i[a][o, :], a = the adapter of the segment holding row m (none: no
// delta). v [rows, v_stride] is the shrink of x (lora::cuda::shrink). mods.column runs from 0 to N.
struct GemvLora {
  lora::cuda::Pool pool;
  lora::cuda::Modules mods;
  const float* v;
  int64_t v_stride;
  int64_t max_rank;
  const float* scales;
  const int32_t* seg_starts;  // [segments + 1]
  const int32_t* seg_slots;   // [segments]
  int64_t segments;
};

// Rotary embedding and the KV cache write of a fused q | k | v projection, in the GEMV's epilogue: its N outputs are
// q_heads heads of head_dim, then kv_heads of k, then kv_heads of v. Each row m of x is at positions[m]: q and k
// rotate as layers' rotary_embedding rounds (in y), and k and v also go to slot slots[m] of the caches (none when
// it is negative), as rotary_kv_cache_write does. head_dim is a power of two >= 16: a tile pairs 8 rows of a head's
// first half with their partners D/2 further.
struct GemvRope {
  const void* cos = nullptr;  // T [positions, head_dim]
  const void* sin = nullptr;
  const int64_t* positions = nullptr;  // [M]
  const int64_t* slots = nullptr;      // [M]
  void* k_cache = nullptr;             // T [cache slots, kv_heads * head_dim]
  void* v_cache = nullptr;
  int head_dim = 0;
  int q_heads = 0;
  int kv_heads = 0;
};
// The LoRA shrink of the SwiGLU output y' [M, N/2] for the projection that reads it next (the MLP's down), in the
// GEMV's epilogue: v[m, j] = y'[m] . A[a][j] for j < the adapter's rank at (pool.layer, pool.module), a = row m's
// adapter (GemvLora's segments), and zero past it and for rows without one. Each CTA sums its tiles' share in
// shared memory and writes it to partials; the last CTA to finish (counted on *counter, which it puts back to zero)
// sums them in CTA order: the result does not depend on which CTA finishes first. Needs page_size >= 8 (a tile's 8
// outputs are one 16-byte load of an A row) and max_rank <= kGemvShrinkMaxRank.
constexpr int kGemvShrinkMaxRank = 128;
constexpr int kGemvMaxCtasPerSm = 3;  // the GEMV's grid is at most this many CTAs an SM: partials has that many rows
struct GemvShrink {
  lora::cuda::Pool pool;  // module: the next projection's
  float* v;               // [M, pool.max_rank_table]
  float* partials;        // [num_sms * kGemvMaxCtasPerSm, M * pool.max_rank_table]
  int32_t* counter;       // zero, and left zero
};

// The GEMV (M <= kGemvMaxM rows of x: gemm_supported(M, N, K, dtype)) with its epilogue: + bias, + the LoRA delta
// when lora is not null, each output rounded once to x's dtype; with silu_mul (N even) the outputs g = y[:, :N/2]
// and u = y[:, N/2:] become y' [M, N/2] = T(T(silu(g)) * u), as layers' silu_mul rounds, and with shrink (not null;
// needs lora) GemvShrink's shrink of y'; with rope (not null, and not with silu_mul) GemvRope's rotary and cache
// write. num_sms sizes its grid.
void gemv(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a,
          int blocksize_log2, int64_t N, const void* bias, const GemvLora* lora, bool silu_mul, const GemvRope* rope,
          const GemvShrink* shrink, void* y, int num_sms, cudaStream_t stream);

// The GEMV's main loop for later launches (CUDA graphs keep what they captured); returns the previous setting.
// false (the default): each warp loads its next steps' codes and absmax into registers. true: the CTA's threads copy
// them (cp.async) into slots of shared memory two or three 1024-element stages ahead (nf4_kernels.cu). The same
// results bit for bit; which is faster is for an H100 to say (bench/RESULTS.md).
bool set_gemv_staging(bool staged);

}  // namespace lorax::nf4::cuda

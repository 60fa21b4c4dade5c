// LoRA CUDA launchers: raw pointers only (see lora.h for the pool layout and the token groups).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace lorax::lora::cuda {

using lorax::DType;

struct Pool {
  const void* arena;
  const int32_t* page_table;  // [slots, layers, modules, 2, max_rank, chunks]
  const int32_t* ranks;       // [slots, layers, modules]
  int64_t slots, layers, modules, max_rank_table, chunks;
  int64_t layer, module;  // module: set per CTA from Modules
  int page_log2;
};

constexpr int kModulesPerCall = 4;

// The modules of one call (a fused projection's parts, which share x) and, for expand, where each one's output
// columns are in y: module i adds into y[:, column[i] : column[i + 1]].
struct Modules {
  int64_t index[kModulesPerCall];
  int64_t column[kModulesPerCall + 1];
  int count;
};

// Groups of tokens sharing an adapter. starts == null: group k is token k alone (G = T, adapters = per-token
// adapter indices, order null).
struct TokenGroups {
  const int32_t* starts;    // [G + 1]; the kernels clamp each group to positions [0, tokens)
  const int32_t* adapters;  // [G], -1 = none (as is any index outside [0, slots))
  const int32_t* order;     // [T] or null (identity)
  int64_t count;            // G
  int64_t tokens;           // T
};

// BGMV calls of at most this many tokens skip the grouping: each token is its own group (TokenGroups).
constexpr int64_t kPerTokenMaxTokens = 64;

// BGMV's grouping in one kernel: tokens bucketed by adapter index (-1 and indices outside [0, slots) = none).
// Writes starts [slots + 2], adapters [slots + 1] (= -1 .. slots - 1) and order [T]; the order inside a bucket is
// unspecified (each token's result does not depend on it).
void group_by_adapter(const int32_t* indices, int64_t tokens, int64_t slots, int32_t* starts, int32_t* adapters,
                      int32_t* order, cudaStream_t stream);
// v [tokens, count * max_rank] fp32 (module i's rows at columns [i * max_rank, (i + 1) * max_rank)), every element
// written. x [tokens, in] contiguous.
void shrink(const void* x, DType dtype, int64_t tokens, int64_t in, const Pool& p, const Modules& m,
            const TokenGroups& g, float* v, int64_t max_rank, cudaStream_t stream);
// One row: s = T(x + residual) -> sum, out = rms_norm(s) (layers.h's add_rms_norm), and v = the narrow shrink of
// out (g holds the row's segment); x, residual, weight, out, sum [cols] contiguous, cols * 4 bytes of shared memory.
void norm_shrink(const void* x, const void* residual, const void* weight, int64_t cols, float eps, void* out,
                 void* sum, DType dtype, const Pool& p, const Modules& m, const TokenGroups& g, float* v,
                 int64_t max_rank, cudaStream_t stream);
// y [tokens, >= column[count]] with row stride ld, updated in place.
void expand(void* y, DType dtype, int64_t tokens, int64_t ld, const float* v, int64_t max_rank, const Pool& p,
            const Modules& m, const float* scales, const TokenGroups& g, cudaStream_t stream);

// y += scale * (x @ A.T) @ B.T in one kernel (shrink and expand, v kept on chip) where the GPU runs thread block
// clusters (sm_90) and the call is a decode's: at most kPerTokenMaxTokens tokens. Returns false, having launched
// nothing, where it does not serve the call: then shrink() and expand() do. x [tokens, in] contiguous; y as
// expand's. num_sms sizes the clusters.
bool apply(void* y, DType dtype, int64_t tokens, int64_t ld, const void* x, int64_t in, const Pool& p,
           const Modules& m, const float* scales, const TokenGroups& g, int64_t max_rank, int num_sms,
           cudaStream_t stream);

}  // namespace lorax::lora::cuda

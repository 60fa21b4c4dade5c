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
  int64_t layers, modules, max_rank_table, chunks;
  int64_t layer, module;
  int page_log2;
};

struct TokenGroups {
  const int32_t* starts;    // [G + 1]
  const int32_t* adapters;  // [G], -1 = none
  const int32_t* order;     // [T] or null (identity)
  int64_t count;            // G
};

void shrink(const void* x, DType dtype, int64_t tokens, int64_t in, const Pool& p, const TokenGroups& g, float* v,
            int64_t max_rank, cudaStream_t stream);
void expand(void* y, DType dtype, int64_t tokens, int64_t out, const float* v, int64_t max_rank, const Pool& p,
            const float* scales, const TokenGroups& g, cudaStream_t stream);

}  // namespace lorax::lora::cuda

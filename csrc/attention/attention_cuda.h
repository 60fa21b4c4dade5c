// Paged KV cache CUDA launchers: raw pointers only (see attention.h for the layout).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace lorax::attention::cuda {

using lorax::DType;

struct Cache {
  const void* k;
  const void* v;
  int64_t blocks, block_size, kv_heads, head_dim;
};

void kv_cache_write(void* k_cache, void* v_cache, const void* k, const void* v, const int64_t* slot_mapping,
                    int64_t tokens, int64_t row, DType dtype, cudaStream_t stream);
void paged_attention_decode(const void* q, void* out, const Cache& c, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* context_lens, int64_t batch, int64_t heads, float scale, int64_t window,
                            DType dtype, cudaStream_t stream);

}  // namespace lorax::attention::cuda

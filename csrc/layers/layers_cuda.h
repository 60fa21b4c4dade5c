// Fused layer op CUDA launchers: raw pointers only (see layers.h for the math). Rows are `stride` elements
// apart; outputs are contiguous.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace lorax::layers::cuda {

using lorax::DType;

// out = norm(x); with residual (non-null): sum = x + residual, out = norm(sum).
void rms_norm(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride, const void* weight,
              void* out, void* sum, int64_t rows, int64_t cols, float eps, DType dtype, cudaStream_t stream);

struct Rotating {  // q or k: [tokens, heads, head_dim] with these strides (head_dim contiguous)
  void* data;
  int64_t heads, token_stride, head_stride;
};

// Where rotary_embedding also stores the rotated k, and v, in the paged KV cache (rotary_kv_cache_write); a null
// k_cache: nowhere.
struct KvWrite {
  void* k_cache;  // [slots, k heads * head_dim], and v_cache alike
  void* v_cache;
  const int64_t* slot_mapping;  // [tokens]: the slot of each token's k and v (< 0: not stored)
  Rotating v;                   // [tokens, k heads, head_dim] (not rotated)
};

void rotary_embedding(Rotating q, Rotating k, const void* cos, const void* sin, const int64_t* positions,
                      int64_t tokens, int64_t head_dim, KvWrite kv, DType dtype, cudaStream_t stream);

void silu_mul(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out, int64_t rows,
              int64_t cols, DType dtype, cudaStream_t stream);

}  // namespace lorax::layers::cuda

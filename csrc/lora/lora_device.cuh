// Device-side reads of the paged adapter pool (lora_cuda.h has its layout), shared by the LoRA kernels and the
// NF4 GEMV, whose epilogue adds the LoRA expand (nf4_kernels.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lora/lora_cuda.h"

namespace lorax::lora::cuda {

// Index of (adapter, p.layer, p.module) in ranks [slots, layers, modules].
__device__ __forceinline__ int64_t layer_module(const Pool& p, int64_t adapter) {
  return (adapter * p.layers + p.layer) * p.modules + p.module;
}

// The adapter's rank at (p.layer, p.module); 0 for none (adapter < 0).
__device__ __forceinline__ int adapter_rank(const Pool& p, int adapter) {
  return adapter < 0 ? 0 : p.ranks[layer_module(p, adapter)];
}

// The pages of row `row` of the adapter's A (ab = 0) or B^T (ab = 1) at (p.layer, p.module): chunk c of the row is
// page row_pages(...)[c].
__device__ __forceinline__ const int32_t* row_pages(const Pool& p, int64_t adapter, int ab, int64_t row) {
  return p.page_table + ((layer_module(p, adapter) * 2 + ab) * p.max_rank_table + row) * p.chunks;
}

// The pool slot of the segment holding row `row`, or -1 (none, or a slot outside the pool's `slots`): as the LoRA
// kernels clamp segments, row m is in segment k when starts[k] <= m < starts[k + 1].
__device__ __forceinline__ int segment_adapter(const int32_t* starts, const int32_t* adapters, int64_t segments,
                                               int64_t slots, int64_t row) {
  for (int64_t k = 0; k < segments; ++k) {
    if (starts[k] <= row && starts[k + 1] > row) {
      const int a = adapters[k];
      return a >= 0 && a < slots ? a : -1;
    }
  }
  return -1;
}

}  // namespace lorax::lora::cuda

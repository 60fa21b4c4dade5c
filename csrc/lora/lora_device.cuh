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

// The pages of row `row` of the adapter's A (ab = 0) or B^T (ab = 1) at (p.layer, p.module): chunk c of the row is
// page row_pages(...)[c].
__device__ __forceinline__ const int32_t* row_pages(const Pool& p, int64_t adapter, int ab, int64_t row) {
  return p.page_table + ((layer_module(p, adapter) * 2 + ab) * p.max_rank_table + row) * p.chunks;
}

}  // namespace lorax::lora::cuda

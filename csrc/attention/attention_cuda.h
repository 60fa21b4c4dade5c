// Paged KV cache CUDA launchers: raw pointers only (see attention.h for the layout).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "lora/lora_cuda.h"

namespace lorax::attention::cuda {

using lorax::DType;

struct Cache {
  const void* k;
  const void* v;
  int64_t blocks, block_size, kv_heads, head_dim;
};

// k / v: token t's row of `row` elements starts at t * k_stride / t * v_stride.
void kv_cache_write(void* k_cache, void* v_cache, const void* k, const void* v, const int64_t* slot_mapping,
                    int64_t tokens, int64_t row, int64_t k_stride, int64_t v_stride, DType dtype, cudaStream_t stream);
// Decode attention's LoRA shrink of its output for the projection that reads it (o_proj): v = out @ A.T of each
// sequence's adapter, out flattened to [batch, heads * head_dim], as sgmv_shrink with one module (pool.module).
// The CTA that writes the output of a (sequence, kv head) adds its heads' columns' share to `shares`, and the last of
// the sequence's kv heads to get there (counters[b], zero and left zero) sums them in kv head order into v.
struct OutputShrink {
  lora::cuda::Pool pool;       // layer and module: the projection's
  const int32_t* seg_starts;   // [segments + 1]: sequence b is in segment k when starts[k] <= b < starts[k + 1]
  const int32_t* seg_slots;    // [segments]
  int64_t segments;
  float* v;                    // [batch, pool.max_rank_table], every element written; null: no shrink
  float* shares;               // [batch, kv_heads, pool.max_rank_table]
  int32_t* counters;           // [batch]
};

// How many splits decode attention cuts each (sequence, kv head) into: a function of the shapes alone (never of
// the context lengths), so CUDA graphs captured once stay valid. With splits > 1 the launch needs a float
// workspace of batch * heads * splits * (head_dim + 2), and merges the splits in a second kernel, or, given
// counters (batch * kv_heads int32, zero; left zero), in the last CTA of each (sequence, kv head) to finish.
// With shrink (not null; needs counters, output_shrink_serves, and arena pages of at least 16 bytes, 16-byte
// aligned), also OutputShrink's shrink of the output, in the same kernel.
int64_t decode_splits(const Cache& c, int64_t batch, int64_t heads, int64_t max_blocks, DType dtype, int num_sms);
void paged_attention_decode(const void* q, void* out, const Cache& c, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* context_lens, int64_t batch, int64_t heads, float scale, int64_t window,
                            float* workspace, int64_t splits, int32_t* counters, const OutputShrink* shrink,
                            DType dtype, cudaStream_t stream);
// Whether the split kernel, which can do OutputShrink's shrink, serves decode attention of this cache and head count.
bool output_shrink_serves(const Cache& c, int64_t heads, DType dtype);

}  // namespace lorax::attention::cuda

// Paged KV cache ops: write new keys/values into their slots, and decode attention over a sequence's blocks.
//
// Layout (lorax_core/engine/kv_cache.py):
//   k_cache, v_cache  [blocks, block_size, kv_heads, head_dim], the model's dtype
//   slot_mapping      int64 [T]: slot = block * block_size + offset of token t (< 0: not stored, e.g. padding)
//   block_tables      int32 [B, max_blocks]: the cache blocks of sequence b, in order
//   context_lens      int32 [B]: tokens of sequence b in the cache, the current one included
// Decode attention: one query token per sequence, grouped-query heads (query head h reads kv head
// h / (heads / kv_heads)), softmax over positions [max(0, len - window), len) (window 0: all), fp32 math.
#pragma once
#include <ATen/ATen.h>

namespace lorax::attention {

struct CacheShape {
  int64_t blocks, block_size, kv_heads, head_dim;
};

// Checks shared by the backends; they return the cache shape.
CacheShape check_kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& slot_mapping);
// The CPU kv_cache_write in its two halves, which rotary_kv_cache_write (layers) runs apart: the checks, slots
// included (they need the slots on the host), so a fused op can refuse bad input before it changes anything; and
// the write, unchecked, given the shape the checks returned.
CacheShape check_kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& slot_mapping);
void write_kv_cache_cpu(const CacheShape& c, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& slot_mapping);
CacheShape check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window);
// Decode attention's optional counters: int32, contiguous, at least batch * kv_heads of them, on q's device, all
// zero between calls (the kernel that uses them puts each back to zero). With them, CUDA merges the splits of a
// (sequence, kv head) in the split kernel's last CTA instead of a second kernel.
void check_counters(const std::optional<at::Tensor>& counters, const at::Tensor& q, const CacheShape& c);

// paged_attention_decode_sgmv_shrink: decode attention, then the LoRA shrink of its output for the projection that
// reads it (o_proj), v = sgmv_shrink(out [batch, heads * head_dim], ...). Its counters are decode attention's and
// then one per sequence: at least batch * (kv_heads + 1).
#define LORAX_ATTENTION_SGMV_SHRINK_PARAMS                                                                           \
  const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache, const at::Tensor &block_tables,      \
      const at::Tensor &context_lens, double scale, int64_t window, const at::Tensor &arena,                       \
      const at::Tensor &page_table, const at::Tensor &ranks, const at::Tensor &seg_starts,                         \
      const at::Tensor &seg_adapters, int64_t layer, at::IntArrayRef modules, int64_t page_size,                   \
      const std::optional<at::Tensor>&counters
void check_shrink_counters(const std::optional<at::Tensor>& counters, const at::Tensor& q, const CacheShape& c);
// The two ops through the dispatcher: the CPU's kernel, and CUDA's where its split kernel does not serve the call.
std::tuple<at::Tensor, at::Tensor> paged_attention_decode_sgmv_shrink_composite(LORAX_ATTENTION_SGMV_SHRINK_PARAMS);

}  // namespace lorax::attention

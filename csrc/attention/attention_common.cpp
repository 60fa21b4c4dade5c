// Input checks of the paged KV cache ops, shared by the CPU and CUDA kernels, and decode attention with the LoRA
// shrink of its output as the two ops.
#include "attention/attention.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "common/checks.h"

namespace lorax::attention {
namespace {

CacheShape check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [blocks, block_size, kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(), op,
              ": v_cache must match k_cache (", k_cache.sizes(), " ", k_cache.scalar_type(), "), got ",
              v_cache.sizes(), " ", v_cache.scalar_type());
  CHECK_FLOAT_INPUT(k_cache);
  CHECK_CONTIGUOUS(k_cache);
  CHECK_CONTIGUOUS(v_cache);
  CHECK_SAME_DEVICE(k_cache, v_cache);
  return {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
}

}  // namespace

CacheShape check_kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& slot_mapping) {
  const CacheShape c = check_caches(k_cache, v_cache, "kv_cache_write");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == c.kv_heads && k.size(2) == c.head_dim && v.sizes() == k.sizes(),
              "kv_cache_write: k and v must be [tokens, ", c.kv_heads, ", ", c.head_dim, "], got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "kv_cache_write: k and v must have the cache's dtype ", k_cache.scalar_type());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.scalar_type() == at::kLong,
              "kv_cache_write: slot_mapping must be int64 [", k.size(0), "], got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  CHECK_SAME_DEVICE(k, k_cache);
  CHECK_SAME_DEVICE(v, k_cache);
  CHECK_SAME_DEVICE(slot_mapping, k_cache);
  return c;
}

CacheShape check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window) {
  const CacheShape c = check_caches(k_cache, v_cache, "paged_attention_decode");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == c.head_dim && q.size(1) % c.kv_heads == 0,
              "paged_attention_decode: q must be [batch, heads, ", c.head_dim, "] with heads a multiple of ",
              c.kv_heads, " kv heads, got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "paged_attention_decode: q is ", q.scalar_type(),
              ", the cache ", k_cache.scalar_type());
  TORCH_CHECK(c.head_dim <= 256, "paged_attention_decode: unsupported shape: head_dim ", c.head_dim,
              " (at most 256)");
  CHECK_DIM(2, block_tables);  // [B, max_blocks]
  CHECK_DTYPE(block_tables, at::kInt);
  CHECK_DTYPE(context_lens, at::kInt);
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.dim() == 1 && context_lens.size(0) == q.size(0),
              "paged_attention_decode: block_tables [", q.size(0), ", max_blocks] and context_lens [", q.size(0),
              "] expected, got ", block_tables.sizes(), " and ", context_lens.sizes());
  TORCH_CHECK(window >= 0, "paged_attention_decode: sliding_window must be >= 0 (0: none), got ", window);
  CHECK_SAME_DEVICE(q, k_cache);
  CHECK_SAME_DEVICE(block_tables, k_cache);
  CHECK_SAME_DEVICE(context_lens, k_cache);
  return c;
}

void check_counters(const std::optional<at::Tensor>& counters, const at::Tensor& q, const CacheShape& c) {
  if (!counters) return;
  TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() &&
                  counters->numel() >= q.size(0) * c.kv_heads,
              "paged_attention_decode: counters must be int32, contiguous, at least batch x kv_heads = ",
              q.size(0) * c.kv_heads, " of them, got ", counters->scalar_type(), " ", counters->sizes());
  CHECK_SAME_DEVICE(q, (*counters));
}

void check_shrink_counters(const std::optional<at::Tensor>& counters, const at::Tensor& q, const CacheShape& c) {
  if (!counters) return;
  TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() &&
                  counters->numel() >= q.size(0) * (c.kv_heads + 1),
              "paged_attention_decode_sgmv_shrink: counters must be int32, contiguous, at least batch x (kv_heads + 1) "
              "= ", q.size(0) * (c.kv_heads + 1), " of them, got ", counters->scalar_type(), " ", counters->sizes());
  CHECK_SAME_DEVICE(q, (*counters));
}

std::tuple<at::Tensor, at::Tensor> paged_attention_decode_sgmv_shrink_composite(LORAX_ATTENTION_SGMV_SHRINK_PARAMS) {
  check_shrink_counters(counters, q, check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, window));
  static auto attend = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::paged_attention_decode", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, double, int64_t,
                                             const std::optional<at::Tensor>&)>();
  static auto shrink = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::sgmv_shrink", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                             at::IntArrayRef, int64_t)>();
  at::Tensor out = attend.call(q, k_cache, v_cache, block_tables, context_lens, scale, window, counters);
  at::Tensor v = shrink.call(out.reshape({out.size(0), -1}), arena, page_table, ranks, seg_starts, seg_adapters, layer,
                             modules, page_size);
  return {out, v};
}

}  // namespace lorax::attention

// Paged KV cache ops on CUDA: checks and tensors to raw pointers; kernels in attention_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#define LORAX_DTYPE_FROM_ATEN
#include "common/dtype.h"

#include "attention/attention.h"
#include "attention/attention_cuda.h"
#include "lora/lora.h"
#include "lora/lora_cuda_args.h"

namespace lorax::attention {
namespace {

void kv_cache_write_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& slot_mapping) {
  const CacheShape c = check_kv_cache_write(k_cache, v_cache, k, v, slot_mapping);
  c10::cuda::CUDAGuard guard(k_cache.device());
  // rows may be strided (k and v are column slices of the qkv projection's output); each row must be dense
  const int64_t row = c.kv_heads * c.head_dim;
  auto dense_rows = [&](const at::Tensor& t) {
    return (t.stride(2) == 1 && t.stride(1) == c.head_dim) || t.size(0) == 0 ? t : t.contiguous();
  };
  const at::Tensor kc = dense_rows(k), vc = dense_rows(v), slots = slot_mapping.contiguous();
  cuda::kv_cache_write(k_cache.data_ptr(), v_cache.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots.data_ptr<int64_t>(),
                       k.size(0), row, kc.stride(0), vc.stride(0), kernel_dtype(k.scalar_type(), "kv_cache_write"),
                       at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Decode attention into out (q's shape), merging the splits in their last CTA where counters are given; with shrink,
// OutputShrink's shrink too (attention_cuda.h has what it needs).
void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, int64_t window,
                const CacheShape& c, int32_t* counters, const cuda::OutputShrink* shrink, at::Tensor& out) {
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const cuda::Cache cache{k_cache.data_ptr(), v_cache.data_ptr(), c.blocks, c.block_size, c.kv_heads, c.head_dim};
  const DType dtype = kernel_dtype(q.scalar_type(), "paged_attention_decode");
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = cuda::decode_splits(cache, q.size(0), q.size(1), tables.size(1), dtype, num_sms);
  at::Tensor ws = at::empty({splits > 1 ? q.size(0) * q.size(1) * splits * (c.head_dim + 2) : 0},
                            q.options().dtype(at::kFloat));
  cuda::paged_attention_decode(qc.data_ptr(), out.data_ptr(), cache, tables.data_ptr<int32_t>(), tables.size(1),
                               lens.data_ptr<int32_t>(), q.size(0), q.size(1), static_cast<float>(scale), window,
                               ws.data_ptr<float>(), splits, counters, shrink, dtype, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t window, const std::optional<at::Tensor>& counters) {
  const CacheShape c = check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, window);
  check_counters(counters, q, c);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  run_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window, c,
             counters ? counters->data_ptr<int32_t>() : nullptr, nullptr, out);
  return out;
}

// The split kernel does the shrink (OutputShrink) given counters, one module, and pages of at least 16 bytes;
// otherwise paged_attention_decode, then sgmv_shrink.
std::tuple<at::Tensor, at::Tensor> paged_attention_decode_sgmv_shrink_cuda(LORAX_ATTENTION_SGMV_SHRINK_PARAMS) {
  const CacheShape c = check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, window);
  check_shrink_counters(counters, q, c);
  const int64_t B = q.size(0), H = q.size(1), elem = q.element_size();
  const cuda::Cache cache{k_cache.data_ptr(), v_cache.data_ptr(), c.blocks, c.block_size, c.kv_heads, c.head_dim};
  const DType dtype = kernel_dtype(q.scalar_type(), "paged_attention_decode_sgmv_shrink");
  const bool fused = counters && modules.size() == 1 && page_size * elem >= 16 &&
                     arena.scalar_type() == q.scalar_type() && cuda::output_shrink_serves(cache, H, dtype) &&
                     reinterpret_cast<uintptr_t>(arena.data_ptr()) % 16 == 0;
  if (!fused)
    return paged_attention_decode_sgmv_shrink_composite(q, k_cache, v_cache, block_tables, context_lens, scale, window,
                                                        arena, page_table, ranks, seg_starts, seg_adapters, layer,
                                                        modules, page_size, counters);
  const lora::PoolView pv{arena, page_table, ranks, layer, modules.vec(), page_size};
  lora::check_pool(pv, {H * c.head_dim}, 0, "paged_attention_decode_sgmv_shrink");  // A's rows read the output
  TORCH_CHECK(arena.device() == q.device(), "paged_attention_decode_sgmv_shrink: the adapter pool is on ",
              arena.device(), ", q on ", q.device());
  const lora::Groups g = lora::groups_from_segments(seg_starts, seg_adapters);
  TORCH_CHECK(g.starts.device() == q.device() && g.adapters.device() == q.device(),
              "paged_attention_decode_sgmv_shrink: the segments are on ", g.adapters.device(), ", q on ", q.device());
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t R = page_table.size(4);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor v = at::empty({B, R}, q.options().dtype(at::kFloat));
  at::Tensor shares = at::empty({B * c.kv_heads * R}, v.options());
  int32_t* count = counters->data_ptr<int32_t>();
  const cuda::OutputShrink shrink{lora::pool_args(pv), g.starts.data_ptr<int32_t>(), g.adapters.data_ptr<int32_t>(),
                                  g.adapters.numel(), v.data_ptr<float>(), shares.data_ptr<float>(),
                                  count + B * c.kv_heads};
  run_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window, c, count, &shrink, out);
  return {out, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CUDA, m) {
  m.impl("kv_cache_write", &kv_cache_write_cuda);
  m.impl("paged_attention_decode", &paged_attention_decode_cuda);
  m.impl("paged_attention_decode_sgmv_shrink", &paged_attention_decode_sgmv_shrink_cuda);
}

}  // namespace lorax::attention

// Paged KV cache ops on the CPU: fp32 math, sequences x heads in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "attention/attention.h"

namespace lorax::attention {

CacheShape check_kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& slot_mapping) {
  const CacheShape c = check_kv_cache_write(k_cache, v_cache, k, v, slot_mapping);
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const int64_t total = c.blocks * c.block_size;
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(sp[t] < total, "kv_cache_write: slot ", sp[t], " of token ", t, " is outside the cache's ", total,
                " slots");
  return c;
}

void write_kv_cache_cpu(const CacheShape& c, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& slot_mapping) {
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t total = c.blocks * c.block_size, row = c.kv_heads * c.head_dim;
  const at::Tensor kept = slots.ge(0).nonzero().squeeze(1);  // tokens that have a slot
  const at::Tensor dst = slots.index_select(0, kept);
  k_cache.view({total, row}).index_copy_(0, dst, k.reshape({-1, row}).index_select(0, kept));
  v_cache.view({total, row}).index_copy_(0, dst, v.reshape({-1, row}).index_select(0, kept));
}

namespace {

void kv_cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slot_mapping) {
  write_kv_cache_cpu(check_kv_cache_write_cpu(k_cache, v_cache, k, v, slot_mapping), k_cache, v_cache, k, v,
                     slot_mapping);
}

template <typename T>
void attend_one(const T* q, const T* kc, const T* vc, const int32_t* blocks, int64_t len, int64_t first,
                const CacheShape& c, int64_t kv_head, float scale, float* scores, T* out) {
  const int64_t D = c.head_dim, token_stride = c.kv_heads * D;
  auto row = [&](const T* cache, int64_t pos) {
    return cache + (int64_t{blocks[pos / c.block_size]} * c.block_size + pos % c.block_size) * token_stride +
           kv_head * D;
  };
  float max_score = -INFINITY;
  for (int64_t pos = first; pos < len; ++pos) {
    const T* kr = row(kc, pos);
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += static_cast<float>(q[d]) * static_cast<float>(kr[d]);
    scores[pos - first] = s * scale;
    max_score = std::max(max_score, s * scale);
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < len - first; ++i) sum += scores[i] = std::exp(scores[i] - max_score);
  std::vector<float> acc(D, 0.0f);
  for (int64_t pos = first; pos < len; ++pos) {
    const T* vr = row(vc, pos);
    const float p = scores[pos - first] / sum;
    for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vr[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d]);
}

at::Tensor paged_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      int64_t window, const std::optional<at::Tensor>& counters) {
  const CacheShape c = check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, window);
  check_counters(counters, q, c);  // unused here: the CPU kernel has no splits to merge
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = c.head_dim, max_blocks = tables.size(1);
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= max_blocks * c.block_size, "paged_attention_decode: context length ", lp[b],
                " of sequence ", b, " must be in 0..", max_blocks * c.block_size,
                " (its block table's capacity; 0 is a padding row)");
    for (int64_t i = 0; i < (lp[b] + c.block_size - 1) / c.block_size; ++i)
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < c.blocks, "paged_attention_decode: block ",
                  tp[b * max_blocks + i], " of sequence ", b, " is outside the cache's ", c.blocks, " blocks");
  }
  at::Tensor out = at::empty_like(qc);
  const int64_t group = H / c.kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_decode_cpu", [&] {
    const scalar_t* kc = k_cache.data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H, len = lp[b];
        const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        scores.resize(len - first);
        attend_one(qc.data_ptr<scalar_t>() + i * D, kc, vc, tp + b * max_blocks, len, first, c, h / group,
                   static_cast<float>(scale), scores.data(), out.data_ptr<scalar_t>() + i * D);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CPU, m) {
  m.impl("kv_cache_write", &kv_cache_write_cpu);
  m.impl("paged_attention_decode", &paged_attention_decode_cpu);
  m.impl("paged_attention_decode_sgmv_shrink", &paged_attention_decode_sgmv_shrink_composite);
}

}  // namespace lorax::attention

// nf4_linear_sgmv composed of the ops that do its parts (nf4_linear, sgmv, silu_mul), and nf4_linear_sgmv_rotary of
// nf4_linear_sgmv and rotary_kv_cache_write: the CPU's kernels, and the CUDA kernels' path for what their fused GEMV
// does not serve (more than 8 rows of x, fp32, odd shapes).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "lora/lora.h"
#include "nf4/nf4.h"

namespace lorax::nf4 {

void check_linear_sgmv(const at::Tensor& x, int64_t out_features, const LoraArgs& l, bool silu_mul) {
  const bool any = l.arena || l.page_table || l.ranks || l.scales || l.seg_starts || l.seg_slots;
  TORCH_CHECK(!any || l.given(),
              "nf4_linear_sgmv: the LoRA arguments (arena, page_table, ranks, scales, seg_starts, seg_slots) come "
              "all together, or none");
  TORCH_CHECK(!l.v || l.given(), "nf4_linear_sgmv: v (the shrink of x) needs the LoRA arguments");
  TORCH_CHECK(!silu_mul || out_features % 2 == 0, "nf4_linear_sgmv: silu_mul needs an even number of outputs (gate "
              "then up), got ", out_features);
  if (!l.given()) return;
  TORCH_CHECK(x.dim() == 2, "nf4_linear_sgmv: with LoRA, x must be [tokens, in], got ", x.sizes());
  TORCH_CHECK(l.columns.size() == l.modules.size() + 1 && !l.columns.empty() && l.columns.front() == 0 &&
                  l.columns.back() == out_features,
              "nf4_linear_sgmv: columns must run from 0 to the ", out_features, " outputs, one more than the ",
              l.modules.size(), " modules; got ", l.columns);
}

at::Tensor linear_sgmv_composite(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s,
                                 int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                 const LoraArgs& l, bool silu_mul) {
  check_linear_sgmv(x, out_features, l, silu_mul);
  using Opt = const std::optional<at::Tensor>&;
  static auto linear = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::nf4_linear", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, Opt, Opt, double,
                                             int64_t, int64_t, c10::SymInt, Opt, at::IntArrayRef,
                                             at::ArrayRef<double>)>();
  at::Tensor y = linear.call(x, codes, s.absmax, s.code2, s.absmax2, s.offset, blocksize, s.blocksize2,
                             c10::SymInt(out_features), bias, s.part_starts, s.part_offsets);
  if (l.v) {
    static auto expand = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lorax_core::sgmv_expand", "")
                             .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, at::IntArrayRef, at::IntArrayRef, int64_t)>();
    expand.call(y, *l.v, *l.arena, *l.page_table, *l.ranks, *l.scales, *l.seg_starts, *l.seg_slots, l.layer,
                l.modules, l.columns, l.page_size);
  } else if (l.given()) {
    static auto sgmv = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::sgmv", "")
                           .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       int64_t, at::IntArrayRef, at::IntArrayRef, int64_t)>();
    sgmv.call(y, x, *l.arena, *l.page_table, *l.ranks, *l.scales, *l.seg_starts, *l.seg_slots, l.layer, l.modules,
              l.columns, l.page_size);
  }
  if (!silu_mul) return y;
  static auto silu = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lorax_core::silu_mul", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const int64_t half = out_features / 2;
  return silu.call(y.narrow(-1, 0, half), y.narrow(-1, half, half));
}

void check_silu_shrink(const at::Tensor& x, const LoraArgs& l, at::IntArrayRef next_modules,
                       const std::optional<at::Tensor>& counters) {
  TORCH_CHECK(l.given(), "nf4_linear_sgmv_silu_shrink: the LoRA arguments (arena, page_table, ranks, scales, "
              "seg_starts, seg_slots) are required: without adapters there is nothing to shrink (use nf4_linear_sgmv)");
  TORCH_CHECK(!next_modules.empty() && next_modules.size() <= lora::kMaxModules,
              "nf4_linear_sgmv_silu_shrink: 1 to ", lora::kMaxModules, " next modules, got ", next_modules.size());
  if (!counters) return;
  TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() && counters->numel() >= 1,
              "nf4_linear_sgmv_silu_shrink: counters must be int32 zeros, contiguous, at least one, got ",
              counters->scalar_type(), " ", counters->sizes());
  TORCH_CHECK(counters->device() == x.device(), "nf4_linear_sgmv_silu_shrink: counters are on ", counters->device(),
              ", x on ", x.device());
}

// nf4_linear_sgmv through the dispatcher (the backend's kernel of it): what the composites below start with.
static at::Tensor call_linear_sgmv(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s,
                                   int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                   const LoraArgs& l, bool silu_mul) {
  using Opt = const std::optional<at::Tensor>&;
  static auto linear_sgmv =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorax_core::nf4_linear_sgmv", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, Opt, Opt, double, int64_t,
                            int64_t, c10::SymInt, Opt, Opt, Opt, Opt, Opt, Opt, Opt, Opt, int64_t, at::IntArrayRef,
                            at::IntArrayRef, int64_t, bool, at::IntArrayRef, at::ArrayRef<double>)>();
  return linear_sgmv.call(x, codes, s.absmax, s.code2, s.absmax2, s.offset, blocksize, s.blocksize2,
                          c10::SymInt(out_features), bias, l.arena, l.page_table, l.ranks, l.scales, l.seg_starts,
                          l.seg_slots, l.v, l.layer, l.modules, l.columns, l.page_size, silu_mul, s.part_starts,
                          s.part_offsets);
}

std::tuple<at::Tensor, at::Tensor> linear_sgmv_silu_shrink_composite(const at::Tensor& x, const at::Tensor& codes,
                                                                     const AbsmaxState& s, int64_t blocksize,
                                                                     int64_t out_features,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     const LoraArgs& l, at::IntArrayRef next_modules) {
  at::Tensor h = call_linear_sgmv(x, codes, s, blocksize, out_features, bias, l, true);
  static auto shrink = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::sgmv_shrink", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                             at::IntArrayRef, int64_t)>();
  at::Tensor v = shrink.call(h, *l.arena, *l.page_table, *l.ranks, *l.seg_starts, *l.seg_slots, l.layer,
                             next_modules, l.page_size);
  return {h, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_heads(const at::Tensor& y, int64_t q_heads, int64_t kv_heads) {
  const int64_t heads = q_heads + 2 * kv_heads, N = y.size(-1);
  TORCH_CHECK(q_heads > 0 && kv_heads > 0 && N % heads == 0 && (N / heads) % 2 == 0,
              "nf4_linear_sgmv_rotary: unsupported shape: ", N, " outputs do not split into ", q_heads, " q heads and ",
              kv_heads, " k and v heads of one even head_dim");
  const int64_t D = N / heads, T = y.size(0);
  auto heads_of = [&](int64_t first, int64_t count) { return y.narrow(1, first * D, count * D).view({T, count, D}); };
  return {heads_of(0, q_heads), heads_of(q_heads, kv_heads), heads_of(q_heads + kv_heads, kv_heads)};
}

at::Tensor linear_sgmv_rotary_composite(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s,
                                        int64_t blocksize, int64_t out_features,
                                        const std::optional<at::Tensor>& bias, const LoraArgs& l, const RotaryArgs& r) {
  TORCH_CHECK(x.dim() == 2, "nf4_linear_sgmv_rotary: x must be [tokens, in], got ", x.sizes());
  at::Tensor y = call_linear_sgmv(x, codes, s, blocksize, out_features, bias, l, false);
  auto [q, k, v] = qkv_heads(y, r.q_heads, r.kv_heads);
  static auto rotary = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::rotary_kv_cache_write", "")
                           .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                       const at::Tensor&)>();
  rotary.call(q, k, v, r.cos, r.sin, r.positions, r.k_cache, r.v_cache, r.slot_mapping);
  return y;
}

}  // namespace lorax::nf4

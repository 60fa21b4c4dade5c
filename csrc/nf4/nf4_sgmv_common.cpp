// nf4_linear_sgmv composed of the ops that do its parts (nf4_linear, sgmv, silu_mul): the CPU's kernel, and the
// CUDA kernel's path for what its fused GEMV does not serve (more than one row of x, fp32, odd shapes).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

at::Tensor linear_sgmv_composite(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                                 double offset, int64_t blocksize, int64_t blocksize2, int64_t out_features,
                                 const std::optional<at::Tensor>& bias, const LoraArgs& l, bool silu_mul) {
  check_linear_sgmv(x, out_features, l, silu_mul);
  using Opt = const std::optional<at::Tensor>&;
  static auto linear = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::nf4_linear", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, Opt, Opt, double,
                                             int64_t, int64_t, c10::SymInt, Opt)>();
  at::Tensor y = linear.call(x, codes, absmax, code2, absmax2, offset, blocksize, blocksize2,
                             c10::SymInt(out_features), bias);
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

}  // namespace lorax::nf4

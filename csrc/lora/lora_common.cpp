// Checks and token grouping shared by the CPU and CUDA LoRA ops (ATen ops only: no device synchronization).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "common/checks.h"
#include "lora/lora.h"

namespace lorax::lora {

void check_pool(const PoolView& p, const std::vector<int64_t>& dims, int64_t ab, const char* op) {
  CHECK_DIM(2, p.arena);       // [pages, page_size]
  CHECK_DIM(6, p.page_table);  // [slots, layers, modules, 2, max_rank, chunks]
  CHECK_DTYPE(p.page_table, at::kInt);
  CHECK_DTYPE(p.ranks, at::kInt);
  TORCH_CHECK(p.ranks.dim() == 3 && p.ranks.size(0) == p.page_table.size(0) && p.ranks.size(1) == p.page_table.size(1) &&
                  p.ranks.size(2) == p.page_table.size(2),
              op, ": ranks must be int32 [slots, layers, modules] matching the page table, got ", p.ranks.sizes());
  CHECK_CONTIGUOUS(p.ranks);
  CHECK_CONTIGUOUS(p.arena);
  CHECK_CONTIGUOUS(p.page_table);
  TORCH_CHECK(p.page_size == p.arena.size(1) && p.page_size > 0 && (p.page_size & (p.page_size - 1)) == 0, op,
              ": page_size must be the arena's row length, a power of two; got ", p.page_size);
  TORCH_CHECK(p.layer >= 0 && p.layer < p.page_table.size(1), op, ": layer ", p.layer, " outside the pool's ",
              p.page_table.size(1), " layers");
  TORCH_CHECK(!p.modules.empty() && p.modules.size() <= kMaxModules, op, ": 1 to ", kMaxModules,
              " modules per call, got ", p.modules.size());
  for (size_t i = 0; i < p.modules.size(); ++i) {
    const int64_t m = p.modules[i], dim = dims[i];
    TORCH_CHECK(m >= 0 && m < p.page_table.size(2), op, ": module ", m, " outside the pool's ", p.page_table.size(2),
                " modules");
    TORCH_CHECK(dim <= p.page_table.size(5) * p.page_size, op, ": unsupported shape: ", ab == 0 ? "in" : "out",
                " features ", dim, " exceed the pool's widest row (", p.page_table.size(5), " pages of ", p.page_size,
                " = ", p.page_table.size(5) * p.page_size, "); build the pool with max_dim >= ", dim);
  }
  CHECK_SAME_DEVICE(p.arena, p.page_table);
  CHECK_SAME_DEVICE(p.arena, p.ranks);
}

void check_activations(const at::Tensor& act, const PoolView& p, const char* op) {
  TORCH_CHECK(act.dim() == 2, op, ": activations must be [tokens, features], got ", act.sizes());
  TORCH_CHECK(act.scalar_type() == p.arena.scalar_type(), op, ": activations are ", act.scalar_type(),
              ", the adapter pool holds ", p.arena.scalar_type());
  TORCH_CHECK(act.device() == p.arena.device(), op, ": activations on ", act.device(), ", the pool on ",
              p.arena.device());
}

void check_expand_pool(const at::Tensor& scales, const PoolView& p, const std::vector<int64_t>& columns,
                       int64_t width, const char* op) {
  TORCH_CHECK(columns.size() == p.modules.size() + 1 && columns.front() >= 0 && columns.back() <= width, op,
              ": columns must hold ", p.modules.size() + 1, " offsets within y's ", width,
              " columns (module i adds to columns [columns[i], columns[i + 1])), got ", columns);
  std::vector<int64_t> outs;
  for (size_t i = 0; i + 1 < columns.size(); ++i) {
    TORCH_CHECK(columns[i] <= columns[i + 1], op, ": columns must not decrease, got ", columns);
    outs.push_back(columns[i + 1] - columns[i]);
  }
  check_pool(p, outs, 1, op);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == p.page_table.size(0), op,
              ": scales must be float32 [slots] with ", p.page_table.size(0), " entries");
  CHECK_SAME_DEVICE(p.arena, scales);
}

void check_shrunk(const at::Tensor& v, int64_t tokens, const PoolView& p, const char* op) {
  const int64_t width = static_cast<int64_t>(p.modules.size()) * p.page_table.size(4);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == tokens && v.size(1) == width && v.scalar_type() == at::kFloat, op,
              ": v must be float32 [", tokens, ", ", width, "] (tokens, modules x the pool's max rank), got ",
              v.scalar_type(), " ", v.sizes());
  CHECK_SAME_DEVICE(p.arena, v);
}

void check_expand_target(const at::Tensor& y, const at::Tensor& scales, const PoolView& p,
                         const std::vector<int64_t>& columns, const char* op) {
  check_activations(y, p, op);
  check_expand_pool(scales, p, columns, y.size(1), op);
  TORCH_CHECK(y.stride(1) == 1 && y.stride(0) >= y.size(1), op,
              ": y's rows must be contiguous (it is updated in place; a column slice of a wider tensor is fine), got "
              "strides ", y.strides());
}

void check_expand_inputs(const at::Tensor& y, const at::Tensor& v, const at::Tensor& scales, const PoolView& p,
                         const std::vector<int64_t>& columns, const char* op) {
  check_expand_target(y, scales, p, columns, op);
  check_shrunk(v, y.size(0), p, op);
}

Groups groups_from_segments(const at::Tensor& seg_starts, const at::Tensor& seg_adapters) {
  TORCH_CHECK(seg_starts.dim() == 1 && seg_adapters.dim() == 1 && seg_starts.numel() == seg_adapters.numel() + 1,
              "sgmv: seg_starts [S + 1] and seg_adapters [S] expected, got ", seg_starts.sizes(), " and ",
              seg_adapters.sizes());
  return {seg_starts.to(at::kInt).contiguous(), seg_adapters.to(at::kInt).contiguous(), at::Tensor()};
}

Groups groups_from_indices(const at::Tensor& adapter_indices, int64_t slots) {
  // key 0 = no adapter; tokens sorted stably by key; group k + 1 = adapter k.
  at::Tensor key = adapter_indices.reshape({-1}).to(at::kLong) + 1;
  at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  at::Tensor counts = at::zeros({slots + 1}, key.options()).index_add_(0, key, at::ones_like(key));
  at::Tensor starts = at::cat({at::zeros({1}, key.options()), at::cumsum(counts, 0)});
  at::Tensor adapters = at::arange(-1, slots, key.options());
  return {starts.to(at::kInt), adapters.to(at::kInt), order.to(at::kInt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_sgmv_shrink_composite(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps, const at::Tensor& arena,
    const at::Tensor& page_table, const at::Tensor& ranks, const at::Tensor& seg_starts,
    const at::Tensor& seg_adapters, int64_t layer, at::IntArrayRef modules, int64_t page_size) {
  static auto norm = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lorax_core::add_rms_norm", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, double)>();
  static auto shrink = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lorax_core::sgmv_shrink", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                             at::IntArrayRef, int64_t)>();
  auto [out, sum] = norm.call(x, residual, weight, eps);
  at::Tensor v = shrink.call(out, arena, page_table, ranks, seg_starts, seg_adapters, layer, modules, page_size);
  return {out, sum, v};
}

}  // namespace lorax::lora
